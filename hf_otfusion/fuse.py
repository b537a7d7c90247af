"""The fusion engine: walk the plan, transport every other model onto the target, average.

The engine knows nothing of architectures: it reads spaces and (tensor, axis) members from the plan.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import Runner, activation_costs, first_batch
from .checkpoint import StateSource, TensorSource
from .errors import FusionError, PlanError
from .evaluate import logits_of
from .plan import AlignmentPlan, AxisRef, Space
from .profile import record_space, timed
from .trace import build_plan, export_model
from .transport import (
    MARGINALS,
    SOLVERS,
    ChannelMap,
    Marginals,
    Solver,
    all_finite,
    barycentric_map,
    head_costs,
    marginal,
    match_heads,
    pairwise_distance,
    rows,
    solve,
    solve_heads,
    transport_axis,
)

Alignment = Literal["weights", "activations"]
ALIGNMENTS: tuple[str, ...] = ("weights", "activations")
Residual = Literal["shared", "mean"]
RESIDUALS: tuple[str, ...] = ("shared", "mean")
State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Plan bookkeeping


@dataclass(frozen=True)
class _Segment:
    space: str
    member: AxisRef
    length: int  # entries on the axis: space size * repeat * tile


def _segments(plan: AlignmentPlan) -> dict[tuple[str, int], list[_Segment]]:
    """For each (tensor, axis), its space segments in offset order."""
    out: dict[tuple[str, int], list[_Segment]] = {}
    for space in plan.spaces:
        for m in space.members:
            out.setdefault((m.tensor, m.axis), []).append(_Segment(space.name, m, space.size * m.repeat * m.tile))
    for segs in out.values():
        segs.sort(key=lambda s: s.member.offset)
    return out


def _ranked(members: Sequence[AxisRef]) -> dict[tuple[str, int, int], AxisRef]:
    """A space's members keyed by (tensor, axis, rank on that axis): comparable across widths, unlike offsets."""
    out: dict[tuple[str, int, int], AxisRef] = {}
    seen: dict[tuple[str, int], int] = {}
    for m in sorted(members, key=lambda m: (m.tensor, m.axis, m.offset)):
        rank = seen.get((m.tensor, m.axis), 0)
        seen[(m.tensor, m.axis)] = rank + 1
        out[(m.tensor, m.axis, rank)] = m
    return out


def check_compatible(target: AlignmentPlan, other: AlignmentPlan, index: int) -> None:
    """Raise a :class:`FusionError` naming the first difference that makes two models unfusable."""
    missing = set(target.tensors) ^ set(other.tensors)
    if missing:
        name = sorted(missing)[0]
        where = "the target" if name not in target.tensors else f"model {index}"
        raise FusionError(f"model {index} and the target do not share an architecture: {where} has no "
                          f"tensor {name!r}")
    names_t, names_o = [s.name for s in target.spaces], [s.name for s in other.spaces]
    if names_t != names_o:
        diff = next((a, b) for a, b in zip(names_t + [""], names_o + [""], strict=False) if a != b)
        raise FusionError(f"model {index} and the target have different alignment plans (space {diff[0]!r} "
                          f"vs {diff[1]!r}); they do not share an architecture")
    for space_t, space_o in zip(target.spaces, other.spaces, strict=True):
        name = space_t.name
        if sorted(_ranked(space_t.members)) != sorted(_ranked(space_o.members)):
            raise FusionError(f"model {index} and the target wire space {name!r} differently")
        if space_t.heads != space_o.heads:
            raise FusionError(f"space {name!r} has {space_o.heads} attention heads in model {index} but "
                              f"{space_t.heads} in the target: fusing models with different head counts is not "
                              "supported (widths inside heads may differ)")
    moved = _segments(target)
    for name, shape in target.tensors.items():
        other_shape = other.tensors[name]
        if len(shape) != len(other_shape):
            raise FusionError(f"tensor {name!r} has shape {other_shape} in model {index} but {shape} in the target")
        for axis, (a, b) in enumerate(zip(other_shape, shape, strict=True)):
            if a != b and (name, axis) not in moved:
                raise FusionError(f"tensor {name!r} has shape {other_shape} in model {index} but {shape} in the "
                                  f"target, and axis {axis} is fixed (not a hidden space): they cannot be fused")


def plans_for(
    plan_t: AlignmentPlan,
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    target: int,
    trace: Callable[[int], AlignmentPlan] | None,
) -> list[AlignmentPlan]:
    """Each model's plan: the target's for a model of the target's shapes, else ``trace(i)`` (other widths; and
    always with attention heads, since equal shapes do not mean equal head counts). ``trace`` None: cannot trace."""
    own = {k: tuple(v) for k, v in plan_t.tensors.items() if k not in plan_t.aliases}
    headed = any(s.heads > 1 for s in plan_t.spaces)
    plans = []
    for i, s in enumerate(shapes):
        same = {k: tuple(v) for k, v in s.items() if k not in plan_t.aliases} == own
        if i == target or (same and (not headed or trace is None)):
            plans.append(plan_t)
        elif trace is None:
            raise FusionError(f"model {i} has other widths than the target: pass example_input to trace it")
        else:
            plans.append(trace(i))
    return plans


