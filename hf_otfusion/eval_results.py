"""The merged model's evaluation as Hub evaluation results: ``.eval_results/*.yaml`` files beside the card, the
format the Hub reads from model repos (https://huggingface.co/docs/hub/eval-results), one file per metric.

Only the merged model's own rows are written (the parents, the vanilla average and the ensemble stay in the card's
table), and only for an evaluation dataset that is a Hub dataset id: a local folder has no page to link to. The
Hub lists a result on a leaderboard only when the dataset is a registered benchmark; for any other dataset the
file still records the number with its split and sample count in ``notes``.

Example:
    >>> files = eval_result_files(config, rows)  # doctest: +SKIP
    >>> sorted(files)                            # doctest: +SKIP
    ['.eval_results/mnist_accuracy.yaml', '.eval_results/mnist_loss.yaml']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

from .config import MergeConfig
from .evaluate import EvalRow

FOLDER = ".eval_results"
_MERGED = ("fused",)  # the saved model's row (after a fine-tune, the fine-tuned one)
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _metrics(row: EvalRow) -> dict[str, float]:
    if row.task == "classification" and row.accuracy is not None:
        return {"accuracy": round(100 * row.accuracy, 4), "loss": round(row.loss, 6)}
    metrics = {"loss": round(row.loss, 6)}
    if row.perplexity is not None:
        metrics["perplexity"] = round(row.perplexity, 6)
    return metrics


def eval_result_files(config: MergeConfig, rows: Sequence[EvalRow] | None) -> dict[str, str]:
    """``{path in the output: YAML text}`` for the merged model's evaluation (empty when there is none to write)."""
    data = config.evaluation
    if not rows or data is None or not _HUB_DATASET.match(data.dataset) or Path(data.dataset).exists():
        return {}
    files = {}
    stem = re.sub(r"[^\w.-]+", "_", data.dataset.split("/")[-1])
    for row in rows:
        if row.kind not in _MERGED:
            continue
        samples = f"{data.num_samples} samples" if data.num_samples else "the whole split"
        unit = {"accuracy": "top-1 accuracy (%)", "loss": "mean cross-entropy (nats)", "perplexity": "perplexity"}
        for metric, value in _metrics(row).items():
            entry = EvalResultEntry(dataset_id=data.dataset, task_id=data.name or "default", value=value,
                                    notes=f"{unit[metric]} on split {data.split!r}, {samples}, measured by "
                                    "hf-otfusion merge")
            files[f"{FOLDER}/{stem}_{metric}.yaml"] = yaml.safe_dump(eval_result_entries_to_yaml([entry]),
                                                                     sort_keys=False)
    return files
