"""Ground metrics, marginals, OT solvers and the transport of tensor axes.

Backend-agnostic torch code: everything runs on the device of its inputs, except exact EMD, which POT solves
on the CPU (and the assignment fast path, solved on the CPU by lapx's Jonker-Volgenant solver, or SciPy's
``linear_sum_assignment`` where lapx is not installed). ``T`` is always an (n_a, n_b) coupling that sums
to one; :func:`barycentric_map` turns it into the (n_b, n_a) matrix that maps A's channels onto B's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import FusionError
from .registry import SOLVERS, Unit

if TYPE_CHECKING:
    from .plan import Layout

Solver = str  # a registered solver's name (hf_otfusion.registry.SOLVERS)
Marginals = Literal["uniform", "importance"]
MARGINALS: tuple[str, ...] = ("uniform", "importance")


_LARGE = 1 << 24  # entries of a feature matrix above which cdist's padded copies of both inputs cost too much


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the rows of ``a`` (n_a, d) and of ``b`` (n_b, d), in float32 or better (wide
    features without ``cdist``'s padded copies: see :func:`distance_of_blocks`)."""
    return distance_of_blocks([(a, b)], a.shape[0], b.shape[0], a.device)[0]


def joined_rows(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], n_a: int, n_b: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Column blocks ``(a_k, b_k)`` joined side by side into (n_a, d) and (n_b, d), in float32 or better."""
    if not pairs:
        return torch.zeros(n_a, 0, device=device), torch.zeros(n_b, 0, device=device)
    dtype = torch.promote_types(pairs[0][0].dtype, torch.float32)
    if len(pairs) == 1:  # no copy
        return pairs[0][0].to(dtype), pairs[0][1].to(dtype)
    return torch.cat([a.to(dtype) for a, _ in pairs], 1), torch.cat([b.to(dtype) for _, b in pairs], 1)


def distance_of_blocks(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], n_a: int, n_b: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euclidean distances between the rows of two matrices given as column blocks ``(a_k, b_k)`` (n_a x d_k,
    n_b x d_k; the members of a space), and each side's row norms, in float32 or better.

    Small blocks are joined and go through ``cdist``. Wide ones (an LLM's residual stream reads its vocabulary-wide
    embedding and head) are never joined: the norms and cross products are summed block by block, each block
    converted on its own, so memory holds the distances and one converted block beside the blocks themselves.
    """
    if not pairs or sum(a.numel() + b.numel() for a, b in pairs) <= _LARGE:
        fa, fb = joined_rows(pairs, n_a, n_b, device)
        return torch.cdist(fa, fb), fa.norm(dim=1), fb.norm(dim=1)
    dtype = torch.promote_types(pairs[0][0].dtype, torch.float32)
    dev = pairs[0][0].device
    sq_a = torch.zeros(n_a, dtype=dtype, device=dev)
    sq_b = torch.zeros(n_b, dtype=dtype, device=dev)
    cross = torch.zeros(n_a, n_b, dtype=dtype, device=dev)
    for a, b in pairs:
        a, b = a.to(dtype), b.to(dtype)
        # squared norms as sums of squares: as fast on a transposed view (the rows of an axis-1 member, such as an
        # embedding's columns) as on contiguous rows, where vector_norm reduces a strided axis 4x slower
        sq_a += torch.linalg.vecdot(a, a, dim=1)
        sq_b += torch.linalg.vecdot(b, b, dim=1)
        cross.addmm_(a, b.T)
    cost = cross.mul_(-2).add_(sq_a[:, None]).add_(sq_b[None, :]).clamp_min_(0).sqrt_()
    return cost, sq_a.sqrt(), sq_b.sqrt()


