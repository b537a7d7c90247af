"""Models of different widths fused into the narrowest."""

from __future__ import annotations

import time
from pathlib import Path

from hf_otfusion import ensemble, finetune

from .harness import Ctx, Scorer, Table, archs, fusions, plot_bars, train, write_report


def run(ctx: Ctx) -> Path:
    started = time.perf_counter()
    groups: dict[str, Table] = {}
    for arch in archs(ctx):
        table = groups.setdefault(arch.label, Table())
        for seed in range(ctx.args.seeds):
            parents = [train(ctx, arch, w, 100 * seed + 50 + i) for i, w in enumerate(arch.widths)]
            score = Scorer(ctx, table, parents)
            for w, p in zip(arch.widths, parents, strict=True):
                score(f"parent {arch.describe(w)}", p)
            score("ensemble (all widths)", ensemble(parents))
            fused = fusions(parents, ctx, target=0)
            for name, model in fused.items():
                score(name, model)
            best = fused["OT (activations) + REPAIR"]
            score("OT (activations) + REPAIR + fine-tune",
                  finetune(best, ctx.train_xy, steps=ctx.args.finetune_steps, lr=0.01, seed=seed, progress=False))
    body = ["Every model is fused into the narrowest (the target; the result has its shape). No vanilla average "
            "exists for different widths.", ""]
    for name, table in groups.items():
        body += [f"## {name}", "", *table.markdown([("acc", "test accuracy (%)"),
                                                   ("agree", "agreement with ensemble (%)")]), ""]
    plot_bars(ctx.args.out / "widths.png", groups, None, "acc", "different widths fused into the narrowest")
    body += ["![widths](widths.png)"]
    return write_report(ctx, "widths", "Different widths, fused into the narrowest", body,
                        time.perf_counter() - started)
