"""Fusion of checkpoints on disk, tensor by tensor: peak memory near the tensors in flight, not N models.

Every parent's weights are read lazily from its safetensors files; each fused tensor is written to its place in
the output checkpoint as soon as every space it belongs to is solved. The plan is traced on an *empty* target
(built on the ``meta`` device, no weights read), or on the loaded target when a model cannot be traced empty.
Activations alignment runs each parent's graph on a *hollow* build (no weights in memory, real buffers), layer by
layer, with every weight read from disk when its node runs; the costs then drive the same streamed walk.
The engine is the one :func:`~hf_otfusion.fuse` uses (:func:`~hf_otfusion.engine.align_sources`), so a merge
streamed from disk gives the in-memory path's tensors, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from tqdm.auto import tqdm

from .activations import activation_costs, first_batch
from .checkpoint import CheckpointError, SafetensorsSource, ShardedWriter, TensorSource, find_checkpoint
from .config import MergeConfig
from .distributed import world
from .engine import Residual, align_sources, check_compatible, check_finite, plans_for
from .errors import FusionError
from .fuse import average_tensor, normalized_weights
from .output import scratch_prefix
from .plan import AlignmentPlan
from .plan_cache import cached_plan_of
from .profile import timed
from .runner import Runner
from .runner import to_device as _to
from .sources import (
    _DTYPES,
    LoadedModel,
    ModelInfo,
    _unwritten_parameters,
    checkpoint_names,
    example_input,
    load_model,
    save_model_files,
)
from .trace import build_plan, export_model
from .transport import Marginals, Solver


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
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    solver: Solver = "emd",
    reg: float = 0.05,
    marginals: Marginals = "uniform",
    match_heads: bool = True,
    residual: Residual = "shared",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_shard_size: int | str | None = None,
    progress: bool = True,
    out_names: Mapping[str, str] | None = None,
    costs: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
) -> list[Path]:
    """Fuse tensor sources into a safetensors checkpoint in ``out``, each tensor written as soon as it is final.

    The tensors written are the target source's, in its order (``dtype``: floating tensors cast to it; named
    ``out_names[name]`` when given). ``costs``: activation costs per model and space (activations alignment, see
    :func:`~hf_otfusion.activations.activation_costs`); weights alignment without. Returns the files written (the
    shards, then the index when sharded).
    """
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

        align_sources(sources, plans, write, target=target, costs=costs, solver=solver, reg=reg,
                      marginals=marginals, heads=match_heads, residual=residual, device=device, progress=progress,
                      couplings=False)
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
    standardize: bool = False,
    **options,
) -> list[Path]:
    """Fuse safetensors checkpoints on disk into one, reading and writing one tensor at a time.

    Weights alignment by default: peak memory is the tensors of the spaces being solved, whatever the size or
    number of the checkpoints. With ``calibration`` (activations alignment), ``model`` is the architecture built
    without weights but with its buffers (``accelerate.init_empty_weights(include_buffers=False)``); its graph
    is exported on the first calibration batch and run layer by layer on each checkpoint's weights, read from disk
    as each node needs them, so memory holds one layer's activations and the statistics of the spaces in flight,
    never a model (see :func:`~hf_otfusion.activations.activation_costs`, ``layerwise``). The checkpoints must then
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
        standardize: activations alignment: correlation distances, as for :func:`~hf_otfusion.fuse`.
        **options: ``weights``, ``solver``, ``reg``, ``marginals``, ``match_heads``, ``residual``, ``dtype``,
            ``device``, ``max_shard_size``, ``progress``, as in :func:`fuse_sources` and :func:`~hf_otfusion.fuse`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import build_plan
        >>> with torch.device("meta"):  # the architecture only: no memory for weights
        ...     mlp = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
        >>> plan = build_plan(mlp, torch.empty(2, 4096, device="meta"))
        >>> files = fuse_checkpoints(["run-a", "run-b"], "fused", plan)  # doctest: +SKIP
    """
    sources = [SafetensorsSource(path) for path in checkpoints]
    spill = _spill_folder(out) if calibration is not None else None
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
                _unwritten_parameters(hollow)
            example = first_batch(calibration)
            with timed("trace"):
                ep = export_model(hollow, example)
                traced = build_plan(hollow, example, exported=ep)
            if plan is not None:
                check_compatible(plan, traced, target)
            plan = traced
            costs = disk_activation_costs([ep] * len(sources), [hollow] * len(sources), sources,
                                          [plan] * len(sources), target, calibration, standardize=standardize,
                                          residual=options.get("residual", "shared"),
                                          device=options.get("device", "cpu"),
                                          progress=options.get("progress", True), spill=spill.name)
        if plan is None:
            raise FusionError("fuse_checkpoints needs a plan (weights alignment) or calibration and model= "
                              "(activations alignment)")
        plans = list(plans) if plans is not None else [plan] * len(sources)
        if len(plans) != len(sources):
            raise FusionError(f"got {len(plans)} plans for {len(sources)} checkpoints")
        for i, p in enumerate(plans):
            check_compatible(plan, p, i)
        return fuse_sources(sources, plans, out, target=target, costs=costs, **options)
    finally:
        if spill is not None:
            spill.cleanup()
        for source in sources:
            source.close()


def _spill_folder(out: str | Path) -> tempfile.TemporaryDirectory:
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
    it (:func:`~hf_otfusion.activations.activation_costs`)."""
    device = torch.device(device)
    runners = [Runner(ep, built, device, source=source, aliases=plan.aliases)
               for ep, built, source, plan in zip(exported, builds, sources, plans, strict=True)]
    streams = {s.name for s in plans[target].spaces if s.kind == "residual"} if residual == "mean" else set()
    with timed("activations"):
        return activation_costs(runners, list(plans), target, calibration, per_site=streams,
                                standardize=standardize, progress=progress, layerwise=True, spill=spill)


