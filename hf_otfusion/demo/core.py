"""The demo's logic, with no gradio: limits, input checks, one fusion with its explanations, a job with a timeout.

Everything the app shows comes from :func:`run_demo_fusion`: the accuracy table (parents, vanilla average,
ensemble, fused) from the same ``run_merge`` the CLI runs, the accuracy along the straight path between the target
and another parent (vanilla ``(1-t)·A + t·B`` vs aligned ``(1-t)·A + t·aligned(B)``), the transport maps of that
pair (``hf_otfusion.engine.align``), and the model card of the written output folder.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import dataclasses
import json
import math
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from ..config import DatasetConfig, parse_config
from ..errors import FusionError
from ..evaluate import EvalRow, accuracy, language_model_kind, loss
from ..merge import load_parents, run_merge, write_output
from ..plan import AlignmentPlan
from ..repair import reset_norm_stats
from ..sources import LoadedModel, SourceError, example_input, parse_ref

EXAMPLE_PREFIX = "example:"
ALIGNMENTS = ("weights", "activations")
SOLVERS = ("emd", "sinkhorn")
MARGINALS = ("uniform", "importance")
REPAIR_HELP = {
    "none": "keep the averaged statistics",
    "reset_bn": "recompute BatchNorm statistics on the calibration data",
    "repair": "REPAIR: give each fused channel its parents' mean and std (Jordan et al. 2023)",
}
ROLE_LABELS = {"parent": "parent", "vanilla": "vanilla average", "ensemble": "ensemble", "fused": "OT fusion"}
TABLE_HEADERS = ["model", "role", "accuracy (%)", "loss", "perplexity"]


def _config_repairs() -> tuple[str, ...]:
    """The repairs the merge config accepts (``parameters.repair``); empty when it has no such field."""
    from ..config import FusionParameters

    field_info = FusionParameters.model_fields.get("repair")
    return tuple(get_args(field_info.annotation)) if field_info is not None else ()


REPAIRS = _config_repairs()
DEFAULT_REPAIR = "reset_bn" if "reset_bn" in REPAIRS else "none"
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MAX_STORED_MAP = 1024  # transport maps kept for the picture: spaces up to this many channels

Report = Callable[[float, str], None]
Check = Callable[[str], None]


class DemoError(FusionError):
    """Input the demo refuses (a limit, a local path in a Space, an unknown example); the message says why."""


class DemoTimeout(DemoError):
    """A fusion stopped because it ran past the demo's time limit."""


@dataclass(frozen=True)
class DemoLimits:
    """What one fusion in the demo may use; a public Space keeps the defaults or lowers them."""

    max_models: int = 4
    max_params: int = 30_000_000  # values in a model's weights (parameters and buffers)
    max_calibration_samples: int = 1000
    max_eval_samples: int = 1000
    max_interpolation_points: int = 11
    max_dataset_mb: float = 500.0  # download size of a Hub dataset, when the Hub says it
    timeout_s: float = 300.0
    max_queue: int = 16  # waiting fusions; more are turned away by gradio's queue

    def __post_init__(self) -> None:
        for name in ("max_models", "max_params", "max_calibration_samples", "max_eval_samples",
                     "max_interpolation_points", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DemoLimits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_models < 2:
            raise ValueError("DemoLimits.max_models must be at least 2 (a fusion needs two models)")
        if self.max_interpolation_points < 3:
            raise ValueError("DemoLimits.max_interpolation_points must be at least 3")
        if not self.timeout_s > 0 or not self.max_dataset_mb > 0:
            raise ValueError("DemoLimits.timeout_s and max_dataset_mb must be positive")


# ----------------------------------------------------------------------------------------------------------
# Bundled examples


@dataclass(frozen=True)
class Examples:
    """The example models and datasets bundled with the demo (``examples/models/*``, ``examples/data/*``)."""

    root: Path | None
    models: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)

    def model_choices(self) -> list[str]:
        return [EXAMPLE_PREFIX + name for name in self.models]

    def dataset_choices(self) -> list[str]:
        return [EXAMPLE_PREFIX + name for name in self.datasets]