# ----------------------------------------------------------------------------------------------------------
# Aligning one model to the target


class _Aligner:
    """One model's tensors, transported lazily into the target's channel order and widths.

    A solved space's map is recorded on each of its members; a tensor is read from its source, and the maps
    recorded on it applied, only when something needs it (its rows for a cost, or its final value), and it is
    kept from then until :meth:`release`. So a tensor is held from its first use until every space it belongs
    to is solved, and a checkpoint on disk is never read whole.
    """

    def __init__(self, source: TensorSource, plan: AlignmentPlan, target_plan: AlignmentPlan,
                 device: torch.device, index: int = 0):
        self.source = source
        self.plan = plan
        self.device = device
        self.index = index
        self.segs = _segments(plan)
        self.target_sizes = {s.name: s.size for s in target_plan.spaces}
        self.sizes = {s.name: s.size for s in plan.spaces}
        self.done: set[str] = set()
        self.ops: dict[str, list[tuple[ChannelMap, int, int, int, int, int]]] = {}
        self.cache: State = {}

    def offset(self, m: AxisRef) -> int:
        """Where a member's segment starts now that earlier segments on its axis may have changed width."""
        shift = 0
        for seg in self.segs[(m.tensor, m.axis)]:
            if seg.member.offset < m.offset and seg.space in self.done:
                per_channel = seg.member.repeat * seg.member.tile
                shift += (self.target_sizes[seg.space] - self.sizes[seg.space]) * per_channel
        return m.offset + shift

    def ready(self, m: AxisRef) -> bool:
        """All other axes of the member's tensor already read the target's channels."""
        ndim = len(self.plan.tensors[m.tensor])
        return all(
            seg.space in self.done
            for axis in range(ndim) if axis != m.axis
            for seg in self.segs.get((m.tensor, axis), [])
        )

    def apply(self, space: Space, m_map: ChannelMap) -> None:
        for m in space.members:
            op = (m_map, m.axis, self.offset(m), m.repeat, m.tile, space.heads)
            self.ops.setdefault(m.tensor, []).append(op)
        self.done.add(space.name)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor with every map solved so far applied."""
        t = self.cache.get(name)
        if t is None:
            with timed("load"):
                t = self.source.get(name).to(self.device)
            _check_finite(t, self.index, name)
        ops = self.ops.pop(name, None)
        if ops:
            with timed("transport"):
                for m_map, axis, offset, repeat, tile, heads in ops:
                    t = transport_axis(t, m_map, axis, offset, repeat, tile, heads)
        self.cache[name] = t
        return t

    def release(self, name: str) -> torch.Tensor:
        """The tensor's final value (all its spaces solved); it is no longer held."""
        t = self.tensor(name)
        del self.cache[name]
        return t

    def drop(self, name: str) -> None:
        """Let go of a tensor without computing its final value."""
        self.cache.pop(name, None)
        self.ops.pop(name, None)


def _features(aligner: _Aligner, space: Space, target: _Aligner, target_space: Space, split: bool = False) -> Any:
    """Rows of every ready member (this model's, the target's), features concatenated (or, ``split``, per member)."""
    fa, fb = [], []
    for m_a, m_b in _member_pairs(space, target_space):
        if not aligner.ready(m_a):
            continue
        fa.append(rows(aligner.tensor(m_a.tensor), m_a.axis, aligner.offset(m_a), space.size, m_a.repeat, m_a.tile,
                       space.heads))
        fb.append(rows(target.tensor(m_b.tensor), m_b.axis, m_b.offset, target_space.size, m_b.repeat, m_b.tile,
                       target_space.heads))
    if split:
        return list(zip(fa, fb, strict=True))
    if not fa:
        return (torch.zeros(space.size, 0, device=aligner.device),
                torch.zeros(target_space.size, 0, device=aligner.device))
    dtype = torch.promote_types(fa[0].dtype, torch.float32)
    if len(fa) == 1:  # no copy
        return fa[0].to(dtype), fb[0].to(dtype)
    return torch.cat([f.to(dtype) for f in fa], 1), torch.cat([f.to(dtype) for f in fb], 1)


def _member_pairs(space: Space, target_space: Space) -> list[tuple[AxisRef, AxisRef]]:
    """Each member of a space with the target's member at the same (tensor, axis, rank)."""
    a, b = _ranked(space.members), _ranked(target_space.members)
    return [(a[k], b[k]) for k in a if k in b]


