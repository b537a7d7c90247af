"""The alignment plan: which tensor axes index which space of hidden units.

A *space* is a set of channels that must be transported together (the output channels of a layer, carried
through norms, activations and residual adds). Each member of a space is one (tensor, axis) pair, possibly a
segment of that axis (``offset``, after a concat) whose index is channel-major repeated ``repeat`` times (a
flatten after a conv). Tensors or axes in no space are fixed: they are averaged as they are.

A member may also be *tiled* (``tile > 1``): grouped-query attention reads each key/value head once per query
head of its group, so the output projection's input axis holds every head block ``tile`` times in a row. A
member's head blocks may lie ``block`` positions apart with other channels between them: a segment of the channels
inside every head (the non-rotary part of partial rotary query/key heads; GPT-NeoX's fused qkv, laid out per head).
A member's heads may also lie on another axis of its tensor (``head_axis``): a mixture of experts stacks its experts'
weights as ``[experts, out, in]``, so the experts are the heads (one router row each) and ``axis`` holds the hidden
channels of each expert, which move inside their expert (a permutation per expert).

Attention gives a space *heads*: its ``size`` channels form ``heads`` contiguous blocks of ``size // heads``
(one per head), and its map must be block-diagonal up to a permutation of whole heads: channel ``i`` of head
``h`` may only go to some channel of head ``sigma(h)``. Spaces with the same ``head_group`` (the query/key
space and the value/output space of one attention op) share that head permutation ``sigma``; a headed space
whose ``head_group`` is None keeps every head in place (only the channels inside each head move).

A *shared* headed space maps the channels inside every head alike (one within-head map for all heads): some
tensor axis holds one head's channels and is read by every head (a grouped convolution's input axis, a per-head
q/k norm). Such a member has ``block == 0``: every head block lies on the same positions.

With grouped- or multi-query attention, the query heads that read one key/value head may be permuted among
themselves: a *queries* space holds them (a head per key/value head, each query head one channel repeated head_dim
times, on the axes where other spaces hold them as tiles). Its heads are moved by the tiled members of its group's
other spaces; it joins their head matching, and solves only the order of the query heads inside each head.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

SpaceKind = Literal["hidden", "residual"]
_BLOCK = ("axis positions from the start of one head block to the next; None: head_dim * repeat (contiguous); "
          "0: every head block on the same positions (one head's channels, read by every head of a shared space)")


class _Placement(BaseModel):
    """The layout fields of a member or site (see :class:`Layout`, which reads them together with the space's).

    Positions ``offset + (h * tile + s) * block + i * repeat + r`` hold channel ``h * head_dim + i`` of the space
    (channel ``i`` of head ``h``), for ``s`` in ``range(tile)`` and ``r`` in ``range(repeat)``. ``block`` None is
    ``head_dim * repeat`` (the head blocks lie back to back): the positions are then
    ``offset + ((h * tile + s) * head_dim + i) * repeat + r``, with ``tile == 1`` simply ``offset + c * repeat + r``.
    A larger ``block`` leaves other channels between the head blocks: a segment of the channels inside every head
    (partial rotary embeddings, a qkv projection laid out per head). A space without heads is one head, so ``tile``
    then repeats the whole space. :meth:`Layout.positions` lists the positions in channel-major order.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_serializer(mode="wrap")
    def _omit_contiguous(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for key in ("block", "head_axis"):  # the default layout: plans written before the fields existed read the same
            if key in out and out[key] is None:
                out.pop(key)
        return out


class AxisRef(_Placement):
    """One segment of one tensor axis that indexes a space (laid out as :class:`Layout` says)."""

    tensor: str
    axis: int
    offset: int = 0
    repeat: int = 1
    tile: int = 1
    block: int | None = Field(None, description=_BLOCK)
    head_axis: int | None = Field(None, description="another axis of the tensor that indexes the space's heads, one "
                                  "head per entry (stacked experts, [experts, out, in]); ``axis`` then holds each "
                                  "head's channels at ``offset + i * repeat + r``")


class Site(_Placement):
    """A graph value whose dimension ``dim`` carries a space (where activations are read)."""

    node: str
    dim: int
    offset: int = 0
    repeat: int = 1
    tile: int = 1
    block: int | None = Field(None, description=_BLOCK)


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Where a space's ``size`` channels lie along dimension ``axis`` of a tensor (or of an activation).

    Read from a member (or site) and its space by :meth:`of` (``space.layout(member)``); the transport of an axis,
    the rows of a cost, activation matrices and random permutations all take this one object. Channel ``i`` of head
    ``h`` (``head_dim = size // heads``) lies at positions ``offset + (h * tile + s) * step + i * repeat + r`` for
    ``s < tile`` and ``r < repeat``, where ``step`` is ``block``, or ``head_dim * repeat`` when ``block`` is None
    (head blocks back to back). ``block`` 0: every head on the same positions (one head's channels, read by every
    head of a shared space). ``head_axis``: the heads lie on that other axis instead, one head per entry (stacked
    experts), and ``axis`` holds each head's channels at ``offset + i * repeat + r``.

    Example:
        >>> Layout(axis=1, size=4, heads=2, repeat=2, offset=1).positions().tolist()
        [1, 2, 3, 4, 5, 6, 7, 8]
        >>> Layout(axis=0, size=4, heads=2, block=3).positions().tolist()
        [0, 1, 3, 4]
    """

    axis: int
    size: int
    heads: int = 1
    offset: int = 0
    repeat: int = 1
    tile: int = 1
    block: int | None = None
    head_axis: int | None = None

    @classmethod
    def of(cls, space: Space, member: AxisRef | Site) -> Layout:
        """The layout of a member (a tensor axis) or a site (an activation's dimension) of ``space``."""
        if isinstance(member, Site):
            return cls(member.dim, space.size, space.heads, member.offset, member.repeat, member.tile, member.block)
        return cls(member.axis, space.size, space.heads, member.offset, member.repeat, member.tile, member.block,
                   member.head_axis)

    @property
    def head_dim(self) -> int:
        return self.size // self.heads

    @property
    def per_channel(self) -> int:
        """Entries each channel holds: ``repeat * tile``."""
        return self.repeat * self.tile

    @property
    def length(self) -> int:
        """Entries the channels hold in all: ``size * repeat * tile``."""
        return self.size * self.repeat * self.tile

    @property
    def contiguous(self) -> bool:
        """One run of ``length`` entries from ``offset``, already channel-major (no tiles, head blocks adjacent)."""
        return self.tile == 1 and self.block is None

    def replace(self, **changes: Any) -> Layout:
        """A copy with some fields changed (``size`` for another width, ``axis`` for a moved dimension)."""
        return dataclasses.replace(self, **changes)

    def with_offset(self, offset: int) -> Layout:
        """A copy starting at ``offset`` (the engine's shifted start once earlier segments changed width)."""
        return self if offset == self.offset else dataclasses.replace(self, offset=offset)

    def positions(self) -> torch.Tensor:
        """The positions of the channels in channel-major order: channel after channel, each channel's
        ``repeat * tile`` entries in a row (repeat-major, tile fastest); heads on ``head_axis`` are not listed."""
        d = self.size // self.heads
        step = d * self.repeat if self.block is None else self.block
        h = torch.arange(self.heads).view(-1, 1, 1, 1)
        i = torch.arange(d).view(1, -1, 1, 1)
        r = torch.arange(self.repeat).view(1, 1, -1, 1)
        s = torch.arange(self.tile).view(1, 1, 1, -1)
        return (self.offset + (h * self.tile + s) * step + i * self.repeat + r).reshape(-1)


class Space(BaseModel):
    """A set of channels transported together, with every tensor axis and activation site that indexes it.

    ``heads > 1``: the channels are ``heads`` contiguous blocks of ``head_dim = size // heads``, mapped block by
    block (see the module docstring); spaces sharing a ``head_group`` share the permutation of the heads.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int
    kind: SpaceKind = "hidden"
    members: tuple[AxisRef, ...]
    sites: tuple[Site, ...] = ()
    heads: int = 1
    head_group: str | None = None
    shared: bool = Field(False, description="one map of the channels inside a head for every head; members with "
                         "block 0 hold one head's channels, read by every head")
    queries: bool = Field(False, description="holds the query heads of grouped- or multi-query attention, each "
                          "tiled in another space's members: those members' costs leave their tiles' order to it; "
                          "with heads (one per key/value head), the group's other spaces move its heads, so it joins "
                          "their head matching and then solves only the order inside each head")

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for flag in ("shared", "queries"):  # plans written before the fields existed read the same
            if not getattr(self, flag):
                out.pop(flag, None)
        return out

    @model_validator(mode="after")
    def _check_heads(self) -> Space:
        if self.heads < 1 or self.size % self.heads:
            raise ValueError(f"space {self.name!r}: {self.size} channels cannot form {self.heads} equal heads")
        if self.head_group is not None and self.heads == 1:
            raise ValueError(f"space {self.name!r}: a head_group needs heads > 1")
        if self.shared and self.heads == 1:
            raise ValueError(f"space {self.name!r}: a shared within-head map needs heads > 1")
        for m in (*self.members, *self.sites):
            if m.block == 0 and not self.shared:
                raise ValueError(f"space {self.name!r}: a member holding one head's channels (block 0) needs a "
                                 f"shared within-head map ({m})")
            stacked = getattr(m, "head_axis", None)
            if stacked is not None and (stacked == m.axis or m.tile != 1 or m.block is not None or self.heads == 1):
                raise ValueError(f"space {self.name!r}: a member whose heads lie on another axis needs heads > 1, "
                                 f"that axis other than its own, no tile and no block ({m})")
            if m.block and m.block < self.head_dim * m.repeat:
                raise ValueError(f"space {self.name!r}: head blocks {m.block} apart cannot hold {self.head_dim} "
                                 f"channels repeated {m.repeat} times ({m})")
        return self

    @property
    def head_dim(self) -> int:
        return self.size // self.heads

    def layout(self, member: AxisRef | Site) -> Layout:
        """Where this space's channels lie in one of its members or sites (:meth:`Layout.of`)."""
        return Layout.of(self, member)

    def tensors(self) -> set[str]:
        return {m.tensor for m in self.members}


class FixedAxes(BaseModel):
    """Hidden channels that the plan leaves in place, and why (never a model input or output)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    members: tuple[str, ...] = Field(description="'tensor:axis' entries holding these channels")
    reason: str
    necessary: bool = Field(False, description="no permutation of these channels keeps the function")

    def __str__(self) -> str:
        shown = ", ".join(self.members[:4]) + (f" (+{len(self.members) - 4})" if len(self.members) > 4 else "")
        return f"{self.size} channels of {shown}: {self.reason}"


class Verification(BaseModel):
    """What :func:`hf_otfusion.verify.verify_plan` found: a random permutation by the plan, on a copy of the model
    with every parameter and buffer randomised, kept (or not) the outputs on the example input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verified: bool = Field(description="the (repaired) plan's random permutation kept the outputs")
    change: float | None = Field(None, description="largest relative change of the outputs under the final plan")
    dtype: str | None = Field(None, description="the dtype the check ran in (float64 where the model allows)")
    passes: int = Field(0, description="forward passes the check took")
    repaired: tuple[str, ...] = Field((), description="spaces removed: permuting them changed the outputs")
    heads_fixed: tuple[str, ...] = Field((), description="head groups whose head order is now kept in place")
    note: str = Field("", description="why the plan could not be verified, or what weakens the check")

    def __str__(self) -> str:
        if not self.verified:
            return f"not verified: {self.note or 'unknown reason'}"
        text = f"verified (a random permutation changes the outputs by {self.change or 0.0:.1e} in {self.dtype}"
        text += f", {self.passes} forward passes)"
        if self.repaired or self.heads_fixed:
            text += (f"; repaired: {len(self.repaired)} spaces and {len(self.heads_fixed)} head orders left fixed "
                     "(failed verification)")
        return text + (f"; {self.note}" if self.note else "")


class AlignmentPlan(BaseModel):
    """Spaces in solving order (topological), plus what the tracer could not handle.

    Example:
        >>> plan = build_plan(model, torch.randn(2, 784))  # doctest: +SKIP
        >>> print(plan)                                    # doctest: +SKIP
        >>> AlignmentPlan.from_json(plan.to_json()) == plan  # doctest: +SKIP
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spaces: tuple[Space, ...]
    tensors: dict[str, tuple[int, ...]] = Field(description="state_dict name -> shape, for every tensor")
    aliases: dict[str, str] = Field(default_factory=dict, description="tied tensor -> the tensor it shares")
    unhandled: tuple[str, ...] = Field(default=(), description="ops that fixed the spaces they touched")
    fixed: tuple[FixedAxes, ...] = Field(default=(), description="hidden channels left in place, with the reason")
    expanded: bool = Field(False, description="traced on a shallow copy of the model and expanded by layer index "
                           "(hf_otfusion.trace.expand): no activation sites, for weights-mode fusion only")
    verification: Verification | None = Field(None, description="the plan's self-check (hf_otfusion.verify); None: "
                                              "never checked")

    @model_serializer(mode="wrap")
    def _omit_unverified(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if self.verification is None:  # plans written before the field existed read the same
            out.pop("verification", None)
        return out

    @property
    def verified(self) -> bool:
        """Whether a random permutation by this plan was checked to keep the model's outputs."""
        return self.verification is not None and self.verification.verified

    def __iter__(self) -> Iterator[Space]:  # type: ignore[override]
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def space(self, name: str) -> Space:
        for space in self.spaces:
            if space.name == name:
                return space
        raise KeyError(f"no space named {name!r} in the plan")

    def head_groups(self) -> dict[str, list[Space]]:
        """Spaces that share one permutation of their heads, by group name (in solving order)."""
        out: dict[str, list[Space]] = {}
        for space in self.spaces:
            if space.head_group is not None:
                out.setdefault(space.head_group, []).append(space)
        return out

    def query_axes(self) -> set[tuple[str, int]]:
        """(tensor, axis) pairs of the :attr:`Space.queries` spaces: a tiled member there leaves the order of its
        tiles to that space, so costs leave it out."""
        return {(m.tensor, m.axis) for s in self.spaces if s.queries for m in s.members}

    def members_by_tensor(self) -> dict[str, list[tuple[Space, AxisRef]]]:
        """For each tensor, the (space, member) pairs that index it."""
        out: dict[str, list[tuple[Space, AxisRef]]] = {}
        for space in self.spaces:
            for m in space.members:
                out.setdefault(m.tensor, []).append((space, m))
        return out

    def fixed_tensors(self) -> list[str]:
        """Tensors none of whose axes belong to a space."""
        moved = self.members_by_tensor()
        return [t for t in self.tensors if t not in moved and t not in self.aliases]

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> AlignmentPlan:
        return cls.model_validate(json.loads(text))

    def __str__(self) -> str:
        lines = [f"AlignmentPlan: {len(self.spaces)} spaces, {len(self.fixed_tensors())} fixed tensors"
                 + (" (expanded by layer index from a shallow trace: no activation sites)" if self.expanded else "")]
        groups = {g: i for i, g in enumerate(self.head_groups())}
        header = (f"{'#':>3}  {'space':<40} {'size':>6}  {'heads':<9} {'kind':<8}  "
                  "members (tensor:axis[@offset][xrepeat][ttile][bblock][hhead_axis])")
        lines += [header, "-" * len(header)]
        for i, space in enumerate(self.spaces):
            members = ", ".join(_format_member(m) for m in space.members)
            heads = "-" if space.heads == 1 else f"{space.heads}x{space.head_dim}" + ("=" if space.shared else "")
            if space.head_group is not None:
                heads += f" g{groups[space.head_group]}"
            if space.queries:
                heads += "q"
            lines.append(f"{i:>3}  {space.name:<40} {space.size:>6}  {heads:<9} {space.kind:<8}  {members}")
        fixed = self.fixed_tensors()
        if fixed:
            lines.append(f"fixed: {', '.join(fixed)}")
        for g, i in groups.items():
            lines.append(f"head group g{i} ({g}): one permutation of the heads for "
                         + ", ".join(s.name for s in self.head_groups()[g]))
        if any(s.queries for s in self.spaces):
            lines.append("spaces marked 'q': the query heads of each key/value head, one channel each (their key/"
                         "value heads move with the group's other spaces; only their order inside them is solved)")
        if any(s.shared for s in self.spaces):
            lines.append("heads marked '=': one map of the channels inside a head, the same in every head "
                         "(members with block 0 hold one head's channels)")
        if self.aliases:
            lines.append("tied: " + ", ".join(f"{a} -> {b}" for a, b in self.aliases.items()))
        if self.unhandled:
            lines.append("ops that fixed hidden channels (no tracer rule, or a structure the plan cannot express): "
                         + ", ".join(self.unhandled))
        if self.fixed:
            lines.append(f"hidden channels left fixed ({len(self.fixed)}):")
            lines += [f"  - {f}" for f in self.fixed]
        lines.append(f"check: {self.verification if self.verification is not None else 'not verified'}")
        return "\n".join(lines)

    def refusals(self) -> list[str]:
        """What ``strict`` refuses: ops without a rule, and hidden channels left fixed that a permutation could
        move (the tracer could not express their structure); channels that no permutation may move pass."""
        out = [f"no tracer rule for op {op!r}" for op in self.unhandled]
        return out + [str(f) for f in self.fixed if not f.necessary]

    def check_strict(self) -> None:
        """Raise :class:`~hf_otfusion.errors.PlanError` listing :meth:`refusals`, if any."""
        problems = self.refusals()
        if problems:
            from .errors import PlanError

            raise PlanError(f"strict: the plan leaves {len(problems)} hidden structures unaligned: "
                            + "; ".join(problems))

    def fixed_summary(self) -> str | None:
        """One line naming the hidden channels left fixed (for warnings and cards), or None when there are none."""
        if not self.fixed:
            return None
        shown = "; ".join(str(f) for f in self.fixed[:2]) + ("; ..." if len(self.fixed) > 2 else "")
        return f"{len(self.fixed)} hidden spaces left fixed: {shown}"


def _format_member(m: AxisRef) -> str:
    text = f"{m.tensor}:{m.axis}"
    if m.offset:
        text += f"@{m.offset}"
    if m.repeat != 1:
        text += f"x{m.repeat}"
    if m.tile != 1:
        text += f"t{m.tile}"
    if m.block is not None:
        text += f"b{m.block}"
    if m.head_axis is not None:
        text += f"h{m.head_axis}"
    return text
