"""Accuracy along the straight path between two models: vanilla, aligned, + BN reset / REPAIR."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from hf_otfusion import build_plan, fuse, repair_model, reset_norm_stats
from hf_otfusion.testing import seeded
from hf_otfusion.trace import export_model

from .harness import Ctx, archs, plot_lines, predictions, train, write_report


def _blend(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: (1 - t) * v + t * b[k] if v.is_floating_point() else v for k, v in a.items()}


def run(ctx: Ctx) -> Path:
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