def _candidate_roots() -> list[Path]:
    roots = []
    if os.environ.get("HF_OTFUSION_EXAMPLES"):
        roots.append(Path(os.environ["HF_OTFUSION_EXAMPLES"]))
    roots.append(Path.cwd() / "examples")
    roots.append(Path(__file__).resolve().parents[2] / "examples")  # a source checkout of the repo
    return roots


def _short_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (tidier in the model card), else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def find_examples(root: str | Path | None = None) -> Examples:
    """The bundled examples under ``root`` (default: ``$HF_OTFUSION_EXAMPLES``, ``./examples``, the repo's)."""
    roots = [Path(root)] if root is not None else _candidate_roots()
    for base in roots:
        models_dir = base / "models"
        if not models_dir.is_dir():
            continue
        models = {p.name: p for p in sorted(models_dir.iterdir()) if (p / "config.json").is_file()}
        data_dir = base / "data"
        data = {p.name: p for p in sorted(data_dir.iterdir()) if p.is_dir()} if data_dir.is_dir() else {}
        if models:
            return Examples(root=base, models=models, datasets=data)
    return Examples(root=None)


# ----------------------------------------------------------------------------------------------------------
# Input checks


def _looks_local(text: str) -> bool:
    return (
        text.startswith(("local-dir:", "/", "./", "../", "~", "."))
        or "\\" in text
        or ".." in text.split("/")
        or text.count("/") > 1
        or Path(text).expanduser().exists()
    )


def resolve_model(text: str, examples: Examples, *, space_mode: bool) -> str:
    """The model reference to load for a user's input: ``example:NAME``, a Hub id, or (not in a Space) a folder."""
    value = str(text).strip()
    if not value:
        raise DemoError("a model name is empty: pick a bundled example or type a Hub model id (org/name)")
    if value.startswith(EXAMPLE_PREFIX):
        name = value.removeprefix(EXAMPLE_PREFIX)
        if name not in examples.models:
            known = ", ".join(examples.model_choices()) or "none are installed"
            raise DemoError(f"unknown bundled example {value!r}; the bundled examples: {known}")
        return _short_path(examples.models[name])
    if space_mode and _looks_local(value):
        raise DemoError(f"{value!r}: this Space does not read local files; give a Hub model id (org/name) or pick "
                        "a bundled example")
    try:
        parse_ref(value)
    except SourceError as err:
        raise DemoError(str(err)) from None
    return value


def resolve_dataset(text: str, examples: Examples, *, space_mode: bool) -> str:
    """The dataset to load for a user's input: ``example:NAME``, a Hub dataset id, or (not in a Space) a path."""
    value = str(text).strip()
    if not value:
        raise DemoError("the dataset is empty: pick the bundled example data or type a Hub dataset id")
    if value.startswith(EXAMPLE_PREFIX):
        name = value.removeprefix(EXAMPLE_PREFIX)
        if name not in examples.datasets:
            known = ", ".join(examples.dataset_choices()) or "none are installed"
            raise DemoError(f"unknown bundled dataset {value!r}; the bundled datasets: {known}")
        return _short_path(examples.datasets[name])
    if _looks_local(value):
        if space_mode:
            raise DemoError(f"{value!r}: this Space does not read local files; give a Hub dataset id (org/name) or "
                            "pick the bundled example data")
        return value
    if not _DATASET_ID.match(value):
        raise DemoError(f"{value!r} is not a Hub dataset id ('name' or 'org/name')")
    return value


