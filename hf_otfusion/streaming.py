"""Fusion of checkpoints on disk, tensor by tensor: peak memory near the tensors in flight, not N models.

Every parent's weights are read lazily from its safetensors files; each fused tensor is written to its place in
the output checkpoint as soon as every space it belongs to is solved. The plan is the caller's (the ``merge``
command traces it on an *empty* target, built on the ``meta`` device: see :mod:`hf_otfusion.merge.streamed`).
Activations alignment runs each parent's graph on a *hollow* build (no weights in memory, real buffers), layer by
layer, with every weight read from disk when its node runs; the costs then drive the same streamed walk.
The engine is the one :func:`~hf_otfusion.fuse` uses (:func:`~hf_otfusion.engine.align_sources`), so a merge
streamed from disk gives the in-memory path's tensors, bit for bit.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from tqdm.auto import tqdm

from .activations import activation_statistics, first_batch
from .checkpoint import CheckpointError, SafetensorsSource, ShardedWriter, TensorSource
from .config import FusionParameters, resolve_options
from .engine import Residual, align_sources, check_compatible, check_finite
from .errors import FusionError
from .fuse import average_tensor, normalized_weights
from .graph import Runner
from .output import scratch_prefix
from .plan import AlignmentPlan
from .profile import timed
from .sources import unwritten_parameters
from .trace import build_plan, export_model


class ParentSource:
    """A parent's checkpoint as its loaded model sees it: tensors by state-dict name (``names``: checkpoint name ->
    state-dict name), floating ones read as float32, as :func:`~hf_otfusion.sources.load_model` loads them."""

    def __init__(self, source: TensorSource, names: dict[str, str]):
        self.source = source
        self.files = {model: file for file, model in names.items()}

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.files[name])

    def dtype(self, name: str) -> torch.dtype:
        dtype = self.source.dtype(self.files[name])
        return torch.float32 if dtype.is_floating_point else dtype

    def get(self, name: str) -> torch.Tensor:
        t = self.source.get(self.files[name])
        return t.float() if t.is_floating_point() else t


def fuse_sources(
    sources: Sequence[TensorSource],
    plans: Sequence[AlignmentPlan],
    out: str | Path,
    options: FusionParameters | None = None,
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_shard_size: int | str | None = None,
    progress: bool = True,
    out_names: Mapping[str, str] | None = None,
    costs: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    **overrides: Any,
) -> list[Path]:
    """Fuse tensor sources into a safetensors checkpoint in ``out``, each tensor written as soon as it is final.

    The tensors written are the target source's, in its order (``dtype``: floating tensors cast to it; named
    ``out_names[name]`` when given). ``costs``: activation costs per model and space (activations alignment, see
    :func:`~hf_otfusion.activations.activation_statistics`); weights alignment without. ``options`` and ``overrides``
    (``FusionParameters`` field names: ``solver``, ``reg``, ``marginals``, ``match_heads``, ``residual``,
    ``sweeps``) as in :func:`~hf_otfusion.fuse`, validated once; no repair (it needs the fused model in memory).
    Returns the files written (the shards, then the index when sharded).
    """
    opts = _disk_options(options, overrides, "fuse_sources")
    w = normalized_weights(weights, len(sources))
    for i, (source, plan) in enumerate(zip(sources, plans, strict=True)):
        _check_shapes(source, plan, i)
    ref = sources[target]
    names = ref.keys()

    def out_dtype(name: str) -> torch.dtype:
        return dtype if dtype is not None and ref.dtype(name).is_floating_point else ref.dtype(name)

    written = dict(out_names or {})
    layout = [(written.get(n, n), ref.shape(n), out_dtype(n)) for n in names]
    with ShardedWriter(out, layout, max_shard_size=max_shard_size) as writer:

        def write(name: str, values: list[torch.Tensor]) -> None:
            fused = average_tensor(values, w, values[target])
            with timed("write"):
                writer.write(written.get(name, name), fused.to(out_dtype(name)))

        align_sources(sources, plans, write, target=target, costs=costs, options=opts, device=device,
                      progress=progress, couplings=False)
        with timed("write"):
            return writer.close()


def average_sources(
    sources: Sequence[TensorSource],
    out: str | Path,
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = True,
    out_names: Mapping[str, str] | None = None,
) -> list[Path]:
    """The weighted average of tensor sources with no alignment (a linear merge), written to a safetensors
    checkpoint in ``out`` one tensor at a time: each parent's tensor is read once, the result written once.

    The tensors are the target source's, in its order, as :func:`fuse_sources` writes them; a source without one of
    them, or with another shape, is a ``CheckpointError``; NaN or infinite values are refused. Integer tensors are
    the target's."""
    w = normalized_weights(weights, len(sources))
    ref = sources[target]
    names = ref.keys()
    for i, source in enumerate(sources):
        keys = set(source.keys())
        for name in names:
            if name not in keys or tuple(source.shape(name)) != tuple(ref.shape(name)):
                raise CheckpointError(f"a linear merge needs identical shapes: model {i} differs at {name!r}")

    def out_dtype(name: str) -> torch.dtype:
        return dtype if dtype is not None and ref.dtype(name).is_floating_point else ref.dtype(name)

    written = dict(out_names or {})
    layout = [(written.get(n, n), ref.shape(n), out_dtype(n)) for n in names]
    with ShardedWriter(out, layout, max_shard_size=max_shard_size) as writer:
        for name in tqdm(names, desc="averaging", disable=not progress):
            with timed("load"):
                values = [source.get(name) for source in sources]
            for i, value in enumerate(values):
                check_finite(value, i, name)
            with timed("average"):
                fused = average_tensor(values, w, values[target])
            with timed("write"):
                writer.write(written.get(name, name), fused.to(out_dtype(name)))
        with timed("write"):
            return writer.close()


