"""Aligned parents: every parent of a merge config transported into the target's basis and written as its own
loadable model, with mergekit configs beside them (``hf-otfusion align``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from .config import MergeConfig
from .distributed import is_main
from .errors import MergeError
from .fuse import fuse, resolve_device
from .merge import calibration_inputs, inspect_parents, load_parents, local_inputs, output_bytes
from .output import CARD_FILE, CONFIG_FILE, PLAN_FILE, check_output, staged
from .plan import AlignmentPlan
from .plan_cache import cached_plan_of
from .profile import timed
from .registry import MERGE_METHODS
from .sources import LoadedModel, ModelInfo, example_input, save_model

ALIGN_README = "README.md"
MERGEKIT_LINEAR = "mergekit-linear.yml"
MERGEKIT_SLERP = "mergekit-slerp.yml"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class AlignResult:
    """What ``align_parents`` produced: each parent in the target's basis (the target itself unchanged), the folder
    name of each under ``out``, the target's plan, and notes on config fields that alignment does not use."""

    config: MergeConfig
    parents: list[ModelInfo]
    models: list[nn.Module]
    names: list[str]
    plan: AlignmentPlan
    notes: list[str]
    out: Path | None = None

    @property
    def target(self) -> ModelInfo:
        return self.parents[self.config.target_index]


def aligned_names(parents: Sequence[ModelInfo]) -> list[str]:
    """One folder name per parent: its repo or folder name (revision dropped, unsafe characters replaced), made
    unique with ``-2``, ``-3``, ... when two parents share one."""
    names: list[str] = []
    for parent in parents:
        text = parent.ref.repo_id if parent.ref.repo_id is not None else parent.ref.text
        base = _UNSAFE_NAME.sub("-", Path(text.rstrip("/\\")).name).strip("-.") or "model"
        name, k = base, 1
        while name in names or name.lower() in (ALIGN_README.lower(), CONFIG_FILE, PLAN_FILE):
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def align_notes(config: MergeConfig) -> list[str]:
    """The config's fields that ``align`` does not use (they act on a merged model), one line each; a
    ``MergeError`` for a config that has no alignment (``merge_method: linear``)."""
    if not MERGE_METHODS.get(config.merge_method).aligns:
        raise MergeError(f"align transports the parents by optimal transport: merge_method "
                         f"{config.merge_method!r} aligns nothing (use merge_method: otfusion)")
    notes = []
    params = config.fusion_parameters
    if params.residual == "orthogonal" or params.alignment == "learned":
        raise MergeError("align writes the parents in the target's basis for other merge tools: residual: orthogonal "
                         "folds the norms of every model (the target's too) and alignment: learned fits its maps to "
                         "the merged model, so neither has a basis to write (use hf-otfusion merge)")
    if params.repair != "none":
        notes.append(f"parameters.repair {params.repair!r} is not applied: it corrects a merged model, and the "
                     "aligned parents are the parents themselves in a new basis")
    if params.alignment != "activations" and config.calibration is not None:
        notes.append("calibration is not used: weights alignment needs no data")
    for field in ("evaluation", "finetune"):
        if getattr(config, field) is not None:
            notes.append(f"{field} is not used: it applies to a merged model (run `hf-otfusion merge`)")
    return notes


def run_align(config: MergeConfig, parents: Sequence[LoadedModel], *, device: str | None = None,
              progress: bool = True, plan_cache: bool = True) -> AlignResult:
    """Transport every loaded parent into the target's basis, as the config's fusion parameters say.

    Each parent is aligned to the target on its own (``fuse([target, parent], weights=[0, 1])``, no repair): that is
    the alignment an N-model ``fuse`` does for it, so the weighted average of the aligned parents, tensor for tensor,
    is the OT fusion of the same config (weights mode, or activations mode without repair). The target is returned
    unchanged. ``plan_cache`` as in :func:`run_merge`.
    """
    notes = align_notes(config)
    t = config.target_index
    target = parents[t]
    dev = resolve_device(device, target.model)
    params = config.fusion_parameters
    calibration, example = (calibration_inputs(config, target) if params.alignment == "activations"
                            else (None, example_input(target)))
    with timed("trace"):
        plan = cached_plan_of(target, example, enabled=plan_cache, sites=params.alignment != "weights")
    aligned: list[nn.Module] = []
    done: dict[int, nn.Module] = {}  # a model listed twice is aligned once
    for i, parent in enumerate(parents):
        if i == t or parent.model is target.model:
            aligned.append(target.model)
            continue
        key = id(parent.model)
        if key not in done:
            done[key] = fuse([target.model, parent.model], options=params, target=0, weights=[0.0, 1.0],
                             calibration=calibration, example_input=example, plan=plan, device=dev,
                             progress=progress, repair="none", repair_parameters=None).cpu()
        aligned.append(done[key])
    return AlignResult(config=config, parents=list(parents), models=aligned, names=aligned_names(parents),
                       plan=plan, notes=notes)


