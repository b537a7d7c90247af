"""The README.md model card of a fused model, rendered from ``model_cards/otfusion.md`` with ``ModelCard``.

Example:
    >>> from hf_otfusion.card import render_card
    >>> from hf_otfusion.config import MergeConfig
    >>> cfg = MergeConfig.model_validate({"models": [{"model": "timm/resnet18.a1_in1k"}, {"model": "you/resnet18-b"}]})
    >>> card = render_card(cfg, library="timm", pipeline_tag="image-classification", repo_id="you/resnet18-fused")
    >>> card.data.base_model
    ['timm/resnet18.a1_in1k', 'you/resnet18-b']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .config import DatasetConfig, MergeConfig
from .evaluate import EvalRow, format_table
from .plan import AlignmentPlan
from .registry import MERGE_METHODS, REPAIRS, SOLVERS, Registry
from .sources import parse_ref


def _template_path(name: str = "otfusion.md") -> Path:
    """A card template: in the package (``hf_otfusion/model_cards/``, where the wheel puts the repository's
    top-level ``model_cards/`` folder), else in the source checkout (or editable install) beside the package."""
    package = Path(__file__).resolve().parent
    candidates = [package / "model_cards" / name, package.parent / "model_cards" / name]
    return next((path for path in candidates if path.is_file()), candidates[0])


TEMPLATE_PATH = _template_path()
PAPER_URL = "https://arxiv.org/abs/1910.05653"
HUB_URL = "https://huggingface.co"
LIBRARIES = ("timm", "transformers")
LOCAL_PLACEHOLDER = "PATH/TO/THIS/FOLDER"

_COMMIT = re.compile(r"[0-9a-f]{40}")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_FILE_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl", ".tsv", ".txt", ".arrow", ".gz", ".zip")
_KIND_LEGEND = {
    "parent": "each parent on its own",
    "vanilla": "the same weighted average of the parents' parameters, without aligning the neurons first",
    "ensemble": "the average of the parents' predictions (one forward pass per parent)",
    "fused": "this model",
    "fused_before_finetune": "this model before its fine-tune",
}


def is_local_dataset(dataset: str) -> bool:
    """Whether a dataset string names local data (a path or a data file) rather than a Hub dataset id."""
    text = dataset.strip()
    return (
        text.startswith(("/", "./", "../", "~"))
        or text.lower().endswith(_DATA_FILE_SUFFIXES)
        or Path(text).expanduser().exists()
    )


def _hub_dataset_ids(config: MergeConfig) -> list[str]:
    ids: list[str] = []
    for data in (config.calibration, config.evaluation):
        if data is None or is_local_dataset(data.dataset):
            continue
        name = data.dataset.strip()
        if _DATASET_ID.match(name) and name not in ids:
            ids.append(name)
    return ids


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (GFM unescapes ``\\|`` even inside code spans)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _percent(fraction: float) -> str:
    return f"{round(100 * fraction, 2):g}%"


def _describe_data(data: DatasetConfig) -> str:
    """``dataset`` (config), split, how many samples; local paths in code spans, Hub ids linked."""
    name = f"`{_cell(data.dataset)}`"
    if not is_local_dataset(data.dataset) and _DATASET_ID.match(data.dataset):
        name = f"[{data.dataset}]({HUB_URL}/datasets/{data.dataset})"
    if data.name:
        name += f" (config `{_cell(data.name)}`)"
    if data.num_samples is None:
        count = "all samples"
    else:
        count = f"{data.num_samples} samples (seeded shuffle, seed {data.seed})"
    return f"{name}, split `{_cell(data.split)}`, {count}"


def _parents(config: MergeConfig, commits: Sequence[str | None] | None) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of the parents table, and the Hub repo ids of the parents (de-duplicated, in order)."""
    if commits is not None and len(commits) != len(config.models):
        raise ValueError(f"commits must name one commit (or None) per parent: {len(config.models)} parents, "
                         f"{len(commits)} commits")
    total = sum(config.weights)
    rows, repo_ids = [], []
    for index, entry in enumerate(config.models):
        ref = parse_ref(entry.model)
        commit = commits[index] if commits is not None else None
        if ref.is_local:
            model, revision, resolved = f"`{_cell(entry.model)}` (local folder)", "local", "not on the Hub"
        else:
            assert ref.repo_id is not None
            model, revision = f"[{ref.repo_id}]({HUB_URL}/{ref.repo_id})", _cell(ref.revision or "main")
            if commit is None:
                resolved = "not recorded"
            elif not _COMMIT.fullmatch(commit):
                raise ValueError(f"commit of parent {index} must be a 40-digit hex Hub commit sha, got {commit!r}")
            else:
                resolved = f"[`{commit}`]({HUB_URL}/{ref.repo_id}/tree/{commit})"
            if ref.repo_id not in repo_ids:
                repo_ids.append(ref.repo_id)
        if index == config.target_index:
            role = "target: its architecture and widths are kept"
        else:
            role = MERGE_METHODS.get(config.merge_method).parent_role
        rows.append({"model": model, "revision": revision, "commit": resolved,
                     "weight": _percent(entry.parameters.weight / total), "role": role})
    return rows, repo_ids


