"""Accuracy and loss of parents, vanilla average, prediction ensemble and fused model on a dataset.

``data`` is either a pair of tensors ``(x, y)`` or an iterable of ``(input, label)`` batches (a
DataLoader). An input is a tensor (``model(x)``) or a dict of tensors (``model(**x)``, e.g. tokenized
text); a model may return a tensor or an object with ``.logits`` (a transformers ``ModelOutput``).
Models are evaluated in eval mode without gradients; each model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Data = tuple[torch.Tensor, torch.Tensor] | Iterable
Inputs = torch.Tensor | Mapping[str, torch.Tensor]
_TENSOR_BATCH = 1024


@dataclass(frozen=True)
class EvalRow:
    """One line of an evaluation table: a model's name, its role, its accuracy (0-1) and mean loss.

    ``agreement`` (0-1, optional): the fraction of samples on which the model predicts the same class as the
    prediction ensemble of the parents.
    """

    name: str
    kind: str  # "parent", "vanilla", "ensemble", "fused", or another role (e.g. "fused_before_finetune")
    accuracy: float
    loss: float
    agreement: float | None = None


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or its ``.logits`` (a transformers ``ModelOutput``)."""
    logits = getattr(output, "logits", output)
    if not torch.is_tensor(logits):
        raise TypeError(f"expected the model to return a tensor or an output with .logits, got {type(output).__name__}")
    return logits


def _predict(model: nn.Module, x: Inputs, device: torch.device) -> torch.Tensor:
    """The model's logits on one batch of inputs, moved to ``device`` first (keyword tensors for a dict)."""
    if isinstance(x, Mapping):
        return logits_of(model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}))
    return logits_of(model(x.to(device)))


