"""The experiments' one harness: command line and context (``context``), parents (``models``), tables and report
helpers (``tables``) and figures (``plots``). Every experiment module imports what it needs from here."""

from .context import (
    DESCRIPTIONS,
    EXPERIMENTS,
    ROOT,
    Ctx,
    Scorer,
    arch_widths,
    archs,
    context,
    fusions,
    parse_args,
    predictions,
    setup_line,
    train,
    write_index,
    write_report,
)
from .models import ARCHS, Arch, MnistResNet
from .plots import plot_bars, plot_lines
from .tables import Table, finish_report, gap_table, mean_std

__all__ = [
    "ARCHS",
    "DESCRIPTIONS",
    "EXPERIMENTS",
    "ROOT",
    "Arch",
    "Ctx",
    "MnistResNet",
    "Scorer",
    "Table",
    "arch_widths",
    "archs",
    "context",
    "finish_report",
    "fusions",
    "gap_table",
    "mean_std",
    "parse_args",
    "plot_bars",
    "plot_lines",
    "predictions",
    "setup_line",
    "train",
    "write_index",
    "write_report",
]
