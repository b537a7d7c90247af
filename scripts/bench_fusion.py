"""Wall time and peak memory of OT fusion for a pair of models, against one vanilla average.

Each (model, mode) case runs in a fresh subprocess so that peak memories do not mix. In the
subprocess: build two randomly initialised models (seeds 0 and 1), make the calibration inputs
(random, 200 samples by default: the figures are about speed), note the process's peak RSS, run
``fuse`` once (this includes tracing the plan), note the peak RSS again, then time ``vanilla_average``
(best of 3). "build_plan" is the time of tracing the plan alone (a second, warm trace; ``fuse`` includes
one). "peak RSS" is the subprocess's whole peak (Python, torch, models); "fuse +RSS" is how much
fusing raised it above everything before. On CUDA the peak GPU memory allocated during fuse is also
reported.

    python scripts/bench_fusion.py [--quick] [--device cuda] [--samples 200] [--out bench.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import MLPNet, cifar_resnet18, cifar_resnet50, seeded, vgg
from torch import nn

CASES: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlpnet": ("MLPNet 784-400-200-100-10", lambda: MLPNet(), (1, 28, 28)),
    "vgg11": ("VGG11 (CIFAR, no BN)", lambda: vgg("vgg11"), (3, 32, 32)),
    "resnet18": ("ResNet18 (CIFAR, BN)", lambda: cifar_resnet18(use_norm=True), (3, 32, 32)),
    "resnet18-nonorm": ("ResNet18 (CIFAR, no norms)", lambda: cifar_resnet18(use_norm=False), (3, 32, 32)),
    "resnet50": ("ResNet50 (CIFAR, BN)", lambda: cifar_resnet50(use_norm=True), (3, 32, 32)),
}
QUICK = ["mlpnet", "vgg11", "resnet18-nonorm"]
MODES = ("weights", "activations")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(case: str, mode: str, device_name: str, samples: int, threads: int | None) -> dict:
    """Run one case in this process and return its measurements."""
    from hf_otfusion import build_plan, fuse, vanilla_average

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    _, factory, shape = CASES[case]
    models = [seeded(factory, seed).to(device).eval() for seed in (0, 1)]
    calib = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"example_input": calib[:2]} if mode == "weights" else {"calibration": calib}
    n_params = sum(p.numel() for p in models[0].parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rss_before = _peak_rss_mb()
    _sync(device)
    start = time.perf_counter()
    fused = fuse(models, alignment=mode, device=device, progress=False, **kwargs)
    _sync(device)
    fuse_s = time.perf_counter() - start
    rss_after = _peak_rss_mb()
    cuda_peak = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20 if device.type == "cuda" else None
    with torch.no_grad():
        out = fused.to(device).eval()(calib[:2])
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{case}/{mode}: fused model gives non-finite outputs")
    _sync(device)
    start = time.perf_counter()
    build_plan(models[0], calib[:2])
    _sync(device)
    trace_s = time.perf_counter() - start
    vanilla_times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        vanilla_average(models)
        _sync(device)
        vanilla_times.append(time.perf_counter() - start)
    return {
        "case": case,
        "mode": mode,
        "params": n_params,
        "fuse_s": fuse_s,
        "trace_s": trace_s,
        "vanilla_s": min(vanilla_times),
        "peak_rss_mb": rss_after,
        "fuse_rss_mb": rss_after - rss_before,
        "cuda_peak_mb": cuda_peak,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def run_case(case: str, mode: str, args: argparse.Namespace) -> dict:
    """Run one case in a fresh subprocess; returns its measurements or an error entry."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        case,
        mode,
        "--device",
        args.device,
        "--samples",
        str(args.samples),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"case": case, "mode": mode, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "mode": mode, "error": tail[:200]}
    return json.loads(lines[-1])


def format_table(results: Sequence[dict], samples: int) -> str:
    cuda = any(r.get("cuda_peak_mb") is not None for r in results)
    header = "| model | params | mode | fuse (s) | build_plan (s) | vanilla avg (s) | fuse / vanilla "
    header += "| peak RSS (MB) | fuse +RSS (MB) |"
    rule = "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    if cuda:
        header += " GPU peak (MB) |"
        rule += "---:|"
    lines = [header, rule]
    for r in results:
        name = CASES[r["case"]][0]
        mode = r["mode"] if r["mode"] == "weights" else f"activations ({samples} samples)"
        if "error" in r:
            lines.append(f"| {name} | | {mode} | error: {r['error']} | | | | | |" + (" |" if cuda else ""))
            continue
        ratio = r["fuse_s"] / r["vanilla_s"] if r["vanilla_s"] > 0 else float("inf")
        line = (
            f"| {name} | {r['params'] / 1e6:.2f} M | {mode} | {r['fuse_s']:.2f} | {r['trace_s']:.2f} "
            f"| {r['vanilla_s']:.4f} "
            f"| {ratio:,.0f}x | {r['peak_rss_mb']:,.0f} | {r['fuse_rss_mb']:,.0f} |"
        )
        if cuda:
            line += f" {r['cuda_peak_mb']:,.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=200, help="calibration samples, activations mode")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        case, mode = args.worker
        print(json.dumps(worker(case, mode, args.device, args.samples, args.threads)))
        return 0

    cases = args.cases or (QUICK if args.quick else list(CASES))
    results = []
    for case in cases:
        for mode in args.modes:
            print(f"running {case} / {mode} ...", file=sys.stderr, flush=True)
            result = run_case(case, mode, args)
            print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
    first = next((r for r in results if "error" not in r), {})
    table = format_table(results, args.samples)
    note = (
        f"\nDevice {first.get('device', args.device)}, {first.get('threads', '?')} thread(s), "
        f"torch {torch.__version__}; random-init models, one fuse per case (tracing included), "
        "vanilla average best of 3."
    )
    print(table + "\n" + note)
    if args.out is not None:
        args.out.write_text(table + "\n" + note + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
