"""The refit's passes: calibration chunks run through an exported graph, a layer's inputs and outputs as rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree
from torch.fx._pytree import tree_flatten_spec

from .activations import _pieces, iter_batches
from .distributed import shard, sum_numbers
from .errors import FusionError
from .plan import AlignmentPlan
from .refit_units import _F64, _Unit
from .repair import _first, _Program
from .runner import to_device as _to
from .trace import as_args
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
    out = torch.empty(*x.shape[:-1], d + (1 if affine else 0), dtype=_F64, device=x.device)
    out[..., :d].copy_(x)
    if affine:
        out[..., d] = 1
    return out.reshape(-1, *out.shape[-2:])


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


# ----------------------------------------------------------------------------------------------------------
# Held passes: every chunk's values kept between levels, so each graph runs once over the calibration data


REFIT_HOLD = 2 << 30  # bytes of held values (all models, all chunks) up to which the passes are held, not re-run


@dataclass(frozen=True)
class _Deferred:
    """A parameter or buffer placeholder: read from the state when a node uses it (the refit rewrites the state)."""

    name: str


class _Lane(torch.fx.Interpreter):
    """One chunk's values in one graph, computed node by node as the levels need them and let go after their last
    use; parameters and buffers are read from ``state`` when a node runs, so later nodes see earlier refits."""

    def __init__(self, program: _Program, state: Mapping[str, torch.Tensor], batch: Any, device: torch.device,
                 keep: Mapping[str, int]):
        super().__init__(program.ep.graph_module, garbage_collect_values=False)
        self.state = state
        self.keep = keep  # node -> the last level that reads it
        args, kwargs = as_args(_to(batch, device))
        user = list(tree_flatten_spec((args, kwargs), program.ep.call_spec.in_spec))
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for node, spec in zip(placeholders, program.specs, strict=True):
            if spec.target is None:
                self.env[node] = user.pop(0)
            elif spec.target in state:
                self.env[node] = _Deferred(spec.target)
            else:
                value = program.ep.constants.get(spec.target, program.ep.state_dict.get(spec.target))
                self.env[node] = value.to(device) if isinstance(value, torch.Tensor) else value
        self.pending = [n for n in self.graph.nodes if n.op not in ("placeholder", "output")]
        self.users = {n: sum(u.op != "output" for u in n.users) for n in self.graph.nodes}

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return torch.utils._pytree.tree_map_only(_Deferred, lambda d: self.state[d.name], (args, kwargs))

    def advance(self, ready: Callable[[torch.fx.Node], bool], level: int) -> None:
        """Compute every pending node that ``ready`` admits (their inputs are computed or admitted too)."""
        left = []
        for node in self.pending:
            if not ready(node):
                left.append(node)
                continue
            self.env[node] = self.run_node(node)
            for arg in node.all_input_nodes:
                self.users[arg] -= 1
                self._drop(arg, level - 1)  # a value read at this level is kept until it is taken
        self.pending = left

    def _drop(self, node: torch.fx.Node, level: int) -> None:
        """Let a value go when no pending node uses it and no level after ``level`` reads it."""
        if self.users[node] <= 0 and self.keep.get(node.name, -1) <= level and node.op != "placeholder":
            self.env.pop(node, None)

    def take(self, wanted: set[str], level: int) -> dict[str, Any]:
        """The values of ``wanted`` (computed), each let go when no later node or level needs it."""
        out = {}
        for node in self.graph.nodes:
            if node.name in wanted:
                if node not in self.env:
                    raise FusionError(f"refit: the graph computed no value for {node.name!r}")
                out[node.name] = self.env[node]
                self._drop(node, level)
        return out


class _Held:
    """One graph's lanes over every chunk. ``depth``: the fused model's graph, whose node of depth ``d`` is final once
    the units of levels up to ``d`` are solved; None: a parent's graph (never refitted: run as far as asked)."""

    def __init__(self, program: _Program, state: Mapping[str, torch.Tensor], chunks: Sequence[Any],
                 device: torch.device, wanted: Mapping[int, set[str]], depth: Mapping[str, int] | None):
        self.depth = depth
        keep: dict[str, int] = {}
        for level, names in sorted(wanted.items()):
            keep.update({n: level for n in names})
        self.wanted = wanted
        self.order = {n.name: i for i, n in enumerate(program.ep.graph.nodes)}
        self.lanes = [_Lane(program, state, batch, device, keep) for batch in chunks]

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
        try:
            lane.advance(ready, level)
        except FusionError:
            raise
        except Exception as exc:  # noqa: BLE001 - an exported graph that does not take this batch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FusionError(f"refit could not run a calibration batch through the model's graph: {first}") from exc
        return lane.take(wanted, level)


def held_bytes(program: _Program) -> int:
    """Bytes per calibration sample of every value in a graph (an upper bound of what its lanes hold), from the
    traced shapes, the batch size taken as 1; 0 when a shape is not known."""
    total = 0
    for node in program.ep.graph.nodes:
        vals = node.meta.get("val")
        for val in vals if isinstance(vals, (tuple, list)) else [vals]:
            if not isinstance(val, torch.Tensor) or node.op == "placeholder" and node.name not in \
                    program.ep.graph_signature.user_inputs:
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


def _hold(calibration: Any, chunk: int, splittable: bool, programs: Sequence[_Program],
          budget: int | None = None) -> list[Any] | None:
    """This process's calibration chunks, when holding every chunk's values in every graph (``programs``, one lane
    each) is estimated to fit ``budget`` bytes (default ``REFIT_HOLD``) in every process; None otherwise: the passes
    are then re-run from the inputs at each level, one chunk at a time."""
    budget = REFIT_HOLD if budget is None else budget
    per_sample = sum(held_bytes(p) for p in programs)
    chunks: list[Any] | None = []
    samples = 0
    for batch in shard(_chunks(calibration, chunk, splittable)):
        samples += _rows(batch)
        if per_sample * samples > budget:
            chunks = None
            break
        chunks.append(batch)
    over = sum_numbers(1.0 if chunks is None else 0.0)[0]
    return chunks if over == 0 else None