def _disk_options(options: FusionParameters | None, overrides: Mapping[str, Any], caller: str,
                  calibrated: bool = False) -> FusionParameters:
    """The fusion options of a fusion from disk, validated once; a ``FusionError`` for a repair (it runs the fused
    model, which a fusion from disk never holds)."""
    opts = resolve_options(options, overrides, caller=caller)
    if opts.repair != "none":
        raise FusionError(f"{caller} writes the aligned average tensor by tensor: repair {opts.repair!r} needs the "
                          "fused model in memory (use fuse)")
    if opts.residual == "orthogonal" or opts.head_maps != "permutation" or opts.hidden_maps != "permutation":
        raise FusionError(f"{caller} reads tensors from disk as the plan needs them: residual='orthogonal', "
                          "head_maps='orthogonal' and hidden_maps='signed' are checked on the model and need the "
                          "models in memory (use fuse)")
    if opts.sweeps and (opts.alignment == "activations" or calibrated):
        raise FusionError(f"{caller}: weight matching (sweeps) on activations adds their similarities to the "
                          "weights', which needs the models in memory (use fuse)")
    return opts


def _check_shapes(source: TensorSource, plan: AlignmentPlan, index: int) -> None:
    """The source holds exactly the plan's tensors (tied aliases aside), with the plan's shapes."""
    expected = {name: tuple(shape) for name, shape in plan.tensors.items() if name not in plan.aliases}
    found = set(source.keys())
    for name in sorted(set(expected) ^ found):
        where = "has no tensor" if name in expected else "has a tensor the plan does not know:"
        raise CheckpointError(f"checkpoint {index} {where} {name!r}; it does not fit the plan")
    for name, shape in expected.items():
        if tuple(source.shape(name)) != shape:
            raise CheckpointError(f"checkpoint {index}: tensor {name!r} has shape {tuple(source.shape(name))}, its "
                                  f"plan says {shape}")