def _cost(
    aligner: _Aligner,
    space: Space,
    target: _Aligner,
    target_space: Space,
    costs: dict[str, torch.Tensor] | None,
    marginals: Marginals,
    per_tensor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Cost matrix and marginals of one space: weight rows of its ready members, or activations (weights break ties).

    ``per_tensor``: the mean of each ready member's own distance matrix, each scaled to a mean of one (every
    tensor counts the same), instead of the distance between their concatenated rows.
    """
    fa, fb = _features(aligner, space, target, target_space)
    with timed("cost"):
        if per_tensor and costs is None:
            pairs = _features(aligner, space, target, target_space, split=True)
            parts = [pairwise_distance(a, b) for a, b in pairs if a.shape[1] > 1]  # matrices; vectors are too noisy
            parts = [c / c.mean() for c in parts if c.numel() and c.mean() > 0]
            cost = sum(parts) / len(parts) if parts else pairwise_distance(fa, fb)
        else:
            cost = pairwise_distance(fa, fb)
        if costs is not None:
            # activations decide; weights only break their ties (e.g. channels dead on all calibration data)
            act = costs[space.name].to(cost.device, cost.dtype)
            scale = act.max() / cost.max() if cost.numel() and cost.max() > 0 else 0.0
            cost = act + 1e-4 * scale * cost
        importance = marginals == "importance" and fa.shape[1] > 0
        a = marginal(space.size, fa.norm(dim=1) if importance else None, device=cost.device)
        b = marginal(target_space.size, fb.norm(dim=1) if importance else None, device=cost.device)
    return cost, a, b, not importance


@dataclass(frozen=True)
class _Options:
    solver: Solver
    reg: float
    marginals: Marginals
    heads: bool


def _solve_space(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, space: Space, order: list[int],
                 opts: _Options, uniform: bool) -> torch.Tensor:
    with timed("solve"):
        if space.heads > 1:
            return solve_heads(cost, a, b, space.heads, order, solver=opts.solver, reg=opts.reg, uniform=uniform)
        return solve(cost, a, b, solver=opts.solver, reg=opts.reg, uniform=uniform)


class _Walker:
    """Solves one model's map of each space in turn, against the target; ``given`` couplings are used as they are."""

    def __init__(self, aligner: _Aligner, target: _Aligner, costs: dict[str, torch.Tensor] | None,
                 given: dict[str, torch.Tensor], opts: _Options, keep: set[str]):
        self.aligner, self.target, self.costs, self.given, self.opts = aligner, target, costs, given, opts
        self.keep = keep  # what to keep of each space once solved: "couplings", "maps" (n x n each, so optional)
        self.couplings: dict[str, torch.Tensor] = {}
        self.maps: dict[str, ChannelMap] = {}
        self.head_sources: dict[str, list[int]] = {}

    def step(self, target_space: Space, groups: dict[str, list[Space]]) -> None:
        plan, opts = self.aligner.plan, self.opts
        space = plan.space(target_space.name)
        if space.name in self.given:
            t = self.given[space.name]
            b = t.sum(0)
        else:
            cost, a, b, uniform = _cost(self.aligner, space, self.target, target_space, self.costs, opts.marginals)
            n_heads, group = target_space.heads, target_space.head_group
            if group is not None and opts.heads and group not in self.head_sources:
                total = head_costs(cost, n_heads)
                for other in groups[group]:
                    if other.name != target_space.name:
                        c_other = _cost(self.aligner, plan.space(other.name), self.target, other, self.costs,
                                        opts.marginals)[0]
                        total += head_costs(c_other, n_heads)
                with timed("solve"):
                    self.head_sources[group] = match_heads(total)
            order = self.head_sources.get(group, list(range(n_heads))) if group is not None else list(range(n_heads))
            t = _solve_space(cost, a, b, target_space, order, opts, uniform)
        m_map = barycentric_map(t, b)
        self.aligner.apply(space, m_map)
        if "couplings" in self.keep:
            self.couplings[space.name] = t
        if "maps" in self.keep:
            self.maps[space.name] = m_map


Finished = Callable[[str, list[torch.Tensor]], None]


