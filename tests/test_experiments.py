"""Smoke runs of the MNIST suite (``python -m experiments``) in its tiny mode: every experiment runs end to end and
writes its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("iid", "noniid", "widths", "compression", "calibration", "interpolation")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-m", "experiments", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _cells(report: str, row: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")[1:]]


@pytest.fixture(scope="module")
def mlp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    _run("all", "--tiny", "--archs", "mlp", "--out", str(out))
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_writes_a_report_and_a_figure(mlp_results, name):
    report = (mlp_results / f"{name}.md").read_text()
    assert report.startswith("# ") and f"python -m experiments {name}" in report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert figures and all((mlp_results / f).stat().st_size > 1000 for f in figures)
    numbers = [float(m) for m in re.findall(r"\| (\d+\.\d\d) ± \d+\.\d\d", report)]
    assert numbers and all(0 <= v <= 100 for v in numbers)
    assert f"[{name}]({name}.md)" in (mlp_results / "README.md").read_text()


def test_iid_rows(mlp_results):
    report = (mlp_results / "iid.md").read_text()
    for n in (2, 4):
        assert f"## MLPNet (no norms), {n} models" in report
    for row in ("parents (mean)", "vanilla average", "ensemble", "OT (weights)", "OT (activations) + REPAIR",
                "OT (activations) + REPAIR + fine-tune"):
        assert len(_cells(report, row)) == 2, row
    assert _cells(report, "ensemble")[1] == "100.00 ± 0.00"  # agreement of the ensemble with itself


def test_noniid_columns(mlp_results):
    report = (mlp_results / "noniid.md").read_text()
    assert "every training image of the special digit 9" in report
    assert len(_cells(report, "model A")) == 7  # all digits, digit 9, others, weight, agreement, margin, beats
    assert "held out of both parties as a validation set" in report


def test_resnet_with_batchnorm_rows(tmp_path):
    _run("iid", "--tiny", "--archs", "resnet", "--out", str(tmp_path))
    report = (tmp_path / "iid.md").read_text()
    for row in ("OT (activations) + BN reset", "OT (activations) + REPAIR", "vanilla + REPAIR"):
        assert _cells(report, row), row
    assert "gap recovered" in report


def test_dirichlet_split(tmp_path):
    _run("noniid", "--tiny", "--archs", "mlp", "--split", "dirichlet", "--parties", "3", "--out", str(tmp_path))
    report = (tmp_path / "noniid-dirichlet.md").read_text()
    assert "Dirichlet split over 3 models" in report and _cells(report, "model 2")
    assert not (tmp_path / "noniid.md").exists()  # the special split's report is left alone


@pytest.mark.parametrize(("split", "words", "columns"), [
    ("labels", "every training image of digits 0-4", ["digits 0-4 (%)", "digits 5-9 (%)"]),
    ("fraction", "a random 10% of the training images", []),
])
def test_two_model_splits(tmp_path, split, words, columns):
    _run("noniid", "--tiny", "--archs", "mlp", "--split", split, "--out", str(tmp_path))
    report = (tmp_path / f"noniid-{split}.md").read_text()
    assert words in report and f"python -m experiments noniid --tiny --archs mlp --split {split}" in report
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert all(c in header for c in columns) and "weight of model A" in header
    assert len(_cells(report, "model A")) == 5 + len(columns)  # all digits, groups, weight, agreement, margin, beats
    assert f"noniid-{split}_weights.png" in report and not (tmp_path / "noniid.md").exists()
