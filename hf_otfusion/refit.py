"""Closed-form layer refit: a layer-wise distillation of the parents into the fused model, with no gradient step.

After alignment and averaging, the fused model's linear and convolution layers are re-solved in forward order. For a
layer with weight ``W`` (a convolution through its unfolded input patches, each group of a grouped or depthwise
convolution on its own), let ``X`` be its inputs on unlabelled calibration data *as the fused model computes them*
(so every layer refitted before it counts) and ``Y`` the target: the weighted mean of the parents' outputs of the
same layer, each parent run on its own inputs and its outputs carried into the fused model's channels (the
coupling's barycentric map: a permutation for equal widths, a transport-weighted mean of neurons otherwise). The
layer becomes the ridge solution

    W = (Y Xᵀ + λ W₀) (X Xᵀ + λ I)⁻¹,    λ = alpha · mean diag(X Xᵀ),

with an unregularised bias column when the layer has a bias. ``W₀`` (``prior="fused"``, the default) is the layer
as fusion left it, so directions the calibration data does not reach keep the averaged weights and a model refitted
onto its own outputs comes back exactly; ``prior="zero"`` is the plain ridge ``Y Xᵀ (X Xᵀ + λ I)⁻¹``.

A linear or convolution whose only user is a BatchNorm (eval mode, running statistics) is fitted together with it,
as one affine map onto the norm's output, and folded back: the weights take the fitted map, the BatchNorm's running
statistics become the refitted layer's own mean and variance on the calibration data and its weight and bias undo
the normalisation (so a later ``reset_bn`` or a fine-tune in training mode sees consistent statistics). The
architecture and the state_dict keys are unchanged. A LayerNorm or GroupNorm normalises each sample, which no affine
map folds: the layer before it is fitted onto its own output and the norm is left as it is. A BatchNorm not fed by
a single layer (after a residual add, on the input) is refitted on its own, as a per-channel affine map (a
depthwise 1x1 layer) onto the parents' mean output, with running statistics set to its input's on the fused model;
one without an affine weight and bias only gets its running statistics recomputed.

``X Xᵀ`` and ``Y Xᵀ`` are accumulated chunk by chunk in float64: memory grows with the layers' channels (and, per
chunk, with ``chunk`` inputs), never with the number of calibration samples. Layers whose inputs do not depend on
each other (the branches of a residual block, the query, key and value projections) are solved from one pass.

It uses unlabelled inputs and the parents' own outputs: no labels and no gradient. RegMean (Jin et al., "Dataless
Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) solves the same normal equations with the
parents' own input Gram matrices, ``W = (Σ wᵢ Wᵢ Xᵢ Xᵢᵀ)(Σ wᵢ Xᵢ Xᵢᵀ)⁻¹``: ``inputs="parents"`` computes that
(ridge-regularised) for comparison.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from .activations import _pieces, _static_batch, _to, iter_batches
from .distributed import all_reduce, all_reduce_, shard, sum_numbers
from .errors import FusionError
from .plan import AlignmentPlan
from .repair import _BN_STATS, _arg, _first, _normalized, _op, _param_names, _Program, _shapes, _state_of
from .trace import build_plan, export_model
from .transport import carry

Prior = Literal["fused", "zero"]
Inputs = Literal["fused", "parents"]
REFIT_ALPHA = 1e-3  # ridge strength relative to the Gram matrix's mean diagonal (measured: docs/results/refit.md)
REFIT_CHUNK = 64  # inputs per forward pass: the unfolded patches of one chunk are held at a time
State = dict[str, torch.Tensor]
_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# What to refit: read from the exported graph


@dataclass(frozen=True)
class _Norm:
    """A BatchNorm (eval mode) fed only by the unit's layer: fitted together with it and folded back."""

    node: str
    weight: str | None
    bias: str | None
    mean: str
    var: str
    eps: float


@dataclass(frozen=True)
class _Unit:
    """One refitted layer: graph node ``node`` (``kind`` linear, addmm or conv), its input node and target node."""

    node: str
    kind: str
    weight: str
    bias: str | None
    source: str  # the node whose value is the layer's input
    out: str  # the node whose value is the target (the layer, or its BatchNorm)
    norm: _Norm | None
    level: int
    stats: _Norm | None = None  # kind "bn": the BatchNorm itself, refitted as a per-channel affine map
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def out_axis(self) -> int:
        return 1 if self.kind == "addmm" else 0

    @property
    def affine(self) -> bool:
        """Whether the fitted map has a bias column (the layer's bias, or its BatchNorm's shift)."""
        return self.bias is not None or self.norm is not None


