"""The README's benchmark tables are the ones in ``benchmarks/results`` (no drift)."""

import re
import warnings

from benchmarks.readme import BLOCKS, README, RESULTS, stale_blocks, update_readme


def test_readme_tables_equal_the_committed_results():
    names = re.findall(r"<!-- bench:([\w-]+) -->", README.read_text())
    assert names, "the README has no generated benchmark blocks"
    for name in names:
        assert (RESULTS / BLOCKS[name][0]).exists(), f"{name}: no results file"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stale = stale_blocks()
    assert stale == [], f"README tables {stale} differ: run `python -m benchmarks readme`"


def test_a_hand_edit_inside_a_block_is_detected_and_undone(tmp_path):
    readme = tmp_path / "README.md"
    text = README.read_text()
    edited = text.replace("| batch L2 |", "| batch L2 (edited) |", 1)
    assert edited != text
    readme.write_text(edited)
    assert stale_blocks(readme) == ["engine"]
    assert update_readme(readme) == ["engine"]
    assert readme.read_text() == text