def distance_from_gram(sq_a: torch.Tensor, sq_b: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Euclidean distances from squared norms and the cross Gram matrix (``|a|^2 + |b|^2 - 2 a.b``)."""
    return (sq_a[:, None] + sq_b[None, :] - 2 * cross).clamp_min(0).sqrt()


def marginal(n: int, scores: torch.Tensor | None = None, *, device: torch.device | None = None) -> torch.Tensor:
    """Uniform mass ``1/n``, or mass proportional to positive ``scores`` (importance-weighted marginals)."""
    if scores is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    s = scores.detach().to(torch.float64).abs() + 1e-12
    return s / s.sum()


def solve(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    solver: Solver = "emd",
    reg: float = 0.05,
    uniform: bool = True,
) -> torch.Tensor:
    """Optimal coupling ``T`` (n_a, n_b) between marginals ``a`` and ``b`` for ``cost``, on ``cost``'s device.

    ``emd`` is exact (POT's network simplex, or a linear assignment when the marginals are uniform and equal
    in size, whose optimum is then a permutation). ``sinkhorn`` is entropic, with ``reg`` relative to the
    cost's largest entry, in the log domain for small ``reg``.

    Example:
        >>> import torch
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> solve(c, marginal(2), marginal(2))
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]], dtype=torch.float64)
    """
    fn = SOLVERS.get(solver).fn  # an unknown name: a FusionError naming the registered solvers
    if not all_finite(cost):
        raise FusionError("the cost matrix has NaN or infinite entries (NaN weights or activations?)")
    return fn(cost, a, b, reg=reg, uniform=uniform)


def emd_coupling(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float = 0.05,
                 uniform: bool = True) -> torch.Tensor:
    """The solver ``emd``: exact OT by POT's network simplex (on the CPU), or a linear assignment when the marginals
    are uniform and equal in size (the optimum is then a permutation). ``reg`` is not used."""
    n_a, n_b = cost.shape
    if uniform and n_a == n_b:
        return permutation_coupling(optimal_permutation(cost)).to(cost.device)
    import ot

    t = ot.emd(a.double().cpu().numpy(), b.double().cpu().numpy(), cost.detach().double().cpu().numpy(),
               numItermax=max(100_000, 50 * n_a * n_b))
    t = torch.from_numpy(np.asarray(t)).to(cost.device)
    _check_coupling(t, a.to(t.device), b.to(t.device), "emd")
    return t


def sinkhorn_coupling(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float = 0.05,
                      uniform: bool = True) -> torch.Tensor:
    """The solver ``sinkhorn``: entropic OT on ``cost``'s device, ``reg`` relative to the cost's largest entry, in
    the log domain for ``reg`` below 0.05. ``uniform`` is not used."""
    import ot

    if reg <= 0:
        raise FusionError(f"sinkhorn needs reg > 0 (got {reg})")
    device = cost.device
    c = cost.detach().double()
    scale = c.max()
    c = c / scale if scale > 0 else c
    method = "sinkhorn_log" if reg < 0.05 else "sinkhorn"
    t = ot.sinkhorn(a.to(device), b.to(device), c, reg, method=method, numItermax=10_000, stopThr=1e-7)
    _check_coupling(t, a.to(t.device), b.to(t.device), "sinkhorn")
    return t


SOLVERS.register(Unit(
    name="emd", description="exact optimal transport", fn=emd_coupling,
    reference="POT's network simplex (ot.emd, Bonneel et al. 2011); a linear assignment when the optimum is a "
    "permutation"))
SOLVERS.register(Unit(
    name="sinkhorn", description="entropy-regularised optimal transport", fn=sinkhorn_coupling,
    reference="Cuturi, \"Sinkhorn Distances\", NeurIPS 2013 (ot.sinkhorn)"))


def optimal_permutation(cost: torch.Tensor) -> torch.Tensor:
    """:func:`solve`'s exact optimum for a square ``cost`` and uniform marginals as the permutation it is: entry ``j``
    is the row (channel of A) sent to column ``j`` (channel of B), on the CPU. ``permutation_coupling`` of it is
    what :func:`solve` returns, and ``ChannelMap.permutation`` of it the coupling's :func:`barycentric_map`."""
    if not all_finite(cost):
        raise FusionError("the cost matrix has NaN or infinite entries (NaN weights or activations?)")
    rows, cols = assignment(cost.detach().double().cpu().numpy())
    order = torch.empty(cost.shape[1], dtype=torch.int64)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return order


