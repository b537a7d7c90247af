"""i.i.d. fusion: two and four MNIST models trained on the same data from different seeds."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from hf_otfusion import ensemble, finetune, repair_model, vanilla_average

from .harness import Ctx, Scorer, Table, archs, fusions, plot_bars, train, write_report


def run(ctx: Ctx) -> Path:
    started = time.perf_counter()
    groups: dict[str, Table] = {}
    gap: dict[str, Table] = {}
    for arch in archs(ctx):
        for n in (2, 4):
            table = groups.setdefault(f"{arch.label}, {n} models", Table())
            for seed in range(ctx.args.seeds):
                parents = [train(ctx, arch, arch.narrow, 100 * seed + i) for i in range(4)][:n]
                score = Scorer(ctx, table, parents)
                accs = [score.accuracy(p) for p in parents]
                table.add("parents (mean)", "acc", statistics.fmean(accs))
                table.add("best parent", "acc", max(accs))
                vanilla = vanilla_average(parents)
                score("vanilla average", vanilla)
                score("vanilla + REPAIR", repair_model(vanilla, parents, ctx.calib))
                score("ensemble", ensemble(parents))
                fused = fusions(parents, ctx)
                for name, model in fused.items():
                    score(name, model)
                best = fused["OT (activations) + REPAIR"]
                score("vanilla + fine-tune", finetune(vanilla, ctx.train_xy, steps=ctx.args.finetune_steps,
                                                      lr=0.01, seed=seed, progress=False))
                score("OT (activations) + REPAIR + fine-tune",
                      finetune(best, ctx.train_xy, steps=ctx.args.finetune_steps, lr=0.01, seed=seed, progress=False))
                if arch.has_bn:
                    g = gap.setdefault(f"{arch.label}, {n} models", Table())
                    mean_parents = statistics.fmean(accs)
                    for mode in ("weights", "activations"):
                        plain = table.values[f"OT ({mode})"]["acc"][-1]
                        for fix in ("BN reset", "REPAIR"):
                            fixed = table.values[f"OT ({mode}) + {fix}"]["acc"][-1]
                            g.add(f"OT ({mode}) + {fix}", "share", (fixed - plain) / max(mean_parents - plain, 1e-9))
    columns = [("acc", "test accuracy (%)"), ("agree", "agreement with ensemble (%)")]
    body = []
    for name, table in groups.items():
        body += [f"## {name}", "", *table.markdown(columns), ""]
    if gap:
        body += ["## How much of the gap does BN reset / REPAIR recover?", "",
                 "Share of the gap between plain OT fusion and the parents' mean accuracy that BN reset or REPAIR "
                 "closes, (fixed - plain) / (parents - plain), per seed:", ""]
        for name, g in gap.items():
            body += [f"{name}:", "", *g.markdown([("share", "gap recovered (%)")], first="fused model"), ""]
    rows = ["parents (mean)", "vanilla average", "vanilla + REPAIR", "ensemble", "OT (weights)",
            "OT (weights) + BN reset", "OT (weights) + REPAIR", "OT (activations)", "OT (activations) + BN reset",
            "OT (activations) + REPAIR", "vanilla + fine-tune", "OT (activations) + REPAIR + fine-tune"]
    plot_bars(ctx.args.out / "iid.png", groups, rows, "acc", "i.i.d. fusion on MNIST (no retraining unless noted)",
              xlim=(0, 104))
    body += ["![i.i.d. fusion](iid.png)"]
    return write_report(ctx, "iid", "i.i.d. fusion: 2 and 4 models", body, time.perf_counter() - started)
