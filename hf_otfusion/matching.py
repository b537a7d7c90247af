"""Weight matching by coordinate descent (Git Re-Basin, Ainsworth et al. ICLR 2023, Algorithm 1, on the plan).

The engine's single pass solves each space once, from the rows of the tensors whose other axes are already
aligned. :func:`weight_matching` then improves those permutations: it revisits every space ``P`` (in a seeded
random order each sweep) with every other space's map held, collects from *every* member axis of ``P``
(incoming and outgoing weights, norms, biases, statistics, embeddings, heads: whatever the plan lists) the inner
products between the target's tensor and the other model's tensor along that axis, every other axis of the
tensor being already in the target's basis, and solves the assignment that maximises their sum. The objective
is the total weight similarity

    J = sum over every tensor with an axis in a space of <W_target, W_other aligned>,

which, with the other maps held, is linear in ``P``'s permutation (unless a tensor has ``P`` on two axes; then
the others are held at their current value, as in the paper), so each step is exact for its coordinate. A step
is kept only if ``J`` (recomputed on the tensors it touched) increased; ties keep the current map, so a sweep
that changes nothing ends the descent.

Attention heads keep the block structure: the spaces of one head group (queries/keys and values/outputs of an
attention op) are one coordinate, re-solved jointly: heads are matched to heads by an assignment over the summed
head-to-head values (each block's own optimal within-head assignment) of all the group's spaces, then channels
inside matched heads, which is the exact optimum of that coordinate; with ``heads=False``, and for headed spaces
without a group, the head order is held and only channels inside each head move. Tiled (grouped-query) and
repeated members are read with :func:`~hf_otfusion.transport.rows` and moved with
:func:`~hf_otfusion.transport.transport_axis`, as everywhere in the engine.

Both models must have the target's widths and the maps of the single pass must be permutations (exact solver,
uniform marginals). No data is used. A residual stream in ``dense`` (one that admits any orthogonal map once its norm
gains are folded: :mod:`hf_otfusion.folding`) is solved by orthogonal Procrustes instead of an assignment: with the
same inner products ``S`` (this state's channels against the target's), the orthogonal ``M`` maximising
``trace(M S)`` is ``V U^T`` for ``S = U diag(s) V^T``, the exact optimum of that coordinate too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from .checkpoint import TensorSource
from .errors import FusionError
from .log import Recorder
from .plan import AlignmentPlan, AxisRef, Space
from .profile import timed
from .transport import ChannelMap, head_costs, marginal, match_heads, rows, solve, solve_heads, transport_axis

if TYPE_CHECKING:
    from .engine import Walker

State = dict[str, torch.Tensor]


class InnerMaps(Protocol):
    """Maps beyond the plan's permutations that keep the function (inside attention heads:
    :mod:`hf_otfusion.head_maps`; a sign per hidden unit: :mod:`hf_otfusion.signs`), refitted during weight matching."""

    def fit(self, state: State, target_state: State) -> State:
        """``state`` with the maps fitted to ``target_state`` and applied."""

    def fit_space(self, state: State, target_state: State, space: Space) -> State:
        """``state`` with the maps of one space fitted (after its permutation changed); the others as they are."""

    def head_values(self, state: State, target_state: State, space: Space) -> torch.Tensor | None:
        """(heads, heads): the best inner product each pair of heads (this state's, the target's) reaches under the
        maps, for a space that takes them; None for another space."""

    def channel_values(self, state: State, target_state: State, space: Space) -> torch.Tensor | None:
        """(n, n): the best inner product each pair of channels reaches under the maps, for a space without heads
        that takes them (in place of :func:`channel_similarity`); None for another space."""


@dataclass(frozen=True)
class AllMaps:
    """Several :class:`InnerMaps` as one (each space takes at most one kind)."""

    parts: tuple[InnerMaps, ...]

    def fit(self, state: State, target_state: State) -> State:
        for part in self.parts:
            state = part.fit(state, target_state)
        return state

    def fit_space(self, state: State, target_state: State, space: Space) -> State:
        for part in self.parts:
            state = part.fit_space(state, target_state, space)
        return state

    def head_values(self, state: State, target_state: State, space: Space) -> torch.Tensor | None:
        return next((v for p in self.parts if (v := p.head_values(state, target_state, space)) is not None), None)

    def channel_values(self, state: State, target_state: State, space: Space) -> torch.Tensor | None:
        return next((v for p in self.parts if (v := p.channel_values(state, target_state, space)) is not None), None)


@dataclass
class MatchingResult:
    """What the coordinate descent did for one model.

    ``perms[space][j]`` is the channel of the input state (already in the target's basis after the single pass)
    that target channel ``j`` now receives. ``objective[0]`` is the total weight similarity before the first
    sweep, ``objective[s]`` after sweep ``s``; ``changed[s - 1]`` the number of coordinates (spaces, or head
    groups) that sweep ``s`` changed. ``converged``: the last sweep changed nothing.
    """

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # orthogonal spaces: target channels <- M @ channels
    changed: list[int] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return bool(self.changed) and self.changed[-1] == 0


_recorder: Recorder[MatchingResult] = Recorder("hf_otfusion_matching")


def recording() -> contextlib.AbstractContextManager[list[MatchingResult]]:
    """Collect the :class:`MatchingResult` of every model matched inside the block (``fuse(..., sweeps=N)``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import fuse
        >>> from hf_otfusion.matching import recording
        >>> models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
        >>> with recording() as results:
        ...     fused = fuse(models, example_input=torch.randn(2, 4), sweeps=3, progress=False)
        >>> results[0].objective[-1] >= results[0].objective[0]
        True
    """
    return _recorder.recording()


record = _recorder.record


def permutation_map(index: torch.Tensor) -> ChannelMap:
    """The :class:`ChannelMap` that gives output channel ``j`` input channel ``index[j]`` (no n x n matrix)."""
    m = ChannelMap.__new__(ChannelMap)
    m.n_out = m.n_in = int(index.numel())
    m.index, m.scale, m.matrix = index.long(), None, None
    return m


def _moved(plan: AlignmentPlan) -> dict[str, list[tuple[Space, AxisRef]]]:
    return {t: ms for t, ms in plan.members_by_tensor().items() if t not in plan.aliases}


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return 0.0
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def weight_similarity(state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                      plan: AlignmentPlan) -> float:
    """The objective: sum of ``<target tensor, tensor>`` over every tensor with an axis in a space of ``plan``."""
    return sum(_dot(state[t], target_state[t]) for t in _moved(plan))


def channel_similarity(state: State, target_state: State, space: Space,
                untiled: AbstractSet[tuple[str, int]] = frozenset()) -> torch.Tensor:
    """(n, n) float64: entry (i, j) the summed inner products of this state's channel i and the target's j over
    every member axis of the space (other axes as they are, i.e. already in the target's basis). ``untiled``: axes
    whose tiled members are left out (a queries space solves the order of their tiles)."""
    n = space.size
    s = torch.zeros(n, n, dtype=torch.float64, device=next(iter(target_state.values())).device)
    for m in space.members:
        a, b = state[m.tensor], target_state[m.tensor]
        if not a.is_floating_point() or (m.tile > 1 and (m.tensor, m.axis) in untiled):
            continue
        dtype = torch.promote_types(a.dtype, torch.float32)
        layout = space.layout(m)
        ra, rb = rows(a, layout).to(dtype), rows(b, layout).to(dtype)
        s += (ra @ rb.T).double()
    return s


def _similarity(state: State, target_state: State, space: Space, untiled: AbstractSet[tuple[str, int]],
                inner: InnerMaps | None) -> torch.Tensor:
    values = inner.channel_values(state, target_state, space) if inner is not None else None
    return values if values is not None else channel_similarity(state, target_state, space, untiled)


def _scaled_evidence(state: State, target_state: State, plan: AlignmentPlan, evidence: Mapping[str, torch.Tensor],
                     inner: InnerMaps | None) -> dict[str, torch.Tensor]:
    """``evidence`` of the spaces that take it (no heads, no inner map of their channels), float64, each scaled to
    the Frobenius norm of its space's weight similarity in ``state``."""
    out = {}
    for name, e in evidence.items():
        space = plan.space(name)
        if space.heads > 1 or (inner is not None and inner.channel_values(state, target_state, space) is not None):
            continue
        if tuple(e.shape) != (space.size, space.size):
            raise FusionError(f"evidence for space {name!r} has shape {tuple(e.shape)}, not ({space.size}, "
                              f"{space.size})")
        weights, own = channel_similarity(state, target_state, space).norm(), e.double().norm()
        if float(own) > 0:
            out[name] = e.double().cpu() * float(weights / own)
    return out


def _moved_rows(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The evidence of a space after its map ``q`` (an assignment: row j takes row q[j]; or an orthogonal matrix)."""
    return q.double() @ e if q.is_floating_point() else e[q]


def procrustes(similarity: torch.Tensor, keep_ones: bool = False) -> torch.Tensor:
    """The orthogonal ``M`` maximising ``trace(M S)`` for ``S = similarity`` (target channel ``j`` <- sum_i
    ``M[j, i]`` channel ``i``); ``keep_ones``: among the maps with ``M 1 = 1`` (a stream read through LayerNorm),
    ``M = 11^T / n + H R H^T`` with ``R`` the Procrustes map of ``H^T S H`` on the complement ``H`` of the ones."""
    if keep_ones:
        h = complement_of_ones(similarity.shape[0]).to(similarity.device)
        return keeping_ones(procrustes(h.T @ similarity.double() @ h))
    u, _, vh = torch.linalg.svd(similarity.double())
    return vh.T @ u.T


def complement_of_ones(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n - 1): an orthonormal basis of the vectors whose entries sum to zero."""
    basis = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.eye(n, dtype=torch.float64)[:, : n - 1]], 1)
    return torch.linalg.qr(basis)[0][:, 1:].to(dtype)


def keeping_ones(inner: torch.Tensor) -> torch.Tensor:
    """The (n, n) orthogonal map that keeps the all-ones vector and acts as the (n - 1, n - 1) ``inner`` on the
    complement (:func:`complement_of_ones`)."""
    n = inner.shape[0] + 1
    h = complement_of_ones(n, inner.dtype).to(inner.device)
    return torch.full((n, n), 1.0 / n, dtype=inner.dtype, device=inner.device) + h @ inner @ h.T


def _solve_unit(sims: list[torch.Tensor], spaces: list[Space], heads: bool,
                dense: AbstractSet[str] = frozenset(),
                values: Sequence[torch.Tensor | None] = (), centred: AbstractSet[str] = frozenset(),
                ) -> list[torch.Tensor]:
    """Each space's relative assignment (target channel j <- channel q[j]) maximising the summed similarity; for a
    space in ``dense``, its orthogonal map (a matrix). ``values``: per space, None or its own (heads, heads) matrix of
    head-to-head values (this state's head, the target's) to match heads by, in place of the best permutation
    inside each pair of heads."""
    space = spaces[0]
    n_heads = space.heads
    if space.name in dense:
        return [procrustes(sims[0], keep_ones=space.name in centred)]
    if n_heads == 1:
        s = sims[0]
        t = solve(-s, marginal(space.size, device=s.device), marginal(space.size, device=s.device))
        return [t.argmax(0)]
    if heads and space.head_group is not None and not space.queries:  # a queries space's heads: its group's
        values = list(values) or [None] * len(sims)
        total = sum(head_costs(-s, n_heads) if v is None else -v.double().cpu()
                    for s, v in zip(sims, values, strict=True))
        order = match_heads(total)
    else:
        order = list(range(n_heads))
    out = []
    for s, sp in zip(sims, spaces, strict=True):
        a = marginal(sp.size, device=s.device)
        out.append(solve_heads(-s, a, a.clone(), n_heads, order, shared=sp.shared).argmax(0))
    return out


def _identity(q: torch.Tensor) -> bool:
    """Whether a solved map leaves every channel where it is (an orthogonal one: to 1e-12)."""
    eye = torch.arange(q.shape[0])
    if q.is_floating_point():
        return bool((q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max() < 1e-12)
    return bool((q == eye).all())


def _units(plan: AlignmentPlan, heads: bool) -> list[list[Space]]:
    """The coordinates: every space alone, except that the spaces of one head group move together (a queries
    space alone: its group moves its heads, it only the order inside each)."""
    units: list[list[Space]] = []
    groups: dict[str, list[Space]] = {}
    for space in plan.spaces:
        if space.head_group is not None and space.heads > 1 and heads and not space.queries:
            if space.head_group not in groups:
                groups[space.head_group] = []
                units.append(groups[space.head_group])
            groups[space.head_group].append(space)
        else:
            units.append([space])
    return units


def weight_matching(
    state: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    plan: AlignmentPlan,
    *,
    sweeps: int,
    seed: int = 0,
    heads: bool = True,
    dense: AbstractSet[str] = frozenset(),
    inner: InnerMaps | None = None,
    centred: AbstractSet[str] = frozenset(),
    evidence: Mapping[str, torch.Tensor] | None = None,
) -> tuple[State, MatchingResult]:
    """Coordinate descent on the permutations of every space, starting from ``state`` as it is.

    ``state`` must already have the target's widths (typically the output of the engine's single pass, so that
    descent starts there); ``plan`` is the target's. Returns the permuted state (tensors not in any space are
    the input's) and the :class:`MatchingResult`. ``sweeps``: at most that many passes over every coordinate,
    in an order drawn from ``seed`` for each pass; stops early after a pass that changes nothing. ``dense``: residual
    spaces solved by orthogonal Procrustes (their norm gains folded and out of the plan), in ``result.dense``;
    those in ``centred`` (read through LayerNorm) by the maps that keep the all-ones vector.
    ``inner``: maps beyond the plan's permutations that keep the function (inside attention heads:
    :mod:`hf_otfusion.head_maps`; signs of hidden units: :mod:`hf_otfusion.signs`), fitted again before each sweep
    and after each new permutation of a space that takes them (so that every step is judged with them in place),
    whose head-to-head (or channel-to-channel) values match the heads (channels) of the spaces that take them;
    they are not in the result (whoever passed them fits them again on the final alignment).
    ``evidence``: per space, an (n, n) similarity of its channels by another measure (the activations' ``E[a_i b_j]``
    on calibration data), rows in ``state``'s order and columns in the target's. It is scaled to the Frobenius norm
    of the space's weight similarity at the start and added to it, and the objective gains ``trace(M E)`` for the
    space's map ``M``: a space's own activations move with its own map only, so the sum stays exact as the other
    spaces move. Spaces with heads or with inner maps of their own channels take none (their channels change
    basis with maps the evidence does not follow).
    """
    if sweeps < 0:
        raise FusionError(f"sweeps must be >= 0, got {sweeps}")
    moved = _moved(plan)
    for name in moved:
        if tuple(state[name].shape) != tuple(target_state[name].shape):
            raise FusionError(f"weight matching needs equal widths: tensor {name!r} has shape "
                              f"{tuple(state[name].shape)} but {tuple(target_state[name].shape)} in the target")
    cur: State = dict(state)
    tgt: State = dict(target_state)
    result = MatchingResult(perms={s.name: torch.arange(s.size) for s in plan.spaces})
    ev = _scaled_evidence(cur, tgt, plan, evidence or {}, inner)
    total = weight_similarity(cur, tgt, plan) + sum(float(e.trace()) for e in ev.values())
    result.objective.append(total)
    units = _units(plan, heads)
    query_axes = plan.query_axes()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(sweeps):
        if inner is not None:
            cur = inner.fit(cur, tgt)
            total = weight_similarity(cur, tgt, plan) + sum(float(e.trace()) for e in ev.values())
        changed = 0
        for u in torch.randperm(len(units), generator=gen).tolist():
            spaces = units[u]
            sims = [_similarity(cur, tgt, sp, frozenset() if sp.queries else query_axes, inner) for sp in spaces]
            sims = [s + ev[sp.name].to(s.device) if sp.name in ev else s for s, sp in zip(sims, spaces, strict=True)]
            values = [inner.head_values(cur, tgt, sp) for sp in spaces] if inner is not None else []
            qs = [q.cpu() for q in _solve_unit(sims, spaces, heads, dense, values, centred)]
            if all(_identity(q) for q in qs):
                continue
            names = list(dict.fromkeys(m.tensor for sp in spaces for m in sp.members))
            old = sum(_dot(cur[t], tgt[t]) for t in names) + sum(float(ev[sp.name].trace()) for sp in spaces
                                                                  if sp.name in ev)
            new_ev = {sp.name: _moved_rows(ev[sp.name], q) for sp, q in zip(spaces, qs, strict=True) if sp.name in ev}
            scale = sum(float(cur[t].double().norm() * tgt[t].double().norm()) for t in names
                        if cur[t].is_floating_point())
            new_state = {t: cur[t] for t in names}
            for sp, q in zip(spaces, qs, strict=True):
                m_map = ChannelMap(q) if q.is_floating_point() else permutation_map(q)
                for m in sp.members:
                    new_state[m.tensor] = transport_axis(new_state[m.tensor], m_map, sp.layout(m))
                if inner is not None:
                    new_state = inner.fit_space(new_state, tgt, sp)
            new = sum(_dot(new_state[t], tgt[t]) for t in names) + sum(float(e.trace()) for e in new_ev.values())
            if new > old + 1e-10 * scale:  # ties keep the current map, so the descent cannot cycle
                cur.update(new_state)
                ev.update(new_ev)
                total += new - old
                for sp, q in zip(spaces, qs, strict=True):
                    if q.is_floating_point():
                        before = result.dense.get(sp.name, torch.eye(sp.size, dtype=torch.float64))
                        result.dense[sp.name] = q @ before
                    else:
                        result.perms[sp.name] = result.perms[sp.name][q]
                changed += 1
        result.objective.append(total)
        result.changed.append(changed)
        if changed == 0:
            break
    return cur, result


# ----------------------------------------------------------------------------------------------------------
# The engine's use of it: ``sweeps`` > 0


def check_sweeps(sweeps: int, alignment: str = "weights", solver: str = "emd", marginals: str = "uniform") -> None:
    """A :class:`FusionError` for a ``sweeps`` value, or options, that weight matching cannot run with."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise FusionError(f"sweeps must be an integer >= 0, got {sweeps!r}")
    if not sweeps:
        return
    if alignment not in ("weights", "activations"):
        raise FusionError(f"sweeps={sweeps} (weight matching by coordinate descent) needs alignment='weights' (or "
                          f"'activations', whose similarities it adds to the weights'), got {alignment!r}")
    for name, value, needed in (("solver", solver, "emd"), ("marginals", marginals, "uniform")):
        if value != needed:
            raise FusionError(f"sweeps={sweeps} (weight matching by coordinate descent) needs {name}={needed!r}, "
                              f"got {value!r}: it improves permutations by exact assignments")


def matched_couplings(sources: Sequence[TensorSource], plans: Sequence[AlignmentPlan], target: int,
                      device: torch.device, walkers: Sequence[Walker | None], sweeps: int, seed: int,
                      heads: bool, dense: AbstractSet[str] = frozenset(), inner: InnerMaps | None = None,
                      centred: AbstractSet[str] = frozenset(),
                      evidence: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
                      ) -> list[dict[str, torch.Tensor | ChannelMap]]:
    """``sweeps > 0``: each model's permutations of the single pass improved by coordinate descent against the
    target (:func:`hf_otfusion.matching.weight_matching`), as couplings for the final walk; the spaces in ``dense``
    as their orthogonal maps (a :class:`ChannelMap`, no coupling). ``evidence``: per model, its activation
    similarities to the target's per space (rows in the model's own channel order), added to weight matching's."""
    from .engine import Aligner

    target_plan = plans[target]
    names = [t for t in target_plan.members_by_tensor() if t not in target_plan.aliases]
    reference = Aligner(sources[target], target_plan, target_plan, device, target)
    target_state = {name: reference.release(name) for name in names}
    given: list[dict[str, torch.Tensor | ChannelMap]] = [{} for _ in sources]
    for k, walker in enumerate(walkers):
        if walker is None:
            continue
        aligner = Aligner(sources[k], plans[k], target_plan, device, k)
        for space in plans[k].spaces:
            m_map = walker.maps[space.name]
            if m_map.index is None or m_map.scale is not None or m_map.n_in != m_map.n_out:
                raise FusionError(f"sweeps: the map of space {space.name!r} for model {k} is not a permutation")
            aligner.apply(space, m_map)
        state = {name: aligner.release(name) for name in names}
        own = (evidence[k] if evidence is not None else None) or {}
        aligned = {name: e[walker.maps[name].index.to(e.device)] for name, e in own.items()}  # the single pass's order
        with timed("matching"):
            _, result = weight_matching(state, target_state, target_plan, sweeps=sweeps, seed=seed, heads=heads,
                                        dense=dense, inner=inner, centred=centred, evidence=aligned)
        record(result)
        for space in target_plan.spaces:
            n = space.size
            if space.name in dense:  # the single pass's permutation, then the descent's orthogonal map
                first = walker.maps[space.name].index.cpu()
                matrix = result.dense.get(space.name, torch.eye(n, dtype=torch.float64))
                given[k][space.name] = ChannelMap(matrix[:, torch.argsort(first)].to(device))
                continue
            index = walker.maps[space.name].index.cpu()[result.perms[space.name]]
            t = torch.zeros(n, n, dtype=torch.float64)
            t[index, torch.arange(n)] = 1.0 / n
            given[k][space.name] = t.to(device)
    return given
