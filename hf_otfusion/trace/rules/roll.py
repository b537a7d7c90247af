"""``roll``: a cyclic shift along dims (timm Swin's shifted windows roll the spatial dims).

Along a dim whose channels are all fixed (positions: spatial dims, tokens) a roll moves positions only, so every
label passes through. Along a dim that holds free channels, ``roll(x, s)`` is ``cat(x[n - s:], x[:n - s])``: the
output dim is those two slices' segments in that order, so the channels stay followed (a permutation of the input
channels is the same permutation of the output's, moved by ``s``). Where the slice cuts a segment the plan cannot
divide (a repeat, a head split) the channels are fixed and the op is reported. A roll of the flattened tensor
(no ``dims``) mixes every dim: free channels it touches are fixed.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Tracer, argument, register_rule, shape_of


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@register_rule("roll")
def _roll(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src = t.of(x), shape_of(x)
    if xl is None or src is None:
        return t.unknown(node, "roll")
    shifts, dims = _as_list(argument(node, 1, "shifts", [])), _as_list(argument(node, 2, "dims", []))
    if not dims:
        if t.is_free(xl):
            t.structural("a roll of the flattened tensor moves entries across every dim")
            t.fix_all(xl)
        return t.fresh(node)
    out = list(xl)
    for shift, dim in zip(shifts, dims, strict=False):
        dim %= len(xl)
        n = src[dim]
        if not isinstance(shift, int) or n is None:
            if t.is_free([out[dim]]):
                t.structural("a roll by a shift not known when tracing")
                t.fix(out[dim])
            continue
        s = shift % n if n else 0
        if s == 0 or not t.is_free([out[dim]]):
            continue  # positions (or nothing moved): the labels pass
        tail, head = t.slice_desc(out[dim], n - s, n), t.slice_desc(out[dim], 0, n - s)
        if tail is None or head is None:
            t.structural(f"a roll by {s} of {n} channels cuts a repeated or per-head block of them")
            t.fix(out[dim])
            continue
        out[dim] = tail + head
    return out
