"""Repairing a fused model's activation statistics.

Averaging aligned models shrinks the variance of their hidden units ("variance collapse"), and the averaged
BatchNorm running statistics no longer describe the fused model's activations. Two remedies:

- ``reset_norm_stats``: recompute the BatchNorm running statistics on calibration data.
- ``repair_model``: REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
  ICLR 2023, arXiv 2211.08403). Each fused channel's mean and standard deviation are set to the weighted average of
  its parents' (aligned) channel statistics, measured on calibration data, and the per-channel correction is folded
  into existing parameters, so the saved model keeps its architecture.

Where REPAIR corrects, found from the exported graph (no per-architecture code), only channels of hidden spaces of
the plan (a classifier's logits are left alone):

- the output of every BatchNorm, LayerNorm (over the channel dim) or GroupNorm with a per-channel affine weight: the
  norm's weight and bias absorb the correction; every BatchNorm's running statistics are recomputed as well;
- the output of every ``conv``/``linear``/``addmm`` that does not feed a norm directly (a norm would renormalise
  it): its pre-activations. Its weight rows are scaled and its bias shifted; a producer without a bias can only be
  rescaled (its std is matched, its mean moves with the scale).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram
from torch.fx._pytree import tree_flatten_spec

from .activations import iter_batches
from .distributed import all_gather_object, all_reduce, all_reduce_, shard, sum_numbers, world
from .errors import FusionError
from .plan import AlignmentPlan
from .runner import to_device as _to
from .trace import as_args, build_plan, export_model
from .transport import carry

Repair = Literal["none", "reset_bn", "repair", "refit"]
REPAIRS: tuple[str, ...] = ("none", "reset_bn", "repair", "refit")  # refit: hf_otfusion.refit.refit_model
REPAIR_CHUNK = 1024  # rows per pass when calibration is one tensor: REPAIR normalises with each batch's statistics
_BatchNorm = nn.modules.batchnorm._BatchNorm
State = dict[str, torch.Tensor]


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
            args, kwargs = as_args(_to(batch, dev))
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


# ----------------------------------------------------------------------------------------------------------
# Where to correct: read from the exported graph


_PRODUCERS = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "addmm"}
# norm op -> (weight, bias) argument positions, and (running_mean, running_var, eps) for BatchNorm
_AFFINE_NORMS = {
    "_native_batch_norm_legit_no_training": (1, 2),
    "batch_norm": (1, 2),
    "layer_norm": (2, 3),
    "native_layer_norm": (2, 3),
    "group_norm": (2, 3),
    "native_group_norm": (1, 2),
}
_BN_STATS = {"_native_batch_norm_legit_no_training": (3, 4, 6), "batch_norm": (3, 4, 7)}


def _op(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


@dataclass(frozen=True)
class _Point:
    """One corrected value: graph node ``node`` (element 0 when the op returns a tuple), channels on ``dim``.

    The correction ``y -> a * y + c`` is folded by scaling ``scale`` along ``scale_axis`` and ``a * shift + c``.
    """

    node: str
    dim: int
    scale: str
    scale_axis: int
    shift: str | None
    where: str  # "producer" or the norm op's name


@dataclass(frozen=True)
class _BatchNormSite:
    """A BatchNorm op whose running statistics the repair pass recomputes (train-mode statistics)."""

    node: str
    mean: str
    var: str


def _param_names(ep: ExportedProgram) -> dict[str, str]:
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def _arg(node: torch.fx.Node, i: int) -> Any:
    return node.args[i] if len(node.args) > i else None


def find_points(ep: ExportedProgram, plan: AlignmentPlan) -> tuple[list[_Point], list[_BatchNormSite]]:
    """The values REPAIR corrects (in graph order) and every BatchNorm with running statistics."""
    names = _param_names(ep)
    in_space = {(m.tensor, m.axis) for space in plan.spaces for m in space.members}

    def param(arg: Any) -> str | None:
        return names.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    points: list[_Point] = []
    bns: list[_BatchNormSite] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op(node)
        if op in _BN_STATS:
            i_mean, i_var, _ = _BN_STATS[op]
            mean, var = param(_arg(node, i_mean)), param(_arg(node, i_var))
            if mean is not None and var is not None:
                bns.append(_BatchNormSite(node.name, mean, var))
        if op in _AFFINE_NORMS:
            i_w, i_b = _AFFINE_NORMS[op]
            norm_w, norm_b = param(_arg(node, i_w)), param(_arg(node, i_b))
            dim = -1 if op in ("layer_norm", "native_layer_norm") else 1
            if dim == -1 and len(node.args[1]) != 1:
                continue  # normalised over several dims: no per-channel affine to fold into
            if norm_w is not None and (norm_w, 0) in in_space:
                points.append(_Point(node.name, dim, norm_w, 0, norm_b, op))
            continue
        if op not in _PRODUCERS:
            continue
        if op == "addmm":
            w_arg, b_arg, axis, dim = node.args[2], node.args[0], 1, -1
        else:
            w_arg, b_arg, axis = node.args[1], _arg(node, 2), 0
            dim = -1 if op == "linear" else 1
            if op == "convolution" and bool(_arg(node, 6)):
                continue  # transposed convolution: its weight is (in, out / groups, ...)
        weight, bias = param(w_arg), param(b_arg)
        if weight is None or (weight, axis) not in in_space:
            continue  # not a weight layer, or its output channels are fixed (a classifier's logits)
        users = list(node.users)
        if len(users) == 1 and _op(users[0]) in _AFFINE_NORMS and users[0].args[0] is node:
            continue  # a norm renormalises this output: its own output is the value to correct (when affine)
        points.append(_Point(node.name, dim, weight, axis, bias, "producer"))
    # a parameter used by several ops (weight sharing) cannot take one correction per use: leave those alone
    uses: dict[str, int] = {}
    for p in points:
        for name in (p.scale, p.shift):
            if name is not None:
                uses[name] = uses.get(name, 0) + 1
    points = [p for p in points if uses[p.scale] == 1 and (p.shift is None or uses[p.shift] == 1)]
    return points, bns


# ----------------------------------------------------------------------------------------------------------
# Running the exported graph with any state


@dataclass
class _Moments:
    """Per-channel sums of a value over samples and positions, in float64."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> _Moments:
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z, z.clone())

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        self.total += rows.sum(0)
        self.squares += (rows * rows).sum(0)
        self.count += rows.shape[0]

    def reduce(self) -> None:
        """Sum over the processes of a distributed run (nothing in a single process)."""
        all_reduce_([self.total, self.squares])
        self.count = int(sum_numbers(self.count)[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1) - self.mean**2).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


