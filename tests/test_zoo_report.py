"""scripts/zoo_report.py, a fast subset: one tiny model of each registry is built, planned, verified, permuted and
fused (rows a report can total), a time-out and a failing build are rows rather than crashes, and the report
replaces only its own section of a markdown file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zr():
    """scripts/zoo_report.py loaded from its file (the tools in scripts/ are run as scripts, not imported from a
    package), after the sibling it imports by name, scripts/zoo_models.py."""
    module = None
    for name in ("zoo_models", "zoo_report"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("registry,name", [("torchvision", "squeezenet1_1"), ("timm", "test_vit"),
                                           ("transformers", "gpt2")])
def test_one_model_of_each_registry_plans_verifies_permutes_and_fuses(zr, registry, name):
    row = zr.survey(registry, name, 30e6)
    assert row["stage"] == "done", row
    assert row["unhandled"] == [] and row["verified"] and row["repaired"] == []
    assert row["perm_change"] < zr.TOLERANCE and row["fuse_change"] < zr.TOLERANCE
    moved, total = row["tensors"]
    assert 0 < moved <= total and row["moved"] == moved  # every tensor the plan names was moved by the permutation
    assert 0 < row["channels"][0] <= row["channels"][1]
    assert not row["vacuous"]


def test_timeouts_errors_and_the_budget_are_rows_and_the_report_totals_them(zr, tmp_path):
    log = tmp_path / "zoo.jsonl"
    echoed: list[str] = []
    rows = zr.run([("timm", "test_resnet"), ("timm", "no_such_model"), ("torchvision", "vit_h_14")], log,
                  timeout=0.01, max_params=30e6, budget=1e9, jobs=2, echo=echoed.append)
    by_name = {r["name"]: r for r in rows}
    assert by_name["test_resnet"]["stage"] == "timeout"
    assert by_name["no_such_model"]["stage"] in ("build", "timeout") and by_name["no_such_model"]["error"]
    assert len(echoed) == 3 and len(log.read_text().splitlines()) == 3
    late = zr.run([("timm", "test_vit")], log, timeout=60, max_params=30e6, budget=0, echo=echoed.append)
    assert late[0]["stage"] == "not run"
    skipped = zr.survey("torchvision", "vit_h_14", 30e6)  # counted on meta: never built
    assert skipped["stage"] == "skipped" and "over the budget" in skipped["error"]
    done = {"registry": "timm", "name": "test_resnet", "stage": "done", "params": 1000, "note": "64px",
            "unhandled": [], "verified": True, "repaired": [], "tensors": [3, 4], "channels": [8, 8], "fixed": [],
            "perm_change": 1e-15, "fuse_change": 0.0, "vacuous": False}
    all_rows = [*map(json.loads, log.read_text().splitlines()), skipped, done]
    totals = zr.totals(all_rows)
    fast = by_name["vit_h_14"]["stage"] == "skipped"  # counted on meta before the time limit (else a timeout)
    assert by_name["vit_h_14"]["stage"] in ("skipped", "timeout")
    assert totals["models"] == 6 and totals["over budget"] == 1 + fast and totals["not run"] == 1
    assert totals["checked"] == 1 and totals["permutation failures"] == 0 and totals["fuse failures"] == 0
    text = zr.render(all_rows, "python scripts/zoo_report.py --log zoo.jsonl", 60, 26)
    assert "| **all** |" in text and "`test_resnet`" in text and "timm sample seed 26" in text
    doc = tmp_path / "architectures.md"
    doc.write_text("# Supported\n\nkept\n")
    zr.write_doc(doc, text)
    zr.write_doc(doc, text.replace("`test_resnet`", "`again`"))
    written = doc.read_text()
    assert written.startswith("# Supported\n\nkept\n") and written.count(zr.BEGIN) == 1 and "`again`" in written
