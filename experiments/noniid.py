"""Non-i.i.d. fusion: one-shot knowledge transfer between models trained on different classes (the
paper's special-digit split, or a Dirichlet split over several parties)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from torch import nn

from hf_otfusion import ensemble, vanilla_average

from .harness import Ctx, Scorer, Table, archs, fusions, plot_bars, plot_lines, predictions, train, write_report


def noniid_split(ctx: Ctx, seed: int) -> tuple[list[np.ndarray], np.ndarray, str]:
    """Training indices of each party, held-out validation indices (in no party), and a description of the split."""
    y = ctx.data.y_train.numpy()
    rng = np.random.default_rng(1000 + seed)
    a = ctx.args
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[: a.val_per_class] for c in range(10)]))
    pool = np.setdiff1d(np.arange(len(y)), val)
    if a.split == "special":
        special = pool[y[pool] == a.special]
        others = rng.permutation(pool[y[pool] != a.special])
        k = int(np.ceil(a.special_frac * len(others)))
        parts = [np.sort(np.concatenate([special, others[:k]])), np.sort(others[k:])]
        text = (f"Model A: every training image of the special digit {a.special} and {a.special_frac:.0%} of the "
                f"others ({len(parts[0])} images); model B: the other {1 - a.special_frac:.0%} of the other digits, "
                f"no {a.special} ({len(parts[1])} images). This is the paper's one-shot knowledge transfer setup "
                "(its code's personalised split).")
    else:
        n = a.parties
        shares: list[list[int]] = [[] for _ in range(n)]
        for c in range(10):
            members = rng.permutation(pool[y[pool] == c])
            cuts = (np.cumsum(rng.dirichlet([a.alpha] * n))[:-1] * len(members)).astype(int)
            for i, chunk in enumerate(np.split(members, cuts)):
                shares[i] += chunk.tolist()
        parts = [np.sort(np.array(p, dtype=np.int64)) for p in shares]
        text = (f"Dirichlet split over {n} models (alpha {a.alpha}): each class's training images are shared out "
                f"with proportions drawn from Dir(alpha); sizes {', '.join(str(len(p)) for p in parts)}.")
    text += (f" {len(val)} training images ({a.val_per_class} per digit) are held out of both parties as a "
             "validation set. Each party trains for as many steps as a parent on the whole training split (its "
             "epochs scaled by 4,000 / its size).")
    return parts, val, text


def run(ctx: Ctx) -> Path:
    started = time.perf_counter()
    a = ctx.args
    groups: dict[str, Table] = {}
    sweeps: dict[str, dict[str, dict[float, list[float]]]] = {}
    x_test, y_test = ctx.test
    special_mask = y_test == a.special
    special = a.split == "special"
    grid = sorted(set(a.sweep)) if special else [None]
    text = ""
    for arch in archs(ctx):
        table = groups.setdefault(arch.label, Table())
        sweep = sweeps.setdefault(arch.label, {})
        for seed in range(a.seeds):
            idx, val, text = noniid_split(ctx, seed)
            x_val, y_val = ctx.data.x_train[val], ctx.data.y_train[val]
            parents = [train(ctx, arch, arch.narrow, 100 * seed + i, subset=f"{a.split}{i}-{seed}", idx=idx[i])
                       for i in range(len(idx))]
            names = ["model A", "model B"] if special else [f"model {i}" for i in range(len(parents))]
            extra = {"special": special_mask, "others": ~special_mask} if special else {}
            score = Scorer(ctx, table, parents, [0.5, 0.5] if special else None)
            parent_accs = [score(name, p, **extra) for name, p in zip(names, parents, strict=True)]
            # every method at every weight of model A; each method's weight is chosen on the validation images
            candidates: dict[str, list[tuple[float, float | None, nn.Module]]] = {}
            for w in grid:
                weights = None if w is None else [w, 1 - w]
                found = {"vanilla average": vanilla_average(parents, weights), "ensemble": ensemble(parents, weights),
                         **fusions(parents, ctx, weights=weights, refit=True)}
                for label, model in found.items():
                    val_acc = (predictions(model, x_val) == y_val).float().mean().item()
                    candidates.setdefault(label, []).append((val_acc, w, model))
                    if w is not None and label in ("vanilla average", "ensemble", "OT (activations)",
                                                   "OT (activations) + REPAIR", "OT (activations) + refit"):
                        acc = (predictions(model, x_test) == y_test).float().mean().item()
                        sweep.setdefault(label, {}).setdefault(w, []).append(acc)
            for label, options in candidates.items():
                _, w, model = max(options, key=lambda o: (o[0], -abs((o[1] or 0.5) - 0.5)))
                acc = score(label, model, **extra)
                table.add(label, "beats", float(acc > max(parent_accs)))
                if w is not None:
                    table.add(label, "weight", w)
    columns = [("acc", "test accuracy, all digits (%)")]
    if special:
        columns += [("special", f"digit {a.special} (%)"), ("others", "other digits (%)"),
                    ("weight", "weight of model A")]
    columns += [("agree", "agreement with ensemble (%)"), ("beats", "better than every parent (seeds)")]
    body = [text, ""]
    if special:
        body += [f"Each fusion (and the vanilla average and the ensemble) uses the weight of model A, among "
                 f"{', '.join(f'{w:g}' for w in grid)}, that is best on the validation images (per seed); the "
                 "ensemble's agreement column refers to the 0.5/0.5 ensemble. No fine-tuning: the fused models never "
                 "saw a training step after fusion.", ""]
    for name, table in groups.items():
        body += [f"## {name}", "", *table.markdown(columns, scales={"weight": 1.0, "beats": None}), ""]
    rows = [*(["model A", "model B"] if special else [f"model {i}" for i in range(a.parties)]),
            "vanilla average", "ensemble", "OT (weights)", "OT (weights) + BN reset", "OT (weights) + REPAIR",
            "OT (activations)", "OT (activations) + BN reset", "OT (activations) + REPAIR", "OT (weights) + refit",
            "OT (activations) + refit"]
    plot_bars(a.out / "noniid.png", groups, rows, "acc", "non-i.i.d. fusion: accuracy on all test digits",
              xlim=(0, 104))
    body += ["![non-i.i.d. fusion](noniid.png)", ""]
    if special and any(sweeps.values()):
        panels = {arch: {label: (sorted(v), [100 * statistics.fmean(v[w]) for w in sorted(v)],
                                 [100 * (statistics.stdev(v[w]) if len(v[w]) > 1 else 0.0) for w in sorted(v)])
                         for label, v in series.items()} for arch, series in sweeps.items()}
        hl = {arch: {name: 100 * groups[arch].mean(name, "acc") for name in ("model A", "model B")}
              for arch in sweeps}
        plot_lines(a.out / "noniid_weights.png", panels, "non-i.i.d.: test accuracy vs model A's weight",
                   "weight of model A (special digit)", hlines=hl)
        body += ["Test accuracy on all digits as a function of model A's weight (dashed: the parents):", "",
                 "![weight sweep](noniid_weights.png)"]
    return write_report(ctx, "noniid", "Non-i.i.d. fusion: one-shot knowledge transfer", body,
                        time.perf_counter() - started)
