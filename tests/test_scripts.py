"""Smoke runs of the scripts with tiny settings: they run end to end and print their tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_mnist_mlp_script(tmp_path):
    out = tmp_path / "mnist.md"
    proc = _run("scripts/mnist_mlp.py", "--pairs", "1", "--epochs", "3", "--out", str(out))
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()
    for row in (
        "parents (mean of the two)",
        "vanilla average",
        "prediction ensemble",
        "OT fusion, weights",
        "OT fusion, activations",
        "OT fusion wide → narrow, weights",
    ):
        match = re.search(rf"\| {re.escape(row)}[^|]* \| ([\d.]+) ± ([\d.]+) \|", report)
        assert match, row
        assert 0.0 <= float(match.group(1)) <= 100.0
    # Three epochs of training already lift the parents far above chance.
    parents = float(re.search(r"\| parents \(mean of the two\) \| ([\d.]+)", report).group(1))
    assert parents > 80.0


def test_bench_script_one_case():
    proc = _run("scripts/bench_fusion.py", "--cases", "mlpnet", "--modes", "weights", "disk", "--threads", "1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| MLPNet")]
    assert len(rows) == 4 and not any("error" in row for row in rows)  # in memory, from disk, two phase rows
    memory = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(memory[3]) > 0 and float(memory[5]) > 0 and float(memory[6]) > 0  # fuse, vanilla, forward (s)
    disk = [c.strip() for c in rows[1].strip("|").split("|")]
    assert float(disk[2]) > 0 and float(disk[3]) > 0 and disk[4].endswith("x")  # fuse, load+save, ratio
