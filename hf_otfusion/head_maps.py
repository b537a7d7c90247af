"""Maps inside attention heads beyond permutations (``fuse(..., head_maps="orthogonal")``).

Inside a head, attention is bilinear in its channels: ``q . k`` keeps its value when the query and key channels of
a head take the same orthogonal map, and the values of a key/value head reach the output projection linearly, so they
admit any orthogonal map too (shared by the query heads that read them). With rotary position embeddings the query
and key channels are rotated pair by pair (channel ``j`` with ``j + d/2`` in HF Llama, ``2j`` with ``2j + 1`` in
GPT-J), so there only a 2-D rotation of each pair commutes with them (Theus et al., "Generalized Linear Mode
Connectivity for Transformers", NeurIPS 2025, arXiv 2506.22712). The plan holds those channels fixed (no permutation
of them keeps the function); a rotation per pair does.

Which spaces take which map is not assumed: each candidate (every headed space whose channels inside a head may
move, and every headed space whose channels inside a head the plan left fixed, for each pairing) is checked like a
plan, on a randomised copy of the model: a random map of that kind must keep the outputs. The first kind that
passes is used; a space where none passes keeps permutations, with the reason.

The maps are fitted after the alignment, head by head, on the aligned weights: for each head the orthogonal block
(or each pair's rotation) that maximises the inner products of the model's member rows with the target's, over every
member of the space (orthogonal Procrustes, in closed form).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .folding import mapped, random_orthogonal, rotate
from .log import Recorder, get_logger
from .matching import channel_similarity, procrustes
from .plan import AlignmentPlan, Space
from .scales import unit_of
from .verify import TOLERANCE, RandomisedCopy, randomised_copy

log = get_logger(__name__)
PAIRINGS = ("half", "interleaved")


@dataclass(frozen=True)
class HeadMap:
    """A space whose heads take a map inside them: ``pairing`` None: any orthogonal block per head; else a rotation
    of each channel pair (``half``: ``j`` with ``j + d/2``; ``interleaved``: ``2j`` with ``2j + 1``) of a space that
    :func:`unrolled` made from one whose channels are whole heads."""

    space: Space
    pairing: str | None = None

    def pairs(self) -> torch.Tensor:
        """[d/2, 2]: the channels of each pair inside a head."""
        d = self.space.head_dim
        if self.pairing == "half":
            return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], 1)
        return torch.arange(d).view(-1, 2)


@dataclass(frozen=True)
class HeadMaps:
    """The spaces that take maps inside their heads, and why the others keep permutations."""

    maps: tuple[HeadMap, ...]
    refused: dict[str, str]

    def fit(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
        """``state`` with every space's map fitted to ``target_state`` (:func:`fit_head_maps`)."""
        return fit_head_maps(state, target_state, self)

    def fit_space(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                  space: Space) -> dict[str, torch.Tensor]:
        """``state`` with the map inside the heads of ``space`` alone fitted (if it takes one)."""
        return fit_head_maps(state, target_state, HeadMaps(tuple(m for m in self.maps if m.space.name == space.name),
                                                           {}))

    def channel_values(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                       space: Space) -> torch.Tensor | None:
        return None

    def head_values(self, state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                    space: Space) -> torch.Tensor | None:
        """(heads, heads): for a space that takes maps inside its heads, the largest inner product between each of
        this state's heads and each of the target's under those maps (a rotary pair's: the norm of its 2-D
        rotation-invariant part; an orthogonal block's: its nuclear norm); None for any other space."""
        head_map = next((m for m in self.maps if m.space.name == space.name), None)
        if head_map is None:
            return None
        s = channel_similarity(dict(state), dict(target_state), head_map.space)
        n, d = head_map.space.heads, head_map.space.head_dim
        blocks = s.reshape(n, d, n, d).permute(0, 2, 1, 3)  # [this head, target head, d, d]
        if head_map.pairing is None:
            return torch.linalg.matrix_norm(blocks, ord="nuc")
        i, j = head_map.pairs().T
        rot = blocks[..., i, i] + blocks[..., j, j]
        skew = blocks[..., i, j] - blocks[..., j, i]
        return (rot.square() + skew.square()).sqrt().sum(-1)

    def summary(self) -> list[str]:
        kinds = [f"{m.space.name}: " + ("an orthogonal map per head" if m.pairing is None else
                                         f"a rotation per rotary channel pair ({m.pairing})") for m in self.maps]
        return kinds + [f"{name}: permutations only ({why})" for name, why in self.refused.items()]


