"""Ops that pick entries along a dim (select, index_select, gather, index)."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..core import Tracer, register_rule


@register_rule("select", "index_select", "gather", "index")
def _select(t: Tracer, node: Node) -> Any:
    """Picking entries along a dim makes that dim's channels special: fix it; other dims pass."""
    x = node.args[0]
    xl, out = t.of(x), t.fresh(node)
    if xl is None or out is None:
        return out
    name = node.target._overloadpacket.__name__
    if name == "index":
        return t.unknown(node, name)
    dim = node.args[1] % len(xl)
    t.atoms.fix(xl[dim])
    kept = [xl[k] for k in range(len(xl)) if k != dim] if name == "select" else list(xl)
    if len(kept) == len(out):
        for k, d in enumerate(kept):
            if k != dim or name == "select":
                out[k] = d
    return out
