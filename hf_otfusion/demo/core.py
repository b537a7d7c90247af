"""The demo's logic, with no gradio: limits, input checks, one fusion with its explanations, a job with a timeout.

Everything the app shows comes from :func:`run_demo_fusion`: the accuracy table (parents, vanilla average,
ensemble, fused) from the same ``run_merge`` the CLI runs, the accuracy along the straight path between the target
and another parent (vanilla ``(1-t)·A + t·B`` vs aligned ``(1-t)·A + t·aligned(B)``), the transport maps of that
pair (``hf_otfusion.engine.align``), and the model card of the written output folder.

Layout: :mod:`.limits` (the limits and the demo's errors), :mod:`.inputs` (the bundled examples and the input
checks), :mod:`.explain` (the aligned pair and the interpolation path), :mod:`.timeout` (a job with a time limit)
and this module (the request, one fusion end to end, its output); every public name stays importable from here.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DatasetConfig, parse_config
from ..evaluate import EvalRow
from ..merge import load_parents, run_merge, write_output
from ..registry import REPAIRS, SOLVERS, Registry
from ..sources import download_limit
from ..untrusted import untrusted_data
from .explain import (  # noqa: F401  (some only re-exported: importable from here as before the split)
    InterpolationCurve,
    align_pair,
    default_space,
    has_batchnorm,
    interpolation_curve,
)
from .inputs import (  # noqa: F401  (as above)
    EXAMPLE_PREFIX,
    Examples,
    check_count,
    check_size,
    find_examples,
    looks_local,
    precheck_dataset,
    precheck_download,
    precheck_size,
    resolve_dataset,
    resolve_model,
    safetensors_values,
    short_path,
    state_values,
)
from .limits import Check, DemoError, DemoLimits, DemoTimeout, Report  # noqa: F401  (as above)
from .timeout import run_with_timeout  # noqa: F401  (as above)

ALIGNMENTS = ("weights", "activations")
MARGINALS = ("uniform", "importance")
ROLE_LABELS = {"parent": "parent", "vanilla": "vanilla average", "ensemble": "ensemble", "fused": "OT fusion"}
TABLE_HEADERS = ["model", "role", "accuracy (%)", "loss", "perplexity"]


def choices_help(registry: Registry) -> str:
    """``name: description; ...`` for every unit of a registry (the app's help under a choice), read when asked."""
    return "; ".join(f"{unit.name}: {unit.description}" for unit in registry)


DEFAULT_REPAIR = "reset_bn"
_MAX_STORED_MAP = 1024  # transport maps kept for the picture: spaces up to this many channels


# ----------------------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class FusionRequest:
    """One fusion as the user asked for it (raw inputs; :func:`run_demo_fusion` checks every field)."""

    models: tuple[str, ...]
    alignment: str = "activations"
    solver: str = "emd"
    reg: float = 0.05
    marginals: str = "uniform"
    dataset: str = "example:mnist"
    evaluation_split: str = "test"
    evaluation_samples: int = 500
    calibration_split: str = "train"
    calibration_samples: int = 500
    interpolation_points: int = 7
    repair: str = DEFAULT_REPAIR  # a registered repair; the interpolation path's models get their statistics reset too
    batch_size: int = 100


def build_config(request: FusionRequest, examples: Examples, limits: DemoLimits, *, space_mode: bool):
    """Check a request against the limits: a validated ``MergeConfig``, the user's name of each model reference,
    and the calibration data (used by activations alignment and by the interpolation path's BatchNorm statistics).
    """
    models = [m for m in (str(x).strip() for x in request.models) if m]
    if len(models) < 2:
        raise DemoError(f"pick at least two models to fuse (got {len(models)})")
    if len(models) > limits.max_models:
        raise DemoError(f"{len(models)} models is more than this demo fuses at once ({limits.max_models})")
    if len(set(models)) != len(models):
        raise DemoError("a model is listed twice: pick different models")
    checks = [("alignment", request.alignment, ALIGNMENTS), ("solver", request.solver, SOLVERS.names()),
              ("marginals", request.marginals, MARGINALS), ("repair", request.repair, REPAIRS.names())]
    for name, value, allowed in checks:
        if value not in allowed:
            raise DemoError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
    refs = [resolve_model(m, examples, space_mode=space_mode) for m in models]
    dataset = resolve_dataset(request.dataset, examples, space_mode=space_mode)
    n_eval = check_count(request.evaluation_samples, limits.max_eval_samples, "the number of evaluation samples")
    check_count(request.interpolation_points, limits.max_interpolation_points, "the number of interpolation points",
                minimum=3)
    batch = check_count(request.batch_size, 1024, "the batch size")
    for what, split in (("evaluation", request.evaluation_split), ("calibration", request.calibration_split)):
        if not str(split).strip() or not re.match(r"^[\w.\-\[\]:%+]+$", str(split).strip()):
            raise DemoError(f"the {what} split {split!r} is not a split name (e.g. 'train', 'test')")
    params: dict[str, Any] = {"alignment": request.alignment, "solver": request.solver,
                              "marginals": request.marginals, "repair": request.repair}
    if request.solver == "sinkhorn":
        try:
            params["reg"] = float(request.reg)
        except (TypeError, ValueError):
            raise DemoError(f"the Sinkhorn regularisation must be a number, got {request.reg!r}") from None
    data: dict[str, Any] = {
        "merge_method": "otfusion",
        "models": [{"model": r} for r in refs],
        "parameters": params,
        "evaluation": {"dataset": dataset, "split": str(request.evaluation_split).strip(), "num_samples": n_eval,
                       "batch_size": batch},
    }
    n_cal = check_count(request.calibration_samples, limits.max_calibration_samples,
                        "the number of calibration samples")
    calibration = {"dataset": dataset, "split": str(request.calibration_split).strip(), "num_samples": n_cal,
                   "batch_size": batch}
    if request.alignment == "activations" or REPAIRS.get(request.repair).needs_data:
        data["calibration"] = calibration
    config = parse_config(data, source="the demo's settings")
    return config, dict(zip(refs, models, strict=True)), DatasetConfig(**calibration)


# ----------------------------------------------------------------------------------------------------------
# One fusion, end to end


@dataclass
class DemoResult:
    """What the app shows after a fusion, and what a later push needs (no models: they are not kept)."""

    rows: list[EvalRow]
    names: list[str]  # the user's name for each parent, in order
    curve: InterpolationCurve
    pair: tuple[str, str]  # (target, other) names of the interpolated pair
    couplings: dict[str, Any]  # space -> numpy coupling (rows: the other model's channels, columns: the target's)
    folder: Path  # the written model folder (weights, config, plan.json, README.md)
    archive: Path  # a zip of the folder, for download
    card: str  # README.md as written
    card_info: dict[str, Any]  # what re-rendering the card for a repo id needs
    seconds: float
    batchnorm: bool = False  # the models have BatchNorm layers
    repair: str = "none"  # the repair the fused model got

    def table(self) -> list[list[Any]]:
        return table_rows(self.rows)


def table_rows(rows: Sequence[EvalRow]) -> list[list[Any]]:
    """The evaluation table as rows of ``TABLE_HEADERS`` (accuracy None for a language model, perplexity None for a
    classifier)."""
    return [[r.name, ROLE_LABELS.get(r.kind, r.kind), None if r.accuracy is None else round(100 * r.accuracy, 2),
             round(r.loss, 4) if math.isfinite(r.loss) else None,
             None if r.perplexity is None or not math.isfinite(r.perplexity) else round(r.perplexity, 3)]
            for r in rows]


class OutputStore:
    """Folders for fusion outputs under one temporary root; only the newest ``keep`` are kept."""

    def __init__(self, root: str | Path | None = None, keep: int = 8):
        if root is None:
            root = tempfile.mkdtemp(prefix="hf-otfusion-demo-")
            atexit.register(shutil.rmtree, root, ignore_errors=True)  # our own temporary folder: gone at exit
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()

    def new(self) -> Path:
        with self._lock:
            old = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            for path in old[: max(0, len(old) - self.keep + 1)]:
                shutil.rmtree(path, ignore_errors=True)
            path = self.root / uuid.uuid4().hex
            path.mkdir()
            return path

    def owns(self, path: str | Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return Path(path).exists()


def _materialize(loader: Any) -> list[tuple[Any, torch.Tensor]]:
    return [(x, y) for x, y in loader]


def run_demo_fusion(
    request: FusionRequest,
    *,
    limits: DemoLimits,
    examples: Examples,
    store: OutputStore,
    space_mode: bool = False,
    report: Report | None = None,
    check: Check | None = None,
) -> DemoResult:
    """Check the request, load the models (refusing oversized ones), fuse, evaluate, explain, write the output.

    ``space_mode``: the inputs are a stranger's (a Space, a share link): models and datasets come from the Hub or
    the bundled examples only, never from the server's files, and images only from their bytes
    (:mod:`hf_otfusion.untrusted`). In any mode a Hub model's download is limited to ``limits.max_download_mb``.
    """
    bundled = [short_path(path) for path in examples.datasets.values()]
    guard = untrusted_data(local=bundled) if space_mode else contextlib.nullcontext()
    with guard, download_limit(int(limits.max_download_mb * 1e6)):
        return _run_demo_fusion(request, limits=limits, examples=examples, store=store, space_mode=space_mode,
                                bundled=bundled, report=report, check=check)


def _run_demo_fusion(request: FusionRequest, *, limits: DemoLimits, examples: Examples, store: OutputStore,
                     space_mode: bool, bundled: list[str], report: Report | None,
                     check: Check | None) -> DemoResult:
    from ..data import make_loader_for_model

    start = time.perf_counter()
    say = report or (lambda fraction, text: None)
    stop = check or (lambda stage: None)

    config, names, calibration_cfg = build_config(request, examples, limits, space_mode=space_mode)
    refs = [m.model for m in config.models]
    say(0.02, "checking model sizes")
    for ref in refs:
        precheck_download(ref, limits)
        check_size(names[ref], precheck_size(ref), limits)
        stop("checking model sizes")
    dataset = config.evaluation.dataset
    precheck_dataset(dataset, limits, local=dataset in bundled or (not space_mode and looks_local(dataset)))

    say(0.05, "loading the models")
    parents = load_parents(config, progress=False)
    for ref, parent in zip(refs, parents, strict=True):
        check_size(names[ref], state_values(parent.model), limits)
    stop("loading the models")

    say(0.2, "fusing and evaluating (parents, vanilla average, ensemble, fused)")
    result = run_merge(config, parents, progress=False)
    rows = [r if r.kind != "parent" else dataclasses.replace(r, name=names.get(r.name, r.name))
            for r in result.evaluation or []]
    stop("fusing")

    target_i = config.target_index
    other_i = next(i for i in range(len(parents)) if i != target_i)
    target, other = parents[target_i], parents[other_i]
    say(0.45, "aligning the pair for the pictures")
    calibration = None
    if config.calibration is not None:
        calibration = _materialize(make_loader_for_model(  # text padded to one length: the traced graph keeps it
            calibration_cfg, library=target.library, model=target.model, model_dir=target.model_dir,
            require_labels=False, fixed_length=True))
    params = config.fusion_parameters
    # the path's models get the fused model's BatchNorm treatment: any repair recomputes their statistics
    repair_path = REPAIRS.get(params.repair).fn is not None and has_batchnorm(target.model)
    first = calibration[0][0] if calibration else None
    example = {k: v[:2] for k, v in first.items()} if isinstance(first, dict) else None
    aligned, couplings = align_pair(target, other, result.plan, params, calibration=calibration, example=example)
    stop("aligning")

    data = _materialize(make_loader_for_model(config.evaluation, library=target.library, model=target.model,
                                              model_dir=target.model_dir, require_labels=True))
    curve = interpolation_curve(target.model, other.model, aligned, data, int(request.interpolation_points),
                                norm_data=calibration if repair_path else None, check=stop,
                                report=lambda i, n: say(0.5 + 0.4 * i / n, f"interpolation path {i}/{n}"))

    say(0.92, "writing the model and its card")
    out = store.new()
    folder = write_output(result, out / "fused-model", card=True)
    stop("writing the output")
    archive = out / "fused-model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder.parent))
    card_info = {"library": target.library, "pipeline_tag": target.pipeline_tag, "auto_class": target.auto_class,
                 "config": config, "evaluation": result.evaluation, "commits": [p.commit for p in result.parents]}
    stored = {name: t.detach().cpu().float().numpy() for name, t in couplings.items()
              if max(t.shape) <= _MAX_STORED_MAP}
    say(1.0, "done")
    return DemoResult(rows=rows, names=[names[r] for r in refs], curve=curve,
                      pair=(names[refs[target_i]], names[refs[other_i]]), couplings=stored, folder=folder,
                      archive=archive, card=(folder / "README.md").read_text(encoding="utf-8"), card_info=card_info,
                      seconds=time.perf_counter() - start, batchnorm=has_batchnorm(target.model),
                      repair=params.repair)


def rewrite_card(result: DemoResult, repo_id: str | None) -> None:
    """Re-render the output's README.md for ``repo_id`` (its usage snippet loads from that repo)."""
    from ..card import render_card

    info = result.card_info
    card = render_card(info["config"], library=info["library"], pipeline_tag=info["pipeline_tag"],
                       evaluation=info["evaluation"], repo_id=repo_id, auto_class=info["auto_class"],
                       commits=info.get("commits"))
    card.save(result.folder / "README.md")
