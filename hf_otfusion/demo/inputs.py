"""The demo's inputs: the bundled examples and the checks on model and dataset references, counts and sizes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..sources import SourceError, hub_files, parse_ref
from ..untrusted import dataset_id_problem
from .limits import DemoError, DemoLimits

EXAMPLE_PREFIX = "example:"
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MODEL_ID = _DATASET_ID
_REVISION = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


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


def short_path(path: Path) -> str:
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


def _path_syntax(text: str) -> bool:
    """Whether ``text`` is written as a path (decided from the text alone: nothing on disk is looked at)."""
    return (
        text.startswith(("local-dir:", "/", "./", "../", "~", "."))
        or "\\" in text
        or ".." in text.split("/")
        or text.count("/") > 1
    )


def looks_local(text: str) -> bool:
    """Whether ``text`` names a local path: written as one, or an existing file or folder."""
    return _path_syntax(text) or Path(text).expanduser().exists()


def _bundled(value: str, entries: Mapping[str, Path], choices: Sequence[str], what: str) -> str:
    """The path of the bundled ``example:NAME`` entry, or a DemoError listing the ones there are."""
    name = value.removeprefix(EXAMPLE_PREFIX)
    if name not in entries:
        known = ", ".join(choices) or "none are installed"
        raise DemoError(f"unknown bundled {what} {value!r}; the bundled {what}s: {known}")
    return short_path(entries[name])


def resolve_model(text: str, examples: Examples, *, space_mode: bool) -> str:
    """The model reference to load for a user's input: ``example:NAME``, a Hub id, or (not in a Space) a folder."""
    value = str(text).strip()
    if not value:
        raise DemoError("a model name is empty: pick a bundled example or type a Hub model id (org/name)")
    if value.startswith(EXAMPLE_PREFIX):
        return _bundled(value, examples.models, examples.model_choices(), "example")
    if space_mode:  # the text alone decides (a message that depends on what exists on disk would reveal it)
        if _path_syntax(value):
            raise DemoError(f"{value!r}: this Space does not read local files; give a Hub model id (org/name) or "
                            "pick a bundled example")
        name = value.removeprefix("hf-hub:")
        repo_id, _, revision = name.partition("@")
        if not _MODEL_ID.match(repo_id) or (_ and not _REVISION.match(revision)):
            raise DemoError(f"{value!r} is not a Hub model id ('org/name' with optional '@revision')")
        return "hf-hub:" + name  # never a local folder, even one of that name in the working directory
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
        return _bundled(value, examples.datasets, examples.dataset_choices(), "dataset")
    if space_mode:  # decided from the text alone; hf_otfusion.untrusted then reads it from the Hub only
        if _path_syntax(value):
            raise DemoError(f"{value!r}: this Space does not read local files; give a Hub dataset id (org/name) or "
                            "pick the bundled example data")
        problem = dataset_id_problem(value)
        if problem:
            raise DemoError(problem)
        return value
    if looks_local(value):
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


def precheck_download(ref_text: str, limits: DemoLimits) -> None:
    """Refuse a Hub model whose files to download (what the loader reads) exceed ``limits.max_download_mb``, before
    downloading anything; the download itself checks again (``hf_otfusion.sources.download_limit``)."""
    ref = parse_ref(ref_text)
    if ref.is_local:
        return
    try:
        hub_files(ref, int(limits.max_download_mb * 1e6))
    except SourceError as err:
        raise DemoError(str(err)) from None
    except Exception:  # noqa: BLE001 - offline, unknown, ...: loading gives the clear message
        return


def precheck_dataset(dataset: str, limits: DemoLimits, *, local: bool | None = None) -> None:
    """Refuse a Hub dataset whose files are larger than ``limits.max_dataset_mb`` (when the Hub says); ``local``:
    whether ``dataset`` is local data, not checked (default: when it looks like a path or exists)."""
    if looks_local(dataset) if local is None else local:
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