def permutation_coupling(order: torch.Tensor) -> torch.Tensor:
    """The (n, n) coupling of a permutation (entry ``j`` of ``order``: the row sent to column ``j``), each entry 1/n."""
    n = len(order)
    t = torch.zeros((n, n), dtype=torch.float64, device=order.device)
    t[order, torch.arange(n, device=order.device)] = 1.0 / n
    return t


def assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact linear assignment of a square ``cost``: ``(rows, cols)``, row ``rows[i]`` going to column ``cols[i]``.

    lapx's ``lapjvs`` (Jonker-Volgenant, with its float64 kernel, so the optimum is exact in float64) when lapx
    is installed: 3-6x faster than SciPy on hard costs at 3,072-5,632 channels, about 2x on near-permutation
    ones (docs/bench.md).
    Else SciPy's ``linear_sum_assignment``. Both return the optimum; between tied optima they may differ.
    """
    lapjvs = _lapjvs()
    if lapjvs is None or cost.shape[0] != cost.shape[1]:
        return linear_sum_assignment(cost)
    rows, cols = lapjvs(np.ascontiguousarray(cost, dtype=np.float64), extend_cost=False, return_cost=False,
                        jvx_like=True, prefer_float32=False)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def _lapjvs():
    """lapx's JV solver, or None where lapx is absent (the ``lap`` module of the older ``lap`` has no lapjvs)."""
    try:
        from lap import lapjvs
    except ImportError:
        return None
    return lapjvs


def _check_coupling(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, solver: str) -> None:
    tol = 1e-6 if solver == "emd" else 1e-3
    err = max((t.sum(1) - a).abs().sum().item(), (t.sum(0) - b).abs().sum().item())
    if not all_finite(t) or err > tol:
        hint = " (raise reg or use solver='emd')" if solver == "sinkhorn" else ""
        raise FusionError(f"the {solver} solver did not converge: marginal error {err:.2e}{hint}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (min and max reductions propagate NaN: far faster than ``isfinite``, and one
    pass with no copy of ``t``)."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t.detach().abs().amax()))
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


class ChannelMap:
    """An (n_out, n_in) matrix that maps channels: a gather when each row has one entry, sparse or dense else.

    Built once per space and applied to every tensor axis of that space.
    """

    def __init__(self, m: torch.Tensor):
        self.n_out, self.n_in = m.shape
        self.index: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None
        # non-negative rows with one entry each: the row's largest entry is its sum (no n x n temporaries)
        largest, index = m.max(1)
        if bool((largest == m.sum(1)).all()) and bool((largest > 0).all()):
            self.index = index
            scale = largest[:, None]
            self.scale = None if bool((scale == 1).all()) else scale
        elif int(torch.count_nonzero(m)) < 0.05 * m.numel() and m.device.type == "cpu":
            self.matrix = m.to_sparse()  # exact EMD couplings have at most n_in + n_out - 1 entries
        else:
            self.matrix = m

    @classmethod
    def permutation(cls, order: torch.Tensor) -> ChannelMap:
        """The map ``eye(n)[order]`` (row ``j`` takes channel ``order[j]``), built without the n x n matrix."""
        out = cls.__new__(cls)
        out.n_out = out.n_in = len(order)
        out.index, out.scale, out.matrix = order, None, None
        return out

    @classmethod
    def dense(cls, matrix: torch.Tensor) -> ChannelMap:
        """The map of ``matrix`` as it is, never turned into a gather (gradients flow through it)."""
        out = cls.__new__(cls)
        out.n_out, out.n_in = matrix.shape
        out.index, out.scale, out.matrix = None, None, matrix
        return out

    def __call__(self, seg: torch.Tensor) -> torch.Tensor:
        """Map the rows of ``seg`` (n_in, features) to (n_out, features)."""
        if self.index is not None:
            out = seg.index_select(0, self.index.to(seg.device))
            return out if self.scale is None else out * self.scale.to(seg.device, seg.dtype)
        m = self.matrix.to(seg.device, seg.dtype)
        return torch.sparse.mm(m, seg) if m.is_sparse else m @ seg


