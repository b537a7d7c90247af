"""Fused attention: ``scaled_dot_product_attention`` and its kernels (eager attention is matmul/softmax)."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Labels, Tracer, register_rule, shape_of


def _gqa(t: Tracer, labels: Labels, g: int, shape: list) -> Labels:
    """Key or value labels (.., heads, tokens, head_dim) as the ``g`` query heads of each group read them."""
    rep = t.repeat_heads(labels[-3], g, list(zip(labels[-2:], shape[-2:], strict=True)))
    if rep is None:
        t.fix_all(labels, f"grouped-query attention over heads the tracer cannot follow ({t.context})")
        return labels
    head, within, tile_within = rep
    out = list(labels)
    out[-3] = head
    if t.expand(out[-1]) == t.expand(((within, 1),)):
        out[-1] = ((tile_within, 1),)
    return out


def _join_mask(t: Tracer, node: Node, scores: Labels, shape: list | None) -> None:
    """An additive mask or bias (``attn_mask``, ``attn_bias``) broadcasts onto the scores (.., heads, queries,
    keys): its dims are the scores' dims. A per-head bias (Swin's and T5's relative-position tables) thereby joins
    the attention's heads and moves with them; a per-head constant (ALiBi slopes) keeps the heads in place."""
    name = node.target._overloadpacket.__name__
    mask = node.args[3] if len(node.args) > 3 and name != "_scaled_dot_product_flash_attention_for_cpu" else None
    mask = node.kwargs.get("attn_mask", node.kwargs.get("attn_bias", mask))
    ml, ms = t.of(mask), shape_of(mask) if isinstance(mask, Node) else None
    if ml is None or ms is None or shape is None:
        return
    for k in range(len(ml)):
        pos = k + len(scores) - len(ml)
        if t.is_uniform(ml[k]):
            continue  # one value along this dim (T5's zero bias of cross-attention): it ties no heads
        if pos >= 0 and ms[k] != 1 and (ms[k] == shape[pos] or ms[k] is None):
            t.join(ml[k], scores[pos])


@register_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention")
def _sdpa(t: Tracer, node: Node) -> Any:
    q, k, v = node.args[:3]
    ql, kl, vl = t.of(q), t.of(k), t.of(v)
    out = t.fresh(node)
    if ql is None or kl is None or vl is None or out is None or isinstance(out, tuple):
        return t.unknown(node, "scaled_dot_product_attention")
    sq, sk = shape_of(q), shape_of(k)
    if len(ql) >= 3 and sq and sk and sq[-3] != sk[-3] and sq[-3] and sk[-3] and sq[-3] % sk[-3] == 0:
        g = sq[-3] // sk[-3]
        kl, vl = _gqa(t, kl, g, sk), _gqa(t, vl, g, shape_of(v))  # enable_gqa: kv heads are shared
    t.join(ql[-1], kl[-1])
    t.join(kl[-2], vl[-2])
    _join_mask(t, node, [*ql[:-1], kl[-2]], [*sq[:-1], sk[-2]] if sq and sk else None)
    for i in range(len(ql) - 2):
        t.join(ql[i], kl[i])
        t.join(ql[i], vl[i])
    return [*ql[:-1], vl[-1]]
