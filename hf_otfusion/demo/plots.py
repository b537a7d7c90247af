"""The demo's pictures, as matplotlib figures (built without pyplot, so they are safe in worker threads)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .core import InterpolationCurve

ALIGNED_COLOR = "#d9480f"
VANILLA_COLOR = "#868e96"


def interpolation_figure(curve: InterpolationCurve, pair: tuple[str, str], fused: float | None = None) -> Figure:
    """Accuracy (a language model: token loss) along the straight path from the target (t=0) to the other model
    (t=1), vanilla vs aligned; ``fused``: the fused model's value, in the curve's metric."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    t = np.asarray(curve.t)
    scale = 100 if curve.metric == "accuracy" else 1
    ax.plot(t, scale * np.asarray(curve.aligned), "o-", color=ALIGNED_COLOR, lw=2.2,
            label="aligned: (1-t)·A + t·aligned(B)")
    if curve.vanilla is not None:
        ax.plot(t, scale * np.asarray(curve.vanilla), "s--", color=VANILLA_COLOR, lw=1.8,
                label="vanilla: (1-t)·A + t·B")
    if fused is not None:
        ax.axhline(scale * fused, color=ALIGNED_COLOR, lw=0.8, ls=":", label="fused model (the table)")
    ax.set_xlabel(f"t   (A = {pair[0]},  B = {pair[1]})")
    ax.set_xlim(-0.02, 1.02)
    if curve.metric == "accuracy":
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    else:
        ax.set_ylabel("token loss (nats)")
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center" if curve.metric == "accuracy" else "upper center", fontsize=8, framealpha=0.9)
    title = "Accuracy along the interpolation path" if curve.metric == "accuracy" else \
        "Token loss along the interpolation path (lower is better)"
    if curve.norms_recomputed:
        title += "\n(BatchNorm statistics recomputed on the calibration data at each point)"
    ax.set_title(title, fontsize=10)
    return fig


def transport_map_figure(coupling: Any, space: str, pair: tuple[str, str]) -> Figure:
    """The transport map of one space: rows are B's channels, columns the target A's; mass scaled to 1 per row."""
    t = np.asarray(coupling, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"a transport map is a matrix, got shape {t.shape}")
    scaled = t * t.shape[0]  # a permutation shows as ones
    side = 4.2
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(scaled, cmap="magma_r", vmin=0.0, vmax=max(1.0, float(scaled.max())), interpolation="nearest",
                      aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="mass (× rows)")
    ax.set_xlabel(f"channel of A ({pair[0]})")
    ax.set_ylabel(f"channel of B ({pair[1]})")
    matched = int((t > 0).sum())
    ax.set_title(f"Transport map of space '{space}' ({t.shape[0]}×{t.shape[1]}, {matched} non-zero)", fontsize=10)
    return fig