def _walk(
    sources: Sequence[TensorSource],
    plans: Sequence[AlignmentPlan],
    target: int,
    device: torch.device,
    costs: Sequence[dict[str, torch.Tensor] | None],
    given: Sequence[dict[str, torch.Tensor]],
    opts: _Options,
    finished: Finished | None,
    progress: bool,
    keep: set[str],
) -> list[_Walker | None]:
    """One walk over the target's spaces in order, every model aligned to the target space by space.

    As soon as every space of a tensor is solved, ``finished(name, [its value in each model])`` gets it (the
    target's unchanged) and no model holds it any more.
    """
    target_plan = plans[target]
    aligners = [_Aligner(s, p, target_plan, device, k) for k, (s, p) in enumerate(zip(sources, plans, strict=True))]
    walkers = [None if k == target else _Walker(aligners[k], aligners[target], costs[k], given[k], opts, keep)
               for k in range(len(sources))]
    remaining: dict[str, set[str]] = {name: set() for name in target_plan.tensors if name not in target_plan.aliases}
    for space in target_plan.spaces:
        for m in space.members:
            remaining[m.tensor].add(space.name)

    def finish(names: Iterable[str]) -> None:
        for name in names:
            if finished is None:
                for a in aligners:
                    a.drop(name)
            else:
                finished(name, [a.release(name) for a in aligners])

    finish([name for name, spaces in remaining.items() if not spaces])  # fixed tensors: nothing to solve
    groups = target_plan.head_groups()
    bar = tqdm(target_plan.spaces, desc="solving spaces", disable=not progress, leave=False, unit="space")
    for target_space in bar:
        start = time.perf_counter()
        for walker in walkers:
            if walker is not None:
                walker.step(target_space, groups)
        done = []
        for m in target_space.members:
            spaces = remaining[m.tensor]
            spaces.discard(target_space.name)
            if not spaces:
                done.append(m.tensor)
        finish(dict.fromkeys(done))
        seconds = time.perf_counter() - start
        record_space(target_space.name, seconds)
        bar.set_postfix_str(f"{target_space.name} ({target_space.size} ch) {seconds:.2f}s", refresh=False)
    return walkers


def _stream_couplings(sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], target: int,
                      device: torch.device, walkers: Sequence[_Walker | None], opts: _Options,
                      ) -> list[dict[str, torch.Tensor]]:
    """``residual="mean"``: each residual stream solved from the mean of its members' own costs, once every other
    space is solved (so deep writers' rows are aligned)."""
    target_plan = plans[target]
    streams = [s for s in target_plan.spaces if s.kind == "residual"]
    given: list[dict[str, torch.Tensor]] = [{} for _ in sources]
    for k, walker in enumerate(walkers):
        if walker is None:
            continue
        for stream in streams:
            aligner = _Aligner(sources[k], plans[k], target_plan, device, k)
            for other in target_plan.spaces:
                if other.name != stream.name:
                    aligner.apply(plans[k].space(other.name), walker.maps[other.name])
            reference = _Aligner(sources[target], target_plan, target_plan, device, target)
            space = plans[k].space(stream.name)
            cost, a, b, uniform = _cost(aligner, space, reference, stream, None, opts.marginals, per_tensor=True)
            given[k][stream.name] = _solve_space(cost, a, b, stream, list(range(stream.heads)), opts, uniform)
    return given