def check_count(value: Any, limit: int, what: str, *, minimum: int = 1) -> int:
    """``value`` as an int within ``[minimum, limit]``, else a ``DemoError`` naming the limit."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise DemoError(f"{what} must be a whole number, got {value!r}")
    number = int(number)
    if number < minimum:
        raise DemoError(f"{what} must be at least {minimum}, got {number}")
    if number > limit:
        raise DemoError(f"{what} is {number}, more than this demo allows ({limit})")
    return number


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 10_000_000 else f"{n / 1e6:.1f} M"


def check_size(name: str, n_values: int | None, limits: DemoLimits) -> None:
    """Refuse a model with more weight values than ``limits.max_params`` (``None``: size unknown, allowed)."""
    if n_values is not None and n_values > limits.max_params:
        raise DemoError(f"{name} has {_millions(n_values)} parameters; this demo allows at most "
                        f"{_millions(limits.max_params)} per model")


def safetensors_values(folder: Path) -> int | None:
    """Number of values in a folder's ``*.safetensors`` files, read from their headers (no weights loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise DemoError(f"{path.name} has an implausible safetensors header")
            header = json.loads(fh.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def precheck_size(ref_text: str) -> int | None:
    """The size of a model before downloading or loading it, when it can be known cheaply; else None."""
    ref = parse_ref(ref_text)
    if ref.is_local:
        return safetensors_values(ref.path) if ref.path.is_dir() else None
    from huggingface_hub import HfApi, get_safetensors_metadata

    with contextlib.suppress(Exception):  # offline, a .bin-only repo, ...: checked again after loading
        meta = get_safetensors_metadata(ref.repo_id, revision=ref.revision)
        return int(sum(meta.parameter_count.values()))
    with contextlib.suppress(Exception):
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith((".safetensors", ".bin"))]
        return int(sum(sizes) // 4) if sizes else None  # float32 bytes -> values (an upper bound for fp16 files)
    return None


def precheck_dataset(dataset: str, limits: DemoLimits) -> None:
    """Refuse a Hub dataset whose files are larger than ``limits.max_dataset_mb`` (when the Hub says)."""
    if _looks_local(dataset):
        return
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(dataset, files_metadata=True)
    except Exception:  # offline or unknown: loading it gives the clear message
        return
    size_mb = sum(s.size or 0 for s in info.siblings or []) / 1e6
    if size_mb > limits.max_dataset_mb:
        raise DemoError(f"dataset {dataset!r} is {size_mb:,.0f} MB; this demo loads datasets of at most "
                        f"{limits.max_dataset_mb:,.0f} MB")


def state_values(model: nn.Module) -> int:
    """Number of values in a model's state dict (parameters and buffers)."""
    return sum(t.numel() for t in model.state_dict().values())


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
    repair: str = DEFAULT_REPAIR  # one of REPAIRS; the interpolation path's models get their statistics reset too
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
    checks = [("alignment", request.alignment, ALIGNMENTS), ("solver", request.solver, SOLVERS),
              ("marginals", request.marginals, MARGINALS)]
    if REPAIRS:
        checks.append(("repair", request.repair, REPAIRS))
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
                              "marginals": request.marginals}
    repair = request.repair if REPAIRS else "none"
    if REPAIRS:
        params["repair"] = repair
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
    if request.alignment == "activations" or repair != "none":
        data["calibration"] = calibration
    config = parse_config(data, source="the demo's settings")
    return config, dict(zip(refs, models, strict=True)), DatasetConfig(**calibration)


