"""Ops that move, split or join dims: permutes, reshapes (head splits and merges, fused qkv stacks), expand,
cat, slice/narrow and split, and the ops that keep a :class:`Stack`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from ..api import Desc, FakeNode, Labels, Stack, Tracer, argument, register_rule, register_stack_rule, shape_of

STACK_COPY_OPS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy", "dropout"}


def _permute_order(node: Node, n: int, name: str) -> list[int]:
    order = list(range(n))
    if name == "permute":
        order = [d % n for d in node.args[1]]
    elif name == "t":
        order = order[::-1]
    elif name == "movedim":
        src, dst = node.args[1] % n, node.args[2] % n
        order.remove(src)
        order.insert(dst, src)
    else:
        a, b = node.args[1] % n, node.args[2] % n
        order[a], order[b] = order[b], order[a]
    return order


@register_rule("permute", "transpose", "t", "swapaxes", "movedim")
def _permute(t: Tracer, node: Node) -> Any:
    xl = t.of(node.args[0])
    if xl is None:
        return t.fresh(node)
    order = _permute_order(node, len(xl), node.target._overloadpacket.__name__)
    return [xl[i] for i in order]


@register_stack_rule
def _stack_rule(t: Tracer, node: Node, name: str, stacks: list[Node]) -> Any:
    """The ops that keep a :class:`Stack` (or resolve it); None for any other op."""
    if len(stacks) != 1 or not node.args or node.args[0] is not stacks[0]:
        return None
    st: Stack = t.labels[stacks[0].name]
    n = len(st.items[0])
    tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
    if name in STACK_COPY_OPS and len(tensors) == 1:
        return st
    if name in ("permute", "transpose", "t", "swapaxes", "movedim"):
        order = _permute_order(node, n, name)
        return Stack(order.index(st.dim), [[item[i] for i in order] for item in st.items])
    if name == "unbind" and argument(node, 1, "dim", 0) % n == st.dim:
        return tuple([d for k, d in enumerate(item) if k != st.dim] for item in st.items)
    if name == "select" and node.args[1] % n == st.dim and isinstance(node.args[2], int):
        return [d for k, d in enumerate(st.items[node.args[2]]) if k != st.dim]
    return None


@register_rule("unsqueeze", "squeeze")
def _squeeze(t: Tracer, node: Node) -> Any:
    """Adding or removing size-1 dims keeps every other dim's labels (a single head's dim among them)."""
    x = node.args[0]
    xl, src, dst = t.of(x), shape_of(x), shape_of(node)
    if xl is None or src is None or dst is None:
        return t.fresh(node)
    if node.target._overloadpacket.__name__ == "unsqueeze":
        dim = node.args[1] % (len(src) + 1)
        return [*xl[:dim], t.new(1), *xl[dim:]]
    dims = argument(node, 1, "dim", None)
    dims = range(len(src)) if dims is None else [dims] if isinstance(dims, int) else dims
    drop = {d % len(src) for d in dims if src[d % len(src)] == 1}
    out = [d for k, d in enumerate(xl) if k not in drop]
    return out if len(out) == len(dst) else _reshape(t, node)


@register_rule("view", "_unsafe_view", "reshape", "flatten", "unflatten", "view_as")
def _reshape(t: Tracer, node: Node) -> Any:
    """Any reshape: match dims block by block (same element order, different shape).

    A channel dim split into (heads, head_dim) gets head labels; (3, heads, head_dim) is a stack of three
    headed dims (a fused qkv); the merge of a (heads, head_dim) pair is the headed dim again.
    """
    x = node.args[0]
    xl, src, dst = t.of(x), shape_of(x), shape_of(node)
    if xl is None or src is None or dst is None:
        return t.fresh(node)
    fx, fo = _batch_factor(x), _batch_factor(node)
    if fx is None or fo is None or fx[1] != fo[1] or (fx[0] == 1 and fo[0] == 1):
        return _reshape_labels(t, node, xl, src, dst)
    # the batch merged with other dims (MobileViT's unfolding into (B * C * nh, ph, nw, pw)): reshape with the
    # batch as a dim of its own; such a dim is labelled by what it holds for one batch item
    if fx[0] > 1:
        width = t.width(xl[0])
        if width != fx[0] and not t.is_fixed(xl[0]):
            return _reshape_labels(t, node, xl, src, dst)
        xl = [t.new(None), xl[0] if width == fx[0] else t.new(fx[0]), *xl[1:]]
        src = [None, fx[0], *src[1:]]
    if fo[0] > 1:
        dst = [None, fo[0], *dst[1:]]
    out = _reshape_labels(t, node, xl, src, dst)
    if fo[0] == 1:
        return out
    if isinstance(out, Stack):
        if out.dim > 1:
            return Stack(out.dim - 1, [item[1:] for item in out.items])
        t.fix_all(out)  # a stack along the batch's own dim: no labelling of the merged dim holds it
        return t.fresh(node)
    return out[1:]


def _batch_factor(value: Any) -> tuple[int, Any] | None:
    """(k, the batch symbol) for a value whose dim 0 is k times a symbolic batch size; None otherwise."""
    val = value.meta.get("val") if isinstance(value, Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not isinstance(val.shape[0], torch.SymInt):
        return None
    k, rest = val.shape[0].node.expr.as_coeff_Mul()  # a sympy expression
    return (int(k), rest) if k.is_Integer and int(k) > 0 and rest.is_Symbol else None


def _reshape_labels(t: Tracer, node: Node, xl: Labels, src: list, dst: list) -> Any:
    """The labels of a reshape of a value labelled ``xl`` from shape ``src`` to ``dst``."""
    out: Labels = [t.new(s) for s in dst]
    stacks: list[tuple[int, list[dict[int, Desc]]]] = []
    swaps: dict[int, int] = {}
    # size-1 dims carry nothing, except the one head of a multi-query attention's keys and values
    i_dims = [i for i, s in enumerate(src) if s != 1 or t.is_head_label(xl[i])]
    o_dims = [j for j, s in enumerate(dst) if s != 1]
    # equal static trailing dims are the same elements (the flat index modulo their size is kept): match them
    # first, so that symbolic leading dims (a batch times a number of windows) cannot misalign the channels
    while i_dims and o_dims and src[i_dims[-1]] is not None and src[i_dims[-1]] == dst[o_dims[-1]] \
            and not (len(i_dims) > 1 and src[i_dims[-2]] == 1):  # (one head, g) -> g query heads: a repeat
        out[o_dims.pop()] = xl[i_dims.pop()]
    i = j = 0
    while i < len(i_dims) and j < len(o_dims):
        si, sj = src[i_dims[i]], dst[o_dims[j]]
        if si is None or sj is None:
            if si is None and sj is None:
                out[o_dims[j]] = xl[i_dims[i]]
                i, j = i + 1, j + 1
                continue
            for k in i_dims[i:]:
                t.fix(xl[k])
            return out
        ib, jb, pi, pj = [i_dims[i]], [o_dims[j]], si, sj
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(i_dims) and src[i_dims[i]] is not None:
                pi *= src[i_dims[i]]
                ib.append(i_dims[i])
                i += 1
            elif pj < pi and j < len(o_dims) and dst[o_dims[j]] is not None:
                pj *= dst[o_dims[j]]
                jb.append(o_dims[j])
                j += 1
            else:
                break
        stack = _reshape_block(t, xl, src, dst, ib, jb, out, swaps)
        if stack is not None:
            stacks.append(stack)
    for k in i_dims[i:]:
        t.fix(xl[k])
    name = node.target._overloadpacket.__name__
    one_head = name in ("view", "_unsafe_view", "reshape") and len(dst) == len(src) + 1 and dst[-2] == 1 \
        and len(src) >= 3
    # (.., T, d) -> (.., T, 1, d): one attention head (multi-query attention's single key/value head); (B, d) ->
    # (B, 1, d) is one token (LeViT's last stage at a small input), not a head
    if one_head and dst[-1] == src[-1] and (headed := t.head_split(xl[-1], 1, dst[-1])) is not None:
        out[-2], out[-1] = headed
    for k, d in enumerate(out):  # the within-head dim of repeated heads is the tile's own
        e = t.expand(d)
        for within, tile_within in swaps.items():
            if e == t.expand(((within, 1),)):
                out[k] = ((tile_within, 1),)
    if len(stacks) == 1:
        dim, per_item = stacks[0]
        items = []
        for labels in per_item:
            item = list(out)
            for k, d in labels.items():
                item[k] = d
            items.append(item)
        return Stack(dim, items)
    for _, per_item in stacks:  # two stacked dims in one value: not expressible
        for labels in per_item:
            for d in labels.values():
                t.fix(d)
    return out


def _refine(t: Tracer, labels: Labels, src: list[int], dst: list[int]) -> list[Desc] | None:
    """A reshape block that splits and merges at once (MobileViT's unfolding, (B, C, nh * ph) -> (B * C * nh,
    ph), and its folding back): both sides are cut into their common finer dims, each input dim is split into
    them and they are merged into each output dim. None where a step is not expressible."""

    def products(sizes: list[int]) -> list[int]:
        return [math.prod(sizes[: k + 1]) for k in range(len(sizes))]

    if 1 in src or 1 in dst:  # a single head's dim (multi-query attention) is no finer dim of the others
        return None
    points = sorted(set(products(src)) | set(products(dst)))
    if any(q % p for p, q in zip(points, points[1:], strict=False)):
        return None
    fine = [q // p for p, q in zip([1, *points[:-1]], points, strict=True)]
    pieces: list[Desc] = []
    for d, size in zip(labels, src, strict=True):
        n = products(fine[len(pieces):]).index(size) + 1
        if (parts := _split_desc(t, d, fine[len(pieces) : len(pieces) + n])) is None:
            return None
        pieces += parts
    out: list[Desc] = []
    at = 0
    for size in dst:
        n = products(fine[at:]).index(size) + 1
        if (merged := _merge_desc(t, pieces[at : at + n], fine[at : at + n])) is None:
            return None
        out.append(merged)
        at += n
    return out


def _split_desc(t: Tracer, d: Desc, sizes: list[int]) -> list[Desc] | None:
    """``d`` cut into dims of ``sizes`` (outermost first): the channels stay in the outer dim when each is
    repeated over the inner ones, in the inner dims when ``d`` is the same channels again for each outer index."""
    if len(sizes) == 1:
        return [d]
    if t.is_fixed(d):
        return [t.new(s) for s in sizes]
    if t.is_structured(d):
        return None
    pieces = t.expand(d)
    outer, rest = sizes[0], math.prod(sizes[1:])
    if all(r % rest == 0 for _, r in pieces):
        return [tuple((a, r // rest) for a, r in pieces), *(t.new(s) for s in sizes[1:])]
    n = len(pieces)
    if n % outer == 0 and pieces == pieces[: n // outer] * outer:
        inner = _split_desc(t, pieces[: n // outer], sizes[1:])
        return None if inner is None else [t.new(outer), *inner]
    return None


def _merge_desc(t: Tracer, parts: list[Desc], sizes: list[int]) -> Desc | None:
    """Dims of ``sizes`` flattened into one: the one that holds channels (the others are positions) gives them,
    again for each index of the dims before it and each repeated over the dims after it."""
    if len(parts) == 1:
        return parts[0]
    free = [k for k, p in enumerate(parts) if not t.is_fixed(p)]
    if not free:
        return t.new(math.prod(sizes))
    if len(free) > 1 or t.is_structured(parts[free[0]]):
        return None  # heads are merged by head_merge or not at all
    k = free[0]
    inner = math.prod(sizes[k + 1 :])
    return tuple((a, r * inner) for a, r in t.expand(parts[k])) * math.prod(sizes[:k])


def _channel_minor(t: Tracer, xl: Labels, src: list, ib: list[int]) -> Desc | None:
    """A flatten whose one channel dim is not the outermost (a patch merging's (2, 2, C) -> 4C): the channels
    again for every position of the dims before them, each repeated over the dims after them; None otherwise."""
    free = [k for k in ib if not t.is_fixed(xl[k])]
    if len(free) != 1 or free[0] == ib[0]:
        return None
    return _merge_desc(t, [xl[k] for k in ib], [src[k] for k in ib])


def _reshape_block(
    t: Tracer, xl: Labels, src: list, dst: list, ib: list[int], jb: list[int], out: Labels,
    swaps: dict[int, int],
) -> tuple[int, list[dict[int, Desc]]] | None:
    if len(ib) == 1 and len(jb) == 1:
        out[jb[0]] = xl[ib[0]]
        return None
    if len(jb) == 1:
        if len(ib) == 2 and (merged := t.head_merge(xl[ib[0]], xl[ib[1]])) is not None:
            out[jb[0]] = merged  # (heads, head_dim) -> the headed channels
            return None
        # merge: channel-major, inner dims must be fixed positions
        inner = math.prod(src[k] for k in ib[1:])
        others = [(d, src[k]) for k, d in enumerate(xl) if k not in ib]
        if all(t.is_fixed(xl[k]) for k in ib[1:]) and (rep := t.repeat_heads(xl[ib[0]], inner, others)):
            out[jb[0]], within, swaps[within] = rep  # each head read by ``inner`` query heads
            return None
        if (minor := _channel_minor(t, xl, src, ib)) is not None:
            out[jb[0]] = minor
            return None
        if any(not t.is_fixed(xl[k]) for k in ib[1:]):
            t.structural(f"a flatten {[src[k] for k in ib]} -> {dst[jb[0]]} of hidden channels from more than one "
                         "dim (or of channels inside heads); a flatten is expressible when one dim holds channels")
        for k in ib[1:]:
            t.fix(xl[k])
        out[jb[0]] = tuple((a, r * inner) for a, r in t.expand(xl[ib[0]]))
        return None
    if len(ib) == 1:  # split: the outer dim keeps the channels when every segment repeats the inner block
        inner = math.prod(dst[k] for k in jb[1:])
        pieces = t.expand(xl[ib[0]])
        if all(r % inner == 0 for _, r in pieces):
            out[jb[0]] = tuple((a, r // inner) for a, r in pieces)
            return None
        if len(jb) == 2 and (headed := t.head_split(xl[ib[0]], dst[jb[0]], dst[jb[1]])) is not None:
            out[jb[0]], out[jb[1]] = headed
            return None
        if len(jb) in (2, 3) and (parts := t.chunks(xl[ib[0]], dst[jb[0]])) is not None:
            per_item: list[dict[int, Desc]] = []
            for part in parts:
                if len(jb) == 2:
                    per_item.append({jb[1]: ((part, 1),)})
                elif (headed := t.head_split(((part, 1),), dst[jb[1]], dst[jb[2]])) is not None:
                    per_item.append({jb[1]: headed[0], jb[2]: headed[1]})
                else:
                    break
            else:
                return jb[0], per_item
    if (refined := _refine(t, [xl[k] for k in ib], [src[k] for k in ib], [dst[k] for k in jb])) is not None:
        for k, d in zip(jb, refined, strict=True):
            out[k] = d
        return None
    if any(not t.is_fixed(xl[k]) for k in ib):
        t.structural(f"a reshape {[src[k] for k in ib]} -> {[dst[k] for k in jb]} of hidden channels that is not "
                     "a head split, a head merge or a flatten")
    for k in ib:
        t.fix(xl[k])
    return None


@register_rule("expand", "expand_as", "repeat", "broadcast_to")
def _expand(t: Tracer, node: Node) -> Any:
    xl, src, dst = t.of(node.args[0]), shape_of(node.args[0]), shape_of(node)
    if xl is None or src is None or dst is None:
        return t.fresh(node)
    out = [t.new(s) for s in dst]
    lead = len(dst) - len(src)
    name = node.target._overloadpacket.__name__
    for k in range(len(src)):
        if src[k] == dst[lead + k] or (src[k] is None and dst[lead + k] is None):
            out[lead + k] = xl[k]
        elif name == "repeat" and src[k] != 1:
            why = f"tiled by repeat (whole blocks in a row, not a channel-major repeat; {t.context})"
            t.fix(xl[k], why)
    return out


@register_rule("cat", "concat", "concatenate")
def _cat(t: Tracer, node: Node) -> Any:
    # (an empty tensor adds nothing)
    tensors = [a for a in node.args[0] if isinstance(a, Node) and shape_of(a) and 0 not in shape_of(a)]
    out = t.fresh(node)
    if out is None or not tensors:
        return out
    dim = argument(node, 1, "dim", 0) % len(out)
    labels = [t.of(a) for a in tensors]
    if any(lab is None or len(lab) != len(out) for lab in labels):
        return t.unknown(node, "cat")
    for k in range(len(out)):
        if k == dim:
            out[k] = tuple(p for lab in labels for p in t.expand(lab[k]))
            continue
        out[k] = labels[0][k]
        for lab in labels[1:]:
            t.join(out[k], lab[k])
    return out


@register_rule("stack")
def _stack(t: Tracer, node: Node) -> Any:
    """A stack: the inputs' dims joined dim by dim, and a new dim of positions (fixed), e.g. EVA's interleaved
    rotary ``stack([-x[..., 1::2], x[..., ::2]], -1)``."""
    tensors = [a for a in node.args[0] if isinstance(a, Node)]
    out = t.fresh(node)
    if out is None or not tensors or len(tensors) != len(node.args[0]):
        return out
    dim = argument(node, 1, "dim", 0) % len(out)
    labels = [t.of(a) for a in tensors]
    if any(lab is None or len(lab) != len(out) - 1 for lab in labels):
        return t.unknown(node, "stack")
    for k, d in enumerate(labels[0]):
        out[k if k < dim else k + 1] = d
        for lab in labels[1:]:
            t.join(d, lab[k])
    return out


def _slice_reason(t: Tracer, desc: Desc) -> str | None:
    if any(t.inside_heads(desc)):
        return (f"a slice inside attention heads at {t.context} (e.g. partial rotary embeddings, or a qkv "
                "projection laid out per head): a range of channels inside every head is not expressible in the plan")
    return None


@register_rule("slice", "narrow")
def _slice(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src, out = t.of(x), shape_of(x), t.fresh(node)
    if xl is None or src is None or out is None:
        return out
    dim = argument(node, 1, "dim", 0) % len(xl)
    name = node.target._overloadpacket.__name__
    size = src[dim]
    if name == "narrow":
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        start, end, step = argument(node, 2, "start", 0), argument(node, 3, "end", None), argument(node, 4, "step", 1)
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)) or size is None:
        for k in range(len(xl)):
            if k != dim:
                out[k] = xl[k]
        return out
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    for k in range(len(xl)):
        if k != dim:
            out[k] = xl[k]
    if end <= start:
        pass  # an empty slice (the non-rotary part of fully rotary heads) reads no channel
    elif step == 1 and (piece := t.slice_desc(xl[dim], start, end)) is not None and piece:
        out[dim] = piece
    elif not t.is_fixed(xl[dim]):
        strided = (f"a slice with step {step} ({t.context}): channels taken one in {step} (e.g. gpt-oss's "
                   "interleaved gate and up projections) are not expressible in the plan")
        t.fix(xl[dim], strided if step != 1 else _slice_reason(t, xl[dim]))
    return out


@register_rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src = t.of(x), shape_of(x)
    val = node.meta.get("val")
    if xl is None or src is None or not isinstance(val, (tuple, list)):
        return t.unknown(node, str(node.target))
    name = node.target._overloadpacket.__name__
    dim = (argument(node, 1, "dim", 0) if name == "unbind" else argument(node, 2, "dim", 0)) % len(xl)
    outs, offset = [], 0
    for v in val:
        o = t.fresh(FakeNode(v))
        if name == "unbind":
            t.fix(xl[dim], f"unbound: each entry of this dim becomes its own value ({t.context})")
            o = [xl[k] for k in range(len(xl)) if k != dim]
        else:
            width = v.shape[dim]
            piece = t.slice_desc(xl[dim], offset, offset + width) if isinstance(width, int) else None
            for k in range(len(xl)):
                if k != dim:
                    o[k] = xl[k]
            if piece:
                o[dim] = piece
            else:
                t.fix(xl[dim], _slice_reason(t, xl[dim]))
            offset += width if isinstance(width, int) else 0
        outs.append(o)
    return tuple(outs)
