"""``repeat_interleave`` with a number of repeats: each entry of a dim repeated ``g`` times in a row.

On plain channels that is a channel-major repeat (the labels' own ``repeat``): a permutation of the channels moves
each block of ``g`` copies. On attention heads (grouped-value or grouped-query attention written as
``k.repeat_interleave(g, dim=heads)``, as in Qwen3-Next's gated delta net and Mamba-2's grouped B and C) each head
is read by ``g`` heads in a row: the heads are tiled as ``repeat_kv`` tiles them (:meth:`Tracer.repeat_heads`), so
whole groups move together. A dim of one entry repeated is the same value ``g`` times: its label is uniform (it
takes on the channels it meets, as a broadcast does). Anything else (channels inside heads, repeats given by a
tensor, no dim) is fixed and reported.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Tracer, argument, register_rule, shape_of


@register_rule("repeat_interleave")
def _repeat_interleave(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src, dst = t.of(x), shape_of(x), shape_of(node)
    g, dim = argument(node, 1, "repeats", None), argument(node, 2, "dim", None)
    if xl is None or src is None or dst is None or not isinstance(g, int) or not isinstance(dim, int) \
            or len(src) != len(dst):
        return t.unknown(node, "repeat_interleave")  # the index form (a repeats tensor), a flattening one
    dim %= len(xl)
    out = list(xl)
    if src[dim] == 1 and g > 1:  # one entry copied g times (Mamba-2's single group of B and C over the heads):
        out[dim] = t.new(dst[dim], why="one entry repeated")  # any order of the copies is the same tensor
        t.make_uniform(out[dim])
        return out
    if g == 1 or t.is_fixed(xl[dim]):
        out[dim] = xl[dim] if g == 1 else t.new(dst[dim])
        return out
    if not t.is_structured(xl[dim]):
        out[dim] = tuple((a, r * g) for a, r in t.expand(xl[dim]))
        return out
    others = [(d, src[k]) for k, d in enumerate(xl) if k != dim]
    if (rep := t.repeat_heads(xl[dim], g, others)) is not None:
        out[dim], within, tile_within = rep
        whole = t.expand(((within, 1),))
        for k, d in enumerate(out):
            if k != dim and t.expand(d) == whole:
                out[k] = ((tile_within, 1),)
        return out
    t.structural(f"a repeat_interleave by {g} of channels inside heads (or of heads without their channels)")
    t.fix(xl[dim])
    out[dim] = t.new(dst[dim])
    return out
