"""The refit's passes: calibration chunks run through an exported graph, a layer's inputs and outputs as rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..activations import iter_batches, pieces
from ..distributed import shard, sum_numbers
from ..errors import FusionError
from ..graph import Env, Runner, graph_errors, main_value, run
from ..plan import AlignmentPlan
from ..transport import carry
from ._refit_units import F64, FitUnit

# ----------------------------------------------------------------------------------------------------------
# Rows: a layer's inputs and outputs as (samples x positions, features)


def input_rows(unit: FitUnit, x: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
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
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C * k, L), copied into float64 below
        n, feats, length = patches.shape
        return _with_ones(patches.view(n, unit.groups, feats // unit.groups, length).permute(0, 3, 1, 2),
                          unit.affine)
    if unit.kind == "bn":
        x = x.movedim(1, -1)
    return _with_ones(x.reshape(*x.shape[:-1], unit.groups, x.shape[-1] // unit.groups), unit.affine)


def _with_ones(x: torch.Tensor, affine: bool) -> torch.Tensor:
    """(rows, groups, features [+ 1]) in float64 from (..., groups, features), in one copy: a ones column last when
    the fitted map has a bias."""
    d = x.shape[-1]
    out = torch.empty(*x.shape[:-1], d + (1 if affine else 0), dtype=F64, device=x.device)
    out[..., :d].copy_(x)
    if affine:
        out[..., d] = 1
    return out.reshape(-1, *out.shape[-2:])


def output_rows(unit: FitUnit, y: torch.Tensor) -> torch.Tensor:
    """(rows, channels) of a unit's target value (channels last)."""
    y = main_value(y)
    if unit.kind in ("conv", "bn"):
        return y.movedim(1, -1).reshape(-1, y.shape[1]).to(F64)
    return y.reshape(-1, y.shape[-1]).to(F64)