def barycentric_map(t: torch.Tensor, b: torch.Tensor | None = None) -> ChannelMap:
    """``diag(1/b) T^T``: maps A's channels onto B's, each of B's getting the mean of the A channels it receives."""
    col = t.sum(0) if b is None else b.to(t.device, t.dtype)
    return ChannelMap((t / col.clamp_min(1e-300)[None, :]).T)


def gather(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The ``layout.length`` entries of dim 0 of ``x`` that the layout's channels hold, channel-major (``axis`` is
    not read: move it to dim 0 first)."""
    if layout.contiguous:  # one run, already channel-major: a view
        return x[layout.offset : layout.offset + layout.size * layout.repeat]
    return x.index_select(0, layout.positions().to(x.device))


def place(x: torch.Tensor, moved: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x`` with the layout's channels on dim 0 replaced by ``moved`` (channel-major, as :func:`gather` gives). A
    contiguous layout may change width; one whose head blocks lie apart (``block``) may not."""
    k = layout.per_channel
    n_out = moved.shape[0] // k
    if layout.block is not None:
        if n_out != layout.size:
            raise FusionError(f"channels {layout.size} -> {n_out}: the channels inside heads that a slice cuts into "
                              "segments (partial rotary, a per-head fused qkv) cannot change width; fuse models of "
                              "equal head widths")
        return x.index_copy(0, layout.positions().to(x.device), moved.to(x.dtype))
    return torch.cat([x[: layout.offset], tiled(moved, layout), x[layout.offset + layout.size * k :]])


