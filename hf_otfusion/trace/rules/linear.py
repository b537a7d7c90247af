"""Weight layers: linear, addmm (GPT-2's Conv1D), matrix products, convolutions, embeddings."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import VOCABULARY, Desc, Labels, Tracer, argument, register_rule, shape_of


@register_rule("linear")
def _linear(t: Tracer, node: Node) -> Any:
    x, w, b = node.args[0], node.args[1], argument(node, 2, "bias")
    xl, wl = t.of(x), t.of(w)
    out = t.fresh(node)
    if xl is None or wl is None or out is None:
        return t.unknown(node, "linear")
    out[:-1] = xl[:-1]
    out[-1] = wl[0]
    t.join(wl[1], xl[-1])
    if (bl := t.of(b)) is not None:
        t.join(bl[0], wl[0])
    t.consumer(x, len(xl) - 1, xl[-1])
    t.producer(node, out, len(out) - 1)
    return out


@register_rule("addmm")
def _addmm(t: Tracer, node: Node) -> Any:
    """``bias + x @ W`` with W stored (in, out), as in GPT-2's Conv1D."""
    b, x, w = node.args[:3]
    xl, wl, bl = t.of(x), t.of(w), t.of(b)
    out = t.fresh(node)
    if xl is None or wl is None or out is None:
        return t.unknown(node, "addmm")
    out[0], out[1] = xl[0], wl[1]
    t.join(wl[0], xl[1])
    if bl is not None:
        t.join(bl[-1], wl[1])
    t.consumer(x, 1, xl[1])
    if w.name in t.param_of_node:
        t.producer(node, out, 1)
    return out


@register_rule("mm", "bmm", "matmul")
def _matmul(t: Tracer, node: Node) -> Any:
    """Batched matrix product: the contracted dims are the same channels; batch dims broadcast."""
    a, b = node.args[:2]
    al, bl, out = t.of(a), t.of(b), t.fresh(node)
    if al is None or bl is None or out is None or len(al) < 2 or len(bl) < 2:
        return t.unknown(node, str(node.target))
    t.join(al[-1], bl[-2])
    out[-2], out[-1] = al[-2], bl[-1]
    sa, sb, so = shape_of(a), shape_of(b), shape_of(node)
    for pos in range(len(out) - 2):
        chosen: Desc | None = None
        for labels, shape in ((al, sa), (bl, sb)):
            k = pos - (len(out) - len(labels))
            if k < 0 or k >= len(labels) - 2 or (shape[k] == 1 and so[pos] != 1):
                continue
            if chosen is None:
                chosen = labels[k]
            else:
                t.join(chosen, labels[k])
        if chosen is not None:
            out[pos] = chosen
    if b.name in t.param_of_node:
        t.consumer(a, len(al) - 1, al[-1])
        t.producer(node, out, len(out) - 1)
    return out


@register_rule("conv1d", "conv2d", "conv3d", "convolution")
def _conv(t: Tracer, node: Node) -> Any:
    x, w, b = node.args[0], node.args[1], argument(node, 2, "bias")
    if node.target._overloadpacket.__name__ == "convolution":
        transposed, groups = bool(argument(node, 6, "transposed", False)), int(argument(node, 8, "groups", 1))
    else:
        transposed, groups = False, int(argument(node, 6, "groups", 1))
    xl, wl, out = t.of(x), t.of(w), t.fresh(node)
    if xl is None or wl is None or out is None or transposed:
        return t.unknown(node, "conv_transpose" if transposed else "conv")
    out[0] = xl[0]
    out[1] = wl[0]
    _positions(t, node, xl, out)
    if (bl := t.of(b)) is not None:
        t.join(bl[0], wl[0])
    in_ch, out_ch = shape_of(x)[1], shape_of(node)[1]
    if groups == 1:
        t.join(wl[1], xl[1])
    elif groups == in_ch and out_ch is not None and in_ch and out_ch % in_ch == 0:
        # depthwise: output channel g * m + k reads input channel g, so it is the input's space repeated
        mult = out_ch // in_ch
        t.join(wl[0], tuple((a, r * mult) for a, r in t.expand(xl[1])))
    else:
        _grouped_conv(t, xl[1], wl, groups, in_ch, out_ch)
    t.consumer(x, 1, xl[1])
    t.producer(node, out, 1)
    return out


def _positions(t: Tracer, node: Node, xl: Labels, out: Labels) -> None:
    """The conv's spatial dims: a kernel of 1 that keeps the size (stride 1, no padding) reads each position alone,
    so any labels there pass (EfficientViM runs a conv over a state dim that holds channels); any other kernel mixes
    neighbouring entries, so channels held there stay in place."""
    src, dst, kernel = shape_of(node.args[0]), shape_of(node), shape_of(node.args[1])
    for k in range(2, len(xl)):
        if not t.is_fixed(xl[k]):
            if kernel is not None and kernel[k] == 1 and src is not None and dst is not None and src[k] == dst[k]:
                out[k] = xl[k]
            else:
                t.fix(xl[k], f"a conv's kernel mixes neighbouring entries of this dim ({t.context})")


GROUPED = "grouped convolution: the input channels cannot be split into the conv's groups"


def _grouped_conv(t: Tracer, x: Desc, wl: Labels, groups: int, in_ch: int | None, out_ch: int | None) -> None:
    """A grouped conv (``groups`` blocks on both sides, as attention has heads): whole groups move together across
    the input and the output (one head permutation), output channels move inside their group, and the input's
    channels inside a group move alike in every group (the weight's axis 1 holds one group's input channels and
    every group reads it: a shared within-head map)."""
    why = f"{GROUPED} ({t.context})"
    if not in_ch or not out_ch or in_ch % groups or out_ch % groups:
        t.fix(x, why)
        t.fix(wl[0], why)
        return
    into = t.head_split(x, groups, in_ch // groups)
    out = t.head_split(wl[0], groups, out_ch // groups) if into is not None else None
    if into is None or out is None:  # the input is not one free block of channels (a concat, a repeat, fixed)
        t.fix(x, why)
        t.fix(wl[0], why)
        return
    t.join(into[1], wl[1])
    t.join(into[0], out[0])


@register_rule("embedding")
def _embedding(t: Tracer, node: Node) -> Any:
    w, idx = node.args[:2]
    wl, il, out = t.of(w), t.of(idx), t.fresh(node)
    if wl is None or out is None:
        return t.unknown(node, "embedding")
    t.fix(wl[0], VOCABULARY)
    if il is not None:
        out[:-1] = il
    out[-1] = wl[1]
    t.producer(node, out, len(out) - 1)
    return out
