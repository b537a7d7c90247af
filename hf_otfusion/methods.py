"""The merge methods a config's ``merge_method`` names, registered in :data:`hf_otfusion.registry.MERGE_METHODS`.

Each is one :class:`~hf_otfusion.registry.MergeMethod`: ``fn`` merges loaded models in memory, ``streamed`` merges
checkpoints on disk tensor by tensor, ``parameters`` is the model of the config's ``parameters:`` section. A new
method is one more ``MERGE_METHODS.register(...)`` (here or in a module of its own listed in the registry).

Example:
    >>> from hf_otfusion.registry import MERGE_METHODS
    >>> MERGE_METHODS.names()
    ('otfusion', 'linear')
    >>> MERGE_METHODS.get("linear").takes_parameters
    False
"""

from __future__ import annotations

from .config import FusionParameters
from .fuse import fuse, vanilla_average
from .registry import MERGE_METHODS, MergeMethod
from .streaming import average_sources, fuse_sources

OTFUSION = MERGE_METHODS.register(MergeMethod(
    name="otfusion",
    description="model fusion via optimal transport: the neurons of every parent are aligned to the target's, "
    "layer by layer, by an optimal transport map, then the aligned parents are averaged",
    reference="Singh & Jaggi, \"Model Fusion via Optimal Transport\", NeurIPS 2020 (https://arxiv.org/abs/1910.05653)",
    fn=fuse,
    streamed=fuse_sources,
    needs=frozenset({"example_input"}),
    parameters=FusionParameters,
    label="OT fusion",
))

LINEAR = MERGE_METHODS.register(MergeMethod(
    name="linear",
    description="a vanilla average: each tensor averaged entry by entry, without aligning the neurons first",
    fn=vanilla_average,
    streamed=average_sources,
    label="linear merge",
))
