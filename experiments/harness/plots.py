"""The experiments' figures: horizontal bars of a table's rows and line plots of series (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .tables import Table


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
