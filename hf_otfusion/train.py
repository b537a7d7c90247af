"""Small, seeded training loops: ``train_classifier`` for the tiny classifiers of the scripts and tests (seconds on a
CPU), and ``finetune``, a short fine-tune of a fused model (a copy) on labelled data."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import FusionError
from .evaluate import batch_logits, labelled_batches, model_device

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def _optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise FusionError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Any, y: torch.Tensor, dev: torch.device) -> float:
    """One gradient step of cross-entropy on a batch (tensor or dict of keyword tensors; logits or ``.logits``)."""
    logits = batch_logits(model, x, dev)
    batch_loss = F.cross_entropy(logits.float(), y.to(dev))
    opt.zero_grad(set_to_none=True)
    batch_loss.backward()
    opt.step()
    return batch_loss.item()


def _shuffled(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
    """Mini-batches of in-memory tensors, a new seeded order every epoch, forever."""
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str | torch.device | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy on in-memory tensors and return it in eval mode.

    Mini-batch order comes from ``seed`` (a private generator; the global RNG is only seeded for
    layers such as dropout), so the same model, data and arguments give the same weights on the same
    machine. ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``).
    """
    if len(x) != len(y):
        raise FusionError(f"x and y differ in length: {len(x)} != {len(y)}")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise FusionError("epochs must be >= 0, batch_size >= 1 and lr > 0")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay)

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = x.to(dev), y.to(dev)
    model.train()
    batches = _shuffled(x, y, batch_size, generator)
    steps_per_epoch = -(-len(x) // batch_size)
    for epoch in range(epochs):
        total_loss, seen = 0.0, 0
        for xb, yb in itertools.islice(batches, steps_per_epoch):
            total_loss += _step(model, opt, xb, yb, dev) * len(yb)
            seen += len(yb)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / max(seen, 1):.4f}")
    model.eval()
    return model


def finetune(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor] | Iterable,
    *,
    steps: int,
    lr: float,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A copy of ``model`` fine-tuned for ``steps`` gradient steps of cross-entropy; ``model`` is left untouched.

    ``data`` is a pair of tensors ``(inputs, labels)``, drawn in seeded random mini-batches of ``batch_size``
    (a new order each pass), or an iterable of ``(input, label)`` batches (a DataLoader), cycled in its own
    order. Inputs are tensors (``model(x)``) or dicts of keyword tensors (``model(**x)``); the model may return
    logits or an object with ``.logits``. The model trains in train mode (BatchNorm statistics are updated,
    dropout is on) and is returned in eval mode. Deterministic for the same arguments on the same machine: the
    batch order comes from ``seed``, which also seeds the global RNG (dropout).

    Example:
        >>> tuned = finetune(fused, (x_train, y_train), steps=200, lr=0.01)  # doctest: +SKIP
    """
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise FusionError(f"finetune needs steps >= 0, lr > 0 and batch_size >= 1 (got {steps}, {lr}, {batch_size})")
    if optimizer not in OPTIMIZERS:
        raise FusionError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    tuned = copy.deepcopy(model)
    if device is not None:
        tuned.to(device)
    dev = model_device(tuned)
    opt = _optimizer(tuned, optimizer, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise FusionError(f"inputs and labels differ in length: {len(x)} != {len(y)}")
        if len(x) == 0:
            raise FusionError("no samples to fine-tune on")
        batches: Iterator[tuple] = _shuffled(x, y, batch_size, generator)
    else:
        batches = _cycle(data)
    tuned.train()
    for xb, yb in tqdm(itertools.islice(batches, steps), total=steps, desc="fine-tuning", disable=not progress,
                       leave=False):
        _step(tuned, opt, xb, yb, dev)
    tuned.eval()
    return tuned


def _cycle(data: Iterable) -> Iterator[tuple]:
    """The batches of an iterable again and again (an error when it has none)."""
    while True:
        empty = True
        for batch in labelled_batches(data):
            empty = False
            yield batch
        if empty:
            raise FusionError("no samples to fine-tune on")
