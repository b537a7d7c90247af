"""Fused attention: ``scaled_dot_product_attention`` and its kernels (eager attention is matmul/softmax)."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..core import Tracer, register_rule


@register_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention")
def _sdpa(t: Tracer, node: Node) -> Any:
    q, k, v = node.args[:3]
    ql, kl, vl = t.of(q), t.of(k), t.of(v)
    out = t.fresh(node)
    if ql is None or kl is None or vl is None or out is None or isinstance(out, tuple):
        return t.unknown(node, "scaled_dot_product_attention")
    t.join(ql[-1], kl[-1])
    t.join(kl[-2], vl[-2])
    for i in range(len(ql) - 2):
        t.join(ql[i], kl[i])
        t.join(ql[i], vl[i])
    return [*ql[:-1], vl[-1]]