def _channel_rows(value: torch.Tensor, dim: int) -> torch.Tensor:
    return value.movedim(dim, -1).reshape(-1, value.shape[dim])


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class _Pass(torch.fx.Interpreter):
    """Interprets the exported graph on one state; measures (and in repair mode corrects) the points' values."""

    def __init__(self, ep: ExportedProgram, points: Sequence[_Point], bns: Sequence[_BatchNormSite],
                 targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(ep.graph_module)
        self.points = {p.node: p for p in points}
        self.bns = {b.node: b for b in bns} if targets is not None else {}
        self.targets = targets  # node -> (mean, std) to normalise to, batch by batch (the repair pass)
        self.moments: dict[str, _Moments] = {}
        self.bn_moments: dict[str, _Moments] = {}

    def _acc(self, table: dict[str, _Moments], key: str, rows: torch.Tensor) -> None:
        if key not in table:
            table[key] = _Moments.zeros(rows.shape[1], rows.device)
        table[key].add(rows)

    def run_node(self, n: torch.fx.Node) -> Any:
        out = self._train_mode_batch_norm(n) if n.name in self.bns else super().run_node(n)
        point = self.points.get(n.name)
        if point is None:
            return out
        value = _first(out)
        rows = _channel_rows(value, point.dim)
        self._acc(self.moments, n.name, rows)
        if self.targets is None:
            return out
        mean_t, std_t = self.targets[n.name]
        rows64 = rows.to(torch.float64)
        mean_b, std_b = rows64.mean(0), rows64.std(0, unbiased=False)
        scale = torch.where(std_b > 1e-12, std_t / std_b.clamp_min(1e-12), torch.ones_like(std_b))
        shape = [1] * value.dim()
        shape[point.dim] = -1
        if point.shift is not None:
            fixed = (value - mean_b.to(value.dtype).view(shape)) * scale.to(value.dtype).view(shape)
            fixed = fixed + mean_t.to(value.dtype).view(shape)
        else:
            fixed = value * scale.to(value.dtype).view(shape)
        if isinstance(out, (tuple, list)):
            return type(out)([fixed, *out[1:]])
        return fixed

    def _train_mode_batch_norm(self, n: torch.fx.Node) -> Any:
        """BatchNorm with this batch's statistics (what ``reset_norm_stats`` does), accumulating the input's moments."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        i_w, i_b = _AFFINE_NORMS[_op(n)]
        _, _, i_eps = _BN_STATS[_op(n)]
        weight, bias, eps = args[i_w], args[i_b], float(args[i_eps])
        rows = _channel_rows(x, 1)
        self._acc(self.bn_moments, n.name, rows)
        rows64 = rows.to(torch.float64)
        mean, var = rows64.mean(0).to(x.dtype), rows64.var(0, unbiased=False).to(x.dtype)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        if _op(n) == "batch_norm":
            return out
        empty = x.new_zeros(0)
        return (out, empty, empty)


class _Program:
    """An exported program that runs on any state dict of the model's shapes."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.specs = list(ep.graph_signature.input_specs)

    def inputs(self, state: Mapping[str, torch.Tensor], batch: Any, device: torch.device) -> list[Any]:
        args, kwargs = as_args(_to(batch, device))
        user = list(tree_flatten_spec((args, kwargs), self.ep.call_spec.in_spec))
        out: list[Any] = []
        for spec in self.specs:
            if spec.target is None:
                out.append(user.pop(0))
                continue
            name = spec.target
            if name in state:
                value = state[name]
            elif name in self.ep.constants:
                value = self.ep.constants[name]
            else:
                value = self.ep.state_dict[name]
            out.append(value.to(device) if isinstance(value, torch.Tensor) else value)
        return out

    @torch.no_grad()
    def run(self, interp: _Pass, state: Mapping[str, torch.Tensor], calibration: Any, device: torch.device) -> int:
        seen = 0
        for batch in shard(_repair_batches(calibration)):
            try:
                interp.run(*self.inputs(state, batch, device))
            except FusionError:
                raise
            except Exception as exc:  # noqa: BLE001 - an exported graph that does not take this batch
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FusionError(f"repair could not run the calibration batch through the model's graph: "
                                  f"{first}") from exc
            seen += 1
        for table in (interp.moments, interp.bn_moments):  # a distributed run: every process's sums
            sizes: dict[str, int] = {}
            for part in all_gather_object({k: m.total.numel() for k, m in table.items()}):
                sizes.update(part)  # a process given no batch has no entries yet
            for key in sorted(sizes):
                table.setdefault(key, _Moments.zeros(sizes[key], device)).reduce()
        seen = int(sum_numbers(seen)[0])
        if seen == 0:
            raise FusionError("the calibration data is empty")
        return seen


def _repair_batches(calibration: Any) -> Iterator[Any]:
    """Calibration inputs in batches of about ``REPAIR_CHUNK`` rows: a tensor is split, smaller tensor batches of one
    shape are concatenated (the repair pass normalises with each batch's statistics: larger batches, less noise);
    other inputs (dicts of keyword tensors) come as they are."""
    if isinstance(calibration, torch.Tensor):
        yield from calibration.split(REPAIR_CHUNK)
        return
    buffer: list[torch.Tensor] = []
    rows = 0
    for batch in iter_batches(calibration):
        stackable = isinstance(batch, torch.Tensor) and batch.dim() > 0
        if stackable and (not buffer or buffer[0].shape[1:] == batch.shape[1:]):
            buffer.append(batch)
            rows += batch.shape[0]
            if rows >= REPAIR_CHUNK:
                yield torch.cat(buffer)
                buffer, rows = [], 0
            continue
        if buffer:
            yield torch.cat(buffer)
            buffer, rows = [], 0
        yield batch
    if buffer:
        yield torch.cat(buffer)


# ----------------------------------------------------------------------------------------------------------
# REPAIR


def _state_of(model: nn.Module | Mapping[str, torch.Tensor], device: torch.device) -> State:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to(device) for k, v in state.items()}


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n or any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise FusionError(f"repair needs one non-negative weight per parent ({n}), summing to more than 0; got {w}")
    return [x / sum(w) for x in w]


