"""The merge of loaded parents, in memory: trace the target's plan, fuse (or average), fine-tune and evaluate as the
config says."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import folding, head_maps, signs
from ..config import FinetuneConfig, MergeConfig
from ..distributed import is_main, world
from ..errors import MergeError
from ..evaluate import EvalRow, evaluate_fusion, language_model_kind
from ..fuse import resolve_device
from ..log import get_logger
from ..output import PLAN_FILE
from ..plan import AlignmentPlan
from ..plan_cache import cached_plan_of
from ..profile import timed
from ..registry import MERGE_METHODS
from ..sources import LoadedModel, example_input
from ..train import finetune
from .inputs import calibration_inputs, dataset_loader
from .result import MergeResult

log = get_logger(__name__)


def check_plan(plan: AlignmentPlan, strict: bool) -> None:
    """Refuse (``strict``) or warn, in one line on stderr, about hidden channels the plan leaves fixed (those that
    failed verification too) and about a plan that could not be verified."""
    if strict:
        plan.check_strict()
    summary = plan.fixed_summary()
    if plan.unhandled:
        ops = f"ops without a tracer rule fixed some channels: {', '.join(plan.unhandled)}"
        summary = f"{summary}; {ops}" if summary else ops
    if plan.verification is not None and not plan.verified:  # never silent: the plan could not be checked
        summary = f"{summary}; plan {plan.verification}" if summary else f"plan {plan.verification}"
    if summary and is_main():
        log.warning("%s; see %s", summary, PLAN_FILE)


def run_merge(config: MergeConfig, parents: Sequence[LoadedModel], *, device: str | None = None,
              progress: bool = True, plan_cache: bool = True) -> MergeResult:
    """Fuse loaded parents as the config says, and evaluate when the config has an ``evaluation`` dataset.

    ``plan_cache``: read the target's plan from the plan cache and store it there (see ``hf_otfusion.plan_cache``);
    ``False`` traces it and neither reads nor writes the cache."""
    models = [p.model for p in parents]
    target = parents[config.target_index]
    dev = resolve_device(device, target.model)
    method = MERGE_METHODS.get(config.merge_method)
    params = config.fusion_parameters if method.takes_parameters else None
    plan = calibration = example = None
    if method.aligns:
        calibration, example = (calibration_inputs(config, target) if config.calibration is not None
                                else (None, example_input(target)))
        with timed("trace"):
            plan = cached_plan_of(target, example, enabled=plan_cache,  # weights alone: sites unused
                                  sites=params.alignment != "weights" or params.repair != "none")
        check_plan(plan, params.strict)
    with folding.recording() as streams, head_maps.recording() as heads, signs.recording() as units:
        fused = method.fn(models, params, target=config.target_index, weights=config.weights,
                          calibration=calibration, example_input=example, plan=plan, device=dev, progress=progress)
    maps = [line for verdict in [*streams, *heads, *units] for line in verdict.summary()]
    untuned = None
    if config.finetune is not None and world()[1] > 1 and is_main():
        log.warning("finetune is not data-parallel: each of the %d processes runs all of it", world()[1])
    if config.finetune is not None:
        with timed("finetune"):
            untuned, fused = fused, finetune_merged(fused, config.finetune, target, device=dev, progress=progress)
    rows = None
    if config.evaluation is not None:
        with timed("evaluate"):
            rows = _evaluate(config, parents, fused, untuned, dev)
    return MergeResult(config=config, parents=list(parents), model=fused.cpu(), plan=plan, evaluation=rows, out=None,
                       maps=maps)


def _evaluate(config: MergeConfig, parents: Sequence[LoadedModel], fused: nn.Module, untuned: nn.Module | None,
              dev: torch.device) -> list[EvalRow]:
    """Parents, vanilla average, ensemble and the merged model (before and after a fine-tune) on the eval set."""
    models = [p.model for p in parents]
    target = parents[config.target_index]
    data = dataset_loader(config.evaluation, target, True)
    names = [p.ref.text for p in parents]
    name = MERGE_METHODS.get(config.merge_method).title
    if untuned is None:
        rows = evaluate_fusion(models, fused, data, weights=config.weights, device=dev, names=names,
                               fused_name=name, agreement=True)
    else:  # the merged model before and after the fine-tune; the saved model is the fine-tuned one
        extra = [(name, "fused_before_finetune", untuned), (f"{name} + fine-tune", "fused", fused)]
        rows = evaluate_fusion(models, None, data, weights=config.weights, device=dev, names=names, extra=extra,
                               agreement=True)
    return rows


def finetune_merged(model: nn.Module, cfg: FinetuneConfig, target: LoadedModel, *, device=None,
                    progress: bool = True) -> nn.Module:
    """A copy of ``model`` fine-tuned as ``cfg`` says, on its dataset preprocessed for the target.

    The selected rows are loaded in memory (image batches are concatenated, so ``finetune`` draws seeded random
    mini-batches; text batches, padded per batch, are cycled in order).
    """
    if language_model_kind(target.model) is not None:
        raise MergeError("finetune: fine-tuning a merged language model is not supported yet; leave finetune out")
    loader = dataset_loader(cfg, target, True)
    batches = list(loader)
    data: object = batches
    if batches and all(torch.is_tensor(x) for x, _ in batches) and len({x.shape[1:] for x, _ in batches}) == 1:
        data = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    return finetune(model, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, device=device,
                    optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                    progress=progress)