# ----------------------------------------------------------------------------------------------------------
# The merge command's streamed path


def streamable(config: MergeConfig, parents: Sequence[ModelInfo]) -> str | None:
    """Why this merge cannot stream from disk (None when it can): a linear merge, or OT fusion (weights, or
    activations calibrated layer by layer on weights read from disk), with nothing that needs the merged model in
    memory (repair, fine-tune, evaluation) and safetensors weights for every parent."""
    params = config.fusion_parameters
    if config.evaluation is not None or config.finetune is not None:
        return "fine-tuning and evaluation run the merged model"
    if config.merge_method == "otfusion" and params.repair != "none":
        return "a repair runs the fused model"
    if params.alignment == "activations" and world()[1] > 1:
        return "a distributed run splits the calibration over processes that each load the models"
    if config.fusion_parameters.sweeps:
        return "weight matching (sweeps) holds every moved tensor of every model"
    missing = next((p for p in parents if find_checkpoint(p.model_dir) is None), None)
    if missing is not None:
        return f"{missing.ref.text} has no safetensors checkpoint"
    return None


@dataclass
class StreamJob:
    """A streamable merge, traced and checked: the (empty) target, every parent's plan and lazy source; in
    activations mode also each parent's graph (``exported``) and hollow build, and the calibration inputs."""

    config: MergeConfig
    target: LoadedModel
    plan: AlignmentPlan | None  # None: a linear merge
    plans: list[AlignmentPlan]
    sources: list[ParentSource]
    out_names: dict[str, str]  # state-dict name -> the name the library saves it under (the target's file names)
    exported: list[ExportedProgram] = field(default_factory=list)
    builds: list[nn.Module] = field(default_factory=list)
    calibration: Any = None


def _trace(info: ModelInfo, example: object | None = None,
           plan_cache: bool = True) -> tuple[LoadedModel, object, AlignmentPlan]:
    """A model's plan, traced on its empty (meta) build when that works, else on the loaded model; read from and
    stored in the plan cache unless ``plan_cache`` is False (a failed trace is not cached: the next run tries the
    empty build again before it loads the model). Weights-mode fusion needs no activation sites, so a deep decoder
    is traced on a shallow copy and expanded by layer index (``sites=False``)."""
    with timed("trace"):
        try:
            empty = load_model(info, empty=True)
            x = example if example is not None else example_input(empty)
            return empty, x, cached_plan_of(empty, _to(x, torch.device("meta")), enabled=plan_cache, sites=False,
                                            verify_input=x)
        except FusionError:
            pass
    with timed("load"):
        loaded = load_model(info)
    with timed("trace"):
        x = example if example is not None else example_input(loaded)
        return loaded, x, cached_plan_of(loaded, x, enabled=plan_cache, sites=False)


