"""Ops that pick entries along a dim (select, index_select, gather, index)."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Tracer, register_rule, shape_of

PICKED = "entries picked by index along this dim (a gather reorders them, so its channels stay in place)"


@register_rule("select", "index_select", "gather")
def _select(t: Tracer, node: Node) -> Any:
    """Picking entries along a dim makes that dim's channels special: fix it; other dims pass."""
    x = node.args[0]
    xl, out = t.of(x), t.fresh(node)
    if xl is None or out is None:
        return out
    name = node.target._overloadpacket.__name__
    dim = node.args[1] % len(xl)
    t.fix(xl[dim], f"{PICKED}: op '{name}' (node {node.name})")
    kept = [xl[k] for k in range(len(xl)) if k != dim] if name == "select" else list(xl)
    if len(kept) == len(out):
        for k, d in enumerate(kept):
            if k != dim or name == "select":
                out[k] = d
    return out


@register_rule("index")
def _index(t: Tracer, node: Node) -> Any:
    """``x[i0, i1, ...]`` with index tensors on some dims: those dims are positions read by index (fixed); the
    other dims keep their labels. A relative-position bias table ``table[index]`` (Swin, LeViT) thereby keeps its
    per-head axis free, to join the heads of the attention that adds it."""
    x, indices = node.args[0], node.args[1]
    xl, src, out, dst = t.of(x), shape_of(x), t.fresh(node), shape_of(node)
    if xl is None or out is None or src is None or dst is None or not isinstance(indices, (list, tuple)):
        return t.unknown(node, "index")
    picked = [k for k, i in enumerate(indices) if i is not None]
    if x.name in t.values:  # indices picked from indices into channels still index them
        t.values[node.name] = t.values[x.name]
    for k in picked:
        value = t.values.get(indices[k].name) if isinstance(indices[k], Node) else None
        if value is not None and value[0] == "index":  # a per-expert table read at each row's expert
            t.join(xl[k], value[1])
        else:
            t.fix(xl[k], f"{PICKED}: op 'index' (node {node.name})")
    if not picked:
        return list(xl)
    kept = [k for k in range(len(xl)) if k not in picked]
    n_new = len(dst) - len(kept)
    if n_new < 0:
        return t.unknown(node, "index")
    adjacent = picked == list(range(picked[0], picked[-1] + 1))
    # adjacent index tensors put their (broadcast) dims where they were; otherwise those dims come first
    before = [k for k in kept if k < picked[0]] if adjacent else []
    after = [k for k in kept if k not in before]
    labels = [*[xl[k] for k in before], *out[len(before):len(before) + n_new], *[xl[k] for k in after]]
    return labels
