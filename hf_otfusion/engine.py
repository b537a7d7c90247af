"""The fusion engine: walks the plan space by space over every model at once, solves each space's transport map
against the target and hands on each tensor, carried into the target's channels, as soon as it is final.

The engine knows nothing of architectures: it reads spaces and (tensor, axis) members from the plan. ``fuse``
(the public API, in :mod:`hf_otfusion.fuse`) and the streamed merge both run it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .checkpoint import StateSource, TensorSource
from .config import FusionParameters, resolve_options
from .distributed import broadcast, broadcast_object, is_main, world
from .errors import FusionError
from .matching import InnerMaps, check_sweeps, matched_couplings
from .plan import AlignmentPlan, AxisRef, Layout, Space
from .profile import record_space, timed
from .transport import (
    ChannelMap,
    Marginals,
    all_finite,
    barycentric_map,
    distance_of_blocks,
    head_costs,
    joined_rows,
    marginal,
    match_heads,
    optimal_permutation,
    pairwise_distance,
    permutation_coupling,
    rows,
    solve,
    solve_heads,
    transport_axis,
)
from .verify import conform

Residual = Literal["shared", "mean", "orthogonal"]
State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Plan bookkeeping


@dataclass(frozen=True)
class _Segment:
    space: str
    member: AxisRef


def _segments(plan: AlignmentPlan) -> dict[tuple[str, int], list[_Segment]]:
    """For each (tensor, axis), its space segments in offset order."""
    out: dict[tuple[str, int], list[_Segment]] = {}
    for space in plan.spaces:
        for m in space.members:
            out.setdefault((m.tensor, m.axis), []).append(_Segment(space.name, m))
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
        if space_t.shared != space_o.shared:
            raise FusionError(f"space {name!r} maps the channels inside its heads alike in "
                              f"{'the target' if space_t.shared else f'model {index}'} only: they do not share an "
                              "architecture")
        if space_t.queries and [m.repeat for m in space_t.members] != [m.repeat for m in space_o.members]:
            raise FusionError(f"space {name!r}: the query heads of grouped-query attention hold "
                              f"{space_o.members[0].repeat} entries each in model {index} but "
                              f"{space_t.members[0].repeat} in the target: models of different head widths with "
                              "grouped- or multi-query attention cannot be fused")
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
        else:  # the target's verified repairs made to it too (the same architecture)
            plans.append(conform(trace(i), plan_t))
    return plans


# ----------------------------------------------------------------------------------------------------------
# Aligning one model to the target


class Aligner:
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
        self.query_axes = plan.query_axes()
        self.target_sizes = {s.name: s.size for s in target_plan.spaces}
        self.sizes = {s.name: s.size for s in plan.spaces}
        self.done: set[str] = set()
        self.ops: dict[str, list[tuple[ChannelMap, Layout]]] = {}
        self.cache: State = {}

    def offset(self, m: AxisRef) -> int:
        """Where a member's segment starts now that earlier segments on its axis may have changed width."""
        segs = self.segs[(m.tensor, m.axis)]
        return m.offset + sum((self.target_sizes[s.space] - self.sizes[s.space]) * s.member.repeat * s.member.tile
                              for s in segs if s.member.offset < m.offset and s.space in self.done)

    def layout(self, space: Space, m: AxisRef) -> Layout:
        """The member's layout as its axis holds it now (:meth:`offset`)."""
        return space.layout(m).with_offset(self.offset(m))

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
            self.ops.setdefault(m.tensor, []).append((m_map, self.layout(space, m)))
        self.done.add(space.name)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor with every map solved so far applied."""
        t = self.cache.get(name)
        if t is None:
            with timed("load"):
                t = self.source.get(name).to(self.device)
            check_finite(t, self.index, name)
        ops = self.ops.pop(name, None)
        if ops:
            with timed("transport"):
                for m_map, layout in ops:
                    t = transport_axis(t, m_map, layout)
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


def _features(aligner: Aligner, space: Space, target: Aligner, target_space: Space,
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows of every ready member: (this model's, the target's), one pair per member. Tiled members on an axis
    that a queries space holds are left out: the order of their tiles is that space's, not solved yet."""
    out = []
    for m_a, m_b in _member_pairs(space, target_space):
        tiles_elsewhere = not space.queries and m_a.tile > 1 and (m_a.tensor, m_a.axis) in aligner.query_axes
        if not aligner.ready(m_a) or tiles_elsewhere:
            continue
        out.append((rows(aligner.tensor(m_a.tensor), aligner.layout(space, m_a)),
                    rows(target.tensor(m_b.tensor), target_space.layout(m_b))))
    return out