def _how_to_load(info: ModelInfo, path: str) -> str:
    if info.library == "timm":
        return f'import timm\nmodel = timm.create_model("local-dir:{path}", pretrained=True)'
    cls = info.auto_class or "AutoModel"
    return f'from transformers import {cls}\nmodel = {cls}.from_pretrained("{path}")'


def _parent_text(info: ModelInfo) -> str:
    return f"`{info.ref.text}`" + (f" (commit `{info.commit}`)" if info.commit else "")


def _aligned_card(result: AlignResult, index: int, path: Path) -> str:
    info = result.parents[index]
    target = result.target
    params = result.config.fusion_parameters
    meta: dict = {"library_name": info.library, "tags": ["hf-otfusion", "optimal-transport", "aligned"]}
    if info.pipeline_tag:
        meta["pipeline_tag"] = info.pipeline_tag
    if not info.ref.is_local and info.ref.repo_id is not None:
        meta["base_model"] = info.ref.repo_id
    if index == result.config.target_index:
        what = (f"This is the target {_parent_text(info)} itself, unchanged: the other parents in the folder above "
                "were transported into its basis.")
    else:
        what = (f"This is {_parent_text(info)} with its hidden units transported into the basis of the target "
                f"{_parent_text(target)} by optimal transport ([hf-otfusion](https://arxiv.org/abs/1910.05653) "
                f"`align`, alignment `{params.alignment}`, solver `{params.solver}`, marginals "
                f"`{params.marginals}`). Where the map is a permutation (solver `emd` between equal widths) it "
                "computes its parent's function; with `sinkhorn`, or a parent wider than the target, it is an "
                "approximation of it. Its config is the target's (same architecture and widths); its processor "
                "and tokenizer files are its parent's.")
    front = yaml.safe_dump(meta, sort_keys=False)
    return (f"---\n{front}---\n\n# {path.name}: aligned to {target.ref.text}\n\n{what}\n\n"
            "Averaged with the other aligned parents of its folder (`mergekit-linear.yml` beside it, or a plain "
            "weighted mean of the tensors) it gives the OT fusion of the parents; any other weight-space merge "
            "(SLERP, task arithmetic, ...) now applies to them too.\n\n"
            f"```python\n{_how_to_load(info, str(path))}\n```\n")


def _mergekit_configs(result: AlignResult, folder: Path) -> dict[str, str]:
    """``{file name: YAML}`` of the mergekit configs over the aligned parents under ``folder`` (absolute paths, so
    ``mergekit-yaml`` runs from any working directory): a linear merge with the config's weights, and for two
    parents a SLERP from the target towards the other. None for timm models: mergekit reads transformers
    checkpoints only."""
    config = result.config
    if result.target.library != "transformers":
        return {}
    paths = [str(folder / name) for name in result.names]
    total = sum(config.weights)
    weights = [w / total for w in config.weights]
    header = ("# Written by `hf-otfusion align`: the parents in {folder} are aligned to one basis (the target's),\n"
              "# so weight-space merges apply. Run: mergekit-yaml {file} MERGED\n"
              "# Model paths are absolute: edit them if you move the folder.\n")
    linear = {"merge_method": "linear",
              "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, weights, strict=True)],
              "dtype": config.dtype}
    out = {MERGEKIT_LINEAR: header.format(folder=folder, file=folder / MERGEKIT_LINEAR)
           + "# The weighted mean of the aligned parents: the OT fusion of the parents (without repair).\n"
           + yaml.safe_dump(linear, sort_keys=False)}
    if len(paths) == 2:
        t = config.target_index
        other = 1 - t
        slerp = {"merge_method": "slerp", "base_model": paths[t],
                 "models": [{"model": paths[t]}, {"model": paths[other]}],
                 "parameters": {"t": weights[other]}, "dtype": config.dtype}
        out[MERGEKIT_SLERP] = (header.format(folder=folder, file=folder / MERGEKIT_SLERP)
                               + "# Spherical interpolation from the target (t=0) to the other aligned parent (t=1).\n"
                               + yaml.safe_dump(slerp, sort_keys=False))
    return out


