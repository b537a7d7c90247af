"""Weight matching by coordinate descent (``fuse(..., sweeps=N)``) on the project's MNIST parents, data-free
alignment: the BatchNorm ResNet (and MLPNet with ``--archs mlp``), sweeps 0 vs N, with and without BN reset.
Writes docs/results/matching.md.

    python -m experiments matching --seeds 3 --archs resnet      # sweeps 0 vs 5
    python -m experiments matching --seeds 3 --archs resnet --widths 8 16 32   # and wider parents
    python -m experiments matching --tiny --out /tmp/m            # a smoke run

Gap closure = (fused - vanilla) / (ensemble - vanilla), test accuracy, per seed. Parents, data, calibration and
training are those of the MNIST suite (``experiments.harness``; same seeds: the i.i.d. experiment's first two
parents).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.matching import recording

from .harness import ROOT, Ctx, Scorer, Table, arch_widths, context, parse_args, setup_line, train


def run(ctx: Ctx, sweeps: int, widths: list[int] | None = None) -> list[str]:
    body: list[str] = []
    for arch, width in arch_widths(ctx, widths):
        table = Table()
        for seed in range(ctx.args.seeds):
            parents = [train(ctx, arch, width, 100 * seed + i) for i in range(2)]
            score = Scorer(ctx, table, parents)
            calib, example = ctx.calib, ctx.calib[:2]
            rows: dict[str, tuple] = {"vanilla average": (vanilla_average(parents), 0.0, None),
                                      "ensemble": (ensemble(parents), 0.0, None)}
            fix = "reset_bn" if arch.has_bn else "none"
            label = " + BN reset" if arch.has_bn else ""
            for n in sorted({0, sweeps}):
                for repair in dict.fromkeys(["none", fix]):
                    start = time.perf_counter()
                    with recording() as log:
                        model = fuse(parents, alignment="weights", repair=repair, sweeps=n, calibration=calib,
                                     example_input=example, progress=False)
                    name = f"OT (weights), sweeps={n}" + (label if repair != "none" else "")
                    rows[name] = (model, time.perf_counter() - start, log[0] if log else None)
            accs = [score.accuracy(p) for p in parents]
            table.add("parents (mean)", "acc", statistics.fmean(accs))
            acc = {name: score(name, model) for name, (model, _, _) in rows.items()}
            gap = acc["ensemble"] - acc["vanilla average"]
            for name, (_, seconds, result) in rows.items():
                table.add(name, "gap", (acc[name] - acc["vanilla average"]) / gap if abs(gap) > 1e-9 else float("nan"))
                if name not in ("ensemble", "vanilla average"):
                    table.add(name, "time", seconds)
                if result is not None:
                    table.add(name, "j0", result.objective[0])
                    table.add(name, "j", result.objective[-1])
                    table.add(name, "sweeps", len(result.changed))
            print(f"[{arch.name} seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()) + "]",
                  file=sys.stderr, flush=True)
        columns = [("acc", "test accuracy (%)"), ("gap", "gap closed (%)"), ("j0", "similarity, single pass"),
                   ("j", "similarity, after descent"), ("sweeps", "sweeps run"), ("time", "fusion time (s)")]
        body += [f"## {arch.label}, {arch.describe(width)}, 2 models", "",
                 *table.markdown(columns, scales={"time": 1.0, "j0": 1.0, "j": 1.0, "sweeps": 1.0}), ""]
    return body


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (the suite's, plus ``--out``, ``--sweeps``, ``--widths``)."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--sweeps", type=int, default=5)
    own.add_argument("--widths", type=int, nargs="+", default=None,
                     help="ResNet widths to run (default: the experiments' narrow width)")
    known, rest = own.parse_known_args(argv)
    args = parse_args(["iid", *rest])
    args.out = known.out
    ctx = context(args)
    started = time.perf_counter()
    body = run(ctx, known.sweeps, known.widths)
    command = " ".join(a for a in argv if not a.startswith("--cache") and "cache" not in a)
    lines = [
        "# Weight matching by coordinate descent (`sweeps`), 2 models i.i.d., data-free alignment",
        "",
        f"Produced by `python -m experiments matching{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); "
        f"every number is the mean ± std over {args.seeds} seed(s), each with new parents (the i.i.d. experiment's "
        "first two).",
        "",
        setup_line(ctx),
        "",
        f"`sweeps={known.sweeps}`: after the single weights-mode pass, every space (a head group as one) is revisited "
        "in a seeded random order with all other maps held and re-solved by the assignment that maximises the summed "
        "inner products of the target's and the other model's tensors along every member axis (Git Re-Basin weight "
        "matching, Ainsworth et al. ICLR 2023, Alg. 1); kept only if the total weight similarity rises; stops after "
        "a sweep that changes nothing. Similarity: sum of <W_target, W_other aligned> over every tensor with an "
        "axis in a space (running statistics included). Gap closed = (fused - vanilla) / (ensemble - vanilla), "
        "test accuracy, per seed. BN reset: running statistics recomputed on the calibration images (the only data "
        "used).",
        "",
        *body,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matching.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

