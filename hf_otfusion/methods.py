"""The merge methods a config's ``merge_method`` names, registered in :data:`hf_otfusion.registry.MERGE_METHODS`.

Each is one :class:`~hf_otfusion.registry.MergeMethod`: ``fn`` merges loaded models in memory, ``streamed`` merges
checkpoints on disk tensor by tensor (both with the contract the record documents), ``parameters`` is the model of
the config's ``parameters:`` section. A new method is one more ``MERGE_METHODS.register(...)`` (here or in a module
of its own listed in the registry); the merge command, ``align``, the card and ``--help`` read it from there.

Example:
    >>> from hf_otfusion.registry import MERGE_METHODS
    >>> MERGE_METHODS.names()
    ('otfusion', 'linear')
    >>> MERGE_METHODS.get("linear").takes_parameters
    False
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import TensorSource
from .config import FusionParameters
from .fuse import fuse, vanilla_average
from .plan import AlignmentPlan
from .registry import MERGE_METHODS, MergeMethod
from .streaming import average_sources, fuse_sources


def linear_merge(models: Sequence[nn.Module], options: None = None, *, target: int = 0,
                 weights: Sequence[float] | None = None, calibration: Any = None, example_input: Any = None,
                 plan: AlignmentPlan | None = None, device: torch.device | str | None = None,
                 progress: bool = True) -> nn.Module:
    """The ``linear`` method in memory: :func:`~hf_otfusion.vanilla_average` (no options, no data, no plan)."""
    return vanilla_average(models, weights=weights)


def linear_streamed(sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], out: str | Path,
                    options: None = None, *, target: int = 0, weights: Sequence[float] | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    max_shard_size: int | str | None = None, progress: bool = True,
                    out_names: Mapping[str, str] | None = None, costs: Any = None) -> None:
    """The ``linear`` method on disk: :func:`~hf_otfusion.streaming.average_sources` (the plans are empty)."""
    average_sources(sources, out, target=target, weights=weights, dtype=dtype, max_shard_size=max_shard_size,
                    progress=progress, out_names=out_names)


OTFUSION = MERGE_METHODS.register(MergeMethod(
    name="otfusion",
    description="model fusion via optimal transport: the neurons of every parent are aligned to the target's, "
    "layer by layer, by an optimal transport map, then the aligned parents are averaged",
    reference="Singh & Jaggi, \"Model Fusion via Optimal Transport\", NeurIPS 2020 (https://arxiv.org/abs/1910.05653)",
    fn=fuse,
    streamed=fuse_sources,
    needs=frozenset({"plan", "example_input"}),
    parameters=FusionParameters,
    label="OT fusion",
    card_title="OT-fused model",
    parent_role="aligned to the target, then averaged",
    tags=("optimal-transport",),
))

LINEAR = MERGE_METHODS.register(MergeMethod(
    name="linear",
    description="a vanilla average: each tensor averaged entry by entry, without aligning the neurons first",
    fn=linear_merge,
    streamed=linear_streamed,
    label="linear merge",
    card_title="Weight-averaged model",
    parent_role="averaged",
))