@dataclass(frozen=True)
class _Reset:
    """A BatchNorm with running statistics that no unit folds: its statistics are measured at its level."""

    node: str
    source: str
    mean: str
    var: str
    level: int


_LAYERS = {"linear", "addmm", "conv1d", "conv2d", "convolution"}


def _ints(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def find_units(ep: ExportedProgram) -> tuple[list[_Unit], list[_Reset]]:
    """The layers to refit and the BatchNorms to recompute, in graph order, each with its level: one more than the
    highest level among the units it depends on (units of one level are solved from one pass)."""
    names = _param_names(ep)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}

    def param(arg: Any) -> str | None:
        return names.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def single_use(arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in placeholders and len(arg.users) == 1

    found: dict[str, dict[str, Any]] = {}  # producer node -> unit fields (without level)
    folded: set[str] = set()
    resets: dict[str, dict[str, Any]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op(node)
        if op in _LAYERS:
            fields = _layer_fields(node, op, param, single_use)
            if fields is None:
                continue
            users = list(node.users)
            norm = users[0] if len(users) == 1 and _op(users[0]) in _BN_STATS and users[0].args[0] is node else None
            if norm is not None:
                i_mean, i_var, i_eps = _BN_STATS[_op(norm)]
                mean, var = param(_arg(norm, i_mean)), param(_arg(norm, i_var))
                if mean is not None and var is not None:
                    w, b = param(_arg(norm, 1)), param(_arg(norm, 2))
                    fields["norm"] = _Norm(norm.name, w, b, mean, var, float(_arg(norm, i_eps)))
                    fields["out"] = norm.name
                    folded.add(norm.name)
            found[node.name] = fields
        elif op in _BN_STATS and node.name not in folded:
            i_mean, i_var, i_eps = _BN_STATS[op]
            mean, var = param(_arg(node, i_mean)), param(_arg(node, i_var))
            w, b = param(_arg(node, 1)), param(_arg(node, 2))
            if mean is None or var is None or not isinstance(node.args[0], torch.fx.Node):
                continue
            if w is not None and b is not None and single_use(_arg(node, 1)) and single_use(_arg(node, 2)):
                stats = _Norm(node.name, w, b, mean, var, float(_arg(node, i_eps)))
                found[node.name] = dict(node=node.name, kind="bn", weight=w, bias=b, source=node.args[0].name,
                                        out=node.name, norm=None, stats=stats, groups=int(_shape0(node.args[0])))
            else:
                resets[node.name] = dict(node=node.name, source=node.args[0].name, mean=mean, var=var)
    # levels: a unit is solved after every unit its input depends on
    depth: dict[str, int] = {}
    units: list[_Unit] = []
    out_resets: list[_Reset] = []
    for node in ep.graph.nodes:
        d = max((depth.get(a.name, 0) for a in node.all_input_nodes), default=0)
        if node.name in found:
            d += 1
            units.append(_Unit(level=d, **found[node.name]))
        elif node.name in resets:
            d += 1
            out_resets.append(_Reset(level=d, **resets[node.name]))
        depth[node.name] = d
    return units, out_resets


def _shape0(node: torch.fx.Node) -> int:
    """The channel count (dim 1) of a graph value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise FusionError(f"refit: no channel dimension on {node.name!r}")
    return int(val.shape[1])


def _layer_fields(node: torch.fx.Node, op: str, param: Any, single_use: Any) -> dict[str, Any] | None:
    """The unit fields of one linear/addmm/conv node, or None when it is not a refittable layer."""
    if op == "addmm":
        x, w_arg, b_arg = node.args[1], node.args[2], node.args[0]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
    else:
        x, w_arg, b_arg = node.args[0], node.args[1], _arg(node, 2)
    weight = param(w_arg)
    if weight is None or not single_use(w_arg) or not isinstance(x, torch.fx.Node):
        return None  # not a weight layer, or a weight shared with another op (tied): left as fused
    bias = param(b_arg)
    if b_arg is not None and (bias is None or not single_use(b_arg)):
        return None
    fields: dict[str, Any] = dict(node=node.name, weight=weight, bias=bias, source=x.name, out=node.name, norm=None)
    if op in ("linear", "addmm"):
        fields["kind"] = op
        return fields
    val = w_arg.meta.get("val")
    nd = val.dim() - 2 if isinstance(val, torch.Tensor) else None
    if nd not in (1, 2):
        return None  # 3-d convolutions are left as fused
    if op == "convolution":
        if bool(_arg(node, 6)):
            return None  # transposed
        stride, padding, dilation, groups = _arg(node, 3), _arg(node, 4), _arg(node, 5), _arg(node, 8)
    else:
        stride, padding, dilation, groups = _arg(node, 3), _arg(node, 4), _arg(node, 5), _arg(node, 6)
    fields.update(kind="conv", stride=_ints(stride, nd, 1), dilation=_ints(dilation, nd, 1),
                  padding=padding if isinstance(padding, str) else _ints(padding, nd, 0),
                  groups=int(groups) if groups is not None else 1)
    return fields


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


@dataclass
class _Normal:
    """The normal equations of one unit, per group: ``gram`` = Σ x xᵀ, ``cross`` = Σ y xᵀ (float64)."""

    gram: torch.Tensor  # (groups, d, d)
    cross: torch.Tensor  # (groups, out per group, d)
    count: float = 0.0  # rows, weighted as the Gram matrix is

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        """``x``: (rows, groups, d); ``y``: (rows, channels)."""
        if x.shape[0] != y.shape[0]:
            raise FusionError("refit: a layer's inputs and outputs have different numbers of positions")
        groups = x.shape[1]
        yg = y.reshape(y.shape[0], groups, -1)
        self.gram += weight * torch.einsum("rgi,rgj->gij", x, x)
        self.cross += weight * torch.einsum("rgo,rgi->goi", yg, x)
        self.count += weight * x.shape[0]

    def reduce(self) -> None:
        """Sum over the processes of a distributed run (nothing in a single process)."""
        all_reduce_([self.gram, self.cross])
        self.count = sum_numbers(self.count)[0]


def _current_map(unit: _Unit, state: State) -> torch.Tensor:
    """The unit's affine map as the state has it, (groups, out per group, d): the ridge prior."""
    if unit.stats is not None:  # a BatchNorm: y = s x + t per channel
        n = unit.stats
        scale = state[n.weight].to(_F64) / (state[n.var].to(_F64) + n.eps).sqrt()
        shift = state[n.bias].to(_F64) - scale * state[n.mean].to(_F64)
        return torch.stack([scale, shift], -1).unsqueeze(1)
    w = state[unit.weight].to(_F64)
    if unit.kind == "addmm":
        w = w.T
    out = w.shape[0]
    w = w.reshape(unit.groups, out // unit.groups, -1)
    b = state[unit.bias].to(_F64) if unit.bias is not None else torch.zeros(out, dtype=_F64, device=w.device)
    if unit.norm is not None:
        n = unit.norm
        g = state[n.weight].to(_F64) if n.weight is not None else torch.ones_like(b)
        scale = g / (state[n.var].to(_F64) + n.eps).sqrt()
        shift = state[n.bias].to(_F64) if n.bias is not None else torch.zeros_like(b)
        w = w * scale.view(unit.groups, -1, 1)
        b = scale * (b - state[n.mean].to(_F64)) + shift
    if unit.affine:
        w = torch.cat([w, b.view(unit.groups, -1, 1)], -1)
    return w


def _solve(normal: _Normal, prior: torch.Tensor | None, alpha: float, affine: bool) -> torch.Tensor:
    """The ridge solution (groups, out per group, d); the bias column (last, when ``affine``) is not regularised."""
    gram, cross = normal.gram, normal.cross
    d = gram.shape[-1] - (1 if affine else 0)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)[..., :d]
    lam = alpha * float(diag.mean()) if diag.numel() else 0.0
    reg = torch.zeros(gram.shape[-1], dtype=_F64, device=gram.device)
    reg[:d] = lam
    lhs = gram + torch.diag(reg)
    rhs = cross if prior is None else cross + prior * reg
    try:
        chol = torch.linalg.cholesky(lhs)
        sol = torch.cholesky_solve(rhs.transpose(-1, -2), chol)
    except RuntimeError:  # singular (alpha = 0 with inputs that span less than their dimension)
        sol = torch.linalg.pinv(lhs, hermitian=True) @ rhs.transpose(-1, -2)
    return sol.transpose(-1, -2)


def _write(unit: _Unit, state: State, fit: torch.Tensor, normal: _Normal) -> None:
    """Fold a fitted map (groups, out per group, d) into the unit's weight, bias and BatchNorm."""
    groups = unit.groups
    if unit.stats is not None:  # a BatchNorm: statistics of its input on the calibration data, affine = the fit
        n = unit.stats
        count = max(normal.count, 1e-300)
        mean = normal.gram[:, 0, 1] / count
        var = (normal.gram[:, 0, 0] / count - mean * mean).clamp_min(0)
        scale, shift = fit[:, 0, 0], fit[:, 0, 1]
        state[n.mean] = mean.to(state[n.mean].dtype)
        state[n.var] = var.to(state[n.var].dtype)
        state[n.weight] = (scale * (var + n.eps).sqrt()).to(state[n.weight].dtype)
        state[n.bias] = (scale * mean + shift).to(state[n.bias].dtype)
        return
    d = fit.shape[-1] - (1 if unit.affine else 0)
    a = fit[..., :d]
    b = fit[..., d].reshape(-1) if unit.affine else None
    old = state[unit.weight]
    if unit.kind == "addmm":
        state[unit.weight] = a.reshape(-1, d).T.to(old.dtype).contiguous()
    else:
        state[unit.weight] = a.reshape(old.shape).to(old.dtype)
    if unit.norm is None:
        if unit.bias is not None:
            state[unit.bias] = b.to(state[unit.bias].dtype)
        return
    # the BatchNorm: its statistics are the refitted layer's own on the calibration data, its affine undoes them
    n = unit.norm
    c = b if unit.bias is not None else torch.zeros_like(b)
    if unit.bias is not None:
        state[unit.bias] = c.to(state[unit.bias].dtype)
    full = torch.cat([a, c.view(groups, -1, 1)], -1)  # z = [a, c] [x; 1]
    count = max(normal.count, 1e-300)
    moment = normal.gram[..., :, -1] / count  # (groups, d + 1): E[x; 1]
    mean = torch.einsum("goi,gi->go", full, moment).reshape(-1)
    sq = torch.einsum("goi,gij,goj->go", full, normal.gram / count, full).reshape(-1)
    var = (sq - mean * mean).clamp_min(0)
    dtype = state[n.mean].dtype
    if n.weight is not None and n.bias is not None:
        state[n.mean], state[n.var] = mean.to(dtype), var.to(dtype)
        state[n.weight] = (var + n.eps).sqrt().to(state[n.weight].dtype)
        state[n.bias] = (mean - c + b).to(state[n.bias].dtype)
        return
    # no full affine to undo the normalisation with: statistics that make the norm a shift (identity scale)
    if not 0 < n.eps < 1:
        raise FusionError(f"refit cannot fold into the BatchNorm of {unit.weight!r} (no affine, eps={n.eps})")
    shift = state[n.bias].to(_F64) if n.bias is not None else torch.zeros_like(b)
    if n.weight is not None:
        state[n.weight] = torch.ones_like(state[n.weight])
    state[n.var] = torch.full_like(state[n.var], 1.0 - n.eps)
    state[n.mean] = (c - b + shift).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The refit


@dataclass
class _Parent:
    program: _Program
    state: State
    weight: float
    coupling: Mapping[str, torch.Tensor] | None
    units: dict[str, _Unit]  # by weight name


def refit_model(
    fused: nn.Module,
    parents: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    calibration: Any,
    *,
    weights: Sequence[float] | None = None,
    couplings: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    alpha: float = REFIT_ALPHA,
    prior: Prior = "fused",
    inputs: Inputs = "fused",
    chunk: int = REFIT_CHUNK,
    device: str | torch.device | None = None,
    plan: AlignmentPlan | None = None,
    example_input: Any = None,
    exported: ExportedProgram | None = None,
) -> nn.Module:
    """A copy of ``fused`` whose linear and convolution layers are refitted, in forward order, by ridge least squares
    onto the weighted mean of the parents' outputs of the same layer (see the module docstring).

    Args:
        fused: the fused model (architecture, widths and state_dict keys are kept).
        parents: without ``couplings``, the parents aligned to the fused model's channels (modules or state dicts of
            the fused model's shapes). With ``couplings``, the parents as they are (modules; widths may differ).
        calibration: unlabelled inputs: a tensor, or an iterable of input batches or of (input, label) batches (the
            labels are ignored).
        weights: one non-negative weight per parent (default equal), normalised.
        couplings: per parent, the OT coupling of every space (``{space: (parent channels, fused channels)}``) or
            None for a parent already in the fused model's channels (the target). A parent's outputs are computed by
            the parent itself and carried to the fused channels by the coupling's barycentric map.
        alpha: ridge strength, relative to the mean diagonal of each layer's input Gram matrix.
        prior: ``"fused"``: shrink towards the layer as fused (exact on a model refitted onto itself); ``"zero"``:
            plain ridge.
        inputs: ``"fused"`` (the refit: each layer's inputs as the fused model computes them) or ``"parents"``
            (RegMean: each parent's own inputs and Gram matrix; needs parents in the fused model's shapes).
        chunk: inputs per forward pass (memory holds one chunk's unfolded patches).
        device: where the passes run (default: the fused model's device).
        plan: the fused model's alignment plan, needed with ``couplings`` (traced when omitted).
        example_input: a batch to trace the models with (default: the first calibration batch).
        exported: an exported program of a model of the fused model's architecture and shapes (skips that export).

    Example:
        >>> refitted = refit_model(fused, [aligned_a, aligned_b], calibration=x_train[:1000])  # doctest: +SKIP
    """
    if calibration is None:
        raise FusionError("repair='refit' needs calibration data")
    if len(parents) < 1:
        raise FusionError("refit needs the parents")
    if couplings is not None and len(couplings) != len(parents):
        raise FusionError(f"refit: got {len(couplings)} couplings for {len(parents)} parents")
    if prior not in ("fused", "zero"):
        raise FusionError(f"unknown refit prior {prior!r}: choose fused or zero")
    if inputs not in ("fused", "parents"):
        raise FusionError(f"unknown refit inputs {inputs!r}: choose fused or parents")
    if not alpha >= 0 or not math.isfinite(alpha):
        raise FusionError(f"refit needs alpha >= 0, got {alpha}")
    if chunk < 1:
        raise FusionError(f"refit needs chunk >= 1, got {chunk}")
    w = _normalized(weights, len(parents))
    dev = torch.device(device) if device is not None else next(
        (p.device for p in fused.parameters()), torch.device("cpu"))
    if example_input is None:
        example_input = next(iter(_chunks(calibration, chunk, True)), None)
        if example_input is None:
            raise FusionError("the calibration data is empty")
    model = copy.deepcopy(fused).to(dev).eval()
    ep = exported if exported is not None else export_model(model, _to(example_input, dev))
    state = _state_of(model, dev)
    units, resets = find_units(ep)
    program = _Program(ep)
    if couplings is not None and any(c is not None for c in couplings) and plan is None:
        plan = build_plan(model, example_input, exported=ep)

    members: list[_Parent] = []
    for i, (wi, parent) in enumerate(zip(w, parents, strict=True)):
        if wi == 0:
            continue
        coupling = couplings[i] if couplings is not None else None
        p_state = _state_of(parent, dev)
        same = _shapes(p_state) == _shapes(state)
        if coupling is None and not same:
            bad = next((k for k in state if k not in p_state or p_state[k].shape != state[k].shape), "?")
            raise FusionError(f"refit: parent {i} does not have the fused model's shapes (tensor {bad!r}): pass the "
                              "parents aligned to the fused model, or their couplings")
        if inputs == "parents" and coupling is not None:
            raise FusionError("refit with inputs='parents' (RegMean) needs the parents aligned to the fused model "
                              "(no couplings)")
        if same:
            p_program, p_units = program, units
        else:
            if not isinstance(parent, nn.Module):
                raise FusionError(f"refit: parent {i} has other widths, so it must be the model itself (a module)")
            ep_p = export_model(copy.deepcopy(parent).to(dev).eval(), _to(example_input, dev))
            p_program, p_units = _Program(ep_p), find_units(ep_p)[0]
        members.append(_Parent(p_program, p_state, wi, coupling, {u.weight: u for u in p_units}))
        for unit in units:
            if unit.weight not in members[-1].units:
                raise FusionError(f"refit: parent {i} has no layer with weight {unit.weight!r}")
    splittable = _static_batch(ep) is None and all(_static_batch(p.program.ep) is None for p in members)

    levels = sorted({u.level for u in units} | {r.level for r in resets})
    for level in levels:
        todo = [u for u in units if u.level == level]
        stats = [r for r in resets if r.level == level]
        normals: dict[str, _Normal] = {}
        for unit in todo:
            shape = state[unit.weight].shape
            out = shape[unit.out_axis]
            d_in = (shape[0] if unit.kind == "addmm" else int(math.prod(shape[1:]))) + (1 if unit.affine else 0)
            normals[unit.node] = _Normal(torch.zeros(unit.groups, d_in, d_in, dtype=_F64, device=dev),
                                         torch.zeros(unit.groups, out // unit.groups, d_in, dtype=_F64, device=dev))
        sums = {r.node: [torch.zeros(state[r.mean].shape[0], dtype=_F64, device=dev)] * 2 + [0] for r in stats}
        wanted = {u.source for u in todo} | {r.source for r in stats}
        seen = 0
        for batch in shard(_chunks(calibration, chunk, splittable)):
            seen += 1
            values = _collect(program, state, batch, wanted if inputs == "fused" else {r.source for r in stats}, dev)
            for r in stats:
                rows = values[r.source].movedim(1, -1).reshape(-1, values[r.source].shape[1]).to(_F64)
                s, sq, n = sums[r.node]
                sums[r.node] = [s + rows.sum(0), sq + (rows * rows).sum(0), n + rows.shape[0]]
            target: dict[str, torch.Tensor] = {}
            for p in members:
                p_wanted = {p.units[u.weight].out for u in todo}
                if inputs == "parents":
                    p_wanted |= {p.units[u.weight].source for u in todo}
                got = _collect(p.program, p.state, batch, p_wanted, dev)
                for unit in todo:
                    pu = p.units[unit.weight]
                    y = _output_rows(pu, got[pu.out])
                    if p.coupling is not None:
                        y = _carry(y, plan, unit.weight, unit.out_axis, state[unit.weight].shape[unit.out_axis],
                                   p.coupling)
                    if inputs == "parents":
                        x = _input_rows(unit, got[pu.source], state[unit.weight].shape)
                        normals[unit.node].add(x, y, p.weight)
                    else:
                        target[unit.node] = target[unit.node] + p.weight * y if unit.node in target else p.weight * y
            if inputs == "fused":
                for unit in todo:
                    x = _input_rows(unit, values[unit.source], state[unit.weight].shape)
                    normals[unit.node].add(x, target[unit.node])
        if sum_numbers(seen)[0] == 0:
            raise FusionError("the calibration data is empty")
        for unit in todo:  # a distributed run: every process's sums
            normals[unit.node].reduce()
        for r in stats:
            s, sq, n = sums[r.node]
            sums[r.node] = [all_reduce(s), all_reduce(sq), sum_numbers(n)[0]]
        for unit in todo:
            prior_map = _current_map(unit, state) if prior == "fused" else None
            fit = _solve(normals[unit.node], prior_map, alpha, unit.affine)
            _write(unit, state, fit, normals[unit.node])
        for r in stats:
            s, sq, n = sums[r.node]
            mean = s / max(n, 1)
            state[r.mean] = mean.to(state[r.mean].dtype)
            state[r.var] = (sq / max(n, 1) - mean * mean).clamp_min(0).to(state[r.var].dtype)
    model.load_state_dict({k: v for k, v in state.items()})
    if plan is not None:
        for alias, name in plan.aliases.items():  # tied tensors stay tied
            model.state_dict()[alias].copy_(state[name])
    return model.train().eval()  # train() drops weight-derived caches (see fuse)
