"""The ``merge`` command's streamed path: a merge that needs no merged model in memory (no repair, fine-tune or
evaluation) of parents stored as safetensors, traced on empty builds and fused from disk to disk by
:mod:`hf_otfusion.streaming`, each tensor written as soon as it is final."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from ..checkpoint import SafetensorsSource, find_checkpoint
from ..config import MergeConfig
from ..distributed import world
from ..engine import check_compatible, plans_for
from ..errors import FusionError
from ..graph import to_device
from ..plan import AlignmentPlan
from ..plan_cache import cached_plan_of
from ..profile import timed
from ..registry import MERGE_METHODS
from ..sources import LoadedModel, ModelInfo, checkpoint_names, example_input, load_model, save_model_files
from ..streaming import ParentSource, disk_activation_costs, spill_folder
from ..trace import export_model
from .inputs import calibration_inputs


def streamable(config: MergeConfig, parents: Sequence[ModelInfo]) -> str | None:
    """Why this merge cannot stream from disk (None when it can): a linear merge, or OT fusion (weights, or
    activations calibrated layer by layer on weights read from disk), with nothing that needs the merged model in
    memory (repair, fine-tune, evaluation) and safetensors weights for every parent."""
    params = config.fusion_parameters
    if config.evaluation is not None or config.finetune is not None:
        return "fine-tuning and evaluation run the merged model"
    if MERGE_METHODS.get(config.merge_method).takes_parameters and params.repair != "none":
        return "a repair runs the fused model"
    if params.alignment == "activations" and world()[1] > 1:
        return "a distributed run splits the calibration over processes that each load the models"
    if config.fusion_parameters.sweeps:
        return "weight matching (sweeps) holds every moved tensor of every model"
    if params.head_maps != "permutation":
        return "maps inside attention heads are checked on the model and fitted on every aligned tensor"
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
    plan: AlignmentPlan | None  # None: a method that does not align (linear)
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
            meta = to_device(x, torch.device("meta"))
            return empty, x, cached_plan_of(empty, meta, enabled=plan_cache, sites=False, verify_input=x)
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
    if not MERGE_METHODS.get(config.merge_method).aligns:
        return _unaligned_job(config, parents)
    activations = config.fusion_parameters.alignment == "activations"
    job_exported: dict[int, ExportedProgram] = {}
    builds: dict[int, LoadedModel] = {}
    calibration = None
    if activations:
        with timed("trace"):
            target = builds[index] = load_model(parents[index], hollow=True)
        calibration, example = calibration_inputs(config, target)
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


def _unaligned_job(config: MergeConfig, parents: Sequence[ModelInfo]) -> StreamJob | None:
    """A merge without alignment (linear) of the parents' checkpoints as they are stored (no plan, no trace: the
    target is built on the meta device for its config files only); None when their tensor names differ (then the
    models are loaded)."""
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
    method = MERGE_METHODS.get(config.merge_method)
    costs = None
    activations = job.plan is not None and params.alignment == "activations"
    with spill_folder(folder) if activations else contextlib.nullcontext() as spill:
        if activations:
            costs = disk_activation_costs(job.exported, job.builds, job.sources, job.plans, config.target_index,
                                          job.calibration, standardize=params.standardize, residual=params.residual,
                                          device=device, progress=progress, spill=spill)
            job.builds, job.exported = [], []
        method.streamed(job.sources, job.plans, folder, params if method.takes_parameters else None,
                        target=config.target_index, weights=config.weights, dtype=getattr(torch, config.dtype),
                        device=device, max_shard_size=max_shard_size, progress=progress, out_names=job.out_names,
                        costs=costs)