def fuse_checkpoints(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    plan: AlignmentPlan | None = None,
    *,
    plans: Sequence[AlignmentPlan] | None = None,
    target: int = 0,
    model: nn.Module | None = None,
    calibration: Any = None,
    options: FusionParameters | None = None,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_shard_size: int | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[Path]:
    """Fuse safetensors checkpoints on disk into one, reading and writing one tensor at a time.

    Weights alignment by default: peak memory is the tensors of the spaces being solved, whatever the size or
    number of the checkpoints. With ``calibration`` (activations alignment), ``model`` is the architecture built
    without weights but with its buffers (``accelerate.init_empty_weights(include_buffers=False)``); its graph
    is exported on the first calibration batch and run layer by layer on each checkpoint's weights, read from disk
    as each node needs them, so memory holds one layer's activations and the statistics of the spaces in flight,
    never a model (see :func:`~hf_otfusion.activations.activation_statistics`, ``layerwise``). The checkpoints must then
    share the architecture's widths.

    Args:
        checkpoints: checkpoint folders (``model.safetensors`` or a sharded index) or ``.safetensors`` files.
        out: the folder to write ``model.safetensors`` (or shards and their index) into.
        plan: the target's alignment plan, e.g. ``build_plan`` of the architecture built on the meta device
            (activations alignment: traced from ``model`` when omitted).
        plans: one plan per checkpoint when widths differ (default: ``plan`` for all).
        target: the checkpoint whose widths, tensor names and order the result keeps.
        model: activations alignment: the architecture, built without weights (see above).
        calibration: activations alignment: model inputs (a tensor, a dict of keyword tensors, or an iterable of
            batches), as for :func:`~hf_otfusion.fuse`.
        options: the fusion options (a ``FusionParameters``, as for :func:`~hf_otfusion.fuse`; the alignment is
            activations when ``calibration`` is given, else weights; no repair).
        weights, dtype, device, max_shard_size, progress: as in :func:`fuse_sources`.
        **overrides: fields of ``FusionParameters`` by name over ``options`` (``solver``, ``reg``, ``marginals``,
            ``match_heads``, ``residual``, ``standardize``, ``sweeps``), validated once with them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import build_plan
        >>> with torch.device("meta"):  # the architecture only: no memory for weights
        ...     mlp = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
        >>> plan = build_plan(mlp, torch.empty(2, 4096, device="meta"))
        >>> files = fuse_checkpoints(["run-a", "run-b"], "fused", plan)  # doctest: +SKIP
    """
    opts = _disk_options(options, overrides, "fuse_checkpoints", calibration is not None)
    if calibration is None and opts.alignment == "activations":
        raise FusionError("fuse_checkpoints: alignment 'activations' needs calibration= (and model=)")
    sources = [SafetensorsSource(path) for path in checkpoints]
    spill = spill_folder(out) if calibration is not None else None
    try:
        costs = None
        if calibration is not None:
            if model is None:
                raise FusionError("activations alignment from disk needs model=, the architecture built without "
                                  "weights (accelerate.init_empty_weights(include_buffers=False))")
            if plans is not None:
                raise FusionError("activations alignment from disk needs checkpoints of one architecture and "
                                  "widths: drop plans=")
            hollow = model
            if any(p.is_meta for p in model.parameters()):  # give them memory that is never written
                hollow = copy.deepcopy(model)
                unwritten_parameters(hollow)
            example = first_batch(calibration)
            with timed("trace"):
                ep = export_model(hollow, example)
                traced = build_plan(hollow, example, exported=ep)
            if plan is not None:
                check_compatible(plan, traced, target)
            plan = traced
            costs = disk_activation_costs([ep] * len(sources), [hollow] * len(sources), sources,
                                          [plan] * len(sources), target, calibration, standardize=opts.standardize,
                                          residual=opts.residual, device=device, progress=progress,
                                          spill=spill.name)
        if plan is None:
            raise FusionError("fuse_checkpoints needs a plan (weights alignment) or calibration and model= "
                              "(activations alignment)")
        plans = list(plans) if plans is not None else [plan] * len(sources)
        if len(plans) != len(sources):
            raise FusionError(f"got {len(plans)} plans for {len(sources)} checkpoints")
        for i, p in enumerate(plans):
            check_compatible(plan, p, i)
        return fuse_sources(sources, plans, out, opts, target=target, weights=weights, dtype=dtype, device=device,
                            max_shard_size=max_shard_size, progress=progress, costs=costs)
    finally:
        if spill is not None:
            spill.cleanup()
        for source in sources:
            source.close()


def spill_folder(out: str | Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside the output, for cost matrices written to disk (not the system's temporary
    folder, which may live in memory)."""
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=scratch_prefix(), dir=parent)


def disk_activation_costs(exported: Sequence[ExportedProgram], builds: Sequence[nn.Module],
                          sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], target: int,
                          calibration: Any, *, spill: str | Path, standardize: bool = False,
                          residual: Residual = "shared", device: torch.device | str = "cpu", progress: bool = True,
                          ) -> list[MutableMapping[str, torch.Tensor] | None]:
    """Activation costs of models whose weights stay on disk: each model's graph (``exported``, run with the
    buffers of its weightless ``builds``) on weights read from its source as each node needs them, all models in
    lockstep, layer by layer, each finished cost written to a file in ``spill`` and read back when the walk needs
    it (:func:`~hf_otfusion.activations.activation_statistics`)."""
    device = torch.device(device)
    runners = [Runner(ep, built, device, source=source, aliases=plan.aliases)
               for ep, built, source, plan in zip(exported, builds, sources, plans, strict=True)]
    streams = {s.name for s in plans[target].spaces if s.kind == "residual"} if residual == "mean" else set()
    with timed("activations"):
        return activation_statistics(runners, list(plans), target, calibration, per_site=streams,
                                     standardize=standardize, progress=progress, layerwise=True, spill=spill)[0]
