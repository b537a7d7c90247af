"""Result tables: values per row and column (one per seed) rendered as markdown 'mean ± std'."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import torch


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


def mean_std(values: Sequence[float]) -> str:
    """'mean ± std' in percent (sample std; 0 for one value)."""
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.fmean(pct):.2f} ± {std:.2f}"


def gap_table(gaps: Sequence[tuple[str, Sequence[float]]]) -> list[str]:
    """Markdown rows: each named per-pair difference (fractions) as 'mean ± std' and its worst pair, in points."""
    out = ["", "| difference (points) | mean ± std | worst pair |", "|---|---:|---:|"]
    return out + [f"| {name} | {mean_std(values)} | {100 * min(values):+.2f} |" for name, values in gaps]


def finish_report(out: list[str], fuse_times: dict[str, list[float]], elapsed: float, path: Path | None) -> str:
    """Add the timing line to a report's lines, print the report and write it to ``path`` when given."""
    out += [
        "",
        f"Fusion time per pair (s): weights {statistics.fmean(fuse_times['weights']):.2f}, "
        f"activations {statistics.fmean(fuse_times['activations']):.2f}; whole run {elapsed:.0f} s "
        f"on {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.",
    ]
    report = "\n".join(out)
    print(report)
    if path is not None:
        path.write_text(report + "\n")
    return report
