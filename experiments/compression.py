"""Compression: a wide model fused into a narrow one, against the narrow model trained alone."""

from __future__ import annotations

import time
from pathlib import Path

from hf_otfusion import finetune

from .harness import Ctx, Scorer, Table, archs, fusions, plot_bars, train, write_report


def run(ctx: Ctx) -> Path:
    started = time.perf_counter()
    groups: dict[str, Table] = {}
    steps = ctx.args.finetune_steps
    for arch in archs(ctx):
        table = groups.setdefault(arch.label, Table())
        for seed in range(ctx.args.seeds):
            wide = train(ctx, arch, arch.wide, 100 * seed + 70)
            narrow = train(ctx, arch, arch.small, 100 * seed + 71)
            score = Scorer(ctx, table, [wide])
            score(f"wide model {arch.describe(arch.wide)}", wide)
            score(f"narrow model {arch.describe(arch.small)}, trained alone", narrow)
            score("narrow, trained alone + fine-tune", finetune(narrow, ctx.train_xy, steps=steps, lr=0.01,
                                                                  seed=seed, progress=False))
            # the wide model alone, transported into the narrow shape (the narrow model only gives the shape)
            only = fusions([wide, narrow], ctx, target=1, weights=[1, 0])
            for name, model in only.items():
                score(f"wide → narrow: {name}", model)
            best = only["OT (activations) + REPAIR"]
            score("wide → narrow: OT (activations) + REPAIR + fine-tune",
                  finetune(best, ctx.train_xy, steps=steps, lr=0.01, seed=seed, progress=False))
            both = fusions([wide, narrow], ctx, target=1)
            for name in ("OT (activations)", "OT (activations) + REPAIR"):
                score(f"wide + narrow fused (1:1): {name}", both[name])
    body = [f"Compression: a wide model transported into a narrow model's shape (fusion weights 1:0, so the narrow "
            f"model only provides the target architecture) or fused with it (1:1), against that narrow model "
            f"trained alone on the same data for the same epochs, with and without the same {steps}-step fine-tune.",
            ""]
    for name, table in groups.items():
        body += [f"## {name}", "", *table.markdown([("acc", "test accuracy (%)"),
                                                   ("agree", "agreement with the wide model (%)")]), ""]
    plot_bars(ctx.args.out / "compression.png", groups, None, "acc", "compression: wide → narrow", xlim=(0, 104))
    body += ["![compression](compression.png)"]
    return write_report(ctx, "compression", "Compression: a wide model into a narrow one", body,
                        time.perf_counter() - started)