def check_sweeps(sweeps: int, alignment: str = "weights", solver: str = "emd", marginals: str = "uniform") -> None:
    """A :class:`FusionError` for a ``sweeps`` value, or options, that weight matching cannot run with."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise FusionError(f"sweeps must be an integer >= 0, got {sweeps!r}")
    if not sweeps:
        return
    for name, value, needed in (("alignment", alignment, "weights"), ("solver", solver, "emd"),
                                ("marginals", marginals, "uniform")):
        if value != needed:
            raise FusionError(f"sweeps={sweeps} (weight matching by coordinate descent) needs {name}={needed!r}, "
                              f"got {value!r}: it improves permutations, found from the weights alone")


def _matched_couplings(sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], target: int,
                       device: torch.device, walkers: Sequence[_Walker | None], sweeps: int, seed: int,
                       heads: bool) -> list[dict[str, torch.Tensor]]:
    """``sweeps > 0``: each model's permutations of the single pass improved by coordinate descent against the
    target (:func:`hf_otfusion.matching.weight_matching`), as couplings for the final walk."""
    from .matching import record, weight_matching

    target_plan = plans[target]
    names = [t for t in target_plan.members_by_tensor() if t not in target_plan.aliases]
    reference = _Aligner(sources[target], target_plan, target_plan, device, target)
    target_state = {name: reference.release(name) for name in names}
    given: list[dict[str, torch.Tensor]] = [{} for _ in sources]
    for k, walker in enumerate(walkers):
        if walker is None:
            continue
        aligner = _Aligner(sources[k], plans[k], target_plan, device, k)
        for space in plans[k].spaces:
            m_map = walker.maps[space.name]
            if m_map.index is None or m_map.scale is not None or m_map.n_in != m_map.n_out:
                raise FusionError(f"sweeps: the map of space {space.name!r} for model {k} is not a permutation")
            aligner.apply(space, m_map)
        state = {name: aligner.release(name) for name in names}
        with timed("matching"):
            _, result = weight_matching(state, target_state, target_plan, sweeps=sweeps, seed=seed, heads=heads)
        record(result)
        for space in target_plan.spaces:
            n = space.size
            index = walker.maps[space.name].index.cpu()[result.perms[space.name]]
            t = torch.zeros(n, n, dtype=torch.float64)
            t[index, torch.arange(n)] = 1.0 / n
            given[k][space.name] = t.to(device)
    return given


def align_sources(
    sources: Sequence[TensorSource],
    plans: Sequence[AlignmentPlan],
    finished: Finished,
    *,
    target: int = 0,
    costs: Sequence[dict[str, torch.Tensor] | None] | None = None,
    solver: Solver = "emd",
    reg: float = 0.05,
    marginals: Marginals = "uniform",
    heads: bool = True,
    residual: Residual = "shared",
    device: torch.device | str = "cpu",
    progress: bool = False,
    couplings: bool = True,
    sweeps: int = 0,
    seed: int = 0,
) -> list[dict[str, torch.Tensor] | None]:
    """The engine on tensors: align every source to the target's, space by space, handing on finished tensors.

    ``sources`` give each model's tensors by state-dict name (in memory, or read lazily from safetensors files);
    ``plans`` are their alignment plans (the same plan for models of the same shapes). Each tensor is read when
    first needed and handed to ``finished(name, [value in each model])`` as soon as all of its spaces are
    solved, so only the tensors of the spaces in flight are held. Options as in :func:`fuse`; ``sweeps > 0``
    (weight matching, order drawn from ``seed``) holds every model's moved tensors and the target's at once.

    Returns:
        Each model's coupling per space (None for the target); empty dicts with ``couplings=False``, which keeps
        no (n x n) coupling once its space is solved.
    """
    device = torch.device(device)
    n = len(sources)
    costs = list(costs) if costs is not None else [None] * n
    opts = _Options(solver=solver, reg=reg, marginals=marginals, heads=heads)
    given: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    streams = any(s.kind == "residual" for s in plans[target].spaces)
    if residual == "mean" and all(c is None for c in costs) and streams:
        first = _walk(sources, plans, target, device, costs, given, opts, None, progress, {"maps"})
        given = _stream_couplings(sources, plans, target, device, first, opts)
    if sweeps:
        check_sweeps(sweeps, "weights" if all(c is None for c in costs) else "activations", solver, marginals)
        for k, plan_k in enumerate(plans):
            for space, space_t in zip(plan_k.spaces, plans[target].spaces, strict=True):
                if space.size != space_t.size:
                    raise FusionError(f"sweeps={sweeps} (weight matching) needs the target's widths: space "
                                      f"{space.name!r} has {space.size} channels in model {k} but {space_t.size} "
                                      "in the target (fuse other widths with sweeps=0)")
        first = _walk(sources, plans, target, device, costs, given, opts, None, progress, {"maps"})
        given = _matched_couplings(sources, plans, target, device, first, sweeps, seed, heads)
    walkers = _walk(sources, plans, target, device, costs, given, opts, finished, progress,
                    {"couplings"} if couplings else set())
    return [None if w is None else w.couplings for w in walkers]


def align(
    state: State,
    plan: AlignmentPlan,
    target_state: State,
    target_plan: AlignmentPlan,
    *,
    costs: dict[str, torch.Tensor] | None = None,
    solver: Solver = "emd",
    reg: float = 0.05,
    marginals: Marginals = "uniform",
    heads: bool = True,
    residual: Residual = "shared",
    progress: bool = False,
) -> tuple[State, dict[str, torch.Tensor]]:
    """Transport one model's state onto the target's channels; returns it and the coupling of each space.

    A space with attention heads gets a block-diagonal coupling: head ``sigma(h)`` of this model onto head ``h``
    of the target. ``heads=True`` chooses ``sigma`` once per head group, by an assignment over the summed
    head-to-head transport costs of all the group's spaces (queries/keys and values/outputs); ``heads=False``
    keeps every head in place. ``residual``: see :func:`fuse`.
    """
    out: State = {}

    def keep(name: str, values: list[torch.Tensor]) -> None:
        out[name] = values[1]

    device = next(iter(target_state.values())).device if target_state else torch.device("cpu")
    couplings = align_sources([StateSource(target_state), StateSource(state)], [target_plan, plan], keep,
                              costs=[None, costs], solver=solver, reg=reg, marginals=marginals, heads=heads,
                              residual=residual, device=device, progress=progress)
    return out, couplings[1]


# ----------------------------------------------------------------------------------------------------------
# Public API


def _state(model: nn.Module, device: torch.device) -> State:
    return {k: v.detach().to(device) for k, v in model.state_dict().items()}


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; None: ``model``'s device (the CPU without one)."""
    if device is None:
        return next((p.device for p in model.parameters()), torch.device("cpu")) if model is not None \
            else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionError("device='cuda' was asked for but no CUDA device is available (use 'auto' or 'cpu')")
    return dev


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One weight per model summing to one (equal by default); a ``FusionError`` for a bad list."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise FusionError(f"got {len(w)} weights for {n} models")
    if any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise FusionError(f"weights must be non-negative and sum to more than 0, got {w}")
    return [x / sum(w) for x in w]


