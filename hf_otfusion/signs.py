"""Signed permutations of hidden units (``fuse(..., hidden_maps="signed")``).

A gated MLP (SwiGLU, GeGLU: ``down(act(gate x) * up x)``) keeps its function when a unit's ``up`` row and ``down``
column both change sign; its ``gate`` row does not take a sign (``silu(-z) != -silu(z)``), nor does a ReLU or GELU
unit's input row. Two models trained from different seeds therefore agree on a unit only up to that sign: about half
the units that play the same part carry opposite ``up``/``down`` signs, a permutation pairs them badly (their ``up``
and ``down`` inner products are negative), and averaging cancels them.

With signs, weight matching pairs units by ``S_fixed + |S_signed|`` (the inner products of the members that take no
sign, plus the absolute inner products of those that do: the best each pair reaches under a sign), which is the exact
optimum of that coordinate, and each matched unit takes the sign that makes its ``up``/``down`` inner product with the
target's positive. Which members take a sign is not assumed: it is checked on a randomised copy of the model
(:func:`hf_otfusion.scales.find_scales` with ``signs=True``); a space where no choice passes keeps permutations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .log import Recorder, get_logger
from .matching import channel_similarity
from .plan import AlignmentPlan, Space
from .scales import ChannelScale, find_scales, multiplied, scale_candidates, unit_of
from .verify import RandomisedCopy

log = get_logger(__name__)
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UnitSigns:
    """The hidden spaces whose units take a sign (on the ``up`` and ``down`` members of each :class:`ChannelScale`),
    and why the other candidates keep permutations. Implements :class:`hf_otfusion.matching.InnerMaps`."""

    spaces: tuple[ChannelScale, ...]
    refused: dict[str, str]

    def _of(self, space: Space) -> ChannelScale | None:
        return next((c for c in self.spaces if c.space.name == space.name), None)

    @staticmethod
    def _similarity(signed: ChannelScale, state: State, target_state: State, takes_sign: bool) -> torch.Tensor:
        """(n, n) inner products over the members that take the sign (``takes_sign``) or over the others."""
        takes = {(m.tensor, m.axis) for m in (*signed.up, *signed.down)}
        members = tuple(m for m in signed.space.members if ((m.tensor, m.axis) in takes) == takes_sign)
        return channel_similarity(state, target_state, signed.space.model_copy(update={"members": members}))

    def channel_values(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                       space: Space) -> torch.Tensor | None:
        """(n, n): the largest inner product of each of this state's units with each of the target's under a sign;
        None for a space whose units take none."""
        signed = self._of(space)
        if signed is None:
            return None
        state, target_state = dict(state), dict(target_state)
        fixed = self._similarity(signed, state, target_state, False)
        return fixed + self._similarity(signed, state, target_state, True).abs()

    def fit_space(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                  space: Space) -> State:
        """``state`` with each unit of ``space`` (already matched to the target's) signed so that its ``up``/``down``
        inner product with the target's is not negative; the function is unchanged."""
        signed = self._of(space)
        if signed is None:
            return dict(state)
        moved = self._similarity(signed, dict(state), dict(target_state), True)  # only these tensors are needed
        signs = torch.where(moved.diagonal() < 0, -1.0, 1.0).double()
        return multiplied(state, signed, signs)

    def fit(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor]) -> State:
        """``state`` with every space's signs fitted (:meth:`fit_space`)."""
        out = dict(state)
        for signed in self.spaces:
            out = self.fit_space(out, target_state, signed.space)
        return out

    def head_values(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                    space: Space) -> torch.Tensor | None:
        return None

    def tensors(self) -> set[str]:
        """Every tensor a sign moves."""
        return {m.tensor for c in self.spaces for m in (*c.up, *c.down)}

    def summary(self) -> list[str]:
        kinds = [f"{c.space.name}: a sign per unit ({', '.join(sorted({unit_of(m.tensor) for m in c.up}))} and "
                 f"{', '.join(sorted({unit_of(m.tensor) for m in c.down}))})" for c in self.spaces]
        return kinds + [f"{name}: permutations only ({why})" for name, why in self.refused.items()]


def find_signs(model: nn.Module, plan: AlignmentPlan, example_input: Any, *, skip: frozenset[str] = frozenset(),
               seed: int = 0, checker: RandomisedCopy | str | None = None) -> UnitSigns:
    """The hidden spaces of ``plan`` (not in ``skip``) whose units take a sign, each checked on a randomised copy of
    ``model``; the reason for every other candidate."""
    names = [kinds[0].space.name for kinds in scale_candidates(plan, skip)]
    if isinstance(checker, str):
        return UnitSigns((), {name: f"cannot be checked: {checker}" for name in names})
    found = find_scales(model, plan, example_input, skip=skip, seed=seed, checker=checker, signs=True)
    taken = {c.space.name for c in found}
    refused = {name: "no layer's rows and another's columns take a sign together (the activation is not odd)"
               for name in names if name not in taken}
    return UnitSigns(tuple(found), refused)


_recorder: Recorder[UnitSigns] = Recorder("hf_otfusion_signs")


def recording() -> contextlib.AbstractContextManager[list[UnitSigns]]:
    """Collect the :class:`UnitSigns` verdict of every ``fuse(..., hidden_maps="signed")`` inside the block."""
    return _recorder.recording()


def report_signs(signs: UnitSigns) -> None:
    """Tell the user which hidden spaces take signs; a warning when none does."""
    _recorder.record(signs)
    if not signs.spaces:
        log.warning("hidden_maps='signed': no hidden space takes a sign per unit (%s)",
                    "; ".join(signs.summary()) or "no hidden space of a few layers")
    for line in signs.summary()[: len(signs.spaces)]:
        log.info("hidden_maps='signed': %s", line)