def _batches(data: Data) -> Iterator[tuple[Inputs, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} != {len(y)}")
        for start in range(0, len(x), _TENSOR_BATCH):
            yield x[start : start + _TENSOR_BATCH], y[start : start + _TENSOR_BATCH]
        return
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("data must be (inputs, labels) tensors or an iterable of (input, label) batches")
        yield batch[0], batch[1]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _run(
    model: nn.Module, data: Data, device: str | torch.device | None, predictions: bool = False
) -> tuple[int, int, float, torch.Tensor | None]:
    """(number correct, number of samples, summed cross-entropy, argmax predictions or None) of ``model``."""
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    correct, total, loss_sum = 0, 0, 0.0
    preds: list[torch.Tensor] = []
    with _eval_mode(model):
        for x, y in _batches(data):
            y = y.to(dev)
            logits = _predict(model, x, dev)
            # cross_entropy applies log_softmax, which leaves log-probabilities (an ensemble) unchanged.
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            pred = logits.argmax(dim=-1)
            correct += (pred == y).sum().item()
            total += len(y)
            if predictions:
                preds.append(pred.cpu())
    if total == 0:
        raise ValueError("no samples to evaluate")
    return correct, total, loss_sum, torch.cat(preds) if predictions else None


def accuracy(model: nn.Module, data: Data, device: str | torch.device | None = None) -> float:
    """Fraction (0-1) of samples whose argmax prediction equals the label."""
    correct, total, _, _ = _run(model, data, device)
    return correct / total


def loss(model: nn.Module, data: Data, device: str | torch.device | None = None) -> float:
    """Mean cross-entropy of the model's outputs (logits or log-probabilities) against the labels."""
    _, total, loss_sum, _ = _run(model, data, device)
    return loss_sum / total


def accuracy_and_loss(model: nn.Module, data: Data, device: str | torch.device | None = None) -> tuple[float, float]:
    """Accuracy and mean loss in one pass over the data."""
    correct, total, loss_sum, _ = _run(model, data, device)
    return correct / total, loss_sum / total


def agreement(model_a: nn.Module, model_b: nn.Module, data: Data, device: str | torch.device | None = None) -> float:
    """Fraction of samples on which the two models' argmax predictions are equal (labels are ignored)."""
    if device is not None:
        model_a.to(device)
        model_b.to(device)
    dev_a, dev_b = _model_device(model_a), _model_device(model_b)
    same, total = 0, 0
    with _eval_mode(model_a), _eval_mode(model_b):
        for x, _ in _batches(data):
            pred_a = _predict(model_a, x, dev_a).argmax(dim=-1)
            pred_b = _predict(model_b, x, dev_b).argmax(dim=-1).to(pred_a.device)
            same += (pred_a == pred_b).sum().item()
            total += len(pred_a)
    if total == 0:
        raise ValueError("no samples to evaluate")
    return same / total


def evaluate_fusion(
    parents: Sequence[nn.Module],
    fused: nn.Module | None,
    data: Data,
    vanilla: nn.Module | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    *,
    names: Sequence[str] | None = None,
    fused_name: str = "OT fusion",
    extra: Sequence[tuple[str, str, nn.Module]] = (),
    agreement: bool = False,
) -> list[EvalRow]:
    """Rows for each parent, the vanilla average, the prediction ensemble and the fused model.

    ``vanilla`` defaults to ``vanilla_average(parents, weights)``; when the parents' shapes differ (no
    vanilla average exists) that row is left out. The ensemble is ``ensemble(parents, weights)``.

    Args:
        names: one name per parent (default ``"parent 0"``, ``"parent 1"``, ...).
        fused_name: the fused model's row name; ``fused=None`` leaves that row out.
        extra: more ``(name, kind, model)`` rows, after the fused model's (e.g. the fused model after a
            fine-tune, or before a repair).
        agreement: also measure each row's agreement with the ensemble's predictions (``EvalRow.agreement``).

    Example:
        >>> rows = evaluate_fusion([a, b], fused, (x_test, y_test), names=["a", "b"], agreement=True)  # doctest: +SKIP
        >>> print(format_table(rows))  # doctest: +SKIP
    """
    from hf_otfusion import ensemble, vanilla_average

    if len(parents) < 1:
        raise ValueError("evaluate_fusion needs at least one parent")
    if names is None:
        names = [f"parent {i}" for i in range(len(parents))]
    elif len(names) != len(parents):
        raise ValueError(f"got {len(names)} names for {len(parents)} parents")
    if vanilla is None:
        shapes = [{k: tuple(v.shape) for k, v in p.state_dict().items()} for p in parents]
        if all(s == shapes[0] for s in shapes[1:]):
            vanilla = vanilla_average(list(parents), weights=weights)
    ens = ensemble(list(parents), weights=weights)
    candidates: list[tuple[str, str, nn.Module]] = [(n, "parent", p) for n, p in zip(names, parents, strict=True)]
    if vanilla is not None:
        candidates.append(("vanilla average", "vanilla", vanilla))
    candidates.append(("ensemble", "ensemble", ens))
    if fused is not None:
        candidates.append((fused_name, "fused", fused))
    candidates.extend(extra)
    ens_result = _run(ens, data, device, predictions=agreement)
    reference = ens_result[3]
    rows = []
    for name, kind, model in candidates:
        result = ens_result if model is ens else _run(model, data, device, predictions=agreement)
        correct, total, loss_sum, preds = result
        agree = None
        if reference is not None and preds is not None:
            if len(preds) != len(reference):
                raise ValueError("the data gave a different number of samples on a second pass")
            agree = (preds == reference).float().mean().item()
        rows.append(EvalRow(name=name, kind=kind, accuracy=correct / total, loss=loss_sum / total, agreement=agree))
    return rows


def format_table(rows: Sequence[EvalRow]) -> str:
    """A markdown table of the rows: model, accuracy (%), loss, and agreement with the ensemble (%) when measured."""
    with_agreement = any(row.agreement is not None for row in rows)
    header = "| model | accuracy (%) | loss |" + (" agreement with ensemble (%) |" if with_agreement else "")
    lines = [header, "|---|---:|---:|" + ("---:|" if with_agreement else "")]
    for row in rows:
        loss_text = f"{row.loss:.4f}" if math.isfinite(row.loss) else str(row.loss)
        line = f"| {row.name} | {100 * row.accuracy:.2f} | {loss_text} |"
        if with_agreement:
            line += " - |" if row.agreement is None else f" {100 * row.agreement:.2f} |"
        lines.append(line)
    return "\n".join(lines)