def _member_pairs(space: Space, target_space: Space) -> list[tuple[AxisRef, AxisRef]]:
    """Each member of a space with the target's member at the same (tensor, axis, rank)."""
    a, b = _ranked(space.members), _ranked(target_space.members)
    return [(a[k], b[k]) for k in a if k in b]


def _cost(
    aligner: Aligner,
    space: Space,
    target: Aligner,
    target_space: Space,
    costs: Mapping[str, torch.Tensor] | None,
    marginals: Marginals,
    per_tensor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Cost matrix and marginals of one space: weight rows of its ready members, or activations (weights break ties).

    ``per_tensor``: the mean of each ready member's own distance matrix, each scaled to a mean of one (every
    tensor counts the same), instead of the distance between their concatenated rows.
    """
    pairs = _features(aligner, space, target, target_space)
    with timed("cost"):
        if per_tensor and costs is None:
            parts = [pairwise_distance(a, b) for a, b in pairs if a.shape[1] > 1]  # matrices; vectors are too noisy
            parts = [c / c.mean() for c in parts if c.numel() and c.mean() > 0]
            cost = sum(parts) / len(parts) if parts else None
        else:
            cost = None
        if cost is None:
            cost, norm_a, norm_b = distance_of_blocks(pairs, space.size, target_space.size, aligner.device)
        else:
            fa, fb = joined_rows(pairs, space.size, target_space.size, aligner.device)
            norm_a, norm_b = fa.norm(dim=1), fb.norm(dim=1)
        if costs is not None and target_space.sites:  # a space that no activation carries: weights decide
            # activations decide; weights only break their ties (e.g. channels dead on all calibration data)
            act = costs[space.name].to(cost.device, cost.dtype)
            scale = act.max() / cost.max() if cost.numel() and cost.max() > 0 else 0.0
            cost = act + 1e-4 * scale * cost
        importance = marginals == "importance" and sum(a.shape[1] for a, _ in pairs) > 0
        a = marginal(space.size, norm_a if importance else None, device=cost.device)
        b = marginal(target_space.size, norm_b if importance else None, device=cost.device)
    return cost, a, b, not importance


def _solve_space(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, space: Space, order: list[int],
                 opts: FusionParameters, uniform: bool) -> torch.Tensor:
    """The coupling of one space, solved on the main process and broadcast to the others (a distributed run)."""
    t = None
    with timed("solve"):
        if is_main():
            if space.heads > 1:
                t = solve_heads(cost, a, b, space.heads, order, solver=opts.solver, reg=opts.reg, uniform=uniform,
                                shared=space.shared)
            else:
                t = solve(cost, a, b, solver=opts.solver, reg=opts.reg, uniform=uniform)
    return broadcast(t, tuple(cost.shape), torch.float64, cost.device)


Solved = Callable[[], tuple[torch.Tensor | None, ChannelMap]]  # a space's coupling and map, once its solve is done


def _coupling_and_map(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, space: Space, order: list[int],
                      opts: FusionParameters, uniform: bool,
                      coupling: bool = True) -> tuple[torch.Tensor | None, ChannelMap]:
    """The space's coupling (None unless ``coupling``, where its map is a permutation) and its barycentric map."""
    n_a, n_b = cost.shape
    if opts.solver == "emd" and uniform and n_a == n_b > 0 and space.heads == 1 and world()[1] == 1:
        with timed("solve"):  # solve()'s assignment path: its map is the permutation, no n x n coupling needed
            perm = optimal_permutation(cost).to(cost.device)
        return (permutation_coupling(perm) if coupling else None), ChannelMap.permutation(perm)
    t = _solve_space(cost, a, b, space, order, opts, uniform)
    return t, barycentric_map(t, b)


