"""What a merge produced: :class:`MergeResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..config import MergeConfig
from ..evaluate import EvalRow
from ..plan import AlignmentPlan
from ..sources import ModelInfo


@dataclass
class MergeResult:
    """What a merge produced: the fused model (None when it was streamed from disk to disk), its plan (None for a
    linear merge) and evaluation rows."""

    config: MergeConfig
    parents: list[ModelInfo]
    model: nn.Module | None
    plan: AlignmentPlan | None
    evaluation: list[EvalRow] | None
    out: Path | None
    streamed: bool = False
    maps: list[str] = field(default_factory=list)  # the spaces that took maps other than permutations, and why not

    @property
    def target(self) -> ModelInfo:
        return self.parents[self.config.target_index]