def channel_major(seg: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reorder dim 0 of a tiled segment (the layout's entries, from position 0) so that each channel's
    ``tile * repeat`` entries are contiguous: the layout of an untiled member with repeat ``tile * repeat``."""
    return gather(seg, layout.replace(size=seg.shape[0] // layout.per_channel, offset=0, block=None))


def tiled(seg: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of :func:`channel_major`."""
    if layout.tile == 1:
        return seg
    order = layout.replace(size=seg.shape[0] // layout.per_channel, offset=0, block=None).positions()
    return seg.index_select(0, torch.argsort(order).to(seg.device))


def _stacked(tensor: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
    """A layout whose heads lie on ``head_axis`` (stacked experts) as one on dim 0: the two axes merged head-major,
    and its layout there (head blocks ``block`` apart, or back to back where each head's channels fill the axis)."""
    assert layout.head_axis is not None
    x = tensor.movedim((layout.head_axis, layout.axis), (0, 1))
    if x.shape[0] != layout.heads:
        raise FusionError(f"axis {layout.head_axis} of a tensor of shape {tuple(tensor.shape)} holds {x.shape[0]} "
                          f"heads, not the plan's {layout.heads}; the plan does not fit this model")
    length = x.shape[1]
    block = None if layout.offset == 0 and layout.head_dim * layout.repeat == length else length
    flat = layout.replace(axis=0, tile=1, block=block, head_axis=None)
    return x.reshape(layout.heads * length, *x.shape[2:]), flat


def transport_axis(tensor: torch.Tensor, m: ChannelMap, layout: Layout) -> torch.Tensor:
    """Map the ``m.n_in`` channels that ``layout`` places on ``tensor``'s axis with ``m``; the result holds
    ``m.n_out`` there (``layout.size`` is taken to be ``m.n_in``)."""
    if layout.size != m.n_in:
        layout = layout.replace(size=m.n_in)
    if layout.head_axis is not None:
        flat, flat_layout = _stacked(tensor, layout)
        moved = transport_axis(flat, m, flat_layout)
        rest = tuple(tensor.movedim((layout.head_axis, layout.axis), (0, 1)).shape[2:])
        return moved.reshape(layout.heads, -1, *rest).movedim((0, 1), (layout.head_axis, layout.axis))
    axis = layout.axis
    x = tensor.movedim(axis, 0)
    where = layout.positions()
    end = int(where[-1]) + 1 if m.n_in else layout.offset
    if end > x.shape[0]:
        raise FusionError(f"axis {axis} of a tensor of shape {tuple(tensor.shape)} is shorter than its plan "
                          f"({end} entries); the plan does not fit this model")
    k = layout.per_channel
    if m.index is not None and m.scale is None and m.n_in == m.n_out:
        # a permutation: one gather along the axis itself (the same entries as the general path below, without its
        # transposed copies; the result is contiguous)
        where = where.view(m.n_in, k)
        order = torch.arange(x.shape[0])
        order[where.reshape(-1)] = where[m.index.cpu()].reshape(-1)
        return tensor.index_select(axis, order.to(tensor.device))
    seg = gather(x, layout).reshape(m.n_in, k * int(np.prod(x.shape[1:], dtype=np.int64)))
    moved = m(seg).reshape(m.n_out * k, *x.shape[1:])
    return place(x, moved, layout).movedim(0, axis)


def rows(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The (size, features) rows of the layout's channels on ``tensor`` (repeats, tiles and other axes flattened;
    heads on ``head_axis``: see :func:`transport_axis`)."""
    if layout.head_axis is not None:
        flat, flat_layout = _stacked(tensor, layout)
        return gather(flat, flat_layout).reshape(layout.size, -1)
    return gather(tensor.movedim(layout.axis, 0), layout).reshape(layout.size, -1)


def carry(values: torch.Tensor, segments: Sequence[tuple[Layout, torch.Tensor]], length: int,
          mismatch: str) -> torch.Tensor:
    """Dim 0 of a parent's ``values`` carried to the fused model's ``length`` channels.

    ``segments``: (the parent's layout of a space member on this axis, the (parent, fused) coupling of its space)
    for each space member of the axis. Each gets the coupling's barycentric map (fused channel ``j`` receives the
    transport-weighted mean of the parent channels sent to it); channels in no space stay where they are.
    ``mismatch``: the error raised when the parent's widths do not add up to ``values``.
    """
    rest = values.shape[1:]
    if any(lay.head_axis is not None for lay, _ in segments):
        raise FusionError(f"{mismatch}: the statistics of a member whose heads lie on another axis (stacked experts) "
                          "cannot be carried along one axis")
    segments = [(lay.replace(axis=0, size=t.shape[0]), t) for lay, t in segments]
    if length == values.shape[0] and all(t.shape[0] == t.shape[1] for _, t in segments):
        out = values.clone()  # every width kept: each member in place, wherever its head blocks lie
        for lay, t in segments:
            # from ``out``: two spaces may share positions (a queries space), their maps applied one after the other
            parent = gather(out, lay).reshape(lay.size, -1)
            moved = _barycentric(t, values) @ parent
            out = place(out, moved.reshape(-1, *rest), lay)
        return out
    if any(lay.block is not None for lay, _ in segments):
        raise FusionError(f"{mismatch} (channels inside heads cut into segments cannot change width)")
    out = values.new_empty(length, *rest)
    pos_t = pos_p = 0
    for lay, t in sorted(segments, key=lambda s: s[0].offset):
        gap = lay.offset - pos_t  # fixed channels between segments: the same in every model
        out[pos_t : pos_t + gap] = values[pos_p : pos_p + gap]
        pos_t, pos_p = pos_t + gap, pos_p + gap
        (n_p, n_t), k = t.shape, lay.per_channel
        block = channel_major(values[pos_p : pos_p + n_p * k], lay).reshape(n_p, -1)
        moved = (_barycentric(t, values) @ block).reshape(n_t * k, *rest)
        out[pos_t : pos_t + n_t * k] = tiled(moved, lay)
        pos_t, pos_p = pos_t + n_t * k, pos_p + n_p * k
    if pos_p + length - pos_t != values.shape[0]:
        raise FusionError(mismatch)
    out[pos_t:] = values[pos_p:]
    return out


def _barycentric(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n_fused, n_parent): each fused channel the transport-weighted mean of the parent channels sent to it."""
    t = t.to(like.device, like.dtype)
    return (t / t.sum(0, keepdim=True).clamp_min(1e-300)).T


def block_value(cost: torch.Tensor) -> float:
    """Optimal transport cost between the rows and columns of ``cost`` with uniform marginals (a head-to-head cost)."""
    n_a, n_b = cost.shape
    c = cost.detach().double().cpu().numpy()
    if n_a == n_b:
        rows, cols = linear_sum_assignment(c)
        return float(c[rows, cols].mean())
    import ot

    return float(ot.emd2(np.full(n_a, 1.0 / n_a), np.full(n_b, 1.0 / n_b), c))


def head_costs(cost: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, heads) matrix: entry (g, h) is the transport cost between head g of A and head h of B."""
    n_a, n_b = cost.shape
    da, db = n_a // heads, n_b // heads
    cost = cost.detach().double().cpu()  # one copy off the device, not one per block (the solver is on the CPU)
    out = torch.zeros(heads, heads, dtype=torch.float64)
    for g in range(heads):
        for h in range(heads):
            out[g, h] = block_value(cost[g * da : (g + 1) * da, h * db : (h + 1) * db])
    return out


def match_heads(cost: torch.Tensor) -> list[int]:
    """The head permutation of least total cost: entry ``h`` is the head of A that goes to head ``h`` of B."""
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    out = [0] * len(rows)
    for r, c in zip(rows, cols, strict=True):
        out[int(c)] = int(r)
    return out


def solve_heads(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    heads: int,
    sources: Sequence[int],
    *,
    solver: Solver = "emd",
    reg: float = 0.05,
    uniform: bool = True,
    shared: bool = False,
) -> torch.Tensor:
    """Block-diagonal coupling of a headed space: head ``sources[h]`` of A is transported onto head ``h`` of B.

    Each block is an OT problem of its own (marginals renormalised within the head); the blocks are scaled so
    that every column sums to ``b``, which is all :func:`barycentric_map` needs. ``shared``: one block for every
    head (a space whose channels inside a head move alike in all heads), solved on the summed cost of the matched
    head pairs and the mean of their marginals.
    """
    n_a, n_b = cost.shape
    da, db = n_a // heads, n_b // heads
    pairs = [(slice(g * da, (g + 1) * da), slice(h * db, (h + 1) * db)) for h, g in enumerate(sources)]
    t = torch.zeros(n_a, n_b, dtype=torch.float64, device=cost.device)
    if shared:
        c = sum(cost[ra, rb].double() for ra, rb in pairs)
        a_s = sum(a[ra].double() / a[ra].double().sum() for ra, _ in pairs) / heads
        b_s = sum(b[rb].double() / b[rb].double().sum() for _, rb in pairs) / heads
        block = solve(c, a_s, b_s, solver=solver, reg=reg, uniform=uniform).to(t.device, t.dtype)
        block = block / block.sum(0, keepdim=True).clamp_min(1e-300)  # every head's columns: the same means
        for ra, rb in pairs:
            t[ra, rb] = block * b[rb].to(t.device, t.dtype)[None, :]
        return t
    for ra, rb in pairs:
        a_h, b_h = a[ra].double(), b[rb].double()
        block = solve(cost[ra, rb], a_h / a_h.sum(), b_h / b_h.sum(), solver=solver, reg=reg, uniform=uniform)
        block = block.to(t.device, t.dtype)
        # columns summing to b exactly, as in the shared case: a permutation block's map then has entries of exactly
        # one (scaling by b_h.sum() left them one ulp off, which weight matching took for "not a permutation")
        t[ra, rb] = block / block.sum(0, keepdim=True).clamp_min(1e-300) * b_h.to(t.device, t.dtype)[None, :]
    return t