# ----------------------------------------------------------------------------------------------------------
# Explanations: the aligned pair, the interpolation path


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def align_pair(
    target: LoadedModel,
    other: LoadedModel,
    plan: AlignmentPlan,
    *,
    alignment: str = "weights",
    solver: str = "emd",
    reg: float = 0.05,
    marginals: str = "uniform",
    calibration: Any = None,
    example: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``other``'s state transported onto ``target``'s channels, and the transport map of each space.

    The same steps as ``fuse`` takes for one model (``hf_otfusion.engine.align``), kept apart so the demo can show
    them: averaging ``(1 - w)·target + w·aligned`` is the fused model of the pair.
    """
    from ..activations import Runner, activation_costs
    from ..engine import align
    from ..trace import build_plan, export_model

    example = example_input(target) if example is None else example  # text: a calibration batch's length
    same_shapes = {k: tuple(v.shape) for k, v in other.model.state_dict().items()} == plan.tensors
    plan_o = plan if same_shapes else build_plan(other.model, example)
    costs = None
    if alignment == "activations":
        if calibration is None:
            raise DemoError("activations alignment needs calibration data")
        device = torch.device("cpu")
        exported = export_model(target.model, example)  # one graph serves both when the shapes are equal (as in fuse)
        runners = [Runner(exported, target.model, device),
                   Runner(exported if same_shapes else export_model(other.model, example), other.model, device)]
        costs = activation_costs(runners, [plan, plan_o], 0, calibration, progress=False)[1]
    state, couplings = align(_state(other.model), plan_o, _state(target.model), plan, costs=costs, solver=solver,
                             reg=reg, marginals=marginals)
    for alias, name in plan.aliases.items():
        state[alias] = state[name]
    return state, couplings


@dataclass(frozen=True)
class InterpolationCurve:
    """Accuracy (0-1) of a classifier, or token loss of a language model, at points ``t`` of the straight path from
    model A (t=0) to model B (t=1)."""

    t: tuple[float, ...]
    aligned: tuple[float, ...]
    vanilla: tuple[float, ...] | None  # None when B's shapes differ from A's (no vanilla path exists)
    norms_recomputed: bool = False  # BatchNorm statistics recomputed at each point
    metric: str = "accuracy"  # or "loss" (language models: the mean next-token or masked-token cross-entropy)

    def at(self, t: float, which: str = "aligned") -> float:
        values = self.aligned if which == "aligned" else self.vanilla
        if values is None:
            raise ValueError("no vanilla path")
        return values[min(range(len(self.t)), key=lambda i: abs(self.t[i] - t))]


def _interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: torch.lerp(v, b[k].to(v.dtype), t) if v.is_floating_point() else v for k, v in a.items()}


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    aligned_b: dict[str, torch.Tensor],
    data: Any,
    points: int = 7,
    *,
    norm_data: Any = None,
    check: Check | None = None,
    report: Callable[[int, int], None] | None = None,
) -> InterpolationCurve:
    """Accuracy (a language model: token loss) along ``(1-t)·A + t·B`` (vanilla) and ``(1-t)·A + t·aligned(B)`` at
    ``points`` values of t.

    ``data``: ``(x, y)`` tensors or a list of ``(input, label)`` batches (iterated once per point and path).
    ``norm_data``: inputs (or ``(input, label)`` batches) on which each interpolated model's BatchNorm running
    statistics are recomputed before it is evaluated (``hf_otfusion.repair.reset_norm_stats``, the ``reset_bn``
    repair), as interpolation studies do; None keeps the interpolated statistics.
    """
    if points < 2:
        raise DemoError("an interpolation path needs at least 2 points")
    ts = tuple(i / (points - 1) for i in range(points))
    metric = "loss" if language_model_kind(model_a) is not None else "accuracy"
    measure = loss if metric == "loss" else accuracy
    state_a, state_b = _state(model_a), _state(model_b)
    vanilla_ok = all(k in state_b and state_b[k].shape == v.shape for k, v in state_a.items())
    work = copy.deepcopy(model_a).cpu().eval()
    paths = [("aligned", aligned_b)] + ([("vanilla", state_b)] if vanilla_ok else [])
    total = len(ts) * len(paths) - (len(paths) - 1)  # t=0 is model A on both paths
    out: dict[str, list[float]] = {name: [] for name, _ in paths}
    done = 0
    for name, end in paths:
        for i, t in enumerate(ts):
            if check is not None:
                check(f"evaluating the {name} path at t={t:.2f}")
            if i == 0 and name != "aligned":
                out[name].append(out["aligned"][0])
                continue
            work.load_state_dict(_interpolate(state_a, end, t))
            model = reset_norm_stats(work, norm_data) if norm_data is not None else work
            out[name].append(measure(model, data))
            done += 1
            if report is not None:
                report(done, total)
    return InterpolationCurve(t=ts, aligned=tuple(out["aligned"]),
                              vanilla=tuple(out["vanilla"]) if vanilla_ok else None,
                              norms_recomputed=norm_data is not None and has_batchnorm(model_a), metric=metric)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def default_space(couplings: dict[str, torch.Tensor]) -> str | None:
    """The space whose map the demo shows first: the first with 8 to 256 channels, else the first one."""
    names = list(couplings)
    return next((n for n in names if 8 <= couplings[n].shape[1] <= 256), names[0] if names else None)


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
    """Check the request, load the models (refusing oversized ones), fuse, evaluate, explain, write the output."""
    from ..data import make_loader_for_model

    start = time.perf_counter()
    say = report or (lambda fraction, text: None)
    stop = check or (lambda stage: None)

    config, names, calibration_cfg = build_config(request, examples, limits, space_mode=space_mode)
    refs = [m.model for m in config.models]
    say(0.02, "checking model sizes")
    for ref in refs:
        check_size(names[ref], precheck_size(ref), limits)
        stop("checking model sizes")
    precheck_dataset(config.evaluation.dataset, limits)

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
    repair_path = getattr(params, "repair", "none") != "none" and has_batchnorm(target.model)
    first = calibration[0][0] if calibration else None
    example = {k: v[:2] for k, v in first.items()} if isinstance(first, dict) else None
    aligned, couplings = align_pair(target, other, result.plan, alignment=params.alignment, solver=params.solver,
                                    reg=params.reg, marginals=params.marginals, calibration=calibration,
                                    example=example)
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
                      repair=getattr(params, "repair", "none"))


def rewrite_card(result: DemoResult, repo_id: str | None) -> None:
    """Re-render the output's README.md for ``repo_id`` (its usage snippet loads from that repo)."""
    from ..card import render_card

    info = result.card_info
    card = render_card(info["config"], library=info["library"], pipeline_tag=info["pipeline_tag"],
                       evaluation=info["evaluation"], repo_id=repo_id, auto_class=info["auto_class"],
                       commits=info.get("commits"))
    card.save(result.folder / "README.md")


# ----------------------------------------------------------------------------------------------------------
# A job with a time limit


_JOB_LOCK = threading.Lock()  # one fusion computes at a time, including one that is being stopped


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Ask ``thread`` to raise ``exc_type`` at its next Python instruction (CPython's async exception)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def run_with_timeout(
    work: Callable[[Report, Check], Any],
    timeout_s: float,
    *,
    on_progress: Report | None = None,
    grace_s: float = 5.0,
) -> Any:
    """Run ``work(report, check)`` in a worker thread and return its result, or raise ``DemoTimeout``.

    ``work`` calls ``check(stage)`` between steps; past the deadline that raises ``DemoTimeout`` inside the worker,
    which unwinds cleanly (temporary folders are removed by their own ``finally`` blocks). A step that does not
    return in time is interrupted with an asynchronous ``DemoTimeout`` at its next Python instruction; the caller
    gets the message at the deadline either way, and the next job waits (at most ``grace_s`` extra) for this one.
    """
    messages: queue.Queue = queue.Queue()
    cancel = threading.Event()
    deadline = time.monotonic() + timeout_s

    def message(stage: str) -> str:
        return (f"the fusion took longer than this demo's limit of {timeout_s:g} s and was stopped (while {stage}); "
                "try smaller models or fewer samples")

    def check(stage: str) -> None:
        if cancel.is_set() or time.monotonic() > deadline:
            raise DemoTimeout(message(stage))

    def report(fraction: float, text: str) -> None:
        messages.put(("progress", (fraction, text)))

    def target() -> None:
        try:
            if not _JOB_LOCK.acquire(timeout=max(0.0, deadline - time.monotonic()) + grace_s):
                raise DemoTimeout(message("waiting for the previous fusion to stop"))
            try:
                check("starting")
                messages.put(("done", work(report, check)))
            finally:
                _JOB_LOCK.release()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            messages.put(("error", err))

    worker = threading.Thread(target=target, name="hf-otfusion-demo-fusion", daemon=True)
    worker.start()
    stage = "starting"
    while True:
        remaining = deadline - time.monotonic()
        try:
            kind, payload = messages.get(timeout=max(remaining, 0.0) + 0.05)
        except queue.Empty:
            cancel.set()
            _raise_in_thread(worker, DemoTimeout)
            raise DemoTimeout(message(stage)) from None
        if kind == "progress":
            stage = payload[1]
            if on_progress is not None:
                on_progress(*payload)
        elif kind == "error":
            if isinstance(payload, DemoTimeout) and not str(payload):
                raise DemoTimeout(message(stage)) from None
            raise payload
        else:
            return payload
