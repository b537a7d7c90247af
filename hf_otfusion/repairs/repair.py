"""The repair ``repair``: REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023, arXiv 2211.08403).

Averaging aligned models shrinks the variance of their hidden units ("variance collapse"). Each fused channel's mean
and standard deviation are set to the weighted average of its parents' (aligned) channel statistics, measured on
calibration data, and the per-channel correction is folded into existing parameters, so the saved model keeps its
architecture.

Where REPAIR corrects, found from the exported graph (no per-architecture code; the ops are those of
:mod:`hf_otfusion.graph`'s op table), only channels of hidden spaces of the plan (a classifier's logits are left
alone):

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
from typing import Any

import torch
import torch.fx
from pydantic import BaseModel
from torch import nn
from torch.export import ExportedProgram

from ..activations import iter_batches
from ..distributed import all_gather_object, all_reduce_, shard, sum_numbers
from ..errors import FusionError
from ..graph import LAYER_OPS, NORM_OPS, Env, Runner, arg, main_value, op_name, run, tensor_names, to_device
from ..plan import AlignmentPlan
from ..registry import REPAIRS, Unit
from ..trace import build_plan, export_model
from ..transport import carry
from ._common import State, parent_weights, run_device, shapes, state_of

REPAIR_CHUNK = 1024  # rows per pass when calibration is one tensor: REPAIR normalises with each batch's statistics


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


def find_points(ep: ExportedProgram, plan: AlignmentPlan) -> tuple[list[_Point], list[_BatchNormSite]]:
    """The values REPAIR corrects (in graph order) and every BatchNorm with running statistics."""
    names = tensor_names(ep)
    in_space = {(m.tensor, m.axis) for space in plan.spaces for m in space.members}

    def param(value: Any) -> str | None:
        return names.get(value.name) if isinstance(value, torch.fx.Node) else None

    points: list[_Point] = []
    bns: list[_BatchNormSite] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node)
        norm = NORM_OPS.get(op)
        if norm is not None:
            if norm.running is not None:
                i_mean, i_var, _ = norm.running
                mean, var = param(arg(node, i_mean)), param(arg(node, i_var))
                if mean is not None and var is not None:
                    bns.append(_BatchNormSite(node.name, mean, var))
            norm_w, norm_b = param(arg(node, norm.weight)), param(arg(node, norm.bias))
            if norm.dim == -1 and len(node.args[1]) != 1:
                continue  # normalised over several dims: no per-channel affine to fold into
            if norm_w is not None and (norm_w, 0) in in_space:
                points.append(_Point(node.name, norm.dim, norm_w, 0, norm_b, op))
            continue
        layer = LAYER_OPS.get(op)
        if layer is None:
            continue
        if layer.transposed is not None and bool(arg(node, layer.transposed)):
            continue  # transposed convolution: its weight is (in, out / groups, ...)
        weight, bias, axis = param(node.args[layer.weight]), param(arg(node, layer.bias)), layer.weight_out
        if weight is None or (weight, axis) not in in_space:
            continue  # not a weight layer, or its output channels are fixed (a classifier's logits)
        users = list(node.users)
        if len(users) == 1 and op_name(users[0]) in NORM_OPS and users[0].args[0] is node:
            continue  # a norm renormalises this output: its own output is the value to correct (when affine)
        points.append(_Point(node.name, layer.out_dim, weight, axis, bias, "producer"))
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


class _Pass:
    """Hooks on the graph's nodes that measure (and in repair mode correct) the points' values, with every
    BatchNorm run in training mode (on this batch's statistics) in repair mode."""

    def __init__(self, points: Sequence[_Point], bns: Sequence[_BatchNormSite],
                 targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.points = {p.node: p for p in points}
        self.bns = {b.node: b for b in bns} if targets is not None else {}
        self.targets = targets  # node -> (mean, std) to normalise to, batch by batch (the repair pass)
        self.moments: dict[str, _Moments] = {}
        self.bn_moments: dict[str, _Moments] = {}
        self.hooks = {name: self.at for name in {*self.points, *self.bns}}

    def _acc(self, table: dict[str, _Moments], key: str, rows: torch.Tensor) -> None:
        if key not in table:
            table[key] = _Moments.zeros(rows.shape[1], rows.device)
        table[key].add(rows)

    def at(self, env: Env, n: torch.fx.Node) -> Any:
        """A point's or BatchNorm's value: measured, and in repair mode normalised to its target."""
        out = self._train_mode_batch_norm(n, env.inputs(n)[0]) if n.name in self.bns else env.compute(n)
        point = self.points.get(n.name)
        if point is None:
            return out
        value = main_value(out)
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

    def _train_mode_batch_norm(self, n: torch.fx.Node, args: tuple) -> Any:
        """BatchNorm with this batch's statistics (what ``reset_norm_stats`` does), accumulating the input's moments."""
        x = args[0]
        norm = NORM_OPS[op_name(n)]
        assert norm.running is not None
        weight, bias, eps = args[norm.weight], args[norm.bias], float(args[norm.running[2]])
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
        if op_name(n) == "batch_norm":
            return out
        empty = x.new_zeros(0)
        return (out, empty, empty)


def _run_pass(ep: ExportedProgram, interp: _Pass, state: Mapping[str, torch.Tensor], calibration: Any,
              device: torch.device) -> int:
    """One pass of the graph, on ``state``'s tensors, over the calibration batches; every process's sums."""
    runner = Runner(ep, None, device, state=state)
    seen = 0
    for batch in shard(_repair_batches(calibration)):
        run(runner, batch, who="repair", hooks=interp.hooks)
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
    return carry(values.to(torch.float64), [(s.layout(m), coupling[s.name]) for s, m in members], length, mismatch)


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
    w = parent_weights(weights, len(parents))
    dev = run_device(fused, device)
    if example_input is None:
        example_input = next(iter(_repair_batches(calibration)), None)
        if example_input is None:
            raise FusionError("the calibration data is empty")
    model = copy.deepcopy(fused).to(dev).eval()
    ep = exported if exported is not None else export_model(model, to_device(example_input, dev))
    if plan is None:
        plan = build_plan(model, example_input, exported=ep)
    fused_state = state_of(model, dev)
    points, bns = find_points(ep, plan)

    # target statistics: the weighted average of the parents' per-channel means and stds, in the fused channel order
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (wi, parent) in enumerate(zip(w, parents, strict=True)):
        coupling = couplings[i] if couplings is not None else None
        if coupling is None:
            state = state_of(parent, dev)
            if shapes(state) != shapes(fused_state):
                bad = next(k for k in fused_state if k not in state or state[k].shape != fused_state[k].shape)
                raise FusionError(f"aligned parent {i} does not have the fused model's shapes (tensor {bad!r}): pass "
                                  "the parents aligned to the fused model, or their couplings")
            measure = _Pass(points, bns)
            _run_pass(ep, measure, state, calibration, dev)
            stats = {node: (m.mean, m.std) for node, m in measure.moments.items()}
        else:
            stats = _parent_stats(parent, i, coupling, calibration, dev, example_input, ep, plan, points, fused_state)
        for node, (mean, std) in stats.items():
            mean_t, std_t = targets.get(node, (0.0, 0.0))
            targets[node] = (mean_t + wi * mean, std_t + wi * std)

    # one pass of the fused model, each point normalised to its target batch by batch
    repair = _Pass(points, bns, targets=targets)
    _run_pass(ep, repair, fused_state, calibration, dev)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for site in bns:
        m = repair.bn_moments.get(site.node)
        if m is not None:
            new[site.mean] = m.mean.to(new[site.mean].dtype)
            new[site.var] = m.var.to(new[site.var].dtype)
    _fold(new, points, repair.moments, targets)
    # polishing: measure the folded model as it is (eval mode) and correct what batch-by-batch normalising missed
    for _ in range(polish):
        measure = _Pass(points, bns)
        _run_pass(ep, measure, {k: v.to(dev) for k, v in new.items()}, calibration, dev)
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
    state = state_of(parent, dev)
    if shapes(state) == shapes(fused_state):
        ep_p, points_p, bns_p = ep, points, []
    else:
        ep_p = export_model(copy.deepcopy(parent).to(dev).eval(), to_device(example_input, dev))
        points_p, bns_p = find_points(ep_p, build_plan(parent, example_input, exported=ep_p))
    measure = _Pass(points_p, bns_p)
    _run_pass(ep_p, measure, state, calibration, dev)
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


def repair_repair(fused: nn.Module, parents: Sequence[nn.Module], calibration: Any, *, weights: list[float],
                  couplings: Any, device: torch.device, plan: AlignmentPlan, example_input: Any,
                  exported: ExportedProgram | None, params: BaseModel) -> nn.Module:
    """The registered repair: :func:`repair_model`, each parent's statistics measured on the parent itself and
    carried over by its couplings (exact for any widths)."""
    return repair_model(fused, parents, calibration, weights=weights, couplings=couplings, device=device, plan=plan,
                        example_input=example_input, exported=exported)


REPAIR = REPAIRS.register(Unit(
    name="repair",
    description="each channel's mean and std set to the average of its parents', REPAIR",
    fn=repair_repair,
    reference="Jordan et al., REPAIR: REnormalizing Permuted Activations for Interpolation Repair, ICLR 2023 "
              "(https://arxiv.org/abs/2211.08403)",
    needs=frozenset({"calibration", "couplings"}),
))