def _check_finite(tensor: torch.Tensor, index: int, name: str) -> None:
    if tensor.is_floating_point() and not all_finite(tensor):
        raise FusionError(f"model {index} has NaN or infinite values in {name!r}")


def average_tensor(values: Sequence[torch.Tensor], weights: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    """The weighted mean of one tensor's aligned values, in ``ref``'s dtype (non-float tensors: ``ref``'s copy)."""
    if not ref.is_floating_point():
        return ref.clone()
    with timed("average"):
        return sum(w * v.to(ref.dtype) for w, v in zip(weights, values, strict=True))


def _with_state(model: nn.Module, state: State) -> nn.Module:
    out = copy.deepcopy(model)
    device = next((p.device for p in out.parameters()), torch.device("cpu"))
    out.load_state_dict({k: v.to(device) for k, v in state.items()})
    return out


def vanilla_average(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """Average the parameters of identically shaped models, with no alignment (the baseline).

    Example:
        >>> from torch import nn
        >>> avg = vanilla_average([nn.Linear(2, 2), nn.Linear(2, 2)])
    """
    if len(models) < 1:
        raise FusionError("vanilla_average needs at least one model")
    w = normalized_weights(weights, len(models))
    states = [_state(m, torch.device("cpu")) for m in models]
    for i, s in enumerate(states[1:], 1):
        for name, t in states[0].items():
            if name not in s or s[name].shape != t.shape:
                raise FusionError(f"vanilla averaging needs identical shapes: model {i} differs at {name!r}")
    return _with_state(models[0], {name: average_tensor([s[name] for s in states], w, ref)
                                   for name, ref in states[0].items()})


class Ensemble(nn.Module):
    """Prediction ensemble: the log of the (weighted) average of the members' softmax probabilities."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", torch.tensor(normalized_weights(weights, len(models))), persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        probs = 0
        for w, model in zip(self.weights, self.members, strict=True):
            out = model(*args, **kwargs)
            probs = probs + w * logits_of(out).float().softmax(-1)
        return torch.log(probs.clamp_min(1e-30))


def ensemble(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> Ensemble:
    """A module that averages the members' predicted probabilities (N times the cost of one model)."""
    return Ensemble(models, weights)


def _random_order(space: Space, gen: torch.Generator, head_orders: dict[str, torch.Tensor],
                  permute_heads: bool) -> torch.Tensor:
    """A random channel order for one space: within each head, and of whole heads (one order per head group)."""
    n, d = space.heads, space.head_dim
    if space.head_group is not None and permute_heads and n > 1:
        if space.head_group not in head_orders:
            order = torch.randperm(n, generator=gen)
            head_orders[space.head_group] = order.roll(1) if bool((order == torch.arange(n)).all()) else order
        heads = head_orders[space.head_group]
    else:
        heads = torch.arange(n)
    within = [torch.randperm(d, generator=gen) for _ in range(n)]
    order = torch.cat([heads[h] * d + within[h] for h in range(n)])
    if bool((order == torch.arange(space.size)).all()) and d > 1:
        order = torch.cat([heads[h] * d + within[h].roll(1 if h == 0 else 0) for h in range(n)])
    return order


def random_permutation(
    model: nn.Module,
    plan: AlignmentPlan | None = None,
    seed: int = 0,
    *,
    example_input: Any = None,
    permute_heads: bool = True,
) -> nn.Module:
    """A copy of ``model`` with every space's channels randomly permuted: the same function, other weights.

    Spaces with attention heads are permuted inside each head and, with ``permute_heads``, by whole heads (one
    head order per head group, so queries, keys, values and outputs stay together).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = random_permutation(m, example_input=torch.randn(2, 4))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(m(x), p(x), atol=1e-6)
        True
    """
    if plan is None:
        if example_input is None:
            raise PlanError("random_permutation needs a plan or an example_input to trace the model")
        plan = build_plan(model, example_input)
    gen = torch.Generator().manual_seed(seed)
    state = _state(model, torch.device("cpu"))
    head_orders: dict[str, torch.Tensor] = {}
    for space in plan.spaces:
        order = _random_order(space, gen, head_orders, permute_heads)
        perm = ChannelMap(torch.eye(space.size)[order])
        for m in space.members:
            state[m.tensor] = transport_axis(state[m.tensor], perm, m.axis, m.offset, m.repeat, m.tile,
                                             space.heads)
    for alias, name in plan.aliases.items():
        state[alias] = state[name]
    return _with_state(model, state)


def fuse(
    models: Sequence[nn.Module],
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    alignment: Alignment = "weights",
    calibration: Any = None,
    example_input: Any = None,
    solver: Solver = "emd",
    reg: float = 0.05,
    marginals: Marginals = "uniform",
    match_heads: bool = True,
    residual: Residual = "shared",
    standardize: bool = False,
    plan: AlignmentPlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    repair: str = "none",
    sweeps: int = 0,
) -> nn.Module:
    """Fuse N models into one with the target's architecture and widths, by optimal transport.

    Each model other than the target is aligned to it space by space (topological order): a cost between
    its channels and the target's (``alignment="weights"``: distances between aligned weight rows;
    ``"activations"``: distances between activations on ``calibration``), an OT coupling (``solver``), then
    every tensor axis of the space is transported. The aligned models are averaged with ``weights``.

    Transformers: a space with attention heads (queries/keys of one attention op; values/output projection) is
    solved head by head, so its map is block-diagonal and attention stays exact. With ``match_heads`` the heads
    are first matched to each other (one assignment per attention op over the head-to-head transport costs of
    its query/key and value/output spaces together); without it head ``h`` goes to head ``h``. LayerNorm
    parameters, class/position/token embeddings and the classifier's input move with the residual stream.

    Residual streams (every tensor that writes into or reads from a chain of residual adds: one space, one map,
    which exactness requires) follow the ``residual`` policy:

    - ``"shared"`` (default): the stream is solved once, when the walk reaches it, from everything aligned by
      then: in weights mode the concatenated rows of its first writers (patch/token embeddings or the stem),
      norm parameters, biases and the classifier's input columns; in activations mode the statistics of every
      site where the stream is read, summed (sites with larger activations weigh more).
    - ``"mean"``: every writer and reader of the stream contributes its own cost matrix, scaled to a mean of
      one, and the map is solved from their average, as Imfeld et al. (ICLR 2024) average the maps of a
      residual connection's branches. In weights mode these are the stream's matrix members (1-D norm
      parameters and biases left out) after a first pass has solved every block, so deep writers' rows are
      aligned; every other space is then solved again against the stream's new map. In activations mode these
      are the stream's sites (each place a layer reads it), each weighing the same.

    Args:
        models: two or more models of one architecture (widths of hidden spaces may differ; head counts not).
        target: index of the model whose architecture and widths the result keeps.
        weights: one non-negative weight per model (default equal).
        alignment: ``"weights"`` (data-free) or ``"activations"`` (needs ``calibration``).
        calibration: a tensor of inputs, a dict of keyword tensors, or an iterable of input batches (tensors,
            dicts) or of (input, label) batches.
        example_input: a batch to trace the models with; defaults to the first calibration batch.
        solver: ``"emd"`` (exact; a linear assignment when the optimum is a permutation) or ``"sinkhorn"``.
        reg: entropic regularisation for Sinkhorn, relative to the cost's largest entry.
        marginals: ``"uniform"`` or ``"importance"`` (channel mass proportional to its weights' norm).
        match_heads: match attention heads to heads before the channels inside them (default True).
        residual: ``"shared"`` or ``"mean"``: how the cost of a residual stream is made (see above).
        standardize: activations mode: compare activations centred and scaled to unit variance per channel
            (a correlation distance) instead of raw values.
        plan: the target's alignment plan (traced when omitted).
        device: where costs, solves and transports run: ``"cpu"``, ``"cuda"``, ``"auto"`` (default: the
            target's device). Exact EMD always solves on the CPU.
        progress: show progress bars.
        repair: after averaging, ``"none"``; ``"reset_bn"`` (recompute BatchNorm running statistics on
            ``calibration``, see ``hf_otfusion.repair.reset_norm_stats``); or ``"repair"`` (REPAIR: each hidden
            channel's mean and std set to the weighted average of its parents' on ``calibration``, measured on each
            parent and carried over by its couplings, folded into the weights; BatchNorm statistics are recomputed
            too; see ``hf_otfusion.repair.repair_model``); or ``"refit"`` (closed-form layer refit: every linear and
            conv layer, in forward order, re-solved by ridge least squares so that on ``calibration`` its outputs,
            with the fused model's inputs, match the weighted mean of the parents' outputs of the same layer; a
            layer and the BatchNorm after it fitted as one and folded back; no labels and no gradient; see
            ``hf_otfusion.refit.refit_model``).
        sweeps: weight matching by coordinate descent (Git Re-Basin, Ainsworth et al. ICLR 2023, Algorithm 1, on
            the plan), data-free: after the single pass, every space (a head group as one) is revisited in a
            seeded random order, with all other maps held, and re-solved by an assignment that maximises the
            inner products between the target's and the model's tensors along every member axis (incoming and
            outgoing weights, norms, biases, heads); a step is kept only if the total weight similarity rises.
            At most ``sweeps`` passes, fewer when one changes nothing; 0 (default): the single pass alone. Needs
            weights mode, ``solver="emd"``, uniform marginals and the target's widths; each model is matched to
            the target. ``hf_otfusion.matching.recording`` collects the objective per sweep.

    Returns:
        A new module (a copy of the target with fused weights); the inputs are not modified. Tied tensors (an
        LM head tied to the embeddings) stay tied.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import fuse
        >>> a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> b = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> fused = fuse([a, b], example_input=torch.randn(2, 4), progress=False)
    """
    models = list(models)
    if len(models) < 2:
        raise FusionError(f"fusion needs at least two models, got {len(models)}")
    if not -len(models) <= target < len(models):
        raise FusionError(f"target={target} is out of range for {len(models)} models")
    target %= len(models)
    if alignment not in ALIGNMENTS:
        raise FusionError(f"unknown alignment {alignment!r}: choose one of {', '.join(ALIGNMENTS)}")
    if solver not in SOLVERS:
        raise FusionError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if marginals not in MARGINALS:
        raise FusionError(f"unknown marginals {marginals!r}: choose one of {', '.join(MARGINALS)}")
    if residual not in RESIDUALS:
        raise FusionError(f"unknown residual policy {residual!r}: choose one of {', '.join(RESIDUALS)}")
    if solver == "sinkhorn" and not reg > 0:
        raise FusionError(f"sinkhorn needs reg > 0, got {reg}")
    if alignment == "activations" and calibration is None:
        raise FusionError("alignment='activations' needs calibration data (calibration=...)")
    check_sweeps(sweeps, alignment, solver, marginals)
    from .repair import REPAIRS

    if repair not in REPAIRS:
        raise FusionError(f"unknown repair {repair!r}: choose one of {', '.join(REPAIRS)}")
    if repair != "none" and calibration is None:
        raise FusionError(f"repair={repair!r} needs calibration data (calibration=...)")
    if example_input is None and calibration is not None:
        example_input = first_batch(calibration)
    if plan is None and example_input is None:
        raise FusionError("pass example_input (or calibration) so the models can be traced, or a plan")
    w = normalized_weights(weights, len(models))
    for i, model in enumerate(models):  # before the (slow) tracing; file sources are checked as they are read
        for name, tensor in model.state_dict().items():
            _check_finite(tensor, i, name)
    dev = resolve_device(device, models[target])

    with timed("trace"):
        target_model = models[target]
        ep_t = export_model(target_model, example_input) if plan is None or alignment == "activations" else None
        plan_t = plan if plan is not None else build_plan(target_model, example_input, exported=ep_t)
        exported: dict[int, Any] = {}

        def trace(i: int) -> AlignmentPlan:
            exported[i] = export_model(models[i], example_input)
            return build_plan(models[i], example_input, exported=exported[i])

        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        plans = plans_for(plan_t, shapes, target, trace if example_input is not None else None)
        for i, plan_i in enumerate(plans):
            check_compatible(plan_t, plan_i, i)

    costs: list[dict[str, torch.Tensor] | None] = [None] * len(models)
    if alignment == "activations":
        runners = [Runner(exported.get(i, ep_t), m, dev) for i, m in enumerate(models)]
        streams = {s.name for s in plan_t.spaces if s.kind == "residual"} if residual == "mean" else set()
        with timed("activations"):
            costs = activation_costs(runners, plans, target, calibration, per_site=streams,
                                     standardize=standardize, progress=progress)
        del runners

    fused: State = {}

    def average(name: str, values: list[torch.Tensor]) -> None:
        fused[name] = average_tensor(values, w, values[target])

    sources = [StateSource(m.state_dict()) for m in models]
    couplings = align_sources(sources, plans, average, target=target, costs=costs, solver=solver, reg=reg,
                              marginals=marginals, heads=match_heads, residual=residual, device=dev,
                              progress=progress, couplings=repair in ("repair", "refit"), sweeps=sweeps)
    for alias, name in plan_t.aliases.items():
        fused[alias] = fused[name]
    if repair == "none":
        return _with_state(target_model, fused)
    from .repair import repair_model, reset_norm_stats

    with timed("repair"):
        if repair == "reset_bn":
            return reset_norm_stats(_with_state(target_model, fused), calibration, device=dev)
        if repair == "refit":
            from .refit import refit_model

            return refit_model(_with_state(target_model, fused), models, calibration, weights=w, couplings=couplings,
                               device=dev, plan=plan_t, example_input=example_input, exported=ep_t)
        # each parent's statistics, measured on the parent and carried over by its couplings (exact for any widths)
        return repair_model(_with_state(target_model, fused), models, calibration, weights=w, couplings=couplings,
                            device=dev, plan=plan_t, example_input=example_input, exported=ep_t)