def _start_solve(pool: ThreadPoolExecutor | None, *args) -> Solved:
    """Solve a space now (no ``pool``), or start its solve on a thread of ``pool`` (the exact solvers release the
    GIL, so spaces solve while the next costs are computed); the result is the same either way."""
    if pool is None:
        done = _coupling_and_map(*args)
        return lambda: done
    future = pool.submit(_coupling_and_map, *args)  # a thread records no phases: the wait for it counts as solve

    def wait() -> tuple[torch.Tensor | None, ChannelMap]:
        with timed("solve"):
            return future.result()
    return wait


def solver_threads() -> int:
    """Threads that solve spaces beside the main one: ``$HF_OTFUSION_SOLVE_THREADS``, else half the CPUs this
    process may run on (1 to 8); 0 solves each space on the main thread. A distributed run solves on the main
    thread (its couplings are broadcast in order)."""
    env = os.environ.get("HF_OTFUSION_SOLVE_THREADS")
    if env is not None:
        return max(0, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))


class Walker:
    """Solves one model's map of each space in turn, against the target; ``given`` couplings are used as they are."""

    def __init__(self, aligner: Aligner, target: Aligner, costs: Mapping[str, torch.Tensor] | None,
                 given: dict[str, torch.Tensor], opts: FusionParameters, keep: set[str]):
        self.aligner, self.target, self.costs, self.given, self.opts = aligner, target, costs, given, opts
        self.keep = keep  # what to keep of each space once solved: "couplings", "maps" (n x n each, so optional)
        self.couplings: dict[str, torch.Tensor] = {}
        self.maps: dict[str, ChannelMap] = {}
        self.head_sources: dict[str, list[int]] = {}

    def step(self, target_space: Space, groups: dict[str, list[Space]],
             pool: ThreadPoolExecutor | None = None) -> Callable[[], None]:
        """Compute the space's cost and start its solve; returns what applies its map (called in space order)."""
        plan, opts = self.aligner.plan, self.opts
        space = plan.space(target_space.name)
        if space.name in self.given:
            t = self.given[space.name]
            done = (None, t) if isinstance(t, ChannelMap) else (t, barycentric_map(t, t.sum(0)))
            solved: Solved = lambda: done  # noqa: E731
        else:
            # a queries space reads weights only: its channels' entries are ordered by its group's other spaces,
            # solved before it, and its activations were read before any of them
            cost, a, b, uniform = _cost(self.aligner, space, self.target, target_space,
                                        None if space.queries else self.costs, opts.marginals)
            n_heads, group = target_space.heads, target_space.head_group
            if group is not None and opts.match_heads and group not in self.head_sources and not space.queries:
                total = head_costs(cost, n_heads)
                for other in groups[group]:
                    if other.name != target_space.name and not other.queries:
                        c_other = _cost(self.aligner, plan.space(other.name), self.target, other, self.costs,
                                        opts.marginals)[0]
                        total += head_costs(c_other, n_heads)
                with timed("solve"):
                    self.head_sources[group] = broadcast_object(match_heads(total) if is_main() else None)
            order = self.head_sources.get(group, list(range(n_heads))) if group is not None else list(range(n_heads))
            if target_space.queries:  # its heads already stand where the group's tiled members moved them
                order = list(range(n_heads))
            solved = _start_solve(pool, cost, a, b, target_space, order, opts, uniform, "couplings" in self.keep)

        def apply() -> None:
            t, m_map = solved()
            self.aligner.apply(space, m_map)
            if "couplings" in self.keep:
                self.couplings[space.name] = t
            if "maps" in self.keep:
                self.maps[space.name] = m_map
        return apply


Finished = Callable[[str, list[torch.Tensor]], None]


