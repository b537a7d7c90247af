"""A merge's parents: resolved (no weights), checked that they can be merged, loaded; the local paths a merge reads
and the size of its output."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import stored_values
from ..config import MergeConfig
from ..errors import FusionError, MergeError
from ..profile import timed
from ..sources import LoadedModel, ModelInfo, inspect_model, load_model, parse_ref
from ..vocab import check_tokenizers


def local_inputs(config: MergeConfig) -> list[Path]:
    """The local folders and files a merge reads (parents and datasets given as paths): an output may not hold
    them."""
    found = []
    for entry in config.models:
        with contextlib.suppress(FusionError):
            ref = parse_ref(entry.model)
            if ref.path is not None:
                found.append(ref.path)
    for data in (config.calibration, config.evaluation, config.finetune):
        if data is not None and Path(data.dataset).expanduser().exists():
            found.append(Path(data.dataset).expanduser())
    return found


def output_bytes(info: ModelInfo, dtype: str, copies: int = 1) -> int | None:
    """About how many bytes ``copies`` models like ``info`` take when saved in ``dtype`` (None: unknown)."""
    values = stored_values(info.model_dir)
    if values is None:
        return None
    return copies * values * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def inspect_parents(config: MergeConfig, progress: bool = True) -> list[ModelInfo]:
    """Resolve every model of the config (no weights loaded) and check they can be merged (one library, one
    architecture)."""
    found: dict[str, ModelInfo] = {}
    refs = [m.model for m in config.models]
    for ref in tqdm(refs, desc="resolving models", disable=not progress):
        if ref not in found:
            found[ref] = inspect_model(ref)
    parents = [found[ref] for ref in refs]
    target = parents[config.target_index]
    for p in parents:
        if p.library != target.library:
            raise MergeError(f"cannot merge a {p.library} model ({p.ref.text}) with a {target.library} model "
                             f"({target.ref.text})")
        if p.architecture != target.architecture:
            raise MergeError(f"cannot merge different architectures: {p.ref.text} is {p.architecture}, the target "
                             f"{target.ref.text} is {target.architecture}")
    check_tokenizers(parents, config.target_index, config.tokenizer_source)
    return parents


def load_parents(config: MergeConfig, progress: bool = True,
                 infos: Sequence[ModelInfo] | None = None) -> list[LoadedModel]:
    """Load every model of the config (``infos``: already inspected) and check they can be merged."""
    infos = list(infos) if infos is not None else inspect_parents(config, progress=progress)
    loaded: dict[str, LoadedModel] = {}
    with timed("load"):
        for info in tqdm(infos, desc="loading models", disable=not progress):
            if info.ref.text not in loaded:
                loaded[info.ref.text] = load_model(info)
    return [loaded[info.ref.text] for info in infos]  # a model listed twice is one object: fusion never modifies it
