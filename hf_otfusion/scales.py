"""Per-channel scale symmetries of hidden spaces, for learned alignment: ``up`` members times ``exp(s)``, ``down``
members times ``exp(-s)``, the function unchanged.

A ReLU MLP's hidden unit may be scaled by any positive factor in its input row (and bias) if its output column is
divided by it; a gated MLP's (SwiGLU, GeGLU) by any factor in its ``up`` row, its ``gate`` row untouched. Which
members take the factor is not assumed: for each hidden space of a few layers (at most :data:`MAX_UNITS` modules),
every choice of one module to scale and one to divide is checked on a randomised copy of the model (random factors
between 1/2 and 2 must keep the outputs), and the first that passes is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .plan import AlignmentPlan, AxisRef, Space
from .verify import TOLERANCE, RandomisedCopy, randomised_copy

MAX_UNITS = 4


@dataclass(frozen=True)
class ChannelScale:
    """A space whose channels take a factor in its ``up`` members and its inverse in its ``down`` members."""

    space: Space
    up: tuple[AxisRef, ...]
    down: tuple[AxisRef, ...]

    def summary(self) -> str:
        names = sorted({unit_of(m.tensor) for m in self.up}), sorted({unit_of(m.tensor) for m in self.down})
        return f"{self.space.name}: a scale per channel ({', '.join(names[0])} times it, {', '.join(names[1])} divided)"


def unit_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def scale_axis(tensor: torch.Tensor, space: Space, member: AxisRef, factors: torch.Tensor) -> torch.Tensor:
    """``tensor`` with each of the space's channels on the member's axis multiplied by its factor
    (differentiable in ``factors``)."""
    layout = space.layout(member)
    if layout.head_axis is not None:
        raise ValueError("stacked experts are not scaled")
    length = tensor.shape[layout.axis]
    mult = torch.ones(length, dtype=factors.dtype, device=tensor.device)
    mult = mult.index_put((layout.positions().to(tensor.device),),
                          factors.to(tensor.device).repeat_interleave(layout.per_channel))
    shape = [1] * tensor.dim()
    shape[layout.axis] = length
    return tensor * mult.view(shape).to(tensor.dtype)


def multiplied(state: Mapping[str, torch.Tensor], scale: ChannelScale, factors: torch.Tensor,
               ) -> dict[str, torch.Tensor]:
    """``state`` with ``factors`` on the ``up`` members and their inverses on the ``down`` members."""
    out = dict(state)
    for members, f in ((scale.up, factors), (scale.down, factors.reciprocal())):
        for m in members:
            out[m.tensor] = scale_axis(out[m.tensor], scale.space, m, f)
    return out


def scaled(state: Mapping[str, torch.Tensor], scale: ChannelScale, log_factors: torch.Tensor,
           ) -> dict[str, torch.Tensor]:
    """``state`` with ``exp(log_factors)`` on the ``up`` members and its inverse on the ``down`` members."""
    return multiplied(state, scale, log_factors.exp())


def scale_candidates(plan: AlignmentPlan, skip: frozenset[str] = frozenset()) -> list[list[ChannelScale]]:
    """Per hidden space of a few layers (not in ``skip``, without heads), every choice of one layer to scale and
    another to divide, unchecked."""
    out: list[list[ChannelScale]] = []
    for space in plan.spaces:
        if space.name in skip or space.heads > 1 or space.queries or any(m.head_axis is not None
                                                                         for m in space.members):
            continue
        units: dict[str, list[AxisRef]] = {}
        for m in space.members:
            units.setdefault(unit_of(m.tensor), []).append(m)
        if 2 <= len(units) <= MAX_UNITS:
            out.append([ChannelScale(space, tuple(units[u]), tuple(units[d])) for u in units for d in units if u != d])
    return out


def find_scales(model: nn.Module, plan: AlignmentPlan, example_input: Any, *, skip: frozenset[str] = frozenset(),
                seed: int = 0, checker: RandomisedCopy | str | None = None, signs: bool = False,
                ) -> list[ChannelScale]:
    """The hidden spaces of ``plan`` (not in ``skip``, without heads) whose channels take a scale, each checked.
    ``checker``: the randomised copy to check on (:func:`~hf_otfusion.verify.randomised_copy`; made when
    omitted). ``signs``: factors of -1 or 1 instead of positive ones (a gated MLP's ``up`` and ``down`` take them, a
    ReLU's input row does not)."""
    candidates = scale_candidates(plan, skip)
    if not candidates:
        return []
    copy_ = checker if checker is not None else randomised_copy(model, plan, example_input, seed=seed)
    if isinstance(copy_, str):
        return []
    tol = TOLERANCE[copy_.dtype]
    gen = torch.Generator().manual_seed(seed + 3)
    found = []
    for kinds in candidates:
        for kind in kinds:
            if signs:
                factors = torch.randint(0, 2, (kind.space.size,), generator=gen).double() * 2 - 1
                factors[0] = -1.0
            else:
                factors = ((torch.rand(kind.space.size, generator=gen, dtype=torch.float64) * 2 - 1) * 0.7).exp()
            if copy_.change_of(multiplied(copy_.base, kind, factors)) <= tol:
                found.append(kind)
                break
    return found
