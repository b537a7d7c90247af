"""A whole merge, config → output folder: load the parents, fuse, evaluate, write the model and its card.

The output is built in a temporary folder next to ``out`` and moved into place at the end, so a failure
never leaves half a model behind and never touches an existing ``out`` (which is replaced only with
``overwrite=True``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FinetuneConfig, MergeConfig
from .errors import FusionError
from .evaluate import EvalRow, evaluate_fusion
from .fuse import fuse, resolve_device, vanilla_average
from .plan import AlignmentPlan
from .sources import LoadedModel, example_input, load_model, save_model
from .trace import build_plan
from .train import finetune

CONFIG_FILE = "hf_otfusion.yml"
PLAN_FILE = "plan.json"
CARD_FILE = "README.md"


class MergeError(FusionError):
    """A merge that cannot run as asked (output folder in the way, parents of different libraries, ...)."""


@dataclass
class MergeResult:
    """What a merge produced: the fused model, its plan (None for a linear merge) and evaluation rows."""

    config: MergeConfig
    parents: list[LoadedModel]
    model: nn.Module | None
    plan: AlignmentPlan | None
    evaluation: list[EvalRow] | None
    out: Path | None

    @property
    def target(self) -> LoadedModel:
        return self.parents[self.config.target_index]


def check_output(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, or a ``MergeError`` when it is a file, or a non-empty folder and not ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out} exists and is not empty: pass --overwrite (overwrite=True) to "
                         "replace it")
    return out


def load_parents(config: MergeConfig, progress: bool = True) -> list[LoadedModel]:
    """Load every model of the config and check they can be merged (one library, one architecture)."""
    loaded: dict[str, LoadedModel] = {}
    refs = [m.model for m in config.models]
    for ref in tqdm(refs, desc="loading models", disable=not progress):
        if ref not in loaded:
            loaded[ref] = load_model(ref)
    parents = [loaded[ref] for ref in refs]  # a model listed twice is one object: fusion never modifies its inputs
    target = parents[config.target_index]
    for p in parents:
        if p.library != target.library:
            raise MergeError(f"cannot merge a {p.library} model ({p.ref.text}) with a {target.library} model "
                             f"({target.ref.text})")
        if p.architecture != target.architecture:
            raise MergeError(f"cannot merge different architectures: {p.ref.text} is {p.architecture}, the target "
                             f"{target.ref.text} is {target.architecture}")
    return parents


def _loader(cfg, target: LoadedModel, require_labels: bool):
    from .data import make_loader_for_model

    return make_loader_for_model(cfg, library=target.library, model=target.model, model_dir=target.model_dir,
                                 require_labels=require_labels)


def run_merge(config: MergeConfig, parents: Sequence[LoadedModel], *, device: str | None = None,
              progress: bool = True) -> MergeResult:
    """Fuse loaded parents as the config says, and evaluate when the config has an ``evaluation`` dataset."""
    models = [p.model for p in parents]
    target = parents[config.target_index]
    dev = resolve_device(device, target.model)
    plan = None
    if config.merge_method == "linear":
        fused = vanilla_average(models, weights=config.weights)
    else:
        params = config.fusion_parameters
        calibration = _loader(config.calibration, target, False) if config.calibration is not None else None
        example = example_input(target)
        plan = build_plan(target.model, example)
        fused = fuse(models, target=config.target_index, weights=config.weights, alignment=params.alignment,
                     calibration=calibration, example_input=example, solver=params.solver, reg=params.reg,
                     marginals=params.marginals, plan=plan, device=dev, progress=progress, repair=params.repair,
                     match_heads=params.match_heads, residual=params.residual, standardize=params.standardize)
    untuned = None
    if config.finetune is not None:
        untuned, fused = fused, finetune_merged(fused, config.finetune, target, device=dev, progress=progress)
    rows = None
    if config.evaluation is not None:
        data = _loader(config.evaluation, target, True)
        names = [p.ref.text for p in parents]
        name = "OT fusion" if config.merge_method == "otfusion" else "linear merge"
        if untuned is None:
            rows = evaluate_fusion(models, fused, data, weights=config.weights, device=dev, names=names,
                                   fused_name=name, agreement=True)
        else:  # the merged model before and after the fine-tune; the saved model is the fine-tuned one
            extra = [(name, "fused_before_finetune", untuned), (f"{name} + fine-tune", "fused", fused)]
            rows = evaluate_fusion(models, None, data, weights=config.weights, device=dev, names=names, extra=extra,
                                   agreement=True)
    return MergeResult(config=config, parents=list(parents), model=fused.cpu(), plan=plan, evaluation=rows, out=None)


def finetune_merged(model: nn.Module, cfg: FinetuneConfig, target: LoadedModel, *, device=None,
                    progress: bool = True) -> nn.Module:
    """A copy of ``model`` fine-tuned as ``cfg`` says, on its dataset preprocessed for the target.

    The selected rows are loaded in memory (image batches are concatenated, so ``finetune`` draws seeded random
    mini-batches; text batches, padded per batch, are cycled in order).
    """
    loader = _loader(cfg, target, True)
    batches = list(loader)
    data: object = batches
    if batches and all(torch.is_tensor(x) for x, _ in batches) and len({x.shape[1:] for x, _ in batches}) == 1:
        data = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    return finetune(model, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, device=device,
                    optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                    progress=progress)


def write_output(result: MergeResult, out: str | Path, *, overwrite: bool = False, card: bool = True,
                 repo_id: str | None = None) -> Path:
    """Write the model (its library's format), the config, the plan and the card; atomically replace ``out``."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model(result.model, staging, like=result.target, dtype=result.config.dtype)
        (staging / CONFIG_FILE).write_text(result.config.to_yaml(), encoding="utf-8")
        if result.plan is not None:
            (staging / PLAN_FILE).write_text(result.plan.to_json(), encoding="utf-8")
        if card:
            from .card import render_card

            model_card = render_card(result.config, library=result.target.library,
                                     pipeline_tag=result.target.pipeline_tag, evaluation=result.evaluation,
                                     repo_id=repo_id, auto_class=result.target.auto_class)
            model_card.save(staging / CARD_FILE)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out = out
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def merge(config: MergeConfig, out: str | Path, *, device: str | None = None, overwrite: bool = False,
          card: bool = True, repo_id: str | None = None, progress: bool = True,
          on_loaded: Callable[[list[LoadedModel]], None] | None = None) -> MergeResult:
    """Run a merge config end to end and write the result to ``out``.

    Args:
        config: a validated ``MergeConfig`` (see ``hf_otfusion.config.load_config``).
        out: the output folder; it must not exist or be empty unless ``overwrite``.
        device: where fusion runs (``"cpu"``, ``"cuda"``, ``"auto"``; default the models' device, the CPU).
        card: write a README.md model card.
        repo_id: the Hub repo the output is meant for (used in the card's usage snippet).
        progress: show progress bars.
        on_loaded: called with the loaded parents before fusing (e.g. to print them).

    Example:
        >>> from hf_otfusion import load_config, merge
        >>> result = merge(load_config("examples/mnist-otfusion.yml"), "fused-mnist")  # doctest: +SKIP
    """
    check_output(out, overwrite)  # fail before any download or fusion
    parents = load_parents(config, progress=progress)
    if on_loaded is not None:
        on_loaded(parents)
    result = run_merge(config, parents, device=device, progress=progress)
    write_output(result, out, overwrite=overwrite, card=card, repo_id=repo_id)
    return result
