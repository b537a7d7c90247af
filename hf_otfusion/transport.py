"""Ground metrics, marginals, OT solvers and the transport of tensor axes.

Backend-agnostic torch code: everything runs on the device of its inputs, except exact EMD, which POT solves
on the CPU (and the assignment fast path, solved by SciPy). ``T`` is always an (n_a, n_b) coupling that sums
to one; :func:`barycentric_map` turns it into the (n_b, n_a) matrix that maps A's channels onto B's.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import FusionError

Solver = Literal["emd", "sinkhorn"]
Marginals = Literal["uniform", "importance"]
SOLVERS: tuple[str, ...] = ("emd", "sinkhorn")
MARGINALS: tuple[str, ...] = ("uniform", "importance")


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the rows of ``a`` (n_a, d) and of ``b`` (n_b, d), in float32 or better."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.cdist(a.to(dtype), b.to(dtype))


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
    n_a, n_b = cost.shape
    device = cost.device
    if not torch.isfinite(cost).all():
        raise FusionError("the cost matrix has NaN or infinite entries (NaN weights or activations?)")
    if solver == "emd":
        if uniform and n_a == n_b:
            rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
            t = torch.zeros((n_a, n_b), dtype=torch.float64)
            t[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0 / n_a
            return t.to(device)
        import ot

        t = ot.emd(a.double().cpu().numpy(), b.double().cpu().numpy(), cost.detach().double().cpu().numpy(),
                   numItermax=max(100_000, 50 * n_a * n_b))
        t = torch.from_numpy(np.asarray(t)).to(device)
    elif solver == "sinkhorn":
        import ot

        if reg <= 0:
            raise FusionError(f"sinkhorn needs reg > 0 (got {reg})")
        c = cost.detach().double()
        scale = c.max()
        c = c / scale if scale > 0 else c
        method = "sinkhorn_log" if reg < 0.05 else "sinkhorn"
        t = ot.sinkhorn(a.to(device), b.to(device), c, reg, method=method, numItermax=10_000, stopThr=1e-7)
    else:
        raise FusionError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    _check_coupling(t, a.to(t.device), b.to(t.device), solver)
    return t


def _check_coupling(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, solver: str) -> None:
    tol = 1e-6 if solver == "emd" else 1e-3
    err = max((t.sum(1) - a).abs().sum().item(), (t.sum(0) - b).abs().sum().item())
    if not torch.isfinite(t).all() or err > tol:
        hint = " (raise reg or use solver='emd')" if solver == "sinkhorn" else ""
        raise FusionError(f"the {solver} solver did not converge: marginal error {err:.2e}{hint}")


def barycentric_map(t: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``diag(1/b) T^T``: (n_b, n_a) weights that give each of B's channels the mean of A's channels it receives."""
    col = t.sum(0) if b is None else b.to(t.device, t.dtype)
    return (t / col.clamp_min(1e-300)[None, :]).T


def transport_axis(
    tensor: torch.Tensor, m: torch.Tensor, axis: int, offset: int = 0, repeat: int = 1
) -> torch.Tensor:
    """Map the segment ``[offset, offset + n_a * repeat)`` of ``tensor``'s ``axis`` with ``m`` (n_b, n_a).

    The segment holds n_a channels, each repeated ``repeat`` times (channel-major); the result holds n_b.
    """
    n_b, n_a = m.shape
    x = tensor.movedim(axis, 0)
    end = offset + n_a * repeat
    if end > x.shape[0]:
        raise FusionError(f"axis {axis} of a tensor of shape {tuple(tensor.shape)} is shorter than its plan "
                          f"({end} entries); the plan does not fit this model")
    seg = x[offset:end].reshape(n_a, repeat * int(np.prod(x.shape[1:], dtype=np.int64)))
    moved = (m.to(seg.dtype) @ seg).reshape(n_b * repeat, *x.shape[1:])
    return torch.cat([x[:offset], moved, x[end:]]).movedim(0, axis)


def rows(tensor: torch.Tensor, axis: int, offset: int, n: int, repeat: int) -> torch.Tensor:
    """The (n, features) rows of the channels of one axis segment (repeats and other axes flattened)."""
    x = tensor.movedim(axis, 0)[offset : offset + n * repeat]
    return x.reshape(n, -1)
