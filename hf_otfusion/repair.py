"""Repairing a fused model's activation statistics.

Averaging aligned models shrinks the variance of their hidden units, and the averaged BatchNorm running
statistics no longer describe the fused model's activations. ``reset_norm_stats`` recomputes them on
calibration data.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from .activations import _to, iter_batches
from .errors import FusionError
from .trace import as_args

Repair = Literal["none", "reset_bn", "repair"]
REPAIRS: tuple[str, ...] = ("none", "reset_bn", "repair")
_BatchNorm = nn.modules.batchnorm._BatchNorm


def reset_norm_stats(model: nn.Module, calibration: Any, *, device: str | torch.device | None = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are recomputed on ``calibration``.

    The statistics are the exact average over all calibration batches (``momentum=None``); only the norm
    layers run in training mode, so dropout and the like stay off. A model without BatchNorm is returned as
    an unchanged copy.

    Example:
        >>> fused = reset_norm_stats(fused, calibration_loader)  # doctest: +SKIP
    """
    if calibration is None:
        raise FusionError("resetting norm statistics needs calibration data")
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    seen = 0
    with torch.no_grad():
        for batch in iter_batches(calibration):
            args, kwargs = as_args(_to(batch, dev))
            model(*args, **kwargs)
            seen += 1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()
    if seen == 0:
        raise FusionError("the calibration data is empty")
    return model
