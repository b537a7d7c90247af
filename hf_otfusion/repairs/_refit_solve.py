"""The refit's layer solve: the normal equations in float64, the ridge solution, its fold into weights and norms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_, sum_numbers
from ..errors import FusionError
from ._common import State
from ._refit_units import F64, FitUnit


@dataclass
class Normal:
    """The normal equations of one unit, per group: ``gram`` = Σ x xᵀ, ``cross`` = Σ y xᵀ (float64)."""

    gram: torch.Tensor  # (groups, d, d)
    cross: torch.Tensor  # (groups, out per group, d)
    count: float = 0.0  # rows, weighted as the Gram matrix is

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        """``x``: (rows, groups, d); ``y``: (rows, channels)."""
        if x.shape[0] != y.shape[0]:
            raise FusionError("refit: a layer's inputs and outputs have different numbers of positions")
        groups = x.shape[1]
        if groups == 1:  # the same products as the grouped einsum, without its permuted copies
            x1 = x[:, 0]
            gram, cross = (x1.T @ x1).unsqueeze(0), (y.T @ x1).unsqueeze(0)
        else:
            yg = y.reshape(y.shape[0], groups, -1)
            gram, cross = torch.einsum("rgi,rgj->gij", x, x), torch.einsum("rgo,rgi->goi", yg, x)
        for total, part in ((self.gram, gram), (self.cross, cross)):
            total += part if weight == 1 else weight * part
        self.count += weight * x.shape[0]

    def reduce(self) -> None:
        """Sum over the processes of a distributed run (nothing in a single process)."""
        all_reduce_([self.gram, self.cross])
        self.count = sum_numbers(self.count)[0]


def current_map(unit: FitUnit, state: State) -> torch.Tensor:
    """The unit's affine map as the state has it, (groups, out per group, d): the ridge prior."""
    if unit.stats is not None:  # a BatchNorm: y = s x + t per channel
        n = unit.stats
        scale = state[n.weight].to(F64) / (state[n.var].to(F64) + n.eps).sqrt()
        shift = state[n.bias].to(F64) - scale * state[n.mean].to(F64)
        return torch.stack([scale, shift], -1).unsqueeze(1)
    w = state[unit.weight].to(F64)
    if unit.kind == "addmm":
        w = w.T
    out = w.shape[0]
    w = w.reshape(unit.groups, out // unit.groups, -1)
    b = state[unit.bias].to(F64) if unit.bias is not None else torch.zeros(out, dtype=F64, device=w.device)
    if unit.norm is not None:
        n = unit.norm
        g = state[n.weight].to(F64) if n.weight is not None else torch.ones_like(b)
        scale = g / (state[n.var].to(F64) + n.eps).sqrt()
        shift = state[n.bias].to(F64) if n.bias is not None else torch.zeros_like(b)
        w = w * scale.view(unit.groups, -1, 1)
        b = scale * (b - state[n.mean].to(F64)) + shift
    if unit.affine:
        w = torch.cat([w, b.view(unit.groups, -1, 1)], -1)
    return w


def solve(normal: Normal, prior: torch.Tensor | None, alpha: float, affine: bool) -> torch.Tensor:
    """The ridge solution (groups, out per group, d); the bias column (last, when ``affine``) is not regularised."""
    gram, cross = normal.gram, normal.cross
    d = gram.shape[-1] - (1 if affine else 0)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)[..., :d]
    lam = alpha * float(diag.mean()) if diag.numel() else 0.0
    reg = torch.zeros(gram.shape[-1], dtype=F64, device=gram.device)
    reg[:d] = lam
    lhs = gram + torch.diag(reg)
    rhs = cross if prior is None else cross + prior * reg
    try:
        chol = torch.linalg.cholesky(lhs)
        sol = torch.cholesky_solve(rhs.transpose(-1, -2), chol)
    except RuntimeError:  # singular (alpha = 0 with inputs that span less than their dimension)
        sol = torch.linalg.pinv(lhs, hermitian=True) @ rhs.transpose(-1, -2)
    return sol.transpose(-1, -2)


def write(unit: FitUnit, state: State, fit: torch.Tensor, normal: Normal) -> None:
    """Fold a fitted map (groups, out per group, d) into the unit's weight, bias and BatchNorm."""
    groups = unit.groups
    if unit.stats is not None:  # a BatchNorm: statistics of its input on the calibration data, affine = the fit
        n = unit.stats
        count = max(normal.count, 1e-300)
        mean = normal.gram[:, 0, 1] / count
        var = (normal.gram[:, 0, 0] / count - mean * mean).clamp_min(0)
        scale, shift = fit[:, 0, 0], fit[:, 0, 1]
        state[n.mean] = mean.to(state[n.mean].dtype)
        state[n.var] = var.to(state[n.var].dtype)
        state[n.weight] = (scale * (var + n.eps).sqrt()).to(state[n.weight].dtype)
        state[n.bias] = (scale * mean + shift).to(state[n.bias].dtype)
        return
    d = fit.shape[-1] - (1 if unit.affine else 0)
    a = fit[..., :d]
    b = fit[..., d].reshape(-1) if unit.affine else None
    old = state[unit.weight]
    if unit.kind == "addmm":
        state[unit.weight] = a.reshape(-1, d).T.to(old.dtype).contiguous()
    else:
        state[unit.weight] = a.reshape(old.shape).to(old.dtype)
    if unit.norm is None:
        if unit.bias is not None:
            state[unit.bias] = b.to(state[unit.bias].dtype)
        return
    # the BatchNorm: its statistics are the refitted layer's own on the calibration data, its affine undoes them
    n = unit.norm
    c = b if unit.bias is not None else torch.zeros_like(b)
    if unit.bias is not None:
        state[unit.bias] = c.to(state[unit.bias].dtype)
    full = torch.cat([a, c.view(groups, -1, 1)], -1)  # z = [a, c] [x; 1]
    count = max(normal.count, 1e-300)
    moment = normal.gram[..., :, -1] / count  # (groups, d + 1): E[x; 1]
    mean = torch.einsum("goi,gi->go", full, moment).reshape(-1)
    sq = torch.einsum("goi,gij,goj->go", full, normal.gram / count, full).reshape(-1)
    var = (sq - mean * mean).clamp_min(0)
    dtype = state[n.mean].dtype
    if n.weight is not None and n.bias is not None:
        state[n.mean], state[n.var] = mean.to(dtype), var.to(dtype)
        state[n.weight] = (var + n.eps).sqrt().to(state[n.weight].dtype)
        state[n.bias] = (mean - c + b).to(state[n.bias].dtype)
        return
    # no full affine to undo the normalisation with: statistics that make the norm a shift (identity scale)
    if not 0 < n.eps < 1:
        raise FusionError(f"refit cannot fold into the BatchNorm of {unit.weight!r} (no affine, eps={n.eps})")
    shift = state[n.bias].to(F64) if n.bias is not None else torch.zeros_like(b)
    if n.weight is not None:
        state[n.weight] = torch.ones_like(state[n.weight])
    state[n.var] = torch.full_like(state[n.var], 1.0 - n.eps)
    state[n.mean] = (c - b + shift).to(dtype)
