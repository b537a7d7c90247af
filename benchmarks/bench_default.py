"""The default path with data, timed: the bundled example (examples/mnist-otfusion.yml: two timm test_resnet models,
1,000 MNIST digits) merged with alignment: activations and the default repair (the closed-form refit), no
evaluation, against the bare forward passes of both parents over the same calibration inputs.

One run reports the merge's phases (``hf_otfusion.profile``), the bare forward passes (both parents, eager, the
calibration inputs already decoded and preprocessed; best of ``--repeat``), the time to decode and preprocess the
calibration inputs once (included in the merge's activations phase, which reads the data first), and the ratio
(activations + repair) / forward passes.

    python benchmarks/bench_default.py [--repeat 3] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist-otfusion.yml"


def default_config(folder: Path) -> Path:
    """The bundled example with its paths made absolute, without ``repair`` (the default) and ``evaluation``."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.get("parameters", {}).pop("repair", None)
    raw.pop("evaluation", None)
    for entry in raw["models"]:
        entry["model"] = str(ROOT / entry["model"])
    raw["base_model"] = str(ROOT / raw["base_model"])
    raw["calibration"]["dataset"] = str(ROOT / raw["calibration"]["dataset"])
    path = folder / "default.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="forward-pass timings to take the best of")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_otfusion.config import load_config
    from hf_otfusion.merge import calibration_inputs, load_parents, merge
    from hf_otfusion.profile import profiling

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(default_config(Path(tmp)))
        parents = load_parents(config, progress=False)
        start = time.perf_counter()
        batches = list(calibration_inputs(config, parents[config.target_index])[0])
        decode = time.perf_counter() - start
        models = [p.model.eval() for p in parents]
        forward = float("inf")
        with torch.no_grad():
            for m in models:  # warm-up
                m(batches[0])
            for _ in range(args.repeat):
                start = time.perf_counter()
                for m in models:
                    for batch in batches:
                        m(batch)
                forward = min(forward, time.perf_counter() - start)
        out = Path(tmp) / "out"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        with profiling() as prof:
            merge(config, out, progress=False)
        wall = time.perf_counter() - start
    secs = prof.seconds
    data = secs.get("activations", 0.0) + secs.get("repair", 0.0)
    samples = sum(b.shape[0] for b in batches)
    rows = [
        "| what | seconds | / forward passes |",
        "|---|---:|---:|",
        f"| bare forward passes, both parents, {samples} inputs | {forward:.3f} | 1.0x |",
        f"| decode + preprocess the inputs once (in activations) | {decode:.3f} | {decode / forward:.1f}x |",
        f"| merge: activations | {secs.get('activations', 0.0):.3f} | {secs.get('activations', 0.0) / forward:.1f}x |",
        f"| merge: repair (refit) | {secs.get('repair', 0.0):.3f} | {secs.get('repair', 0.0) / forward:.1f}x |",
        f"| **merge: activations + refit** | **{data:.3f}** | **{data / forward:.1f}x** |",
        f"| merge: trace (export, plan) | {secs.get('trace', 0.0):.3f} | {secs.get('trace', 0.0) / forward:.1f}x |",
        f"| merge: whole (load, trace, ..., write) | {wall:.3f} | {wall / forward:.1f}x |",
    ]
    table = "\n".join(rows)
    env = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {sys.platform}"
    print(table)
    print(f"\n{env}")
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(table + f"\n\n{env}\n")


if __name__ == "__main__":
    main()
