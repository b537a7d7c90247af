"""The data a merge reads, preprocessed for its target: the calibration inputs (kept in memory after a first pass
when small) and the loaders of the evaluation and fine-tuning sets."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping

import torch

from ..config import DatasetConfig, MergeConfig
from ..errors import DataError
from ..sources import LoadedModel, example_input

CALIBRATION_KEEP = 1 << 30  # bytes of calibration inputs kept in memory after a first full pass (not re-loaded)


def dataset_loader(cfg: DatasetConfig, target: LoadedModel, require_labels: bool, fixed_length: bool = False):
    """A loader of ``(inputs, labels)`` batches of a dataset of the config, preprocessed for ``target`` (see
    :func:`~hf_otfusion.data.make_loader_for_model`)."""
    from ..data import make_loader_for_model

    return make_loader_for_model(cfg, library=target.library, model=target.model, model_dir=target.model_dir,
                                 require_labels=require_labels, fixed_length=fixed_length)


def _nbytes(value: object) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class CalibrationInputs:
    """The model inputs of a loader's ``(inputs, labels)`` batches (calibration needs no labels). After a first
    complete pass, inputs of at most ``CALIBRATION_KEEP`` bytes are kept, so the later passes (activations, each
    repair) do not decode and preprocess the data again; the loader is deterministic (no shuffling)."""

    def __init__(self, loader):
        self.loader = loader
        self.kept: list | None = None

    def __iter__(self) -> Iterator:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list | None = []
        size = 0
        for inputs, _ in self.loader:
            if kept is not None:
                size += _nbytes(inputs)
                if size <= CALIBRATION_KEEP:
                    kept.append(inputs)
                else:
                    kept = None
            yield inputs
        self.kept = kept

    def __len__(self) -> int:
        return len(self.loader)


def calibration_inputs(config: MergeConfig, target: LoadedModel) -> tuple[CalibrationInputs, object]:
    """The calibration inputs and an example batch to trace with (two rows of the first calibration batch, so the
    traced inputs are those the data gives; text is padded to one length for the whole split, since the traced
    graph keeps the sequence length it saw)."""
    assert config.calibration is not None
    calibration = CalibrationInputs(dataset_loader(config.calibration, target, False, fixed_length=True))
    batch = next(iter(calibration), None)
    if batch is None:
        raise DataError(f"calibration dataset {config.calibration.dataset!r} is empty")
    if not isinstance(batch, Mapping):
        return calibration, example_input(target)
    _check_inputs(batch, target, config.calibration.dataset)
    return calibration, {k: v[:2] if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_inputs(batch: Mapping, target: LoadedModel, dataset: str) -> None:
    """A ``DataError`` when the model's forward cannot take the keyword inputs the data gives (a name it does not
    take, or a required one the data lacks); a forward with ``**kwargs`` is taken at its word."""
    try:
        params = inspect.signature(target.model.forward).parameters
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params.values()}
    unknown = [] if inspect.Parameter.VAR_KEYWORD in kinds else [k for k in batch if k not in params]
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in batch
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if unknown or missing:
        problem = f"takes no {', '.join(map(repr, unknown))}" if unknown else \
            f"needs {', '.join(map(repr, missing))}"
        raise DataError(f"calibration dataset {dataset!r} gives the inputs {', '.join(map(repr, batch))}, but "
                        f"{target.ref.text} ({target.architecture}) {problem}; its forward takes "
                        f"{', '.join(params)}")