def unrolled(space: Space) -> Space | None:
    """A space of whole heads (one channel per head, ``repeat`` = the head's width on every member) as a space of
    the channels inside them; None when its members do not hold that layout."""
    repeats = {m.repeat for m in space.members}
    if space.head_dim != 1 or len(repeats) != 1 or (r := repeats.pop()) < 2 or r % 2:
        return None
    members = tuple(m.model_copy(update={"repeat": 1}) for m in space.members)
    return space.model_copy(update={"size": space.size * r, "members": members})


def _candidates(plan: AlignmentPlan) -> list[tuple[str, list[HeadMap]]]:
    fixed = {m for f in plan.fixed for m in f.members}
    out = []
    for space in plan.spaces:
        if space.heads < 2 or space.queries:
            continue
        if space.head_dim > 1:
            out.append((space.name, [HeadMap(space)]))
        elif (flat := unrolled(space)) is not None and all(f"{m.tensor}:{m.axis}" in fixed for m in space.members):
            out.append((space.name, [HeadMap(flat, p) for p in PAIRINGS]))
    return out


def _random_map(head_map: HeadMap, gen: torch.Generator) -> torch.Tensor:
    space = head_map.space
    d = space.head_dim
    blocks = [_block(head_map, gen, d)] * space.heads if space.shared else \
        [_block(head_map, gen, d) for _ in range(space.heads)]
    return torch.block_diag(*blocks)


def _block(head_map: HeadMap, gen: torch.Generator, d: int) -> torch.Tensor:
    if head_map.pairing is None:
        return random_orthogonal(d, gen)
    angles = 2 * math.pi * torch.rand(d // 2, generator=gen, dtype=torch.float64)
    return rotations(head_map.pairs(), angles.cos(), angles.sin(), d)


def rotations(pairs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """The (d, d) map rotating each pair ``(i, j)`` by its angle: ``x_i <- c x_i - s x_j``, ``x_j <- s x_i + c x_j``
    (differentiable in ``cos`` and ``sin``)."""
    m = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)
    i, j = pairs[:, 0], pairs[:, 1]
    m[i, i], m[i, j], m[j, i], m[j, j] = cos, -sin, sin, cos
    return m


def find_head_maps(model: nn.Module, plan: AlignmentPlan, example_input: Any, *, seed: int = 0,
        checker: RandomisedCopy | str | None = None) -> HeadMaps:
    """The headed spaces of ``plan`` that take maps inside their heads, each kind checked on a randomised copy of
    ``model`` (a random map of it must keep the outputs on ``example_input``).
    ``checker``: the randomised copy to check on (:func:`~hf_otfusion.verify.randomised_copy`; made when
    omitted)."""
    candidates = _candidates(plan)
    if not candidates:
        return HeadMaps((), {})
    copy_ = checker if checker is not None else randomised_copy(model, plan, example_input, seed=seed)
    if isinstance(copy_, str):
        return HeadMaps((), {name: f"cannot be checked: {copy_}" for name, _ in candidates})
    tol = TOLERANCE[copy_.dtype]
    gen = torch.Generator().manual_seed(seed + 2)
    maps, refused = [], {}
    for name, kinds in candidates:
        changes = []
        for kind in kinds:
            change = copy_.change_of(rotate(copy_.base, kind.space, _random_map(kind, gen), plan.aliases))
            if change <= tol:
                maps.append(kind)
                break
            changes.append(f"{kind.pairing or 'orthogonal'}: {change:.1e}")
        else:
            refused[name] = "a random map inside its heads changes the outputs (" + ", ".join(changes) + ")"
    return HeadMaps(tuple(maps), refused)


def find_invertible(maps: HeadMaps, checker: RandomisedCopy | str, seed: int = 0) -> dict[str, frozenset[str]]:
    """The head spaces of ``maps`` (orthogonal blocks, no rotary pairing) whose heads take any invertible map, each
    with the tensors that take its inverse transpose (one layer of the pair), checked on ``checker``: for some layer
    of the space, a random well-conditioned invertible block per head on the others and its inverse transpose on it
    must keep the outputs (values and the output projection do; queries and keys in one tensor do not)."""
    if isinstance(checker, str):
        return {}
    tol = TOLERANCE[checker.dtype]
    gen = torch.Generator().manual_seed(seed + 5)
    found = {}
    for head_map in maps.maps:
        space = head_map.space
        if head_map.pairing is not None:
            continue
        d = space.head_dim
        blocks = [torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64)
                  / d ** .5 for _ in range(1 if space.shared else space.heads)]
        matrix = torch.block_diag(*(blocks * space.heads if space.shared else blocks))
        inverse_t = torch.linalg.inv(matrix).T
        units: dict[str, set[str]] = {}
        for m in space.members:
            units.setdefault(unit_of(m.tensor), set()).add(m.tensor)
        if len(units) < 2:  # one layer holds every member: nothing to undo the map
            continue
        for tensors in units.values():
            transposed = frozenset(tensors)
            state = mapped(checker.base, space, matrix.to(checker.dtype), transposed, inverse_t.to(checker.dtype))
            if checker.change_of(state) <= tol:
                found[space.name] = transposed
                break
    return found


