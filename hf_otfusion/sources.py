"""Model references → loaded ``nn.Module`` with its library; saving back in that library's format.

A reference is a Hub id with an optional ``@revision`` (``org/name@v1``), an ``hf-hub:`` name, or a local
folder (an existing path, or one written ``local-dir:PATH``, ``./PATH`` or ``/PATH``).

Example:
    >>> from hf_otfusion.sources import parse_ref
    >>> parse_ref("timm/resnet18.a1_in1k@main")
    ModelRef(text='timm/resnet18.a1_in1k@main', repo_id='timm/resnet18.a1_in1k', revision='main', path=None)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from .errors import SourceError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")



@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: either a Hub repo (``repo_id``, ``revision``) or a local folder (``path``)."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


def parse_ref(text: str) -> ModelRef:
    """Parse a model reference; a ``SourceError`` says what is wrong with a malformed one."""
    raw = text.strip()
    if not raw:
        raise SourceError("empty model reference")
    if raw.startswith("local-dir:"):
        return ModelRef(text=text, path=Path(raw.removeprefix("local-dir:")).expanduser())
    if raw.startswith(("/", "./", "../", "~")) or Path(raw).expanduser().exists():
        return ModelRef(text=text, path=Path(raw).expanduser())
    name = raw.removeprefix("hf-hub:")
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise SourceError(
            f"{text!r} is neither an existing local folder nor a Hub model id ('org/name' with optional '@revision')"
        )
    return ModelRef(text=text, repo_id=repo_id, revision=revision or None)


# ----------------------------------------------------------------------------------------------------------
# Resolving and loading

Library = Literal["timm", "transformers"]
# the weights the loaders read, in their order of preference: (index of shards, single file)
_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_CONFIG_FILES = ("config.json", "generation_config.json")
_DOWNLOAD_LIMIT: ContextVar[int | None] = ContextVar("hf_otfusion_download_limit", default=None)
# what a transformers output copies from the target: its processor and tokenizer files
_PREPROCESSING_FILES = (
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model", "chat_template.jinja",
)
# task suffix of a transformers class -> (pipeline tag, Auto class)
_TASKS = {
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "LMHeadModel": ("text-generation", "AutoModelForCausalLM"),
}


@dataclass
class ModelInfo:
    """A resolved reference with its library and architecture (read from config.json; no weights loaded)."""

    ref: ModelRef
    library: Library
    architecture: str  # timm model name, or the transformers class name
    model_dir: Path  # the local folder (or Hub snapshot) it was loaded from
    config: dict[str, Any]

    @property
    def pipeline_tag(self) -> str | None:
        if self.library == "timm":
            return "image-classification" if self.config.get("num_classes", 1) else "image-feature-extraction"
        return next((tag for suffix, (tag, _) in _TASKS.items() if self.architecture.endswith(suffix)), None)

    @property
    def commit(self) -> str | None:
        """The Hub commit a Hub reference resolved to (its snapshot folder is named by it); None for a local folder."""
        if self.ref.is_local:
            return None
        name = self.model_dir.name
        return name if self.model_dir.parent.name == "snapshots" and _COMMIT.fullmatch(name) else None

    @property
    def auto_class(self) -> str | None:
        """The transformers ``Auto*`` class that loads this model (None for timm)."""
        if self.library == "timm":
            return None
        return next((cls for suffix, (_, cls) in _TASKS.items() if self.architecture.endswith(suffix)), "AutoModel")


@dataclass
class LoadedModel(ModelInfo):
    """A model loaded from a reference, with what saving it back and preprocessing for it need."""

    model: nn.Module


@contextlib.contextmanager
def download_limit(max_bytes: int | None) -> Iterator[None]:
    """Within the block, :func:`resolve` refuses a Hub model whose files to download add up to more than
    ``max_bytes`` (``None``: no limit), before downloading any weights. A public app (the demo) sets it."""
    token = _DOWNLOAD_LIMIT.set(max_bytes)
    try:
        yield
    finally:
        _DOWNLOAD_LIMIT.reset(token)


@dataclass(frozen=True)
class HubFiles:
    """The files :func:`resolve` downloads from a Hub repo at one commit, with their sizes in bytes (None: unknown)."""

    commit: str
    sizes: dict[str, int | None]

    @property
    def total(self) -> int:
        return sum(size or 0 for size in self.sizes.values())


def _literal(name: str) -> str:
    """An ``allow_patterns`` pattern that matches exactly ``name`` (fnmatch's special characters escaped)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _check_limit(ref: ModelRef, total: int, limit: int | None) -> None:
    if limit is not None and total > limit:
        raise SourceError(f"{ref.text!r}: its files to download add up to {total / 1e6:,.1f} MB, more than the "
                          f"{limit / 1e6:,.1f} MB allowed here")


def hub_files(ref: ModelRef, max_bytes: int | None = None) -> HubFiles:
    """What the loaders read from a Hub repo, listed with their sizes at the commit ``ref.revision`` points to.

    config.json (and generation_config.json), the weights (model.safetensors, or the shards its index names; if
    the repo has no safetensors weights, the same for pytorch_model.bin) and the processor and tokenizer files;
    nothing else. ``max_bytes``: refuse (``SourceError``) before downloading a shard index past that total.
    """
    from huggingface_hub import HfApi, hf_hub_download

    assert ref.repo_id is not None
    info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    listed = {s.rfilename: s.size for s in info.siblings or []}
    names = [n for n in (*_CONFIG_FILES, *_PREPROCESSING_FILES) if n in listed]
    for index, single in _WEIGHTS:
        if index in listed:
            _check_limit(ref, sum(listed[n] or 0 for n in (*names, index)), max_bytes)
            weight_map = json.loads(Path(hf_hub_download(ref.repo_id, index, revision=info.sha)).read_text(
                encoding="utf-8")).get("weight_map", {})
            names += [index, *sorted({str(v) for v in weight_map.values()} & set(listed))]
            break
        if single in listed:
            names.append(single)
            break
    files = HubFiles(commit=str(info.sha), sizes={n: listed[n] for n in names})
    _check_limit(ref, files.total, max_bytes)
    return files


def _unreachable() -> tuple[type[BaseException], ...]:
    """The errors of a Hub that cannot be reached (offline mode, no connection, a timeout)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def resolve(ref: ModelRef) -> Path:
    """The local folder of a reference: the folder itself, or a snapshot of the Hub repo at its revision.

    From the Hub only the files :func:`hub_files` lists are downloaded (within :func:`download_limit`, if set);
    offline, the cached snapshot is used as it is.
    """
    if ref.path is not None:
        if not ref.path.is_dir():
            raise SourceError(f"model folder not found: {ref.path}")
        return ref.path
    try:
        try:
            files = hub_files(ref, _DOWNLOAD_LIMIT.get())
        except _unreachable():  # the cached snapshot, if there is one (LocalEntryNotFoundError if not)
            return Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
        folder = Path(snapshot_download(ref.repo_id, revision=files.commit,
                                        allow_patterns=[_literal(n) for n in files.sizes]))
    except RepositoryNotFoundError:
        raise SourceError(f"model {ref.repo_id!r} not found on the Hub (if it is private or gated, log in "
                          "with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceError(f"model {ref.repo_id!r} has no revision {ref.revision!r}") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"cannot download {ref.text!r}: the Hub cannot be reached (or HF_HUB_OFFLINE is set) and "
                          "it is not in the local cache") from None
    except HfHubHTTPError as err:
        raise SourceError(f"cannot download {ref.text!r}: {str(err).splitlines()[0]}") from None
    return folder


def _read_config(folder: Path, ref: ModelRef) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{ref.text!r} has no config.json, so its library (timm or transformers) is unknown")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path} does not hold a JSON object")
    return config


def detect_library(config: dict[str, Any]) -> Library | None:
    """``timm`` (config.json names an ``architecture``), ``transformers`` (a ``model_type``), else None."""
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def inspect_model(ref: ModelRef | str | Path) -> ModelInfo:
    """Resolve a reference (downloading a Hub snapshot) and read its library and architecture, loading no weights.

    Example:
        >>> info = inspect_model("timm/resnet18.a1_in1k")  # doctest: +SKIP
        >>> info.library, info.architecture                 # doctest: +SKIP
        ('timm', 'resnet18')
    """
    ref = ref if isinstance(ref, ModelRef) else parse_ref(str(ref))
    folder = resolve(ref)
    config = _read_config(folder, ref)
    library = detect_library(config)
    if library == "timm":
        architecture = str(config["architecture"])
    elif library == "transformers":
        architecture = _transformers_class(config, ref)[0]
    else:
        raise SourceError(f"{ref.text!r}: unknown library — config.json has neither timm's 'architecture' nor "
                          "transformers' 'model_type'")
    return ModelInfo(ref=ref, library=library, architecture=architecture, model_dir=folder, config=config)


def load_model(ref: ModelRef | str | Path | ModelInfo, *, empty: bool = False, hollow: bool = False) -> LoadedModel:
    """Load a reference (or an inspected one) as a float32 model in eval mode with its library.

    ``empty``: build the architecture on the ``meta`` device and read no weights (enough to trace a plan).
    ``hollow``: read no weights either, but give the parameters CPU memory that is never written (so it takes no
    RAM) and build the buffers for real: a graph exported on it runs on the CPU with weights read from disk.

    Example:
        >>> loaded = load_model("timm/resnet18.a1_in1k")  # doctest: +SKIP
        >>> loaded.library, loaded.architecture            # doctest: +SKIP
        ('timm', 'resnet18')
    """
    info = ref if isinstance(ref, ModelInfo) else inspect_model(ref)
    ref, folder, architecture = info.ref, info.model_dir, info.architecture
    if hollow:
        from accelerate import init_empty_weights

        building = init_empty_weights(include_buffers=False)
    else:
        building = torch.device("meta") if empty else contextlib.nullcontext()
    empty = empty or hollow
    try:
        with building:
            if info.library == "timm":
                import timm

                model = timm.create_model(f"local-dir:{folder}", pretrained=not empty)
            else:
                cls = _transformers_class(info.config, ref)[1]
                if empty:
                    from transformers import AutoConfig

                    model = cls._from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False),
                                               dtype=torch.float32)
                else:
                    model = cls.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - the libraries raise many types; the user needs the reference named
        raise SourceError(f"cannot load {ref.text!r} with {info.library} ({architecture}): {_first_line(err)}") \
            from None
    if hollow:
        unwritten_parameters(model)
    model = model.float().eval()
    return LoadedModel(ref=ref, library=info.library, architecture=architecture, model_dir=folder,
                       config=info.config, model=model)


def unwritten_parameters(model: nn.Module) -> None:
    """Replace each ``meta`` parameter by float32 CPU memory that is never written (tied ones stay tied)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                module._parameters[name] = made[id(p)]


def _transformers_class(config: dict[str, Any], ref: ModelRef) -> tuple[str, type]:
    import transformers

    names = config.get("architectures") or []
    if not names:
        return "AutoModel", transformers.AutoModel
    name = str(names[0])
    cls = getattr(transformers, name, None)
    if cls is None:
        raise SourceError(f"{ref.text!r}: unknown architecture {name!r} (not in transformers {transformers.__version__}"
                          "; remote code is not supported)")
    return name, cls


# ----------------------------------------------------------------------------------------------------------
# Example inputs and saving


def example_input(loaded: LoadedModel, batch_size: int = 2) -> Any:
    """A random batch of the model's input (images at its input size, or token ids), to trace it with."""
    gen = torch.Generator().manual_seed(0)
    if loaded.library == "timm":
        from timm.data import resolve_data_config

        size = resolve_data_config({}, model=loaded.model)["input_size"]
        return torch.randn(batch_size, *size, generator=gen)
    cfg = loaded.model.config
    if hasattr(cfg, "num_channels"):
        side = getattr(cfg, "image_size", None) or _processor_size(loaded.model_dir) or 224
        size = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
        return torch.randn(batch_size, cfg.num_channels, *size, generator=gen)
    if getattr(cfg, "vocab_size", None):
        length = min(16, getattr(cfg, "max_position_embeddings", 16) or 16)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, length), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raise SourceError(f"cannot build an example input for {loaded.architecture}: give calibration data")


