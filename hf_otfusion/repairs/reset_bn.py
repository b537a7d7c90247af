"""The repair ``reset_bn``: a fused model's BatchNorm running statistics recomputed on calibration data.

Averaging aligned models leaves BatchNorm running statistics that no longer describe the fused model's activations.
The model itself runs here (its norms in training mode), not its exported graph: no trace is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.export import ExportedProgram

from ..activations import iter_batches
from ..distributed import all_reduce, shard, sum_numbers, world
from ..errors import FusionError
from ..graph import to_device
from ..plan import AlignmentPlan
from ..registry import REPAIRS, Unit
from ..trace import as_args

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
        for batch in shard(iter_batches(calibration)):
            args, kwargs = as_args(to_device(batch, dev))
            model(*args, **kwargs)
            seen += 1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
        _merge_running_stats(norm)
    model.eval()
    if sum_numbers(seen)[0] == 0:
        raise FusionError("the calibration data is empty")
    return model


def _merge_running_stats(norm: _BatchNorm) -> None:
    """A distributed run: the average over every process's batches of a norm's ``momentum=None`` statistics (each
    an average over its own batches, so weighted by their number)."""
    if world()[1] == 1:
        return
    batches = all_reduce(norm.num_batches_tracked.double())
    if batches.item() == 0:
        return
    mine = norm.num_batches_tracked.double()
    for stat in (norm.running_mean, norm.running_var):
        stat.copy_(all_reduce(stat.double() * mine) / batches)
    norm.num_batches_tracked.fill_(int(batches.item()))


def reset_bn_repair(fused: nn.Module, parents: Sequence[nn.Module], calibration: Any, *, weights: list[float],
                    couplings: Any, device: torch.device, plan: AlignmentPlan, example_input: Any,
                    exported: ExportedProgram | None, params: BaseModel) -> nn.Module:
    """The registered repair: :func:`reset_norm_stats` of the fused model (the parents are not needed)."""
    return reset_norm_stats(fused, calibration, device=device)


RESET_BN = REPAIRS.register(Unit(
    name="reset_bn",
    description="BatchNorm statistics recomputed on the calibration data",
    fn=reset_bn_repair,
    needs=frozenset({"calibration"}),
))
