"""What the repairs share: a model's tensors on a device, their shapes, and the parents' weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import FusionError

State = dict[str, torch.Tensor]


def state_of(model: nn.Module | Mapping[str, torch.Tensor], device: torch.device) -> State:
    """A model's (or a state dict's) tensors by name, detached, on ``device``."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to(device) for k, v in state.items()}


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name."""
    return {k: tuple(v.shape) for k, v in state.items()}


def parent_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One weight per parent, normalised to sum to one (equal when ``weights`` is None)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n or any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise FusionError(f"repair needs one non-negative weight per parent ({n}), summing to more than 0; got {w}")
    return [x / sum(w) for x in w]


def run_device(fused: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where a repair's passes run: ``device``, or the fused model's (the CPU for a model without parameters)."""
    if device is not None:
        return torch.device(device)
    return next((p.device for p in fused.parameters()), torch.device("cpu"))
