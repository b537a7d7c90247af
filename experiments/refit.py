"""Closed-form layer refit (``repair="refit"``) on the project's MNIST parents: the 2-model i.i.d. table with refit
rows, gap closure, the ridge strength, the prior, the number of calibration samples and RegMean. Writes
docs/results/refit.md.

    python -m experiments refit                     # 3 seeds, MLPNet and the BatchNorm ResNet
    python -m experiments refit --tiny --out /tmp/r  # a smoke run
    python -m experiments refit --archs resnet --widths 16 --out /tmp/r16  # the 16-32-64 ResNet

Gap closure = (fused - vanilla) / (ensemble - vanilla), test accuracy, per seed. Parents, data, calibration and
training are those of the MNIST suite (``experiments.harness``; same seeds: the parents are the i.i.d. experiment's
first two).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_otfusion import ensemble, finetune, fuse, vanilla_average
from hf_otfusion.repairs.refit import REFIT_ALPHA, refit_model

from .harness import ROOT, Ctx, Scorer, Table, arch_widths, context, parse_args, setup_line, train

ALPHAS = (1e-4, 1e-2, 1e-1)
TUNED = ("vanilla average", "OT (activations) + refit")  # the rows fine-tuned (the only gradient steps)
SAMPLES = (100, 300, 4000)


@torch.no_grad()
def kl_to_ensemble(model: nn.Module, ens: nn.Module, x: torch.Tensor) -> float:
    """Mean KL(ensemble || model) of the predicted class probabilities on the test images (nats)."""
    model.eval()
    logp = ens(x)
    return float((logp.exp() * (logp - model(x).log_softmax(-1))).sum(-1).mean())


def run(ctx: Ctx, widths: list[int] | None = None) -> list[str]:
    body: list[str] = []
    for arch, width in arch_widths(ctx, widths):
        table = Table()
        for seed in range(ctx.args.seeds):
            parents = [train(ctx, arch, width, 100 * seed + i) for i in range(2)]
            score = Scorer(ctx, table, parents)
            ens = ensemble(parents)
            x_test = ctx.test[0]
            rows: dict[str, tuple[nn.Module, float]] = {}

            def timed(name: str, fn: Callable[..., nn.Module], *args: object, rows: dict = rows,
                      **kwargs: object) -> None:
                start = time.perf_counter()
                rows[name] = (fn(*args, **kwargs), time.perf_counter() - start)

            calib, example = ctx.calib, ctx.calib[:2]
            kw = dict(calibration=calib, example_input=example, progress=False)
            timed("vanilla average", vanilla_average, parents)
            timed("ensemble", ensemble, parents)
            fix = "reset_bn" if arch.has_bn else "none"
            label = " + BN reset" if arch.has_bn else ""
            timed(f"OT (weights){label}", fuse, parents, alignment="weights", repair=fix, **kw)
            timed(f"OT (activations){label}", fuse, parents, alignment="activations", repair=fix, **kw)
            timed("OT (activations) + REPAIR", fuse, parents, alignment="activations", repair="repair", **kw)
            timed("OT (weights) + refit", fuse, parents, alignment="weights", repair="refit", **kw)
            timed("OT (activations) + refit", fuse, parents, alignment="activations", repair="refit", **kw)
            # the variants, from the same alignment: B carried into A's basis, and the plain average
            plain = fuse(parents, alignment="activations", **kw)
            aligned = [parents[0], fuse(parents, weights=[0, 1], alignment="activations", **kw)]
            timed("vanilla + refit (no alignment)", refit_model, rows["vanilla average"][0], parents, calib)
            timed("RegMean (OT activations, parents' Gram matrices)", refit_model, plain, aligned, calib,
                  inputs="parents")
            for alpha in ALPHAS:
                timed(f"OT (activations) + refit, alpha {alpha:g}", refit_model, plain, aligned, calib, alpha=alpha)
            timed(f"OT (activations) + refit, plain ridge (prior zero, alpha {REFIT_ALPHA:g})", refit_model, plain,
                  aligned, calib, prior="zero")
            for n in SAMPLES:
                pool = ctx.calib_pool[:n]
                timed(f"OT (activations) + refit, {len(pool)} calibration images", fuse, parents,
                      alignment="activations", repair="refit", calibration=pool, example_input=example,
                      progress=False)
            for name in TUNED:  # no fusion time: the fine-tune is training, not fusion
                rows[f"{name} + fine-tune"] = (finetune(rows[name][0], ctx.train_xy, steps=ctx.args.finetune_steps,
                                                        lr=0.01, seed=seed, progress=False), None)
            accs = [score.accuracy(p) for p in parents]
            table.add("parents (mean)", "acc", statistics.fmean(accs))
            acc = {name: score(name, model) for name, (model, _) in rows.items()}
            for name, (model, seconds) in rows.items():
                gap = acc["ensemble"] - acc["vanilla average"]
                table.add(name, "gap", (acc[name] - acc["vanilla average"]) / gap if abs(gap) > 1e-9 else float("nan"))
                table.add(name, "kl", kl_to_ensemble(model, ens, x_test))
                if seconds is not None and name != "ensemble":
                    table.add(name, "time", seconds)
            print(f"[{arch.name} seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()) + "]",
                  file=sys.stderr, flush=True)
        columns = [("acc", "test accuracy (%)"), ("gap", "gap closed (%)"), ("kl", "KL to ensemble (10⁻³ nats)"),
                   ("agree", "agreement with ensemble (%)"), ("time", "fusion time (s)")]
        size = "" if width == arch.narrow else f", {arch.describe(width)}"  # the default width: as in the data line
        body += [f"## {arch.label}{size}, 2 models", "",
                 *table.markdown(columns, scales={"kl": 1000.0, "time": 1.0}), ""]
    return body


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (the suite's, plus ``--out`` and ``--widths``); writes refit.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--widths", type=int, nargs="+", default=None,
                     help="ResNet widths to run (default: the experiments' narrow width)")
    known, rest = own.parse_known_args(argv)
    args = parse_args(["iid", *rest])
    args.out = known.out
    ctx = context(args)
    started = time.perf_counter()
    body = run(ctx, known.widths)
    command = " ".join(argv)
    lines = [
        "# Closed-form layer refit (`repair=\"refit\"`), 2 models i.i.d.",
        "",
        f"Produced by `python -m experiments refit{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); "
        f"every number is the mean ± std over {args.seeds} seed(s), each with new parents (the i.i.d. experiment's "
        "first two).",
        "",
        setup_line(ctx),
        "",
        "Refit: every linear and conv layer re-solved in forward order by ridge least squares so that, on the "
        "unlabelled calibration images as the fused model computes them, its outputs match the mean of the two "
        "parents' outputs of the same layer (conv + BatchNorm fitted as one and folded back). No labels, no "
        f"gradient. Default ridge strength alpha = {REFIT_ALPHA:g} of the Gram matrix's mean diagonal, shrunk "
        "towards the fused weights (prior 'fused'). Gap closed = (fused - vanilla) / (ensemble - vanilla), test "
        "accuracy, per seed. RegMean: the same normal equations from each aligned parent's own inputs "
        "(Jin et al., ICLR 2023, with this ridge instead of its off-diagonal shrinking). Fusion time includes "
        "tracing, alignment and the refit; the variants below the defaults reuse one alignment, so their time is "
        "the refit's alone. The two fine-tuned rows (the only gradient steps in the tables): the vanilla average and "
        "OT (activations) + refit after the fine-tune of the data line.",
        "",
        *body,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refit.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

