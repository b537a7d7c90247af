"""The alignment plan: which tensor axes index which space of hidden units.

A *space* is a set of channels that must be transported together (the output channels of a layer, carried
through norms, activations and residual adds). Each member of a space is one (tensor, axis) pair, possibly a
segment of that axis (``offset``, after a concat) whose index is channel-major repeated ``repeat`` times (a
flatten after a conv). Tensors or axes in no space are fixed: they are averaged as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SpaceKind = Literal["hidden", "residual"]


class AxisRef(BaseModel):
    """One segment of one tensor axis that indexes a space.

    Positions ``offset + c * repeat + r`` of ``tensor``'s axis ``axis`` hold channel ``c`` of the space, for
    ``r`` in ``range(repeat)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensor: str
    axis: int
    offset: int = 0
    repeat: int = 1


class Site(BaseModel):
    """A graph value whose dimension ``dim`` carries a space (where activations are read)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    dim: int
    offset: int = 0
    repeat: int = 1


class Space(BaseModel):
    """A set of channels transported together, with every tensor axis and activation site that indexes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int
    kind: SpaceKind = "hidden"
    members: tuple[AxisRef, ...]
    sites: tuple[Site, ...] = ()

    def tensors(self) -> set[str]:
        return {m.tensor for m in self.members}


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

    def __iter__(self) -> Iterator[Space]:  # type: ignore[override]
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def space(self, name: str) -> Space:
        for space in self.spaces:
            if space.name == name:
                return space
        raise KeyError(f"no space named {name!r} in the plan")

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
        lines = [f"AlignmentPlan: {len(self.spaces)} spaces, {len(self.fixed_tensors())} fixed tensors"]
        header = f"{'#':>3}  {'space':<40} {'size':>6}  {'kind':<8}  members (tensor:axis[@offset][xrepeat])"
        lines += [header, "-" * len(header)]
        for i, space in enumerate(self.spaces):
            members = ", ".join(_format_member(m) for m in space.members)
            lines.append(f"{i:>3}  {space.name:<40} {space.size:>6}  {space.kind:<8}  {members}")
        fixed = self.fixed_tensors()
        if fixed:
            lines.append(f"fixed: {', '.join(fixed)}")
        if self.aliases:
            lines.append("tied: " + ", ".join(f"{a} -> {b}" for a, b in self.aliases.items()))
        if self.unhandled:
            lines.append(f"ops without a rule (their spaces were fixed): {', '.join(self.unhandled)}")
        return "\n".join(lines)


def _format_member(m: AxisRef) -> str:
    text = f"{m.tensor}:{m.axis}"
    if m.offset:
        text += f"@{m.offset}"
    if m.repeat != 1:
        text += f"x{m.repeat}"
    return text