def _align_readme(result: AlignResult, folder: Path, mergekit: Sequence[str]) -> str:
    rows = "\n".join(f"| `{name}/` | {_parent_text(info)} | {w:g} |"
                     for name, info, w in zip(result.names, result.parents, result.config.weights, strict=True))
    if mergekit:
        merges = "\n".join(f"    mergekit-yaml {folder / name} MERGED" for name in mergekit)
        merges = f"Merge them next with mergekit (paths in the configs are absolute):\n\n{merges}\n"
        if MERGEKIT_SLERP not in mergekit:
            merges += (f"\nSLERP interpolates between two models: with {len(result.names)} parents only the linear "
                       "config is written.\n")
    else:
        merges = (f"mergekit reads transformers checkpoints only, so no mergekit config is written for these "
                  f"{result.target.library} models. Any weight-space method applies to them: their weighted mean, "
                  "e.g. `hf-otfusion merge` with `merge_method: linear` over these folders, is the OT fusion.\n")
    return (f"# Parents aligned to {result.target.ref.text}\n\n"
            "Each folder is one parent with its hidden units transported into the target's basis by optimal "
            "transport (`hf-otfusion align`); the config as run is in `hf_otfusion.yml`, the alignment plan in "
            "`plan.json`.\n\n| folder | parent | weight |\n|---|---|---:|\n"
            f"{rows}\n\n{merges}")


def write_aligned(result: AlignResult, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write each aligned parent as its own model folder (its library's format, config, processor/tokenizer files
    and a short card), the mergekit configs, the config as run and the plan; atomically replace ``out``."""
    out = check_output(out, overwrite)
    final = out.resolve()
    with staged(out, overwrite) as staging:
        with timed("write"):
            for i, (name, model) in enumerate(zip(result.names, result.models, strict=True)):
                save_model(model, staging / name, like=result.parents[i], dtype=result.config.dtype)
                (staging / name / CARD_FILE).write_text(_aligned_card(result, i, final / name), encoding="utf-8")
        mergekit = _mergekit_configs(result, final)
        for file, text in mergekit.items():
            (staging / file).write_text(text, encoding="utf-8")
        (staging / CONFIG_FILE).write_text(result.config.to_yaml(), encoding="utf-8")
        (staging / PLAN_FILE).write_text(result.plan.to_json(), encoding="utf-8")
        (staging / ALIGN_README).write_text(_align_readme(result, final, list(mergekit)), encoding="utf-8")
    result.out = out
    return out


def align_parents(config: MergeConfig, out: str | Path, *, device: str | None = None, overwrite: bool = False,
                  progress: bool = True, on_loaded: Callable[[list[ModelInfo]], None] | None = None,
                  plan_cache: bool = True, protect: Sequence[str | Path] = ()) -> AlignResult:
    """Transport every parent of a merge config into the target's basis and write each as its own model.

    ``out/<name>/`` holds each parent (the target unchanged), loadable as its library's own model; beside them
    ``mergekit-linear.yml`` (and, for two parents, ``mergekit-slerp.yml``) merge them with mergekit. The plain
    weighted average of the aligned parents is the OT fusion of the config (without its repair). Uses the
    config's ``parameters`` (and ``calibration`` for activations alignment); ``repair``, ``evaluation`` and
    ``finetune`` act on a merged model and are not used (``AlignResult.notes`` says which were given).

    Example:
        >>> from hf_otfusion import load_config
        >>> from hf_otfusion.aligned import align_parents
        >>> result = align_parents(load_config("examples/mnist-otfusion.yml"), "aligned")  # doctest: +SKIP
    """
    align_notes(config)
    inputs = [*local_inputs(config), *protect]
    check_output(out, overwrite, inputs=inputs)  # fail before any download or fusion
    progress = progress and is_main()  # a distributed run: calibration split, one writer (see merge)
    with timed("load"):
        infos = inspect_parents(config, progress=progress)
    check_output(out, overwrite, inputs=inputs,
                 needed_bytes=output_bytes(infos[config.target_index], config.dtype, copies=len(infos)))
    if on_loaded is not None:
        on_loaded(infos)
    parents = load_parents(config, progress=progress, infos=infos)
    result = run_align(config, parents, device=device, progress=progress, plan_cache=plan_cache)
    if is_main():
        write_aligned(result, out, overwrite=overwrite)
    return result
