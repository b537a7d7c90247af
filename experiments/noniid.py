"""Non-i.i.d. fusion: one-shot knowledge transfer between models trained on different data. The paper's three
two-model splits (``--split special``: one special digit, its code's personalised split; ``labels``: digits 0-4 /
5-9; ``fraction``: a random 10% / 90% share of the images) and a Dirichlet split over several parties. Each split
writes its own report (``noniid.md``, ``noniid-labels.md``, ``noniid-fraction.md``, ``noniid-dirichlet.md``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average

from .harness import Ctx, Scorer, Table, archs, fusions, plot_bars, plot_lines, predictions, train, write_report

STEMS = {"special": "noniid", "labels": "noniid-labels", "fraction": "noniid-fraction", "dirichlet": "noniid-dirichlet"}
TITLES = {"special": "one special digit", "labels": "digits 0-4 / 5-9", "fraction": "10% / 90% of the images",
          "dirichlet": "a Dirichlet split"}
STREAM_REFIT = "OT (activations) + refit (stream target)"
MATCHED_REFIT = "OT (activations) + weight matching + refit"  # sweeps=15: the activations' similarity counts too
SWEPT = ("vanilla average", "ensemble", "OT (activations)", "OT (activations) + REPAIR", "OT (activations) + refit",
         STREAM_REFIT)


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
    elif a.split == "labels":
        parts = [pool[y[pool] < 5], pool[y[pool] >= 5]]
        text = (f"Model A: every training image of digits 0-4 ({len(parts[0])} images); model B: every training "
                f"image of digits 5-9 ({len(parts[1])} images). This is the paper's heterogeneous label split: each "
                "parent has never seen the other's five classes (its output units for them only learn to stay low).")
    elif a.split == "fraction":
        order = rng.permutation(pool)
        k = int(np.ceil(a.special_frac * len(order)))
        parts = [np.sort(order[:k]), np.sort(order[k:])]
        text = (f"Model A: a random {a.special_frac:.0%} of the training images ({len(parts[0])} images); model B: "
                f"the other {1 - a.special_frac:.0%} ({len(parts[1])} images); both see every digit in about its "
                "share of the data (the paper's unbalanced-data split: one small and one large party, same labels).")
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
             f"epochs scaled by {len(y):,} / its size).")
    return parts, val, text


def digit_masks(ctx: Ctx, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The split's per-group accuracy columns (keyword names for the scorer) on labels ``y``."""
    if ctx.args.split == "special":
        return {"special": y == ctx.args.special, "others": y != ctx.args.special}
    if ctx.args.split == "labels":
        return {"low": y < 5, "high": y >= 5}
    return {}


def group_columns(ctx: Ctx) -> list[tuple[str, str]]:
    if ctx.args.split == "special":
        return [("special", f"digit {ctx.args.special} (%)"), ("others", "other digits (%)")]
    if ctx.args.split == "labels":
        return [("low", "digits 0-4 (%)"), ("high", "digits 5-9 (%)")]
    return []


def candidates_at(parents: list[nn.Module], ctx: Ctx, weights: list[float] | None, streamed: bool
                  ) -> dict[str, nn.Module]:
    """Every method at one weighting of the parents (``streamed``: also the refit with its stream target)."""
    found = {"vanilla average": vanilla_average(parents, weights), "ensemble": ensemble(parents, weights),
             **fusions(parents, ctx, weights=weights, refit=True)}
    found[MATCHED_REFIT] = fuse(parents, weights=weights, alignment="activations", calibration=ctx.calib,
                                example_input=ctx.calib[:2], progress=False, repair="refit", sweeps=15)
    if streamed:
        found[STREAM_REFIT] = fuse(parents, weights=weights, alignment="activations", calibration=ctx.calib,
                                   example_input=ctx.calib[:2], progress=False, repair="refit",
                                   repair_parameters={"target": "stream"})
    return found


