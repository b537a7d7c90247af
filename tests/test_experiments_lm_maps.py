"""``python -m experiments lm-maps``: the library's maps beyond permutations on the causal LM, in its tiny mode."""

from __future__ import annotations

import os
import re
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
