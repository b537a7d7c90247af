"""Labels of graph values: the types and shape helpers that the tracer core and every rule module share.

A dimension's label (:data:`Desc`) is a sequence of segments, each a channel-major repeated atom; the atoms are
classes of the tracer's union-find (private to the core, reached through the label operations of :mod:`.ops`),
with composite definitions (concats, repeats) and head splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

Piece = tuple[int, int]  # (atom, repeat)
Desc = tuple[Piece, ...]  # one dimension: concatenated segments, each a channel-major repeated atom
Labels = list[Desc]  # one tensor: a Desc per dimension


@dataclass
class FakeNode:
    """One element of a tuple-valued node, so rules can read its shape like a node's."""

    val: Any

    @property
    def meta(self) -> dict[str, Any]:
        return {"val": self.val}


@dataclass
class Stack:
    """A value whose dim ``dim`` selects between different labellings of its other dims.

    timm's fused ``qkv``: a (B, N, 3 * D) linear output viewed as (B, N, 3, H, d) holds the query, key and value
    heads at index 0, 1, 2 of dim 2, each with its own (head, within) labels. Each item is a full labelling
    (its ``dim`` entry is a fixed placeholder). Only ops that move dims (permute), pick an index of ``dim``
    (unbind, select) or copy values keep a stack; any other op fixes every label in it.
    """

    dim: int
    items: list[Labels]


def _dim_size(s: Any) -> int | None:
    return s if isinstance(s, int) else None


def shape_of(node: Any) -> list[int | None] | None:
    """Static sizes of a graph value (None for a symbolic size such as the batch), or None for a non-tensor."""
    val = node.meta.get("val") if isinstance(node, (Node, FakeNode)) else None
    if isinstance(val, torch.Tensor):
        return [_dim_size(s) for s in val.shape]
    return None


def argument(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