def _usage(library: str, repo_id: str | None, auto_class: str | None) -> str:
    if library == "timm":
        source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{LOCAL_PLACEHOLDER}"
        return f'import timm\n\nmodel = timm.create_model("{source}", pretrained=True)'
    cls = auto_class or "AutoModel"
    return f'from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{repo_id or LOCAL_PLACEHOLDER}")'


def _described(registry: Registry, name: str) -> str:
    """``name (description)`` from the registry; a unit that does nothing (the repair ``none``) by its name alone."""
    unit = registry.get(name)
    return f"{name} ({unit.description})" if unit.fn is not None else name


def _fusion_options(config: MergeConfig) -> list[tuple[str, str]]:
    options = config.fusion_parameters
    rows = [("alignment", options.alignment), ("solver", _described(SOLVERS, options.solver))]
    if options.solver == "sinkhorn":
        rows.append(("reg", f"{options.reg:g} (relative to the largest cost)"))
    rows.append(("marginals", options.marginals))
    rows.append(("repair", _described(REPAIRS, options.repair)))
    if options.repair_parameters is not None:
        rows.append(("repair parameters", ", ".join(f"{k}={v}" for k, v in options.repair_params)))
    rows.append(("attention heads", "matched first" if options.match_heads else "kept in place"))
    if options.residual == "orthogonal":
        rows.append(("residual stream", "any orthogonal map where the stream allows it (RMSNorm gains folded into the "
                     "layers reading them, so the merged model's norm gains are one), found by weight matching "
                     "(orthogonal Procrustes)"))
    else:
        rows.append(("residual stream cost", options.residual))
    if options.head_maps == "orthogonal":
        rows.append(("inside attention heads", "an orthogonal map per head, or a rotation per rotary channel pair, "
                     "where a check on the model allows it, fitted to the target by Procrustes"))
    if options.hidden_maps == "signed":
        rows.append(("hidden units", "a permutation and a sign per unit where a check on the model allows it (a gated "
                     "MLP's up row and down column), found by weight matching"))
    if options.alignment == "learned":
        rows.append(("learned maps", f"the maps beyond permutations (any invertible map per value head, and a scale "
                     f"per MLP unit, where a check on the model allows it) trained for {options.learn_steps} Adam "
                     f"steps (lr {options.learn_lr:g}) on the calibration data against the parents' ensemble (KL of "
                     "the output distributions), every model weight frozen"
                     + (", starting from the alignment on the weights and the calibration data's activations"
                        if options.learn_from == "activations" else "")))
    if options.sweeps:
        rows.append(("weight matching", f"coordinate descent after the single pass, up to {options.sweeps} sweeps "
                     "(every space re-solved from all its weights, kept if the total weight similarity rises)"
                     + ("; every space without heads also scores a map by its activations' similarity on the "
                        "calibration data, scaled to count as much as its weights'"
                        if options.on_activations else "")))
    if options.alignment == "activations":
        rows.append(("activations compared by", "correlation" if options.standardize else "Euclidean distance"))
    if config.calibration is not None:
        rows.append(("calibration data", _describe_data(config.calibration)))
    return rows


def _evaluation(config: MergeConfig, rows: Sequence[EvalRow]) -> dict[str, str]:
    if config.evaluation is not None:
        source = f"Measured on {_describe_data(config.evaluation)}."
    else:
        source = "Measured on data that the merge config does not record."
    task = rows[0].task if rows else "classification"
    tokens = next((row.tokens for row in rows if row.tokens is not None), None)
    over = f" over {tokens} tokens" if tokens is not None else ""
    if task == "causal-lm":
        metric = (f"Loss is the mean next-token cross-entropy (nats per token){over} (padding not counted), "
                  "perplexity its exp.")
    elif task == "masked-lm":
        metric = (f"Loss is the mean cross-entropy on masked tokens{over}: 15% of each text's tokens, masked at "
                  "random with a fixed seed, the same tokens for every model; perplexity is its exp.")
    else:
        metric = "Accuracy is top-1 accuracy, loss the mean cross-entropy."
    if any(row.agreement is not None for row in rows) and task != "classification":
        metric += " Agreement is the share of scored tokens whose top-1 prediction equals the ensemble's."
    legend = [f"{metric} The rows:", ""]
    for kind, meaning in _KIND_LEGEND.items():
        names = list(dict.fromkeys(row.name for row in rows if row.kind == kind))
        if names:
            legend.append(f"- {', '.join(_cell(name) for name in names)}: {meaning}")
    return {"evaluation_source": source, "evaluation_table": format_table(rows), "evaluation_legend": "\n".join(legend)}


