"""The ``merge`` command, config → output folder: load the parents, fuse, evaluate, write the model and its card.

The output is built in a temporary folder next to ``out`` and moved into place at the end, so a failure
never leaves half a model behind and never touches an existing ``out`` (which is replaced only with
``overwrite=True``).

Modules: :mod:`.parents` (resolve, check and load the parents), :mod:`.inputs` (calibration, evaluation and
fine-tuning data), :mod:`.loaded` (the merge in memory), :mod:`.streamed` (the merge from disk to disk),
:mod:`.write` (the output folder) and :mod:`.result` (:class:`MergeResult`); this module runs them in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..checkpoint import parse_size
from ..config import MergeConfig
from ..distributed import is_main
from ..errors import MergeError
from ..fuse import resolve_device
from ..output import check_output
from ..profile import timed
from ..sources import ModelInfo, check_shardable
from .inputs import CALIBRATION_KEEP, CalibrationInputs, calibration_inputs, dataset_loader
from .loaded import check_plan, finetune_merged, run_merge
from .parents import inspect_parents, load_parents, local_inputs, output_bytes
from .result import MergeResult
from .streamed import StreamJob, plan_stream, streamable, write_stream
from .write import write_output

__all__ = [
    "CALIBRATION_KEEP",
    "CalibrationInputs",
    "MergeError",
    "MergeResult",
    "StreamJob",
    "calibration_inputs",
    "check_plan",
    "dataset_loader",
    "finetune_merged",
    "inspect_parents",
    "load_parents",
    "local_inputs",
    "merge",
    "output_bytes",
    "plan_stream",
    "run_merge",
    "streamable",
    "write_output",
    "write_stream",
]


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