def _walk(
    sources: Sequence[TensorSource],
    plans: Sequence[AlignmentPlan],
    target: int,
    device: torch.device,
    costs: Sequence[Mapping[str, torch.Tensor] | None],
    given: Sequence[dict[str, torch.Tensor]],
    opts: FusionParameters,
    finished: Finished | None,
    progress: bool,
    keep: set[str],
) -> list[Walker | None]:
    """One walk over the target's spaces in order, every model aligned to the target space by space.

    As soon as every space of a tensor is solved, ``finished(name, [its value in each model])`` gets it (the
    target's unchanged) and no model holds it any more.

    Solves run on threads (:func:`solver_threads`) while the next spaces' costs are computed; a space's map is
    applied, in plan order, before any later space reads a tensor it moves, so every cost, map and tensor is the
    one the walk one space at a time gives.
    """
    target_plan = plans[target]
    aligners = [Aligner(s, p, target_plan, device, k) for k, (s, p) in enumerate(zip(sources, plans, strict=True))]
    walkers = [None if k == target else Walker(aligners[k], aligners[target], costs[k], given[k], opts, keep)
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
    threads = solver_threads() if world()[1] == 1 else 0
    # spaces whose solve was started and whose map is not applied yet, in plan order: (space, the tensors it moves,
    # each walker's apply, seconds so far)
    pending: deque[tuple[Space, set[str], list[Callable[[], None]], float]] = deque()

    def settle(needed: set[str], keep: int) -> None:
        """Apply pending maps in order: through the last one that moves a tensor in ``needed``, then until at most
        ``keep`` are left."""
        last = max((i for i, (_, moved, _, _) in enumerate(pending) if moved & needed), default=-1)
        while pending and (last >= 0 or len(pending) > keep):
            space, _, applies, seconds = pending.popleft()
            last -= 1
            start = time.perf_counter()
            for apply in applies:
                apply()
            done = []
            for m in space.members:
                spaces = remaining[m.tensor]
                spaces.discard(space.name)
                if not spaces:
                    done.append(m.tensor)
            finish(dict.fromkeys(done))
            seconds += time.perf_counter() - start
            record_space(space.name, seconds)
            bar.set_postfix_str(f"{space.name} ({space.size} ch) {seconds:.2f}s", refresh=False)

    bar = tqdm(target_plan.spaces, desc="solving spaces", disable=not progress, leave=False, unit="space")
    with ThreadPoolExecutor(threads) if threads else contextlib.nullcontext() as pool:
        try:
            for target_space in bar:
                # a cost reads the member tensors of its space (and of its head group's spaces)
                group = groups.get(target_space.head_group, []) if target_space.head_group is not None else []
                needed = {m.tensor for s in [target_space, *group] for m in s.members}
                settle(needed, threads)
                start = time.perf_counter()
                applies = [w.step(target_space, groups, pool) for w in walkers if w is not None]
                pending.append((target_space, {m.tensor for m in target_space.members}, applies,
                                time.perf_counter() - start))
                settle(set(), threads)
            settle(set(), 0)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return walkers


def _stream_couplings(sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], target: int,
                      device: torch.device, walkers: Sequence[Walker | None], opts: FusionParameters,
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
            aligner = Aligner(sources[k], plans[k], target_plan, device, k)
            for other in target_plan.spaces:
                if other.name != stream.name:
                    aligner.apply(plans[k].space(other.name), walker.maps[other.name])
            reference = Aligner(sources[target], target_plan, target_plan, device, target)
            space = plans[k].space(stream.name)
            cost, a, b, uniform = _cost(aligner, space, reference, stream, None, opts.marginals, per_tensor=True)
            given[k][stream.name] = _solve_space(cost, a, b, stream, list(range(stream.heads)), opts, uniform)
    return given


def align_sources(
    sources: Sequence[TensorSource],
    plans: Sequence[AlignmentPlan],
    finished: Finished,
    *,
    target: int = 0,
    costs: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    options: FusionParameters | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    couplings: bool = True,
    seed: int = 0,
    dense: frozenset[str] = frozenset(),
    inner: InnerMaps | None = None,
    centred: frozenset[str] = frozenset(),
    evidence: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
) -> list[dict[str, torch.Tensor] | None]:
    """The engine on tensors: align every source to the target's, space by space, handing on finished tensors.

    ``sources`` give each model's tensors by state-dict name (in memory, or read lazily from safetensors files);
    ``plans`` are their alignment plans (the same plan for models of the same shapes). Each tensor is read when
    first needed and handed to ``finished(name, [value in each model])`` as soon as all of its spaces are
    solved, so only the tensors of the spaces in flight are held. ``options``: the fusion options (validated; the
    engine reads solver, reg, marginals, match_heads, residual and sweeps: see :func:`fuse`); ``sweeps > 0`` (weight
    matching, order drawn from ``seed``) holds every model's moved tensors and the target's at once. ``dense``:
    residual spaces that weight matching solves by orthogonal maps (``residual="orthogonal"``, their norm gains
    folded and out of the plans: :mod:`hf_otfusion.folding`); they have no coupling; those in ``centred`` keep the
    all-ones vector (read through LayerNorm). ``inner``: maps beyond
    permutations (inside attention heads, a sign per hidden unit) that weight matching fits as it goes
    (:func:`hf_otfusion.matching.weight_matching`); ``evidence``: with activation ``costs`` and ``sweeps``, their
    similarities per model and space (``activations.activation_statistics``), added to the weights' in matching.

    Returns:
        Each model's coupling per space (None for the target); empty dicts with ``couplings=False``, which keeps
        no (n x n) coupling once its space is solved.
    """
    device = torch.device(device)
    n = len(sources)
    costs = list(costs) if costs is not None else [None] * n
    opts = options if options is not None else FusionParameters()
    sweeps = opts.sweeps
    given: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    streams = any(s.kind == "residual" for s in plans[target].spaces)
    if opts.residual == "mean" and all(c is None for c in costs) and streams:
        first = _walk(sources, plans, target, device, costs, given, opts, None, progress, {"maps"})
        given = _stream_couplings(sources, plans, target, device, first, opts)
    if sweeps:
        if any(c is not None for c in costs) and evidence is None:
            raise FusionError("weight matching on activations needs their similarities (fuse computes them)")
        check_sweeps(sweeps, "weights", opts.solver, opts.marginals)
        for k, plan_k in enumerate(plans):
            for space, space_t in zip(plan_k.spaces, plans[target].spaces, strict=True):
                if space.size != space_t.size:
                    raise FusionError(f"sweeps={sweeps} (weight matching) needs the target's widths: space "
                                      f"{space.name!r} has {space.size} channels in model {k} but {space_t.size} "
                                      "in the target (fuse other widths with sweeps=0)")
        first = _walk(sources, plans, target, device, costs, given, opts, None, progress, {"maps"})
        given = matched_couplings(sources, plans, target, device, first, sweeps, seed, opts.match_heads, dense,
                                  inner, centred, evidence)
    elif dense:
        raise FusionError("orthogonal maps of residual streams are solved by weight matching: set sweeps >= 1")
    walkers = _walk(sources, plans, target, device, costs, given, opts, finished, progress,
                    {"couplings"} if couplings else set())
    return [None if w is None else w.couplings for w in walkers]


def align(
    state: State,
    plan: AlignmentPlan,
    target_state: State,
    target_plan: AlignmentPlan,
    options: FusionParameters | None = None,
    *,
    costs: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    **overrides: Any,
) -> tuple[State, dict[str, torch.Tensor]]:
    """Transport one model's state onto the target's channels; returns it and the coupling of each space.

    ``options`` and ``overrides`` (``FusionParameters`` field names: ``solver``, ``reg``, ``marginals``,
    ``match_heads``, ``residual``, ``sweeps``) as in :func:`fuse`, validated once. A space with attention heads gets
    a block-diagonal coupling: head ``sigma(h)`` of this model onto head ``h`` of the target. ``match_heads=True``
    chooses ``sigma`` once per head group, by an assignment over the summed head-to-head transport costs of all the
    group's spaces (queries/keys and values/outputs); ``match_heads=False`` keeps every head in place.
    """
    opts = resolve_options(options, overrides, caller="align")
    out: State = {}

    def keep(name: str, values: list[torch.Tensor]) -> None:
        out[name] = values[1]

    device = next(iter(target_state.values())).device if target_state else torch.device("cpu")
    couplings = align_sources([StateSource(target_state), StateSource(state)], [target_plan, plan], keep,
                              costs=[None, costs], options=opts, device=device, progress=progress)
    return out, couplings[1]


def check_finite(tensor: torch.Tensor, index: int, name: str) -> None:
    if tensor.is_floating_point() and not all_finite(tensor):
        raise FusionError(f"model {index} has NaN or infinite values in {name!r}")