def run(ctx: Ctx) -> Path:
    started = time.perf_counter()
    a = ctx.args
    groups: dict[str, Table] = {}
    sweeps: dict[str, dict[str, dict[float, list[float]]]] = {}
    x_test, y_test = ctx.test
    two = a.split != "dirichlet"
    grid = sorted(set(a.sweep)) if two else [None]
    stem = STEMS[a.split]
    text = ""
    for arch in archs(ctx):
        table = groups.setdefault(arch.label, Table())
        sweep = sweeps.setdefault(arch.label, {})
        for seed in range(a.seeds):
            idx, val, text = noniid_split(ctx, seed)
            x_val, y_val = ctx.data.x_train[val], ctx.data.y_train[val]
            # the special split's parents keep their cache names of the earlier runs
            parents = [train(ctx, arch, arch.narrow, 100 * seed + i, subset=f"{a.split}{i}-{seed}", idx=idx[i])
                       for i in range(len(idx))]
            names = ["model A", "model B"] if two else [f"model {i}" for i in range(len(parents))]
            extra = digit_masks(ctx, y_test)
            score = Scorer(ctx, table, parents, [0.5, 0.5] if two else None)
            parent_accs = [score(name, p, **extra) for name, p in zip(names, parents, strict=True)]
            # every method at every weight of model A; each method's weight is chosen on the validation images
            candidates: dict[str, list[tuple[float, float | None, nn.Module]]] = {}
            for w in grid:
                weights = None if w is None else [w, 1 - w]
                for label, model in candidates_at(parents, ctx, weights, arch.has_bn).items():
                    val_acc = (predictions(model, x_val) == y_val).float().mean().item()
                    candidates.setdefault(label, []).append((val_acc, w, model))
                    if w is not None and label in SWEPT:
                        acc = (predictions(model, x_test) == y_test).float().mean().item()
                        sweep.setdefault(label, {}).setdefault(w, []).append(acc)
            for label, options in candidates.items():
                _, w, model = max(options, key=lambda o: (o[0], -abs((o[1] or 0.5) - 0.5)))
                acc = score(label, model, **extra)
                table.add(label, "beats", float(acc > max(parent_accs)))
                table.add(label, "margin", acc - max(parent_accs))
                if w is not None:
                    table.add(label, "weight", w)
    columns = [("acc", "test accuracy, all digits (%)"), *group_columns(ctx)]
    if two:
        columns.append(("weight", "weight of model A"))
    columns += [("agree", "agreement with ensemble (%)"), ("margin", "minus the better parent (points)"),
                ("beats", "better than every parent (seeds)")]
    body = [text, ""]
    if two:
        body += [f"Each fusion (and the vanilla average and the ensemble) uses the weight of model A, among "
                 f"{', '.join(f'{w:g}' for w in grid)}, that is best on the validation images (per seed); the "
                 "ensemble's agreement column refers to the 0.5/0.5 ensemble. The margin column is the test accuracy "
                 "minus that of the better parent of the same seed. No fine-tuning: the fused models never saw a "
                 "training step after fusion. The refit (`repair=\"refit\"`) fits each layer onto the weighted mean "
                 "of the parents' outputs of that layer at the same weights, so its last layer is fitted onto the "
                 "weighted mean of the parents' logits; the stream-target row (ResNet) adds "
                 "`repair_parameters={\"target\": \"stream\"}`. The weight-matching row adds `sweeps=15`: after the "
                 "activations' single pass, weight matching scores each space's map by its weights' similarity plus "
                 "its activations' (`E[a_i b_j]` on the calibration images).", ""]
    for name, table in groups.items():
        body += [f"## {name}", "", *table.markdown(columns, scales={"weight": 1.0, "margin": 100.0, "beats": None}),
                 ""]
    rows = [*(["model A", "model B"] if two else [f"model {i}" for i in range(a.parties)]),
            "vanilla average", "ensemble", "OT (weights)", "OT (weights) + BN reset", "OT (weights) + REPAIR",
            "OT (activations)", "OT (activations) + BN reset", "OT (activations) + REPAIR", "OT (weights) + refit",
            "OT (activations) + refit", MATCHED_REFIT, STREAM_REFIT]
    plot_bars(a.out / f"{stem}.png", groups, rows, "acc", f"non-i.i.d. fusion ({TITLES[a.split]}): accuracy on all "
              "test digits", xlim=(0, 104))
    body += [f"![non-i.i.d. fusion]({stem}.png)", ""]
    if two and any(sweeps.values()):
        panels = {arch: {label: (sorted(v), [100 * statistics.fmean(v[w]) for w in sorted(v)],
                                 [100 * (statistics.stdev(v[w]) if len(v[w]) > 1 else 0.0) for w in sorted(v)])
                         for label, v in series.items()} for arch, series in sweeps.items()}
        hl = {arch: {name: 100 * groups[arch].mean(name, "acc") for name in ("model A", "model B")}
              for arch in sweeps}
        plot_lines(a.out / f"{stem}_weights.png", panels, f"non-i.i.d. ({TITLES[a.split]}): test accuracy vs model "
                   "A's weight", "weight of model A", hlines=hl)
        body += ["Test accuracy on all digits as a function of model A's weight (dashed: the parents):", "",
                 f"![weight sweep]({stem}_weights.png)"]
    return write_report(ctx, "noniid", f"Non-i.i.d. fusion: one-shot knowledge transfer, {TITLES[a.split]}", body,
                        time.perf_counter() - started, stem=stem)
