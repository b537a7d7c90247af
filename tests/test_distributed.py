"""Data-parallel merges: two CPU processes (gloo) give the single-process result, each on its own share of the data.

The processes are real: ``torch.distributed.run`` (torchrun) for ``fuse()`` inside a distributed run, and
``accelerate launch`` for the CLI, as a user starts them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_otfusion import distributed

ROOT = Path(__file__).resolve().parents[1]
SHARE = re.compile(r"rank (\d) of 2: (\w+) batches ([\d,]+|none) of (\d+)")

WORKER = textwrap.dedent('''
    """Fuse two seeded conv/BatchNorm nets with every data-dependent option; alone, or as one of a torchrun's
    processes. Writes each option's fused state (main process) and this process's log of the batches it took."""
    import json, logging, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from hf_otfusion import fuse
    from hf_otfusion.evaluate import evaluate_fusion

    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("hf_otfusion.distributed").addHandler(Keep())
    logging.getLogger("hf_otfusion.distributed").setLevel(logging.INFO)

    def net(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        for bn in (m[1], m[4]):  # BatchNorm statistics that are not the defaults
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        return m.eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (160,), generator=g)
    batches = [x[i : i + 20] for i in range(0, 160, 20)]  # 8 batches: 4 per process
    a, b = net(1), net(2)
    result = {}
    for repair in ("reset_bn", "repair", "refit"):
        for alignment in ("activations", "weights"):
            fused = fuse([a, b], alignment=alignment, calibration=batches, repair=repair, progress=False)
            result[f"{alignment}-{repair}"] = {k: v.tolist() for k, v in fused.state_dict().items()}
    rows = evaluate_fusion([a, b], fused, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 160, 32)],
                           agreement=True)
    result["evaluation"] = [[r.name, r.accuracy, r.loss, r.agreement] for r in rows]
    if rank == 0:
        with open(os.path.join(out, "fused.json"), "w") as f:
            json.dump(result, f)
    with open(os.path.join(out, f"log-{rank}.txt"), "w") as f:
        f.write("\\n".join(lines))
''')


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_OTFUSION_PLAN_CACHE": str(tmp_path / "pc")}


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _shares(text: str, what: str) -> dict[int, list[tuple[set[int], int]]]:
    """rank -> (the batches it took, of how many) for each ``what`` pass it logged."""
    out: dict[int, list[tuple[set[int], int]]] = {}
    for rank, kind, taken, total in SHARE.findall(text):
        if kind == what:
            got = set() if taken == "none" else {int(i) for i in taken.split(",")}
            out.setdefault(int(rank), []).append((got, int(total)))
    return out


def _check_split(shares: dict[int, list[tuple[set[int], int]]], n: int) -> None:
    """Both processes ran every pass, each on its own batches, which together are all the pass's batches; the
    passes over all ``n`` batches gave each process half."""
    assert sorted(shares) == [0, 1]
    assert len(shares[0]) == len(shares[1]) > 0
    halves = 0
    for (mine, total), (theirs, total_1) in zip(shares[0], shares[1], strict=True):
        assert total == total_1 and not mine & theirs and mine | theirs == set(range(total))
        halves += total == n and {len(mine), len(theirs)} <= {n // 2, (n + 1) // 2}
    assert halves > 0


def test_single_process_is_the_identity():
    assert distributed.world() == (0, 1) and distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce(t) is t
    assert distributed.sum_numbers(2, 3.5) == [2, 3.5]
    assert list(distributed.shard(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_fuse_inside_torchrun_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run([sys.executable, str(script), str(tmp_path / "one")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
          str(script), str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "fused.json").read_text())
    two = json.loads((tmp_path / "two" / "fused.json").read_text())
    assert not (tmp_path / "one" / "log-0.txt").read_text()  # one process: nothing split, nothing logged
    logs = (tmp_path / "two" / "log-0.txt").read_text() + "\n" + (tmp_path / "two" / "log-1.txt").read_text()
    _check_split(_shares(logs, "calibration"), 8)
    _check_split(_shares(logs, "evaluation"), 5)
    assert set(one) == set(two)
    for option in one:
        if option == "evaluation":
            continue
        for name, value in one[option].items():
            torch.testing.assert_close(torch.tensor(two[option][name]), torch.tensor(value), rtol=1e-5, atol=1e-5,
                                       msg=f"{option}: {name}")
    moved = [n for n, v in one["activations-refit"].items() if torch.tensor(v).float().abs().sum() > 0]
    assert moved  # the comparison is of real tensors
    for (name, acc, loss, agree), (name2, acc2, loss2, agree2) in zip(one["evaluation"], two["evaluation"],
                                                                       strict=True):
        assert name == name2 and acc == pytest.approx(acc2) and loss == pytest.approx(loss2, rel=1e-6)
        assert agree == pytest.approx(agree2)


def test_accelerate_launch_merge_equals_one_process(tmp_path):
    """The bundled example (activations, BN reset, evaluation) in two processes: OUT written once, by the main
    process, equal to the one-process OUT with the same evaluation table; each process saw half the batches."""
    config = tmp_path / "bn-reset.yml"  # the example with its earlier BN reset (the refit default costs minutes)
    config.write_text((ROOT / "examples/mnist-otfusion.yml").read_text().replace(
        "  solver: emd\n", "  solver: emd\n  repair: reset_bn\n"))
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run([sys.executable, "-m", "hf_otfusion.cli", "merge", str(config), str(one), "-q"], tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_port()), "-m", "hf_otfusion.cli", "merge", str(config), str(two)]
    double = _run(launch, tmp_path)
    _check_split(_shares(double.stderr, "calibration"), 10)  # 1,000 digits in batches of 100
    _check_split(_shares(double.stderr, "evaluation"), 4)
    assert not _shares(single.stderr, "calibration")
    assert double.stdout.count(f"wrote {two}") == 1  # one writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn-reset.yml", "one", "pc", "two"]  # no staging left
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    table = [line for line in single.stdout.splitlines() if line.startswith("|")]
    assert table and table == [line for line in double.stdout.splitlines() if line.startswith("|")]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
