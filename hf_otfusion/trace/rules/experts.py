"""Mixtures of experts: a router's top-k choice of experts, and experts whose weights are stacked ``[experts, ...]``
and applied to the rows routed to them (``grouped_mm``, as transformers' experts run when exported).

The experts are *heads* one level up: the router's output dim indexes them, so its rows and every stacked expert
tensor's expert axis share one head permutation, and each expert's hidden channels move inside their expert (a
permutation per expert). The link from the router to the experts is in the *values* of integer tensors (the top-k
indices, sorted, counted per expert, summed into row offsets), which :attr:`Tracer.values` follows; an op that
reads them in any other way fixes the experts (see :meth:`Tracer.apply`).
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import READS_VALUES, Desc, FakeNode, Tracer, argument, register_rule, shape_of

STACKED = ("an expert's hidden channels that the tracer cannot stack on its expert axis (a weight that is not "
           "one plain [experts, in, out] tensor)")
READS_VALUES.update(("topk", "sort", "histc", "cumsum", "index", "grouped_mm_fallback", "_grouped_mm", "grouped_mm"))


@register_rule("topk")
def _topk(t: Tracer, node: Node) -> Any:
    """``values, indices = topk(x, k, dim)``: sorted values do not depend on the order of ``dim``'s channels; the
    indices' values index them (the router's choice of experts)."""
    x = node.args[0]
    xl, val = t.of(x), node.meta.get("val")
    if xl is None or not isinstance(val, (tuple, list)) or len(val) != 2:
        return t.unknown(node, "topk")
    if not argument(node, 4, "sorted", True):
        t.structural("a top-k that does not sort its result (DeepSeek-V3's group-limited routing): the order of the "
                     "chosen channels follows their order, so they stay in place")
        return t.unknown(node, "topk")
    dim = argument(node, 2, "dim", -1) % len(xl)
    outs = []
    for v in val:
        out = t.fresh(FakeNode(v))
        for k in range(len(xl)):
            if k != dim:
                out[k] = xl[k]
        outs.append(out)
    if not t.is_fixed(xl[dim]):
        t.values[f"{node.name}#1"] = ("index", xl[dim])
    return tuple(outs)


@register_rule("sort")
def _sort(t: Tracer, node: Node) -> Any:
    """Sorting channel indices (the experts' rows grouped by expert): the sorted values still index the channels;
    the order (positions) is new. Any other sort of hidden channels is not followed."""
    x, val = node.args[0], node.meta.get("val")
    value = t.values.get(x.name) if isinstance(x, Node) else None
    if value is None or value[0] != "index" or not isinstance(val, (tuple, list)):
        t.drop_values(node)
        return t.unknown(node, "sort")
    t.values[f"{node.name}#0"] = value
    return tuple(t.fresh(FakeNode(v)) for v in val)


@register_rule("histc")
def _histc(t: Tracer, node: Node) -> Any:
    """``histc(indices, bins=n, min=0, max=n-1)`` of indices into n channels: the count per channel, a dim of
    those channels."""
    x = node.args[0]
    out = t.fresh(node)
    value = t.values.get(x.name) if isinstance(x, Node) else None
    if value is None or out is None:
        return out
    bins, low, high = argument(node, 1, "bins", 100), argument(node, 2, "min", 0), argument(node, 3, "max", 0)
    if value[0] != "index" or t.width(value[1]) != bins or low != 0 or high != bins - 1 or len(out) != 1:
        t.drop_values(node)
        return out
    return [value[1]]


@register_rule("cumsum")
def _cumsum(t: Tracer, node: Node) -> Any:
    """A running sum along a dim: along positions the labels pass; along hidden channels (counts per expert) the
    result depends on their order, so it only serves as the offsets of a grouped product over those channels."""
    x = node.args[0]
    xl, out = t.of(x), t.fresh(node)
    if xl is None or out is None:
        return out
    t.drop_values(node)
    dim = argument(node, 1, "dim", 0) % len(xl)
    if t.is_fixed(xl[dim]):
        return list(xl)
    for k in range(len(xl)):
        if k != dim:
            out[k] = xl[k]
    if len(xl) == 1:
        t.values[node.name] = ("offsets", xl[dim])
    else:
        t.fix(xl[dim], f"a running sum along hidden channels ({t.context})")
    return out


def _within(t: Tracer, desc: Desc) -> bool:
    """Whether a dim holds channels inside heads (each row's expert's own channels)."""
    inside = t.inside_heads(desc)
    return bool(inside) and all(inside)


def _stack(t: Tracer, head: Desc, within: Desc) -> None:
    """``within`` (an axis of a stacked expert weight) becomes each expert's own channels, or is fixed."""
    if not t.is_fixed(within) and not t.stack_heads(head, within):
        t.fix(within, f"{STACKED} ({t.context})")


@register_rule("grouped_mm_fallback", "_grouped_mm", "grouped_mm")
def _grouped_mm(t: Tracer, node: Node) -> Any:
    """``out[r] = x[r] @ w[g]`` for the rows ``r`` of group ``g`` (cut by ``offs``, the running row counts per
    expert): the weight's axis 0 is the experts the offsets count. Where ``x`` holds plain channels (the residual
    stream), the weight's input axis reads them and its output axis is each expert's own hidden channels; where
    ``x`` holds each expert's channels (or channels the tracer lost), the input axis is those channels and the
    output is shared by every expert (it is summed over them: one map for all experts, which is always admissible).
    The rows are sorted by expert, so no activation is read here."""
    x, w, offs = node.args[0], node.args[1], argument(node, 2, "offs")
    xl, wl, out = t.of(x), t.of(w), t.fresh(node)
    value = t.values.get(offs.name) if isinstance(offs, Node) else None
    extra = any(argument(node, i, name) is not None for i, name in ((3, "bias"), (4, "out_dtype")))
    if (xl is None or wl is None or out is None or len(xl) != 2 or len(wl) != 3 or value is None
            or value[0] != "offsets" or extra or shape_of(w) is None):
        t.drop_values(node)
        if value is None and xl is not None and wl is not None and t.is_free([*xl, *wl]):
            t.structural("a grouped matrix product whose groups are not the running counts of a router's top-k "
                         "choice (the experts it routes to are not followed)")
        return t.unknown(node, t.op_name)
    experts = value[1]
    t.join(wl[0], experts)
    if _within(t, xl[-1]):
        _stack(t, wl[0], wl[1])
        t.join(wl[1], xl[-1])
    else:
        t.join(wl[1], xl[-1])
        if not t.is_fixed(xl[-1]):  # (an input the tracer lost: its output is taken as shared, a restriction)
            _stack(t, wl[0], wl[2])
    out[-1] = wl[2]
    t.producer(node, out, len(out) - 1, site=False)
    return out
