"""Keep the README's benchmark tables equal to ``benchmarks/results/*.md``.

The README marks each generated block with HTML comments::

    <!-- bench:presets -->
    ...generated, do not edit...
    <!-- /bench:presets -->

:func:`update_readme` replaces every block with the sections :data:`BLOCKS` names from
the matching results file (its preamble of machine, date and commit, and the chosen
``## `` sections with their headings in bold), so a benchmark run that writes to
``benchmarks/results`` also updates the README (``python -m benchmarks`` does this after
each target; ``python -m benchmarks readme`` only re-renders). :func:`stale_blocks`
says which blocks differ from the results (the main test suite checks it is empty).

Only the standard library is imported (the module also runs in ``.bench-venv``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"

#: Block name → (results file, the ``## `` sections it shows, in order; a name also
#: matches the headings that continue it with a colon).
BLOCKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "engine": ("engine.md", ("Time", "Memory")),
    "presets": ("presets.md", ("Time", "Memory", "Cockpit 1.0.2: each instrument alone")),
    "curvature": ("curvature.md", ("Time", "Memory", "Lanczos")),
    "scaling": ("scaling.md", ("Batch size", "Width")),
    "cuda": ("cuda.md", ("B on CUDA",)),
}

_BLOCK = re.compile(
    r"(?P<open><!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- /bench:(?P=name) -->)",
    re.S,
)


def _sections(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """The preamble lines (after the ``# `` title) and ``{heading: body lines}``."""
    preamble: list[str] = []
    sections: dict[str, list[str]] = {}
    current = preamble
    for line in markdown.splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
            continue
        current.append(line)
    return preamble, sections


def render_block(name: str, results: Path = RESULTS) -> str | None:
    r"""The README text of block ``name`` from ``results``; None if its file is missing.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "scaling.md").write_text(
        ...     "# Scaling\n\nmeasured here\n\n## Batch size\n\n| N | x |\n|---|---|\n"
        ...     "\n## Other\n\nleft out\n"
        ... )
        >>> print(render_block("scaling", d))
        measured here
        <BLANKLINE>
        **Batch size**
        <BLANKLINE>
        | N | x |
        |---|---|
        <BLANKLINE>
        >>> render_block("curvature", d) is None
        True
    """
    file, wanted = BLOCKS[name]
    path = results / file
    if not path.exists():
        return None
    preamble, sections = _sections(path.read_text())
    lines = list(preamble)
    for prefix in wanted:  # a prefix: "Batch size" shows "Batch size: A = …" and "…: B = …"
        for heading, body in sections.items():
            if heading == prefix or heading.startswith(prefix + ":"):
                lines += ["", f"**{heading}**", *body]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text + "\n"


def _replace(readme_text: str, results: Path) -> tuple[str, list[str]]:
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise ValueError(f"README block {name!r} is not one of {sorted(BLOCKS)}")
        body = render_block(name, results)
        if body is None:
            warnings.warn(
                f"README block {name!r}: {results / BLOCKS[name][0]} does not exist; kept as is",
                stacklevel=3,
            )
            return m[0]
        if body != m["body"]:
            changed.append(name)
        return m["open"] + body + m["close"]

    text = _BLOCK.sub(sub, readme_text)
    opened = re.findall(r"<!-- bench:([\w-]+) -->", readme_text)
    closed = re.findall(r"<!-- /bench:([\w-]+) -->", readme_text)
    if sorted(opened) != sorted(closed):
        raise ValueError(f"README bench blocks do not pair up: opened {opened}, closed {closed}")
    return text, changed


def stale_blocks(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """Names of the README blocks that differ from what the results render to."""
    return _replace(readme.read_text(), results)[1]


def update_readme(readme: Path = README, results: Path = RESULTS) -> list[str]:
    r"""Re-render every ``<!-- bench:NAME -->`` block of ``readme``; returns the changed ones.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "engine.md").write_text("# E\n\n## Time\n\n| a |\n|---|\n")
        >>> readme = d / "README.md"
        >>> block = "<!-- bench:engine -->\nold\n<!-- /bench:engine -->"
        >>> _ = readme.write_text(f"intro\n{block}\nend\n")
        >>> update_readme(readme, d), update_readme(readme, d)
        (['engine'], [])
        >>> print(readme.read_text())
        intro
        <!-- bench:engine -->
        **Time**
        <BLANKLINE>
        | a |
        |---|
        <!-- /bench:engine -->
        end
        <BLANKLINE>
    """
    text, changed = _replace(readme.read_text(), results)
    if changed:
        readme.write_text(text)
    return changed
