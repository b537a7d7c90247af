"""``python -m experiments lm-maps``: the library's maps beyond permutations on the causal LM, in its tiny mode."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path


def test_lm_maps_runs_tiny_and_writes_every_row_it_ran(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    rows = ["weight matching (15 sweeps), signed units + refit", "residual orthogonal, head maps, signed units"]
    proc = subprocess.run([sys.executable, "-m", "experiments", "lm-maps", "--tiny", "--seeds", "1", "--learn-steps",
                           "3", "--out", str(tmp_path), "--threads", "1", "--cache", str(tmp_path / "cache"),
                           "--rows", *rows, "learned (500 steps), residual orthogonal, head maps, signed"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "lm_maps.md").read_text()
    number = r"-?[\d.]+ ± [\d.]+"
    for name in (rows[0], "residual orthogonal, head maps, signed units + refit (stream target)",
                 "learned (3 steps), residual orthogonal, head maps, signed units", "parents (mean)", "ensemble"):
        cells = rf"\| {number} \| [\d.]+ \| {number} \| {number} \| {number} \|"
        assert re.search(rf"^\| {re.escape(name)} {cells}$", report, re.M), name
    assert "lm-maps --tiny --seeds 1" in report  # the command that produced it


def test_lm_maps_runs_a_later_seed_alone_and_reports_it_with_an_earlier_run(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    common = ["--tiny", "--seeds", "1", "--threads", "1", "--cache", str(tmp_path / "cache"), "--rows",
              "OT (weights) + refit"]

    def run(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "experiments", "lm-maps", *common, *extra], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("--out", str(tmp_path / "first"))
    run("--seed-from", "1", "--out", str(tmp_path / "second"), "--merge", str(tmp_path / "first" / "lm_maps.json"))
    first = json.loads((tmp_path / "first" / "lm_maps.json").read_text())
    second = json.loads((tmp_path / "second" / "lm_maps.json").read_text())
    assert (first["seeds"], second["seeds"]) == ([0], [1])  # each run's JSON holds its own seeds only
    loss = [first["rows"]["OT (weights) + refit"]["loss"][0], second["rows"]["OT (weights) + refit"]["loss"][0]]
    assert loss[0] != loss[1]  # other parents
    report = (tmp_path / "second" / "lm_maps.md").read_text()
    assert "over 2 seed(s) (seed indices 0, 1; 0 from" in report
    mean, std = statistics.fmean(loss), statistics.stdev(loss)
    assert f"| OT (weights) + refit | {mean:.3f} ± {std:.3f} |" in report
