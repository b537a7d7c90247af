"""Reading data for a public app (the demo in Space mode): only Hub datasets, only image bytes.

Inside :func:`untrusted_data` a dataset name is a Hub dataset id and nothing else: never a path on the server,
never one of ``datasets``' packaged builders (``csv``, ``json``, ``imagefolder``, ...; they scan the working
folder), and never a Hub dataset whose card points its data files outside the repo (an absolute path in
``configs: data_files`` is read from the server's disk). Images come only from their bytes (or pixel arrays): a
string or ``{"path": ...}`` value is refused without being opened, so the answer is the same for a path that exists
and one that does not. The bundled example data, named in ``local``, stays readable.

Example:
    >>> from hf_otfusion.untrusted import untrusted_data
    >>> with untrusted_data(local=["examples/data/mnist"]):  # doctest: +SKIP
    ...     run_merge(config, parents)
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from .errors import UntrustedInputError

HUB_PREFIX = "hf://datasets/"  # datasets reads such a name from the Hub only, never from a local folder
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL: ContextVar[frozenset[str] | None] = ContextVar("hf_otfusion_untrusted_data", default=None)



@contextlib.contextmanager
def untrusted_data(local: Iterable[str] = ()) -> Iterator[None]:
    """Within the block (this thread), read datasets as a public app must; ``local``: dataset names still read as
    they are (the bundled examples, exactly as the app names them). The host's Hub token (``HF_TOKEN``, the stored
    login) is not sent with any request made without an explicit token meanwhile, so a stranger cannot reach the
    host's private or gated repos (a process-wide switch: the demo runs one fusion at a time)."""
    from huggingface_hub import constants

    token = _LOCAL.set(frozenset(str(x) for x in local))
    implicit = constants.HF_HUB_DISABLE_IMPLICIT_TOKEN
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = implicit
        _LOCAL.reset(token)


def active() -> bool:
    """Whether this code runs inside :func:`untrusted_data`."""
    return _LOCAL.get() is not None


def hub_only(dataset: str) -> bool:
    """Whether ``dataset`` must be read as a Hub dataset id (inside :func:`untrusted_data`, not a named example)."""
    local = _LOCAL.get()
    return local is not None and dataset not in local


def packaged_builders() -> frozenset[str]:
    """The names ``datasets.load_dataset`` takes as its own builders rather than Hub ids (lower case)."""
    from datasets import packaged_modules

    names = set(getattr(packaged_modules, "_PACKAGED_DATASETS_MODULES", {}))
    names |= {"arrow", "csv", "json", "text", "parquet", "pandas", "imagefolder", "audiofolder", "videofolder",
              "webdataset", "xml", "sql", "generator", "cache", "spark"}
    return frozenset(n.lower() for n in names)


def dataset_id_problem(name: str) -> str | None:
    """Why ``name`` is not a Hub dataset id a public app may load (None: it is one). Reads nothing, on disk or
    online: the answer depends on the text alone."""
    if not _DATASET_ID.match(name) or ".." in name:
        return f"{name!r} is not a Hub dataset id ('name' or 'org/name'); local files are not read here"
    if name.lower() in packaged_builders():
        return (f"{name!r} is one of datasets' builder names (csv, json, parquet, imagefolder, ...), which read "
                "local files, not a Hub dataset id; give 'org/name'")
    return None


def _strings(value: Any) -> Iterator[str]:
    """Every string in a card's ``data_files``/``data_dir`` value (split names left out)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "split":
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _inside_repo(pattern: str) -> bool:
    parts = re.split(r"[/\\]", pattern)
    return not pattern.startswith(("/", "~", "\\")) and ":" not in pattern and ".." not in parts


def hub_dataset(name: str) -> tuple[str, str | None]:
    """The ``datasets.load_dataset`` path (``hf://datasets/NAME``) and revision (the commit whose card was checked;
    None when the repo has no card) of the Hub dataset ``name``; an ``UntrustedInputError`` when it may not be read.
    """
    problem = dataset_id_problem(name)
    if problem:
        raise UntrustedInputError(f"dataset {problem}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.repocard import metadata_load

    try:
        card = hf_hub_download(name, "README.md", repo_type="dataset")
    except Exception:  # noqa: BLE001 - no card, unknown, offline: datasets' own load gives the message
        return HUB_PREFIX + name, None
    configs = (metadata_load(card) or {}).get("configs") or []
    for config in configs if isinstance(configs, list) else [configs]:
        if not isinstance(config, dict):
            continue
        for pattern in _strings([config.get("data_files"), config.get("data_dir")]):
            if not _inside_repo(pattern):
                raise UntrustedInputError(f"dataset {name!r}: its card names data files outside the dataset repo "
                                          f"({pattern!r}); only the repo's own files are read here")
    return HUB_PREFIX + name, os.path.basename(os.path.dirname(card))


def image_bytes(value: object) -> object:
    """An image column's value as it may be decoded inside :func:`untrusted_data`: its bytes, or pixel values as
    they are; a file path (a string, or a ``{"path": ...}`` without bytes) is refused and never opened."""
    if not active():
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if isinstance(value, (str, os.PathLike, dict)):
        raise UntrustedInputError("an image column holds file paths, not image bytes; files named in a dataset "
                                  "are not opened here")
    return value


def undecoded_images(ds: Any, column: str) -> Any:
    """``ds`` with its ``datasets.Image`` column ``column`` left undecoded inside :func:`untrusted_data` (datasets
    would open a path, or a URL, that a row names); unchanged otherwise."""
    import datasets

    feature = ds.features.get(column)
    if active() and isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds
