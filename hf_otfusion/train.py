"""A small, seeded training loop for the tiny classifiers of the scripts and tests (seconds on a CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = x.to(dev), y.to(dev)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(dev)
        total_loss, seen = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            logits = model(x[idx])
            batch_loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            total_loss += batch_loss.item() * len(idx)
            seen += len(idx)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / max(seen, 1):.4f}")
    model.eval()
    return model
