"""docs/architecture.md's worked examples run as written: a repair, a merge method and a solver, each one
registered unit that the config and ``fuse`` then accept by name."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_the_worked_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    try:
        for block in blocks[:-1]:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own examples
    finally:
        with contextlib.suppress(KeyError):  # a block that failed registered less: its error is the one shown
            exec(compile(blocks[-1], str(DOC), "exec"), namespace)  # noqa: S102 - its clean-up block

    from hf_otfusion.registry import MERGE_METHODS, REPAIRS, SOLVERS

    assert "toward_target" not in REPAIRS and "target_only" not in MERGE_METHODS
    assert "sinkhorn_stabilized" not in SOLVERS
