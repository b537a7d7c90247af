"""What the refit re-solves, read from the exported graph: its layers and BatchNorms, each with its pass level."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from ..errors import FusionError
from ..graph import LAYER_OPS, NORM_OPS, arg, op_name, tensor_names

F64 = torch.float64


@dataclass(frozen=True)
class FitNorm:
    """A BatchNorm (eval mode) fed only by the unit's layer: fitted together with it and folded back."""

    node: str
    weight: str | None
    bias: str | None
    mean: str
    var: str
    eps: float


@dataclass(frozen=True)
class FitUnit:
    """One refitted layer: graph node ``node`` (``kind`` linear, addmm or conv), its input node and target node."""

    node: str
    kind: str
    weight: str
    bias: str | None
    source: str  # the node whose value is the layer's input
    out: str  # the node whose value is the target (the layer, or its BatchNorm)
    norm: FitNorm | None
    level: int
    stats: FitNorm | None = None  # kind "bn": the BatchNorm itself, refitted as a per-channel affine map
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    # the residual add the unit's output flows into and the add's other operand (computed before this level): the
    # "stream" target is the parents' mean of the add's output less the fused model's other operand
    stream: tuple[str, str] | None = None

    @property
    def out_axis(self) -> int:
        return 1 if self.kind == "addmm" else 0

    @property
    def affine(self) -> bool:
        """Whether the fitted map has a bias column (the layer's bias, or its BatchNorm's shift)."""
        return self.bias is not None or self.norm is not None


@dataclass(frozen=True)
class StatsReset:
    """A BatchNorm with running statistics that no unit folds: its statistics are measured at its level."""

    node: str
    source: str
    mean: str
    var: str
    level: int


_SAME_VALUE = {"clone", "alias", "contiguous", "dropout"}


def _ints(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def find_units(ep: ExportedProgram) -> tuple[list[FitUnit], list[StatsReset]]:
    """The layers to refit and the BatchNorms to recompute, in graph order, each with its level: one more than the
    highest level among the units it depends on (units of one level are solved from one pass)."""
    names = tensor_names(ep)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}

    def param(value: Any) -> str | None:
        return names.get(value.name) if isinstance(value, torch.fx.Node) else None

    def single_use(value: Any) -> bool:
        return isinstance(value, torch.fx.Node) and value.name in placeholders and len(value.users) == 1

    found: dict[str, dict[str, Any]] = {}  # producer node -> unit fields (without level)
    folded: set[str] = set()
    resets: dict[str, dict[str, Any]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node)
        if op in LAYER_OPS:
            fields = _layer_fields(node, op, param, single_use)
            if fields is None:
                continue
            users = list(node.users)
            norm = users[0] if len(users) == 1 and _running(users[0]) is not None and users[0].args[0] is node \
                else None
            if norm is not None:
                i_mean, i_var, i_eps = _running(norm)
                mean, var = param(arg(norm, i_mean)), param(arg(norm, i_var))
                if mean is not None and var is not None:
                    w, b = param(arg(norm, 1)), param(arg(norm, 2))
                    fields["norm"] = FitNorm(norm.name, w, b, mean, var, float(arg(norm, i_eps)))
                    fields["out"] = norm.name
                    folded.add(norm.name)
            found[node.name] = fields
        elif _running(node) is not None and node.name not in folded:
            i_mean, i_var, i_eps = _running(node)
            mean, var = param(arg(node, i_mean)), param(arg(node, i_var))
            w, b = param(arg(node, 1)), param(arg(node, 2))
            if mean is None or var is None or not isinstance(node.args[0], torch.fx.Node):
                continue
            if w is not None and b is not None and single_use(arg(node, 1)) and single_use(arg(node, 2)):
                stats = FitNorm(node.name, w, b, mean, var, float(arg(node, i_eps)))
                found[node.name] = dict(node=node.name, kind="bn", weight=w, bias=b, source=node.args[0].name,
                                        out=node.name, norm=None, stats=stats, groups=int(_shape0(node.args[0])))
            else:
                resets[node.name] = dict(node=node.name, source=node.args[0].name, mean=mean, var=var)
    # levels: a unit is solved after every unit its input depends on
    depth: dict[str, int] = {}
    units: list[FitUnit] = []
    out_resets: list[StatsReset] = []
    for node in ep.graph.nodes:
        d = max((depth.get(a.name, 0) for a in node.all_input_nodes), default=0)
        if node.name in found:
            d += 1
            units.append(FitUnit(level=d, **found[node.name]))
        elif node.name in resets:
            d += 1
            out_resets.append(StatsReset(level=d, **resets[node.name]))
        depth[node.name] = d
    nodes = {n.name: n for n in ep.graph.nodes}
    units = [dataclasses.replace(u, stream=_stream(nodes[u.out], depth, u.level)) for u in units]
    return units, out_resets


