"""Where the time and memory of OT fusion go, for pairs of randomly initialised models, against baselines.

Each (model, mode) case runs in a fresh subprocess so that peak memories do not mix. Modes:

- ``weights`` / ``activations``: two models in memory (seeds 0 and 1); ``fuse`` once (tracing included), with
  :mod:`hf_otfusion.profile` recording its phases. Baselines, same process: ``vanilla_average`` (best of 3) and
  one forward pass of one model over the calibration inputs (what any calibration must at least spend).
- ``disk``: weights mode from disk to disk. A first subprocess writes the two checkpoints (safetensors); the
  measured one builds the architecture on the meta device (no weights), traces the plan and runs
  ``fuse_checkpoints``; its peak RSS is the streamed fusion's whole footprint. Baseline: loading both
  checkpoints whole and saving one (``safetensors`` ``load_file`` + ``save_file``), best of 3.
- ``disk-activations``: activations mode from disk to disk, on the same checkpoints: the architecture built with no
  weights (real buffers), its graph run layer by layer on weights read from disk as each node needs them
  (``fuse_checkpoints(..., model=, calibration=)``); same baseline.

"peak RSS" is the subprocess's high-water mark (Python, torch, models); "+RSS" how much the fusion raised it
above everything before. On CUDA the peak GPU memory allocated during fusion is reported too.

    python benchmarks/bench_fusion.py [--quick] [--cases ...] [--modes ...] [--device cuda] [--out docs/bench.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_otfusion.testing import MLPNet, cifar_resnet18, cifar_resnet50, seeded, vgg


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Any]  # (n samples, generator) -> model input
    samples: int  # calibration samples in activations mode (ImageNet-sized models: fewer, the CPU is slow)
    dtype: torch.dtype = torch.float32  # of the models and their checkpoints


def _images(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, gen: torch.randn((n, *shape), generator=gen)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, num_classes=1000)

    return build


def _bert_base() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=2))  # bert-base-uncased's sizes


def _tokens(n: int, gen: torch.Generator, vocab: int = 30522) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (n, 128), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tinyllama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 query heads, 4 kv heads (grouped-query)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


CASES: dict[str, Case] = {
    "mlpnet": Case("MLPNet 784-400-200-100-10", lambda: MLPNet(), _images(1, 28, 28), 200),
    "vgg11": Case("VGG11 (CIFAR, no BN)", lambda: vgg("vgg11"), _images(3, 32, 32), 200),
    "resnet18-nonorm": Case("ResNet18 (CIFAR, no norms)", lambda: cifar_resnet18(use_norm=False), _images(3, 32, 32),
                            200),
    "resnet18-cifar": Case("ResNet18 (CIFAR, BN)", lambda: cifar_resnet18(use_norm=True), _images(3, 32, 32), 200),
    "resnet50-cifar": Case("ResNet50 (CIFAR, BN)", lambda: cifar_resnet50(use_norm=True), _images(3, 32, 32), 200),
    "resnet18": Case("timm resnet18 (224 px)", _timm("resnet18"), _images(3, 224, 224), 32),
    "resnet50": Case("timm resnet50 (224 px)", _timm("resnet50"), _images(3, 224, 224), 32),
    "vit-b16": Case("timm vit_base_patch16_224", _timm("vit_base_patch16_224"), _images(3, 224, 224), 32),
    "bert-base": Case("BERT-base (seq 128)", _bert_base, _tokens, 32),
    "tinyllama-1b": Case("Llama 1.1B, TinyLlama's shape (bf16, seq 128)", _tinyllama,
                         lambda n, gen: _tokens(n, gen, 32000), 32, torch.bfloat16),
}
QUICK = ["mlpnet", "vgg11", "resnet18-nonorm"]
MODES = ("weights", "activations", "disk", "disk-activations")


def _peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _to(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _chunks(x: Any, size: int = 32) -> list[Any]:
    if isinstance(x, dict):
        n = next(iter(x.values())).shape[0]
        return [{k: v[i : i + size] for k, v in x.items()} for i in range(0, n, size)]
    return list(x.split(size))


def _rows(x: Any) -> int:
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def worker(case: str, mode: str, device_name: str, samples: int | None, folder: str | None) -> dict:
    """Run one case in this process and return its measurements."""
    from hf_otfusion import build_plan, fuse, vanilla_average
    from hf_otfusion.profile import profiling

    device = torch.device(device_name)
    spec = CASES[case]
    n = samples or spec.samples
    gen = torch.Generator().manual_seed(0)
    calib = _to(spec.inputs(n, gen), device)
    example = _to(spec.inputs(2, torch.Generator().manual_seed(1)), device)
    if mode.startswith("disk"):
        return _disk_worker(case, spec, device, example, Path(folder), _chunks(calib) if mode != "disk" else None)
    models = [seeded(spec.build, seed).to(device, spec.dtype).eval() for seed in (0, 1)]
    kwargs = {"example_input": example} if mode == "weights" else {"calibration": _chunks(calib)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rss_before = _peak_rss_mb()
    with profiling() as prof:
        start = time.perf_counter()
        fused = fuse(models, alignment=mode, device=device, progress=False, **kwargs)
        _sync(device)
        fuse_s = time.perf_counter() - start
    rss_after = _peak_rss_mb()
    cuda_peak = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20 if device.type == "cuda" else None
    with torch.no_grad():
        out = fused.to(device).eval()(**example) if isinstance(example, dict) else fused.to(device).eval()(example)
    logits = out.logits if hasattr(out, "logits") else out
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{case}/{mode}: the fused model gives non-finite outputs")
    trace_s = _timed(lambda: build_plan(models[0], example), device)
    vanilla_s = _timed(lambda: vanilla_average(models), device, repeat=3)

    def forward() -> None:
        with torch.no_grad():
            for chunk in _chunks(calib):
                models[0](**chunk) if isinstance(chunk, dict) else models[0](chunk)

    forward_s = _timed(forward, device)
    return {
        "case": case, "mode": mode, "params": _params(models[0]), "samples": n, "fuse_s": fuse_s,
        "phases": dict(prof.seconds), "trace_s": trace_s, "vanilla_s": vanilla_s, "forward_s": forward_s,
        "peak_rss_mb": rss_after, "fuse_rss_mb": rss_after - rss_before, "cuda_peak_mb": cuda_peak,
        "device": str(device), "threads": torch.get_num_threads(),
    }


def prepare(case: str, folder: Path) -> None:
    """Write the two checkpoints of a case (seeds 0 and 1) as safetensors, for the ``disk`` mode."""
    from safetensors.torch import save_file

    for seed in (0, 1):
        model = seeded(CASES[case].build, seed).to(CASES[case].dtype)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        seen: set[int] = set()
        unique = {}
        for k, v in state.items():  # tied tensors once, as the libraries save them
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        save_file(unique, str(folder / f"m{seed}.safetensors"), metadata={"format": "pt"})
        del model, state, unique
        gc.collect()


def _disk_worker(case: str, spec: Case, device: torch.device, example: Any, folder: Path,
                 calibration: list | None = None) -> dict:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file, save_file

    from hf_otfusion.plan_cache import cached_plan
    from hf_otfusion.profile import profiling, timed
    from hf_otfusion.streaming import fuse_checkpoints

    with torch.device("meta"):
        empty = spec.build().to(spec.dtype).eval()
    checkpoints = [folder / "m0.safetensors", folder / "m1.safetensors"]
    rss_before = _peak_rss_mb()
    with profiling() as prof:
        start = time.perf_counter()
        if calibration is None:
            with timed("trace"):  # traced on the first run, read from the plan cache ($HF_OTFUSION_PLAN_CACHE) after
                plan = cached_plan(empty, _to(example, torch.device("meta")), sites=False)  # as a streamed merge
            fuse_checkpoints(checkpoints, folder / "fused", plan, device=device, progress=False)
        else:
            with init_empty_weights(include_buffers=False):  # no weights, real buffers (rotary frequencies)
                built = spec.build().eval()
            fuse_checkpoints(checkpoints, folder / "fused", model=built, calibration=calibration, device=device,
                             progress=False)
        _sync(device)
        fuse_s = time.perf_counter() - start
    rss_after = _peak_rss_mb()

    def load_save() -> None:
        states = [load_file(str(c)) for c in checkpoints]
        save_file(states[0], str(folder / "copy.safetensors"), metadata={"format": "pt"})

    load_save_s = _timed(load_save, torch.device("cpu"), repeat=3)
    return {
        "case": case, "mode": "disk" if calibration is None else "disk-activations", "params": _params(empty),
        "samples": sum(_rows(c) for c in calibration or []), "fuse_s": fuse_s,
        "phases": dict(prof.seconds), "load_save_s": load_save_s, "peak_rss_mb": rss_after,
        "fuse_rss_mb": rss_after - rss_before, "checkpoint_mb": sum(c.stat().st_size for c in checkpoints) / 2**20,
        "cuda_peak_mb": None, "device": str(device), "threads": torch.get_num_threads(),
    }


def run_case(case: str, mode: str, args: argparse.Namespace) -> list[dict]:
    """Run one case in fresh subprocesses; returns its measurements (or an error entry). ``disk`` runs twice on
    one empty plan cache: the first run traces the plan, the second reads it from the cache."""
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, "--worker", case, mode, "--device", args.device]
    if args.samples:
        cmd += ["--samples", str(args.samples)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        env = {**os.environ, "HF_OTFUSION_PLAN_CACHE": str(Path(tmp) / "plans")}
        try:
            if mode.startswith("disk"):
                subprocess.run([sys.executable, script, "--prepare", case, tmp], check=True, capture_output=True,
                               timeout=args.timeout)
                cmd += ["--folder", tmp]
            for run in ("traced", "cached") if mode == "disk" else ("traced",):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    return [*out, {"case": case, "mode": mode, "error": tail[:200]}]
                out.append({**json.loads(lines[-1]), "plan": run})
        except subprocess.TimeoutExpired:
            return [*out, {"case": case, "mode": mode, "error": f"timed out after {args.timeout} s"}]
        except subprocess.CalledProcessError as err:
            return [*out, {"case": case, "mode": mode, "error": (err.stderr or b"").decode()[-200:]}]
    return out


PHASES = ("load", "trace", "activations", "cost", "solve", "transport", "average", "write")


def format_table(results: Sequence[dict]) -> str:
    """Two markdown tables: fusion in memory against its baselines, and fusion from disk to disk."""
    cuda = any(r.get("cuda_peak_mb") is not None for r in results)
    head = ("| model | params | mode | fuse (s) | trace (s) | vanilla avg (s) | one forward pass (s) "
            "| fuse / forward | peak RSS (MB) | fuse +RSS (MB) |" + (" GPU peak (MB) |" if cuda else ""))
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    disk = ["| model | checkpoints (MB) | plan | fuse from disk (s) | load 2 + save 1 (s) | fuse / (load+save) "
            "| peak RSS (MB) |", "|---|---:|---|---:|---:|---:|---:|"]
    phases = ["| model | mode | " + " | ".join(PHASES) + " |", "|---|---|" + "---:|" * len(PHASES)]
    for r in results:
        name = CASES[r["case"]].label
        if "error" in r:
            lines.append(f"| {name} | | {r['mode']} | error: {r['error']} |")
            continue
        label = r["mode"] if r.get("plan", "traced") == "traced" else f"{r['mode']} (plan cached)"
        phases.append(f"| {name} | {label} | "
                      + " | ".join(f"{r['phases'].get(p, 0.0):.2f}" for p in PHASES) + " |")
        if r["mode"].startswith("disk"):
            plan = r.get("plan", "traced") if r["mode"] == "disk" else f"activations ({r['samples']} samples)"
            disk.append(f"| {name} | {r['checkpoint_mb']:,.0f} | {plan} | {r['fuse_s']:.2f} "
                        f"| {r['load_save_s']:.3g} "
                        f"| {r['fuse_s'] / r['load_save_s']:,.1f}x | {r['peak_rss_mb']:,.0f} |")
            continue
        mode = r["mode"] if r["mode"] == "weights" else f"activations ({r['samples']} samples)"
        line = (f"| {name} | {r['params'] / 1e6:.1f} M | {mode} | {r['fuse_s']:.2f} | {r['trace_s']:.2f} "
                f"| {r['vanilla_s']:.3g} | {r['forward_s']:.3g} | {r['fuse_s'] / r['forward_s']:,.1f}x "
                f"| {r['peak_rss_mb']:,.0f} | {r['fuse_rss_mb']:,.0f} |")
        lines.append(line + (f" {r['cuda_peak_mb']:,.0f} |" if cuda else ""))
    out = ["In memory:", "", *lines]
    if len(disk) > 2:
        out += ["", "From disk to disk (streamed; weights mode unless it says activations):", "", *disk]
    out += ["", "Phases of the fusion (s; `hf_otfusion.profile`):", "", *phases]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: per case)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each case")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.prepare:
        import hf_otfusion  # noqa: F401 - before timm: makes a CPU torch's torchvision importable

        prepare(args.prepare[0], Path(args.prepare[1]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.samples, args.folder)))
        return 0
    results = []
    for case in args.cases or (QUICK if args.quick else list(CASES)):
        for mode in args.modes:
            print(f"running {case} / {mode} ...", file=sys.stderr, flush=True)
            for result in run_case(case, mode, args):
                results.append(result)
                print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
    first = next((r for r in results if "error" not in r), {})
    note = (f"\nDevice {first.get('device', args.device)}, {first.get('threads', '?')} thread(s), torch "
            f"{torch.__version__}; random-init models, one fusion per case (tracing included), vanilla average "
            "and load+save best of 3.")
    text = format_table(results) + "\n" + note
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
