"""Normalisations: batch/instance, layer/RMS and group norm (their affine parameters join the channels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node

from ..api import Desc, FakeNode, Tracer, register_rule, shape_of


def _norm_params(t: Tracer, channel: Desc, params: Sequence[Any]) -> None:
    for p in params:
        if (pl := t.of(p)) is not None:
            t.join(pl[0], channel)


@register_rule("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
               "batch_norm", "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "batch_norm")
    _norm_params(t, xl[1], node.args[1:5])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        rest = []
        for v in val[1:]:
            shape = list(v.shape) if isinstance(v, torch.Tensor) else None
            rest.append([xl[1]] if shape == [shape_of(x)[1]] else t.fresh(FakeNode(v)))
        return (xl, *rest)
    return xl


@register_rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(t: Tracer, node: Node) -> Any:
    x, normalized = node.args[0], node.args[1]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "layer_norm")
    k = len(normalized)
    for p in node.args[2:4]:
        if (pl := t.of(p)) is not None:
            for i in range(k):
                t.join(pl[i], xl[len(xl) - k + i])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (xl, *[t.fresh(FakeNode(v)) for v in val[1:]])
    return xl


@register_rule("group_norm", "native_group_norm")
def _group_norm(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "group_norm")
    if node.target._overloadpacket.__name__ == "group_norm":
        groups, params = int(node.args[1]), node.args[2:4]
    else:
        groups, params = int(node.args[6]), node.args[1:3]
    channels = shape_of(x)[1]
    # statistics over contiguous channel groups: the groups are heads (whole groups move, channels inside each)
    if groups not in (1, channels) and (not channels or channels % groups
                                        or t.head_split(xl[1], groups, channels // groups) is None):
        t.fix(xl[1], f"group norm: statistics over {groups} contiguous channel groups that the channels "
                    f"cannot be split into ({t.context})")
    _norm_params(t, xl[1], params)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (xl, *[t.fresh(FakeNode(v)) for v in val[1:]])
    return xl