def plan_stream(config: MergeConfig, parents: Sequence[ModelInfo], *, plan_cache: bool = True) -> StreamJob | None:
    """Trace the target and open every parent's checkpoint lazily; None when the checkpoints' tensor names are not
    the models' own state-dict names (a checkpoint the library renames while loading): then the merge must load
    the models. ``plan_cache``: as in :func:`~hf_otfusion.merge.merge`."""
    index = config.target_index
    if config.merge_method == "linear":
        return _linear_job(config, parents)
    activations = config.fusion_parameters.alignment == "activations"
    job_exported: dict[int, ExportedProgram] = {}
    builds: dict[int, LoadedModel] = {}
    calibration = None
    if activations:
        from .merge import _calibration

        with timed("trace"):
            target = builds[index] = load_model(parents[index], hollow=True)
        calibration, example = _calibration(config, target)
        with timed("trace"):
            job_exported[index] = export_model(target.model, example)
            plan_t = cached_plan_of(target, example, enabled=plan_cache, sites=True)
    else:
        target, example, plan_t = _trace(parents[index], plan_cache=plan_cache)
    names = {name for name in plan_t.tensors if name not in plan_t.aliases}
    sources = []
    for parent in parents:
        files = SafetensorsSource(find_checkpoint(parent.model_dir))
        renamed = checkpoint_names(target.model, files.keys(), names, library=target.library)
        if renamed is None:
            return None
        sources.append(ParentSource(files, renamed))
    shapes = [{name: s.shape(name) for name in names} for s in sources]

    def trace(i: int) -> AlignmentPlan:
        if not activations:
            return _trace(parents[i], example, plan_cache)[2]
        with timed("trace"):
            builds[i] = load_model(parents[i], hollow=True)
            job_exported[i] = export_model(builds[i].model, example)
            return cached_plan_of(builds[i], example, enabled=plan_cache, sites=True)

    plans = plans_for(plan_t, shapes, index, trace)
    for i, plan in enumerate(plans):
        check_compatible(plan_t, plan, i)
    job = StreamJob(config=config, target=target, plan=plan_t, plans=plans, sources=sources,
                    out_names=sources[index].files, calibration=calibration)
    if activations:
        for i, parent in enumerate(parents):  # each parent's own buffers (e.g. rotary frequencies of its config)
            if i not in builds:
                with timed("trace"):
                    builds[i] = load_model(parent, hollow=True)
        job.exported = [job_exported.get(i, job_exported[index]) for i in range(len(parents))]
        job.builds = [builds[i].model for i in range(len(parents))]
    return job


def _linear_job(config: MergeConfig, parents: Sequence[ModelInfo]) -> StreamJob | None:
    """A linear merge of the parents' checkpoints as they are stored (no plan, no trace: the target is built on the
    meta device for its config files only); None when their tensor names differ (then the models are loaded)."""
    with timed("load"):
        target = load_model(parents[config.target_index], empty=True)
    sources = [SafetensorsSource(find_checkpoint(p.model_dir)) for p in parents]
    names = set(sources[config.target_index].keys())
    if any(set(s.keys()) != names for s in sources):
        for source in sources:
            source.close()
        return None
    wrapped = [ParentSource(s, {n: n for n in names}) for s in sources]
    return StreamJob(config=config, target=target, plan=None, plans=[], sources=wrapped,
                     out_names={n: n for n in names})


def write_stream(job: StreamJob, folder: Path, *, device: torch.device | str = "cpu",
                 max_shard_size: int | None = None, progress: bool = True) -> None:
    """Write the job's merge into ``folder``: the library's config and preprocessing files, then the weights."""
    config, params = job.config, job.config.fusion_parameters
    with timed("write"):
        save_model_files(job.target.model, folder, like=job.target, dtype=config.dtype)
    job.target.model = None  # type: ignore[assignment]  # a loaded (not empty) target is let go before fusing
    if config.merge_method == "linear":
        average_sources(job.sources, folder, target=config.target_index, weights=config.weights,
                        dtype=_DTYPES[config.dtype], max_shard_size=max_shard_size, progress=progress,
                        out_names=job.out_names)
        return
    costs = None
    activations = params.alignment == "activations"
    with _spill_folder(folder) if activations else contextlib.nullcontext() as spill:
        if activations:
            costs = disk_activation_costs(job.exported, job.builds, job.sources, job.plans, config.target_index,
                                          job.calibration, standardize=params.standardize, residual=params.residual,
                                          device=device, progress=progress, spill=spill)
            job.builds, job.exported = [], []
        fuse_sources(job.sources, job.plans, folder, target=config.target_index, weights=config.weights,
                     solver=params.solver, reg=params.reg, marginals=params.marginals, match_heads=params.match_heads,
                     residual=params.residual, dtype=_DTYPES[config.dtype], device=device,
                     max_shard_size=max_shard_size, progress=progress, out_names=job.out_names, costs=costs)
