"""``python -m app ROOT [--host 127.0.0.1] [--port 8050] [--refresh 2]``: serve the dashboard."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and serve until interrupted.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.

    """
    parser = argparse.ArgumentParser(
        prog="python -m app", description="Serve the live cockpit dashboard for a log root."
    )
    parser.add_argument("root", help="log root (a directory of run directories)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local)")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between updates")
    args = parser.parse_args(argv)
    log = logging.getLogger("app")  # our own line (Dash prints its own through its logger)
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        return serve(args.root, host=args.host, port=args.port, refresh_s=args.refresh)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