def _fold(state: State, points: Sequence[_Point], moments: dict[str, _Moments],
          targets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fold ``y -> a * y + c`` per channel (measured ``moments`` onto ``targets``) into each point's parameters."""
    for point in points:
        m = moments.get(point.node)
        if m is None:
            continue
        mean_t, std_t = targets[point.node]
        a = torch.where(m.std > 1e-12, std_t / m.std.clamp_min(1e-12), torch.ones_like(m.std))
        scale = state[point.scale]
        shape = [1] * scale.dim()
        shape[point.scale_axis] = -1
        state[point.scale] = (scale.to(torch.float64) * a.to(scale.device).view(shape)).to(scale.dtype)
        if point.shift is not None:
            c = (mean_t - a * m.mean).to(scale.device)
            shift = state[point.shift]
            state[point.shift] = (shift.to(torch.float64) * a.to(shift.device) + c).to(shift.dtype)


def _transport(values: torch.Tensor, plan: AlignmentPlan, tensor: str, axis: int, length: int,
               coupling: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A parent's per-channel statistic on ``tensor``'s ``axis``, carried to the fused model's channels.

    Each space segment of the axis gets the coupling's barycentric map (fused channel ``j`` receives the
    transport-weighted mean of the parent channels sent to it); channels in no space stay where they are.
    """
    members = [(s, m) for s, m in plan.members_by_tensor().get(tensor, []) if m.axis == axis]
    missing = next((s.name for s, _ in members if s.name not in coupling), None)
    if missing is not None:
        raise FusionError(f"repair: no coupling for space {missing!r}")
    mismatch = f"repair: the channels of {tensor!r} do not match between a parent and the fused model"
    return carry(values.to(torch.float64), [(m, s.heads, coupling[s.name]) for s, m in members], length, mismatch)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def repair_model(
    fused: nn.Module,
    parents: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    calibration: Any,
    *,
    weights: Sequence[float] | None = None,
    couplings: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    device: str | torch.device | None = None,
    plan: AlignmentPlan | None = None,
    example_input: Any = None,
    polish: int = 1,
    exported: ExportedProgram | None = None,
) -> nn.Module:
    """REPAIR: a copy of ``fused`` whose hidden channels have their parents' mean and std, folded into its weights.

    For every corrected value (see the module docstring) the target statistics are the ``weights``-average of the
    parents' per-channel means and standard deviations on ``calibration`` (over samples and positions), each parent's
    in the fused model's channel order. One pass of the fused model over the calibration data then normalises each
    corrected value, batch by batch, to those statistics (as REPAIR's reset layers do in training mode, so each layer
    sees its inputs already corrected), recomputes every BatchNorm's running statistics, and accumulates the
    statistics of each uncorrected value; the resulting affine correction ``y -> a * y + c`` per channel is folded
    into the producer's weight rows and bias or the norm's weight and bias. Nothing is added to the model: same
    state_dict keys and shapes.

    With all the calibration data in one batch (at most ``REPAIR_CHUNK`` rows; smaller tensor batches are joined)
    the repaired model's statistics equal the targets exactly; over several batches, to within the batches'
    sampling noise, which the ``polish`` passes remove.

    Args:
        fused: the fused model (its architecture and widths are kept).
        parents: without ``couplings``, the parents aligned to the fused model's channels (modules or state dicts
            of the fused model's shapes). With ``couplings``, the parents as they are (modules; widths may differ).
        calibration: a tensor of inputs, or an iterable of input batches or of (input, label) batches.
        weights: one non-negative weight per parent (default equal), normalised.
        couplings: per parent, the OT coupling of every space, ``{space name: (parent channels, fused channels)}``
            as ``hf_otfusion.align`` returns them, or None for a parent already in the fused model's channel order
            (the target). A parent's statistics are measured on the parent itself and carried over by the
            coupling's barycentric map: right for different widths and soft (Sinkhorn) couplings, where the aligned
            weights are averages of several neurons and no longer have the parent's statistics.
        device: where the passes run (default: the fused model's device).
        plan: the fused model's alignment plan (traced when omitted); only hidden-space channels are corrected.
        example_input: a batch to trace the models with (default: the first calibration batch).
        polish: extra passes that measure the folded model as it is and correct what normalising batch by batch
            missed (each costs one pass over the calibration data).
        exported: an exported program of a model of the fused model's architecture and shapes (skips that export).

    Example:
        >>> repaired = repair_model(fused, [aligned_a, aligned_b], calibration=x_train[:500])  # doctest: +SKIP
    """
    if calibration is None:
        raise FusionError("repair='repair' needs calibration data")
    if len(parents) < 1:
        raise FusionError("repair needs the aligned parents")
    if couplings is not None and len(couplings) != len(parents):
        raise FusionError(f"repair: got {len(couplings)} couplings for {len(parents)} parents")
    w = _normalized(weights, len(parents))
    dev = torch.device(device) if device is not None else next(
        (p.device for p in fused.parameters()), torch.device("cpu"))
    if example_input is None:
        example_input = next(iter(_repair_batches(calibration)), None)
        if example_input is None:
            raise FusionError("the calibration data is empty")
    model = copy.deepcopy(fused).to(dev).eval()
    ep = exported if exported is not None else export_model(model, _to(example_input, dev))
    if plan is None:
        plan = build_plan(model, example_input, exported=ep)
    fused_state = _state_of(model, dev)
    points, bns = find_points(ep, plan)
    program = _Program(ep)

    # target statistics: the weighted average of the parents' per-channel means and stds, in the fused channel order
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (wi, parent) in enumerate(zip(w, parents, strict=True)):
        coupling = couplings[i] if couplings is not None else None
        if coupling is None:
            state = _state_of(parent, dev)
            if _shapes(state) != _shapes(fused_state):
                bad = next(k for k in fused_state if k not in state or state[k].shape != fused_state[k].shape)
                raise FusionError(f"aligned parent {i} does not have the fused model's shapes (tensor {bad!r}): pass "
                                  "the parents aligned to the fused model, or their couplings")
            measure = _Pass(ep, points, bns)
            program.run(measure, state, calibration, dev)
            stats = {node: (m.mean, m.std) for node, m in measure.moments.items()}
        else:
            stats = _parent_stats(parent, i, coupling, calibration, dev, example_input, ep, plan, points, fused_state)
        for node, (mean, std) in stats.items():
            mean_t, std_t = targets.get(node, (0.0, 0.0))
            targets[node] = (mean_t + wi * mean, std_t + wi * std)

    # one pass of the fused model, each point normalised to its target batch by batch
    repair = _Pass(ep, points, bns, targets=targets)
    program.run(repair, fused_state, calibration, dev)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for site in bns:
        m = repair.bn_moments.get(site.node)
        if m is not None:
            new[site.mean] = m.mean.to(new[site.mean].dtype)
            new[site.var] = m.var.to(new[site.var].dtype)
    _fold(new, points, repair.moments, targets)
    # polishing: measure the folded model as it is (eval mode) and correct what batch-by-batch normalising missed
    for _ in range(polish):
        measure = _Pass(ep, points, bns)
        program.run(measure, {k: v.to(dev) for k, v in new.items()}, calibration, dev)
        _fold(new, points, measure.moments, targets)
    for alias, name in plan.aliases.items():  # tied tensors stay tied
        new[alias] = new[name]
    model.load_state_dict(new)
    return model.train().eval()  # train() drops weight-derived caches (see fuse)


def _parent_stats(
    parent: nn.Module | Mapping[str, torch.Tensor],
    index: int,
    coupling: Mapping[str, torch.Tensor],
    calibration: Any,
    dev: torch.device,
    example_input: Any,
    ep: ExportedProgram,
    plan: AlignmentPlan,
    points: Sequence[_Point],
    fused_state: State,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per fused-model point: a parent's (mean, std) measured on the parent and transported by its coupling."""
    if not isinstance(parent, nn.Module):
        raise FusionError(f"repair: parent {index} comes with couplings, so it must be the model itself (a module)")
    state = _state_of(parent, dev)
    if _shapes(state) == _shapes(fused_state):
        ep_p, points_p, bns_p = ep, points, []
    else:
        ep_p = export_model(copy.deepcopy(parent).to(dev).eval(), _to(example_input, dev))
        points_p, bns_p = find_points(ep_p, build_plan(parent, example_input, exported=ep_p))
    measure = _Pass(ep_p, points_p, bns_p)
    _Program(ep_p).run(measure, state, calibration, dev)
    by_scale = {p.scale: measure.moments[p.node] for p in points_p if p.node in measure.moments}
    out = {}
    for point in points:
        m = by_scale.get(point.scale)
        if m is None:
            raise FusionError(f"repair: parent {index} has no value to match {point.scale!r} of the fused model")
        length = fused_state[point.scale].shape[point.scale_axis]
        out[point.node] = tuple(_transport(v, plan, point.scale, point.scale_axis, length, coupling)
                                for v in (m.mean, m.std))
    return out