def render_card(
    config: MergeConfig,
    *,
    library: str,
    pipeline_tag: str | None,
    evaluation: Sequence[EvalRow] | None = None,
    repo_id: str | None = None,
    auto_class: str | None = None,
    commits: Sequence[str | None] | None = None,
    plan: AlignmentPlan | None = None,
    maps: Sequence[str] = (),
) -> ModelCard:
    """Render the model card (README.md) of a model made from ``config``.

    Args:
        config: the merge config as run.
        library: the library the model is saved for, ``"timm"`` or ``"transformers"``.
        pipeline_tag: the Hub task (e.g. ``"image-classification"``), or None to leave it out.
        evaluation: evaluation rows (see ``hf_otfusion.evaluate.evaluate_fusion``); without them the card has no
            evaluation section.
        repo_id: the Hub repo the model will be pushed to, used in the usage snippet; without it the snippet loads
            from a local folder.
        auto_class: for transformers, the Auto class that loads the model (default ``"AutoModel"``).
        commits: per parent, in the config's order, the Hub commit sha its revision resolved to (None for a local
            folder; see ``hf_otfusion.sources.ModelInfo.commit``); without them the commit column says
            "not recorded".
        plan: the target's alignment plan; its hidden channels left fixed (``plan.fixed``) are listed.
        maps: with ``residual`` or ``head_maps`` ``"orthogonal"`` or ``hidden_maps="signed"``: one line per space,
            the map it took (or why it kept permutations), as ``hf_otfusion.folding``, ``hf_otfusion.head_maps`` and
            ``hf_otfusion.signs`` report them.

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.save(folder / "README.md")`` writes it, ``card.push_to_hub`` pushes it.

    Example:
        >>> from hf_otfusion.card import render_card
        >>> from hf_otfusion.config import MergeConfig
        >>> cfg = MergeConfig.model_validate({"models": [{"model": "google/vit-base-patch16-224"}, {"model": "./b"}]})
        >>> card = render_card(cfg, library="transformers", pipeline_tag="image-classification",
        ...                    auto_class="AutoModelForImageClassification")
        >>> card.data.base_model, card.data.base_model_relation
        (['google/vit-base-patch16-224'], 'merge')
        >>> card.save("fused/README.md")  # doctest: +SKIP
    """
    from . import __version__  # here, not at import time: the package may import this module before defining it

    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {', '.join(LIBRARIES)}, got {library!r}")
    if auto_class is not None and (library != "transformers" or not auto_class.isidentifier()):
        raise ValueError(f"auto_class must be a transformers class name such as 'AutoModel', got {auto_class!r}")
    if repo_id is not None:
        validate_repo_id(repo_id)

    parents, base_models = _parents(config, commits)
    tags = ["hf-otfusion", "merge"]
    tags += MERGE_METHODS.get(config.merge_method).tags
    tags.append(library)
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        tags=tags,
        library_name=library,
        pipeline_tag=pipeline_tag,
        datasets=_hub_dataset_ids(config) or None,
    )

    title = repo_id.split("/")[-1] if repo_id else MERGE_METHODS.get(config.merge_method).card_title
    alignment = config.fusion_parameters.alignment
    variables = {
        "title": title,
        "merge_method": config.merge_method,
        "paper_url": PAPER_URL,
        "version": __version__,
        "cost_source": {"activations": "activations on calibration data",
                        "learned": "weights, then maps learned on calibration data"}.get(alignment, "weights"),
        "fusion_options": _fusion_options(config),
        "parents": parents,
        "config_yaml": config.to_yaml(),
        "usage": _usage(library, repo_id, auto_class),
        "evaluation_source": "",
        "evaluation_table": "",
        "evaluation_legend": "",
        "fixed": [(_cell(str(f.size)), _cell(", ".join(f.members)), _cell(f.reason)) for f in plan.fixed]
        if plan is not None else [],
        "plan_check": str(plan.verification) if plan is not None and plan.verification is not None else "",
        "maps": [_cell(line) for line in maps],
    }
    if evaluation:
        variables.update(_evaluation(config, evaluation))
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **variables)
    card.text = card.text.rstrip("\n") + "\n"  # jinja drops the template's final newline; README.md keeps one
    return card
