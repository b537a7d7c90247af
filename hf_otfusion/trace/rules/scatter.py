"""``slice_scatter``, ``select_scatter`` and ``copy``: a copy of ``base`` whose slice (or one index) along ``dim``
is ``src`` (what an in-place slice assignment ``out[:, a:b] = src`` exports to: a ``copy`` into the slice, then the
scatter).

Along ``dim`` the output holds base's channels outside the slice and src's inside: with step 1 and cuts the plan
can make, the output dim is the segments ``base[:start]``, ``src``, ``base[end:]`` (the base's channels inside the
slice are overwritten: they reach nothing). Every other dim is one dim of both, joined as a broadcasting op joins
them. A strided slice, or cuts inside a repeated or per-head block, fix the channels of that dim and are reported;
``select_scatter`` writes one index, so ``dim`` is passed from base when it is positions and fixed otherwise.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Desc, Tracer, argument, register_rule, shape_of

PER_CHANNEL = 1024  # zeros around a scatter up to this many channels get one atom each


def _filler(t: Tracer, size: int, uniform: bool) -> Desc:
    """Fixed channels around a scattered slice. Zeros (``uniform``) get one uniform atom per channel, so a later
    slice can cut them anywhere (GhostNet fills a zero buffer in ranges and slices it again) and any order of them is
    the same tensor."""
    if not size:
        return ()
    if not uniform or size > PER_CHANNEL:
        return t.new(size)
    out = tuple(t.new(1, fixed=True, why="zeros around a scattered slice")[0] for _ in range(size))
    t.make_uniform(out)
    return out


@register_rule("slice_scatter")
def _slice_scatter(t: Tracer, node: Node) -> Any:
    base, src = node.args[0], node.args[1]
    bl, sl, shape = t.of(base), t.of(src), shape_of(base)
    if bl is None or sl is None or shape is None or len(bl) != len(sl):
        return t.unknown(node, "slice_scatter")
    dim = argument(node, 2, "dim", 0) % len(bl)
    start, end, step = argument(node, 3, "start", None), argument(node, 4, "end", None), argument(node, 5, "step", 1)
    n = shape[dim]
    if n is None and start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1:
        return list(sl)  # the whole of a symbolic dim (the batch) overwritten: src
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)) or n is None:
        return t.unknown(node, "slice_scatter")
    start = 0 if start is None else (start + n if start < 0 else min(start, n))
    end = n if end is None else (end + n if end < 0 else min(end, n))
    if step == 1 and start == 0 and end == n:
        return list(sl)  # the whole of base overwritten: src
    out = list(bl)
    for k in range(len(bl)):
        if k != dim:
            t.join(bl[k], sl[k])
    if not t.is_free([bl[dim]]) and not t.is_free([sl[dim]]):
        return out  # positions (a cache, a token range): nothing to follow
    pieces = None
    if step == 1 and end > start and not t.is_free([bl[dim]]):  # into positions or a constant: new fixed channels
        uniform = t.is_uniform(bl[dim])
        before, after = _filler(t, start, uniform), _filler(t, n - end, uniform)
        pieces = before + sl[dim] + after
    elif step == 1 and end > start:
        before, after = t.slice_desc(bl[dim], 0, start), t.slice_desc(bl[dim], end, n)
        if before is not None and after is not None:
            pieces = before + sl[dim] + after
    if pieces is None:
        t.structural(f"a slice_scatter of [{start}:{end}:{step}] into {n} channels the plan cannot cut there")
        t.fix(bl[dim])
        t.fix(sl[dim])
        return out
    out[dim] = pieces
    return out


@register_rule("select_scatter")
def _select_scatter(t: Tracer, node: Node) -> Any:
    base, src = node.args[0], node.args[1]
    bl, sl = t.of(base), t.of(src)
    if bl is None or sl is None or len(bl) != len(sl) + 1:
        return t.unknown(node, "select_scatter")
    dim = argument(node, 2, "dim", 0) % len(bl)
    rest = [k for k in range(len(bl)) if k != dim]
    for k, d in zip(rest, sl, strict=True):
        t.join(bl[k], d)
    if t.is_free([bl[dim]]):
        t.structural("a select_scatter writes one channel of a dim that holds channels")
        t.fix(bl[dim])
    return list(bl)


@register_rule("copy")
def _copy(t: Tracer, node: Node) -> Any:
    """``copy(dst, src)``: src's values in dst's shape (functionalised ``dst[...] = src``). Its dims are src's (aligned
    from the right); dst's values are overwritten, so its channels join nothing. A dim src broadcasts is one value
    repeated: uniform."""
    dst, src = node.args[0], node.args[1]
    dl, sl, dshape, sshape = t.of(dst), t.of(src), shape_of(dst), shape_of(src)
    if dl is None or dshape is None:
        return t.unknown(node, "copy")
    if sl is None or sshape is None:  # a scalar or a value the tracer does not label: positions
        return [t.new(s) for s in dshape]
    lead = len(dshape) - len(sshape)
    out = []
    for k, size in enumerate(dshape):
        j = k - lead
        if j >= 0 and sshape[j] == size:
            out.append(sl[j])
        else:
            d = t.new(size, why="a value broadcast by copy")
            t.make_uniform(d)
            out.append(d)
    return out
