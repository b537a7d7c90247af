"""The refit's passes: calibration chunks run through an exported graph, a layer's inputs and outputs as rows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from .activations import _pieces, iter_batches
from .errors import FusionError
from .plan import AlignmentPlan
from .refit_units import _F64, _Unit
from .repair import _first, _Program
from .transport import carry

# ----------------------------------------------------------------------------------------------------------
# Rows: a layer's inputs and outputs as (samples x positions, features)


def _input_rows(unit: _Unit, x: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """(rows, groups, features) of a unit's input: unfolded patches for a convolution, with a ones column when the
    fitted map has a bias."""
    if unit.kind == "conv":
        if x.dim() == 3:  # conv1d as a 2-d convolution of height 1
            x = x.unsqueeze(2)
        kernel = tuple(weight_shape[2:]) if len(weight_shape) == 4 else (1, weight_shape[2])
        pad1 = (1,) if len(weight_shape) == 3 else ()
        stride, dilation = pad1 + unit.stride, pad1 + unit.dilation
        if isinstance(unit.padding, str):
            padding = (0, 0) if unit.padding == "valid" else tuple(d * (k - 1) for d, k in zip(dilation, kernel,
                                                                                           strict=True))
            pads = [p for total in reversed(padding) for p in (total // 2, total - total // 2)]
        else:
            padding = (0,) * len(pad1) + unit.padding
            pads = [p for total in reversed(padding) for p in (total, total)]
        if any(pads):
            x = F.pad(x, pads)
        patches = F.unfold(x.to(_F64), kernel, dilation=dilation, stride=stride)  # (N, C * k, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    elif unit.kind == "bn":
        rows = x.movedim(1, -1).reshape(-1, x.shape[1]).to(_F64)
    else:
        rows = x.reshape(-1, x.shape[-1]).to(_F64)
    rows = rows.reshape(rows.shape[0], unit.groups, -1)
    if unit.affine:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], unit.groups, 1)], -1)
    return rows


def _output_rows(unit: _Unit, y: torch.Tensor) -> torch.Tensor:
    """(rows, channels) of a unit's target value (channels last)."""
    y = _first(y)
    if unit.kind in ("conv", "bn"):
        return y.movedim(1, -1).reshape(-1, y.shape[1]).to(_F64)
    return y.reshape(-1, y.shape[-1]).to(_F64)


def _carry(rows: torch.Tensor, plan: AlignmentPlan, tensor: str, axis: int, length: int,
           coupling: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(rows, parent channels) of a parent's outputs carried to the fused model's ``length`` channels on ``tensor``'s
    ``axis``: each space segment by its coupling's barycentric map (fused channel ``j`` gets the transport-weighted
    mean of the parent channels sent to it), fixed channels as they are."""
    mismatch = f"refit: the outputs of {tensor!r} do not match between a parent and the fused model"
    members = [(s, m) for s, m in plan.members_by_tensor().get(tensor, []) if m.axis == axis]
    if not members:
        if rows.shape[1] != length:
            raise FusionError(mismatch)
        return rows
    missing = next((s.name for s, _ in members if s.name not in coupling), None)
    if missing is not None:
        raise FusionError(f"refit: no coupling for space {missing!r}")
    return carry(rows.T, [(m, s.heads, coupling[s.name]) for s, m in members], length, mismatch).T


# ----------------------------------------------------------------------------------------------------------
# Passes


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    pass


class _Collect(torch.fx.Interpreter):
    """Runs an exported graph until every wanted node's value is known (the rest of the graph is skipped)."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[n.name] = out
            if len(self.seen) == len(self.wanted):
                raise _Stop
        return out


def _collect(program: _Program, state: Mapping[str, torch.Tensor], batch: Any, wanted: set[str],
             device: torch.device) -> dict[str, Any]:
    if not wanted:
        return {}
    interp = _Collect(program.ep.graph_module, wanted)
    try:
        interp.run(*program.inputs(state, batch, device))
    except _Stop:
        pass
    except FusionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exported graph that does not take this batch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FusionError(f"refit could not run a calibration batch through the model's graph: {first}") from exc
    missing = wanted - set(interp.seen)
    if missing:
        raise FusionError(f"refit: the graph computed no value for {sorted(missing)[0]!r}")
    return interp.seen


def _chunks(calibration: Any, chunk: int, splittable: bool) -> Iterator[Any]:
    """Calibration inputs in pieces of at most ``chunk`` rows (tensors and dicts of keyword tensors)."""
    if isinstance(calibration, torch.Tensor):
        yield from calibration.split(chunk) if splittable else [calibration]
        return
    for batch in iter_batches(calibration):
        yield from _pieces(batch, chunk) if splittable else [batch]
