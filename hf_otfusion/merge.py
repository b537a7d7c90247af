"""A whole merge, config → output folder: load the parents, fuse, evaluate, write the model and its card.

The output is built in a temporary folder next to ``out`` and moved into place at the end, so a failure
never leaves half a model behind and never touches an existing ``out`` (which is replaced only with
``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import parse_size, stored_values
from .config import FinetuneConfig, MergeConfig
from .distributed import is_main, world
from .errors import DataError, FusionError, MergeError
from .eval_results import eval_result_files
from .evaluate import EvalRow, evaluate_fusion, language_model_kind
from .fuse import fuse, resolve_device, vanilla_average
from .output import CARD_FILE, CONFIG_FILE, PLAN_FILE, check_output, staged
from .plan import AlignmentPlan
from .plan_cache import cached_plan_of
from .profile import timed
from .sources import LoadedModel, ModelInfo, check_shardable, example_input, inspect_model, load_model, save_model
from .train import finetune
from .vocab import check_tokenizers


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

    @property
    def target(self) -> ModelInfo:
        return self.parents[self.config.target_index]


def local_inputs(config: MergeConfig) -> list[Path]:
    """The local folders and files a merge reads (parents and datasets given as paths): an output may not hold
    them."""
    from .sources import parse_ref

    found = []
    for entry in config.models:
        with contextlib.suppress(FusionError):
            ref = parse_ref(entry.model)
            if ref.path is not None:
                found.append(ref.path)
    for data in (config.calibration, config.evaluation, config.finetune):
        if data is not None and Path(data.dataset).expanduser().exists():
            found.append(Path(data.dataset).expanduser())
    return found


def output_bytes(info: ModelInfo, dtype: str, copies: int = 1) -> int | None:
    """About how many bytes ``copies`` models like ``info`` take when saved in ``dtype`` (None: unknown)."""
    values = stored_values(info.model_dir)
    if values is None:
        return None
    return copies * values * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def inspect_parents(config: MergeConfig, progress: bool = True) -> list[ModelInfo]:
    """Resolve every model of the config (no weights loaded) and check they can be merged (one library, one
    architecture)."""
    found: dict[str, ModelInfo] = {}
    refs = [m.model for m in config.models]
    for ref in tqdm(refs, desc="resolving models", disable=not progress):
        if ref not in found:
            found[ref] = inspect_model(ref)
    parents = [found[ref] for ref in refs]
    target = parents[config.target_index]
    for p in parents:
        if p.library != target.library:
            raise MergeError(f"cannot merge a {p.library} model ({p.ref.text}) with a {target.library} model "
                             f"({target.ref.text})")
        if p.architecture != target.architecture:
            raise MergeError(f"cannot merge different architectures: {p.ref.text} is {p.architecture}, the target "
                             f"{target.ref.text} is {target.architecture}")
    check_tokenizers(parents, config.target_index, config.tokenizer_source)
    return parents


def load_parents(config: MergeConfig, progress: bool = True,
                 infos: Sequence[ModelInfo] | None = None) -> list[LoadedModel]:
    """Load every model of the config (``infos``: already inspected) and check they can be merged."""
    infos = list(infos) if infos is not None else inspect_parents(config, progress=progress)
    loaded: dict[str, LoadedModel] = {}
    with timed("load"):
        for info in tqdm(infos, desc="loading models", disable=not progress):
            if info.ref.text not in loaded:
                loaded[info.ref.text] = load_model(info)
    return [loaded[info.ref.text] for info in infos]  # a model listed twice is one object: fusion never modifies it


def _loader(cfg, target: LoadedModel, require_labels: bool, fixed_length: bool = False):
    from .data import make_loader_for_model

    return make_loader_for_model(cfg, library=target.library, model=target.model, model_dir=target.model_dir,
                                 require_labels=require_labels, fixed_length=fixed_length)


CALIBRATION_KEEP = 1 << 30  # bytes of calibration inputs kept in memory after a first full pass (not re-loaded)


def _nbytes(value: object) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class _Inputs:
    """The model inputs of a loader's ``(inputs, labels)`` batches (calibration needs no labels). After a first
    complete pass, inputs of at most ``CALIBRATION_KEEP`` bytes are kept, so the later passes (activations, each
    repair) do not decode and preprocess the data again; the loader is deterministic (no shuffling)."""

    def __init__(self, loader):
        self.loader = loader
        self.kept: list | None = None

    def __iter__(self) -> Iterator:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list | None = []
        size = 0
        for inputs, _ in self.loader:
            if kept is not None:
                size += _nbytes(inputs)
                if size <= CALIBRATION_KEEP:
                    kept.append(inputs)
                else:
                    kept = None
            yield inputs
        self.kept = kept

    def __len__(self) -> int:
        return len(self.loader)


def _calibration(config: MergeConfig, target: LoadedModel) -> tuple[_Inputs, object]:
    """The calibration inputs and an example batch to trace with (two rows of the first calibration batch, so the
    traced inputs are those the data gives; text is padded to one length for the whole split, since the traced
    graph keeps the sequence length it saw)."""
    assert config.calibration is not None
    calibration = _Inputs(_loader(config.calibration, target, False, fixed_length=True))
    batch = next(iter(calibration), None)
    if batch is None:
        raise DataError(f"calibration dataset {config.calibration.dataset!r} is empty")
    if not isinstance(batch, Mapping):
        return calibration, example_input(target)
    _check_inputs(batch, target, config.calibration.dataset)
    return calibration, {k: v[:2] if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_inputs(batch: Mapping, target: LoadedModel, dataset: str) -> None:
    """A ``DataError`` when the model's forward cannot take the keyword inputs the data gives (a name it does not
    take, or a required one the data lacks); a forward with ``**kwargs`` is taken at its word."""
    try:
        params = inspect.signature(target.model.forward).parameters
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params.values()}
    unknown = [] if inspect.Parameter.VAR_KEYWORD in kinds else [k for k in batch if k not in params]
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in batch
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if unknown or missing:
        problem = f"takes no {', '.join(map(repr, unknown))}" if unknown else \
            f"needs {', '.join(map(repr, missing))}"
        raise DataError(f"calibration dataset {dataset!r} gives the inputs {', '.join(map(repr, batch))}, but "
                        f"{target.ref.text} ({target.architecture}) {problem}; its forward takes "
                        f"{', '.join(params)}")


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
        print(f"warning: {summary}; see {PLAN_FILE}", file=sys.stderr)


def run_merge(config: MergeConfig, parents: Sequence[LoadedModel], *, device: str | None = None,
              progress: bool = True, plan_cache: bool = True) -> MergeResult:
    """Fuse loaded parents as the config says, and evaluate when the config has an ``evaluation`` dataset.

    ``plan_cache``: read the target's plan from the plan cache and store it there (see ``hf_otfusion.plan_cache``);
    ``False`` traces it and neither reads nor writes the cache."""
    models = [p.model for p in parents]
    target = parents[config.target_index]
    dev = resolve_device(device, target.model)
    plan = None
    if config.merge_method == "linear":
        fused = vanilla_average(models, weights=config.weights)
    else:
        params = config.fusion_parameters
        calibration, example = (_calibration(config, target) if config.calibration is not None
                                else (None, example_input(target)))
        with timed("trace"):
            plan = cached_plan_of(target, example, enabled=plan_cache,  # weights alone: sites unused
                                  sites=params.alignment != "weights" or params.repair != "none")
        check_plan(plan, params.strict)
        fused = fuse(models, target=config.target_index, weights=config.weights, alignment=params.alignment,
                     calibration=calibration, example_input=example, solver=params.solver, reg=params.reg,
                     marginals=params.marginals, plan=plan, device=dev, progress=progress, repair=params.repair,
                     match_heads=params.match_heads, residual=params.residual, standardize=params.standardize,
                     sweeps=params.sweeps)
    untuned = None
    if config.finetune is not None and world()[1] > 1 and is_main():
        print(f"warning: finetune is not data-parallel: each of the {world()[1]} processes runs all of it",
              file=sys.stderr)
    if config.finetune is not None:
        with timed("finetune"):
            untuned, fused = fused, finetune_merged(fused, config.finetune, target, device=dev, progress=progress)
    rows = None
    if config.evaluation is not None:
        with timed("evaluate"):
            rows = _evaluate(config, parents, fused, untuned, dev)
    return MergeResult(config=config, parents=list(parents), model=fused.cpu(), plan=plan, evaluation=rows, out=None)


def _evaluate(config: MergeConfig, parents: Sequence[LoadedModel], fused: nn.Module, untuned: nn.Module | None,
              dev: torch.device) -> list[EvalRow]:
    """Parents, vanilla average, ensemble and the merged model (before and after a fine-tune) on the eval set."""
    models = [p.model for p in parents]
    target = parents[config.target_index]
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
    return rows


def finetune_merged(model: nn.Module, cfg: FinetuneConfig, target: LoadedModel, *, device=None,
                    progress: bool = True) -> nn.Module:
    """A copy of ``model`` fine-tuned as ``cfg`` says, on its dataset preprocessed for the target.

    The selected rows are loaded in memory (image batches are concatenated, so ``finetune`` draws seeded random
    mini-batches; text batches, padded per batch, are cycled in order).
    """
    if language_model_kind(target.model) is not None:
        raise MergeError("finetune: fine-tuning a merged language model is not supported yet; leave finetune out")
    loader = _loader(cfg, target, True)
    batches = list(loader)
    data: object = batches
    if batches and all(torch.is_tensor(x) for x, _ in batches) and len({x.shape[1:] for x, _ in batches}) == 1:
        data = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    return finetune(model, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, device=device,
                    optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                    progress=progress)


def write_output(result: MergeResult, out: str | Path, *, overwrite: bool = False, card: bool = True,
                 repo_id: str | None = None, max_shard_size: int | None = None,
                 save: Callable[[Path], None] | None = None) -> Path:
    """Write the model (its library's format), the config, the plan and the card; atomically replace ``out``.

    ``save(folder)`` writes the model files instead of ``save_model(result.model, ...)`` (a streamed merge).
    """
    out = check_output(out, overwrite)
    with staged(out, overwrite) as staging:
        if save is not None:
            save(staging)
        else:
            with timed("write"):
                save_model(result.model, staging, like=result.target, dtype=result.config.dtype,
                           max_shard_size=max_shard_size)
        (staging / CONFIG_FILE).write_text(result.config.to_yaml(), encoding="utf-8")
        if result.plan is not None:
            (staging / PLAN_FILE).write_text(result.plan.to_json(), encoding="utf-8")
        if card:
            from .card import render_card

            model_card = render_card(result.config, library=result.target.library,
                                     pipeline_tag=result.target.pipeline_tag, evaluation=result.evaluation,
                                     repo_id=repo_id, auto_class=result.target.auto_class,
                                     commits=[parent.commit for parent in result.parents], plan=result.plan)
            model_card.save(staging / CARD_FILE)
        for name, text in eval_result_files(result.config, result.evaluation).items():
            (staging / name).parent.mkdir(exist_ok=True)
            (staging / name).write_text(text, encoding="utf-8")
    result.out = out
    return out


def merge(config: MergeConfig, out: str | Path, *, device: str | None = None, overwrite: bool = False,
          card: bool = True, repo_id: str | None = None, progress: bool = True,
          on_loaded: Callable[[list[ModelInfo]], None] | None = None, out_shard_size: int | str | None = None,
          stream: bool = True, plan_cache: bool = True, protect: Sequence[str | Path] = ()) -> MergeResult:
    """Run a merge config end to end and write the result to ``out``.

    A linear merge, or an OT merge with no repair, with no evaluation or fine-tune, of parents stored as
    safetensors, is streamed from disk to disk (see ``hf_otfusion.streaming``): each parent's tensors are read as
    the merge needs them and each merged tensor is written as soon as it is final, so memory stays near one model
    whatever the number of parents. Activations alignment then calibrates layer by layer on weights read from disk.
    Every other merge loads the parents.

    In a distributed run (``accelerate launch ... -m hf_otfusion.cli merge``, ``torchrun``), every process runs the
    merge on its share of the calibration and evaluation batches, with the statistics summed over all of them (see
    ``hf_otfusion.distributed``); only the main process writes ``out``.

    Args:
        config: a validated ``MergeConfig`` (see ``hf_otfusion.config.load_config``).
        out: the output folder; it must not exist or be empty, or, with ``overwrite``, be a previous hf-otfusion
            output holding only the files it wrote (see ``hf_otfusion.output``). It may not hold the current
            folder, a local parent or dataset, or any path of ``protect``.
        device: where fusion runs (``"cpu"``, ``"cuda"``, ``"auto"``; default the CPU).
        card: write a README.md model card.
        repo_id: the Hub repo the output is meant for (used in the card's usage snippet).
        progress: show progress bars.
        on_loaded: called with the resolved parents before fusing (e.g. to print them).
        out_shard_size: split the weights into shards of at most this size (bytes, or ``"5GB"``, ``"500MB"``);
            transformers outputs only.
        stream: stream from disk when the merge allows it (``False``: always load the parents).
        plan_cache: reuse the target's traced plan from the plan cache, and store it there when it is not yet
            (``False``: trace, and neither read nor write the cache; see ``hf_otfusion.plan_cache``).
        protect: other paths the output folder may not hold (the CLI passes the config file).

    Example:
        >>> from hf_otfusion import load_config, merge
        >>> result = merge(load_config("examples/mnist-otfusion.yml"), "fused-mnist")  # doctest: +SKIP
    """
    inputs = [*local_inputs(config), *protect]
    check_output(out, overwrite, inputs=inputs)  # fail before any download or fusion
    progress = progress and is_main()  # a distributed run: one set of bars, one writer
    max_shard_size = parse_size(out_shard_size) if out_shard_size is not None else None
    with timed("load"):
        infos = inspect_parents(config, progress=progress)
    check_shardable(infos[config.target_index], max_shard_size)
    check_output(out, overwrite, inputs=inputs, needed_bytes=output_bytes(infos[config.target_index], config.dtype))
    if on_loaded is not None:
        on_loaded(infos)
    if stream:
        from .streaming import plan_stream, streamable, write_stream

        job = plan_stream(config, infos, plan_cache=plan_cache) if streamable(config, infos) is None else None
        if job is not None and job.plan is not None:
            check_plan(job.plan, config.fusion_parameters.strict)
        if job is not None:
            dev = resolve_device(device, None)
            result = MergeResult(config=config, parents=infos, model=None, plan=job.plan, evaluation=None, out=None,
                                 streamed=True)
            if is_main():  # no data to split: the other processes of a distributed run have nothing to do
                write_output(result, out, overwrite=overwrite, card=card, repo_id=repo_id,
                             save=lambda folder: write_stream(job, folder, device=dev, max_shard_size=max_shard_size,
                                                              progress=progress))
            return result
    parents = load_parents(config, progress=progress, infos=infos)
    result = run_merge(config, parents, device=device, progress=progress, plan_cache=plan_cache)
    if is_main():
        write_output(result, out, overwrite=overwrite, card=card, repo_id=repo_id, max_shard_size=max_shard_size)
    return result
