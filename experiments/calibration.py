"""Accuracy vs number of calibration samples (activations alignment, REPAIR, BN reset)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hf_otfusion import fuse

from .harness import Ctx, archs, plot_lines, predictions, train, write_report


def run(ctx: Ctx) -> Path:
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
