"""A merge's output folder: the model in its library's format, the config as run, the plan, the model card and the
evaluation results, written into a staged folder that replaces ``out`` atomically (see ``hf_otfusion.output``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..card import render_card
from ..eval_results import eval_result_files
from ..output import CARD_FILE, CONFIG_FILE, PLAN_FILE, check_output, staged
from ..profile import timed
from ..sources import save_model
from .result import MergeResult


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
            model_card = render_card(result.config, library=result.target.library,
                                     pipeline_tag=result.target.pipeline_tag, evaluation=result.evaluation,
                                     repo_id=repo_id, auto_class=result.target.auto_class,
                                     commits=[parent.commit for parent in result.parents], plan=result.plan,
                                     maps=result.maps)
            model_card.save(staging / CARD_FILE)
        for name, text in eval_result_files(result.config, result.evaluation).items():
            (staging / name).parent.mkdir(exist_ok=True)
            (staging / name).write_text(text, encoding="utf-8")
    result.out = out
    return out