def node_depths(ep: ExportedProgram, units: list[FitUnit], resets: list[StatsReset]) -> dict[str, int]:
    """node -> the highest level among the units and resets its value depends on (a unit's or reset's own node: its
    level): the value is final once every level up to it is solved."""
    solved = {u.node for u in units} | {r.node for r in resets}
    depth: dict[str, int] = {}
    for node in ep.graph.nodes:
        d = max((depth.get(a.name, 0) for a in node.all_input_nodes), default=0)
        depth[node.name] = d + 1 if node.name in solved else d
    return depth


def _running(node: torch.fx.Node) -> tuple[int, int, int] | None:
    """A BatchNorm's (running_mean, running_var, eps) argument positions; None for any other op."""
    norm = NORM_OPS.get(op_name(node))
    return norm.running if norm is not None else None


def _stream(node: torch.fx.Node, depth: dict[str, int], level: int) -> tuple[str, str] | None:
    """(add, other operand) when ``node``'s value (a BatchNorm's through its first output) is added to a value that
    depends only on units of lower levels than ``level``; None otherwise."""
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) == "getitem" and users[0].args[1] == 0:
        node, users = users[0], list(users[0].users)
    while len(users) == 1 and op_name(users[0]) in _SAME_VALUE:  # an eval-mode dropout exports as a clone
        node, users = users[0], list(users[0].users)
    if len(users) != 1 or op_name(users[0]) != "add" or users[0].kwargs.get("alpha", 1) != 1:
        return None
    add = users[0]
    others = [a for a in add.args if a is not node]
    if len(add.args) != 2 or len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return None
    other = others[0]
    mine, theirs, total = (v.meta.get("val") for v in (node, other, add))
    if not all(isinstance(v, torch.Tensor) for v in (mine, theirs, total)) or mine.shape != total.shape or \
            theirs.shape != total.shape:
        return None
    return (add.name, other.name) if depth.get(other.name, 0) < level else None


def _shape0(node: torch.fx.Node) -> int:
    """The channel count (dim 1) of a graph value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise FusionError(f"refit: no channel dimension on {node.name!r}")
    return int(val.shape[1])


def _layer_fields(node: torch.fx.Node, op: str, param: Any, single_use: Any) -> dict[str, Any] | None:
    """The unit fields of one linear/addmm/conv node, or None when it is not a refittable layer."""
    layer = LAYER_OPS[op]
    x, w_arg, b_arg = node.args[layer.x], node.args[layer.weight], arg(node, layer.bias)
    if op == "addmm" and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return None
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
        return None  # 3-d convolutions are left as fused: a layer's inputs are unfolded as 1-d or 2-d patches
    if layer.transposed is not None and bool(arg(node, layer.transposed)):
        return None  # transposed
    stride, padding, dilation, groups = (arg(node, i) for i in (layer.stride, layer.padding, layer.dilation,
                                                               layer.groups))
    fields.update(kind="conv", stride=_ints(stride, nd, 1), dilation=_ints(dilation, nd, 1),
                  padding=padding if isinstance(padding, str) else _ints(padding, nd, 0),
                  groups=int(groups) if groups is not None else 1)
    return fields