def carried(rows: torch.Tensor, plan: AlignmentPlan, tensor: str, axis: int, length: int,
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
    return carry(rows.T, [(s.layout(m), coupling[s.name]) for s, m in members], length, mismatch).T


# ----------------------------------------------------------------------------------------------------------
# Passes


def collect(runner: Runner, batch: Any, wanted: set[str]) -> dict[str, Any]:
    """The values of the ``wanted`` nodes on one batch (the rest of the graph is not run)."""
    if not wanted:
        return {}
    seen = run(runner, batch, who="refit", wanted=wanted)
    missing = wanted - set(seen)
    if missing:
        raise FusionError(f"refit: the graph computed no value for {sorted(missing)[0]!r}")
    return seen


def chunks(calibration: Any, chunk: int, splittable: bool) -> Iterator[Any]:
    """Calibration inputs in pieces of at most ``chunk`` rows (tensors and dicts of keyword tensors)."""
    if isinstance(calibration, torch.Tensor):
        yield from calibration.split(chunk) if splittable else [calibration]
        return
    for batch in iter_batches(calibration):
        yield from pieces(batch, chunk) if splittable else [batch]


# ----------------------------------------------------------------------------------------------------------
# Held passes: every chunk's values kept between levels, so each graph runs once over the calibration data


class _Lane:
    """One chunk's values in one graph, computed node by node as the levels need them and let go after their last
    use; parameters and buffers are read from the runner's state when a node runs, so later nodes see earlier
    refits."""

    def __init__(self, runner: Runner, batch: Any, keep: Mapping[str, int]):
        self.env = Env(runner, batch, free=False, check_batch=False)
        self.keep = keep  # node -> the last level that reads it
        self.pending = [n for n in runner.nodes if n.op not in ("placeholder", "output")]
        self.users = {n: sum(u.op != "output" for u in n.users) for n in runner.nodes}

    def advance(self, ready: Callable[[torch.fx.Node], bool], level: int) -> None:
        """Compute every pending node that ``ready`` admits (their inputs are computed or admitted too)."""
        left = []
        for node in self.pending:
            if not ready(node):
                left.append(node)
                continue
            self.env.step(node)
            for arg in node.all_input_nodes:
                self.users[arg] -= 1
                self._drop(arg, level - 1)  # a value read at this level is kept until it is taken
        self.pending = left

    def _drop(self, node: torch.fx.Node, level: int) -> None:
        """Let a value go when no pending node uses it and no level after ``level`` reads it."""
        if self.users[node] <= 0 and self.keep.get(node.name, -1) <= level and node.op != "placeholder":
            self.env.drop(node)

    def take(self, wanted: set[str], level: int) -> dict[str, Any]:
        """The values of ``wanted`` (computed), each let go when no later node or level needs it."""
        out = {}
        for node in self.env.graph.nodes:
            if node.name in wanted:
                if node not in self.env.env:
                    raise FusionError(f"refit: the graph computed no value for {node.name!r}")
                out[node.name] = self.env.env[node]
                self._drop(node, level)
        return out


class Held:
    """One graph's lanes over every chunk. ``depth``: the fused model's graph, whose node of depth ``d`` is final once
    the units of levels up to ``d`` are solved; None: a parent's graph (never refitted: run as far as asked)."""

    def __init__(self, runner: Runner, batches: Sequence[Any], wanted: Mapping[int, set[str]],
                 depth: Mapping[str, int] | None):
        self.depth = depth
        keep: dict[str, int] = {}
        for level, names in sorted(wanted.items()):
            keep.update({n: level for n in names})
        self.wanted = wanted
        self.order = {n.name: i for i, n in enumerate(runner.nodes)}
        with graph_errors("refit"):
            self.lanes = [_Lane(runner, batch, keep) for batch in batches]

    def values(self, chunk: int, level: int) -> dict[str, Any]:
        """Chunk ``chunk``'s values of the nodes wanted at ``level`` (all levels below it solved)."""
        wanted = self.wanted.get(level, set())
        if not wanted:
            return {}
        if self.depth is not None:
            depth = self.depth

            def ready(node: torch.fx.Node) -> bool:
                return depth.get(node.name, 0) < level
        else:
            last = max(self.order[n] for n in wanted)

            def ready(node: torch.fx.Node) -> bool:
                return self.order[node.name] <= last
        lane = self.lanes[chunk]
        with graph_errors("refit"), torch.no_grad():
            lane.advance(ready, level)
        return lane.take(wanted, level)


def held_bytes(runner: Runner) -> int:
    """Bytes per calibration sample of every value in a graph (an upper bound of what its lanes hold), from the
    traced shapes, the batch size taken as 1; 0 when a shape is not known."""
    total = 0
    for node in runner.nodes:
        vals = node.meta.get("val")
        for val in vals if isinstance(vals, (tuple, list)) else [vals]:
            if not isinstance(val, torch.Tensor) or node.op == "placeholder" and node.name not in \
                    runner.ep.graph_signature.user_inputs:
                continue
            n = val.numel()
            if not isinstance(n, int):
                expr = n.node.expr
                n = int(expr.subs({s: 1 for s in expr.free_symbols}))
            total += n * val.element_size()
    return total


def _rows(batch: Any) -> int:
    """The number of inputs in a batch (a tensor, or a dict of keyword tensors); 1 when it has no batch axis."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else [v for v in dict(batch).values()
                                                               if isinstance(v, torch.Tensor)] \
        if isinstance(batch, dict) or hasattr(batch, "keys") else []
    return max((int(t.shape[0]) for t in tensors if t.dim() > 0), default=1)


def hold(calibration: Any, chunk: int, splittable: bool, runners: Sequence[Runner], budget: int) -> list[Any] | None:
    """This process's calibration chunks, when holding every chunk's values in every graph (``runners``, one lane
    each) is estimated to fit ``budget`` bytes in every process; None otherwise: the passes are then re-run from the
    inputs at each level, one chunk at a time."""
    per_sample = sum(held_bytes(r) for r in runners)
    kept: list[Any] | None = []
    samples = 0
    for batch in shard(chunks(calibration, chunk, splittable)):
        samples += _rows(batch)
        if per_sample * samples > budget:
            kept = None
            break
        kept.append(batch)
    over = sum_numbers(1.0 if kept is None else 0.0)[0]
    return kept if over == 0 else None