def fitted_map(head_map: HeadMap, similarity: torch.Tensor) -> torch.Tensor:
    """The block-diagonal map (target channel ``j`` <- sum_i ``M[j, i]`` channel ``i``) maximising ``trace(M S)``
    for ``S = similarity`` (this model's channels against the target's), head by head (or one block for every head of
    a shared space)."""
    space = head_map.space
    d = space.head_dim
    blocks = [similarity[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(space.heads)]
    if space.shared:
        blocks = [sum(blocks)] * space.heads
    if head_map.pairing is None:
        return torch.block_diag(*[procrustes(b) for b in blocks])
    pairs = head_map.pairs()
    i, j = pairs[:, 0], pairs[:, 1]
    out = []
    for b in blocks:
        b = b.double()
        angle = torch.atan2(b[i, j] - b[j, i], b[i, i] + b[j, j])
        out.append(rotations(pairs, angle.cos(), angle.sin(), d))
    return torch.block_diag(*out)


def fit_head_maps(state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor], maps: HeadMaps,
                  aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` (aligned to the target) with each space's map inside its heads fitted to the target and applied;
    the function is unchanged."""
    out = dict(state)
    for head_map in maps.maps:
        s = channel_similarity(out, dict(target_state), head_map.space)
        out = rotate(out, head_map.space, fitted_map(head_map, s), aliases)
    return out


def tensors_of(maps: HeadMaps) -> set[str]:
    """Every tensor a head map moves."""
    return {m.tensor for hm in maps.maps for m in hm.space.members}


_recorder: Recorder[HeadMaps] = Recorder("hf_otfusion_head_maps")


def recording() -> contextlib.AbstractContextManager[list[HeadMaps]]:
    """Collect the :class:`HeadMaps` verdict of every ``fuse(..., head_maps="orthogonal")`` inside the block."""
    return _recorder.recording()


def report_head_maps(maps: HeadMaps) -> None:
    """Tell the user which spaces take maps inside their heads; a warning for each that keeps permutations."""
    _recorder.record(maps)
    for name, why in maps.refused.items():
        log.warning("head_maps='orthogonal': space %s keeps permutations: %s", name, why)
    if not maps.maps:
        log.warning("head_maps='orthogonal': no attention space takes a map inside its heads")
    for line in maps.summary()[: len(maps.maps)]:
        log.info("head_maps='orthogonal': %s", line)