def _processor_size(folder: Path) -> tuple[int, int] | int | None:
    """The image size an image processor produces (``size`` or ``crop_size`` of preprocessor_config.json)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    size = config.get("crop_size") if config.get("do_center_crop") else config.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return (size["height"], size["width"])
        return size.get("shortest_edge")
    return None


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_model(model: nn.Module, out: str | Path, *, like: ModelInfo, dtype: str = "float32",
               max_shard_size: int | None = None) -> None:
    """Save ``model`` in the format of ``like``'s library (timm ``save_for_hf`` / transformers
    ``save_pretrained`` plus the target's processor and tokenizer files), in ``dtype``.

    ``max_shard_size`` (bytes): split the weights into shards of at most that size (transformers only: timm
    loads one ``model.safetensors``)."""
    check_shardable(like, max_shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if _DTYPES[dtype] != torch.float32:
        model = copy.deepcopy(model).to(_DTYPES[dtype])  # the caller's model stays float32
    if like.library == "timm":
        import timm

        timm.models.save_for_hf(model, str(out), safe_serialization=True)
        return
    model.save_pretrained(out, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    _copy_preprocessing(like, out)


def check_shardable(like: ModelInfo, max_shard_size: int | None) -> None:
    """A ``SourceError`` when ``max_shard_size`` is asked of a library that cannot load sharded weights."""
    if max_shard_size is not None and like.library == "timm":
        raise SourceError("--out-shard-size (out_shard_size) is for transformers outputs: timm loads its weights "
                          "from one model.safetensors file")


def save_model_files(model: nn.Module, out: str | Path, *, like: ModelInfo, dtype: str = "float32") -> None:
    """Everything :func:`save_model` writes except the weights (configs, processor and tokenizer files), for a
    caller that writes the weights itself (``model`` only lends its config; its weights are not read)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if like.library == "timm":
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(out / "config.json"))
        return
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    _copy_preprocessing(like, out)


def checkpoint_names(model: nn.Module, keys: Sequence[str], names: set[str], *,
                     library: Library) -> dict[str, str] | None:
    """The state-dict name (one of ``names``) of each checkpoint tensor name, when ``model``'s library maps them one
    to one (the same names, or transformers' renamings of legacy checkpoint names); None when a tensor is converted
    (split, fused, ...) while loading or the names do not match."""
    if set(keys) == names:
        return {k: k for k in keys}
    if library != "transformers":
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        out = {}
        for key in keys:
            renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                                   model.state_dict())
            if converted is not None:
                return None
            out[key] = renamed if renamed in names or key not in names else key
    except Exception:  # noqa: BLE001 - transformers' loading internals move between releases: then load instead
        return None
    return out if set(out.values()) == names and len(set(out.values())) == len(out) else None


def _copy_preprocessing(like: ModelInfo, out: Path) -> None:
    for name in _PREPROCESSING_FILES:
        if (like.model_dir / name).is_file():
            shutil.copyfile(like.model_dir / name, out / name)  # a new file: its mode from the umask, as saved
