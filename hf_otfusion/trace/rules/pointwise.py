"""Ops that keep channels in place: pointwise and broadcasting ops, dropout, softmax-like ops along a dim,
pools and pads, reductions, and ops that create values from nothing the plan tracks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node

from ..api import IO_REASONS, TABLE, Desc, FakeNode, Labels, Tracer, argument, register_rule, shape_of


def _pointwise_out(t: Tracer, node: Node, tensors: Sequence[Any]) -> Labels | None:
    """Broadcasting: aligned dims of equal size are the same channels."""
    out_shape = shape_of(node)
    if out_shape is None:
        return t.fresh(node)
    out: Labels = []
    for pos in range(len(out_shape)):
        chosen: Desc | None = None
        for arg in tensors:
            labels, shape = t.of(arg), shape_of(arg)
            if labels is None or shape is None:
                continue
            k = pos - (len(out_shape) - len(shape))
            if k < 0 or (shape[k] == 1 and out_shape[pos] != 1):
                continue
            if out_shape[pos] == 1:  # one entry: nothing to permute, so nothing to join (keep a single head's label)
                if chosen is None or (t.is_fixed(chosen) and not t.is_fixed(labels[k])):
                    chosen = labels[k]
                continue
            if chosen is None:
                chosen = labels[k]
            else:
                if (t.is_fixed(labels[k]) and not t.is_free(labels)
                        and (shape[k] or 0) > 1 and not t.is_uniform(labels[k])):
                    if (lost := t.failure(labels[k])) is not None:  # not a table: channels the tracer lost
                        t.fix(chosen, lost)
                    else:  # channel by channel against a table computed in the graph: no permutation keeps the
                        # function, whatever fixed these channels before (a q/k norm shared by the heads, in Qwen3)
                        t.fix(chosen, TABLE, keep=IO_REASONS)
                t.join(chosen, labels[k])
                chosen = t.within_side(chosen, labels[k])
        out.append(chosen if chosen is not None else t.new(out_shape[pos]))
    return out


@register_rule(
    "add", "sub", "mul", "div", "maximum", "minimum", "where", "masked_fill", "pow", "lerp", "addcmul",
    "addcdiv", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "clone", "contiguous", "alias", "detach",
    "_to_copy", "to", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "square", "reciprocal", "clamp",
    "clamp_min", "clamp_max", "dropout", "lift_fresh_copy", "fill", "bitwise_not",
    "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "sign", "floor", "ceil", "round", "sin", "cos",
)
def _pointwise(t: Tracer, node: Node) -> Any:
    tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
    return _pointwise_out(t, node, tensors)


@register_rule("type_as")
def _type_as(t: Tracer, node: Node) -> Any:
    """``x.type_as(other)``: ``x`` in ``other``'s dtype; ``other`` lends its dtype, never its channels."""
    return t.of(node.args[0]) or t.fresh(node)


@register_rule("native_dropout")
def _native_dropout(t: Tracer, node: Node) -> Any:
    out = t.of(node.args[0])
    return (out, out)


@register_rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def _along_dim(t: Tracer, node: Node) -> Any:
    return t.of(node.args[0]) or t.fresh(node)


@register_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
               "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices",
               "max_pool3d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool2d",
               "pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d")
def pool(t: Tracer, node: Node) -> Any:
    """Channels pass through; spatial outputs are new (fixed) positions."""
    x = node.args[0]
    xl = t.of(x)
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    name = node.target._overloadpacket.__name__
    spatial = 3 if "3d" in name else 1 if "1d" in name else 2
    if xl is None or not isinstance(first, torch.Tensor):
        return t.unknown(node, name)
    out = t.fresh(FakeNode(first))
    if name in ("pad", "constant_pad_nd") and isinstance(node.args[1], (list, tuple)):
        # pad=[last_lo, last_hi, second_last_lo, ...]: only the dims with a non-zero pad get new positions
        pads = list(node.args[1])
        spatial = len(pads) // 2
        padded = {len(xl) - 1 - k for k in range(spatial) if pads[2 * k] != 0 or pads[2 * k + 1] != 0}
        for k in range(len(xl)):
            if k not in padded and len(out) == len(xl):
                out[k] = xl[k]
            else:
                # padded channels would be new channels: fix them (positions are fixed anyway)
                t.fix(xl[k], f"padded: the pad adds entries along this dim ({t.context})")
        return out
    out[: len(out) - spatial] = xl[: len(xl) - spatial]
    for d in xl[len(xl) - spatial :]:
        # the pooled dims must be positions; channels pooled here (channels-last) stay fixed
        t.fix(d, f"pooled: a pool mixes neighbouring entries of this dim, so channels pooled here stay in place "
                       f"({t.context})")
    if isinstance(val, (tuple, list)):
        return (out, out)
    return out


@register_rule("mean", "sum", "amax", "amin", "var", "std", "prod", "max", "min", "logsumexp", "norm",
               "linalg_vector_norm", "any", "all", "argmax", "argmin", "var_mean")
def _reduce(t: Tracer, node: Node) -> Any:
    """Reductions: kept dims pass through (a reduction over channels is invariant to their order)."""
    x = node.args[0]
    xl = t.of(x)
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    if xl is None or not isinstance(first, torch.Tensor):
        return t.fresh(node)
    dims = argument(node, 1, "dim", None)
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) or not isinstance(dims, (list, tuple)):
        dims = list(range(len(xl)))
    dims = {d % len(xl) for d in dims if isinstance(d, int)}
    keep = len(first.shape) == len(xl)
    out = [xl[i] if i not in dims else t.new(1) for i in range(len(xl)) if keep or i not in dims]
    if isinstance(val, (tuple, list)):
        return tuple(out if isinstance(v, torch.Tensor) and len(v.shape) == len(out) else t.fresh(FakeNode(v))
                     for v in val)
    return out


@register_rule("sym_size", "sym_numel", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
               "sym_constrain_range_for_size", "_assert_async", "scalar_tensor", "arange", "empty", "empty_like",
               "rand", "randn", "tensor", "new_empty", "_local_scalar_dense", "item")
def _no_channels(t: Tracer, node: Node) -> Any:
    """Ops that create values (or sizes) from nothing the plan tracks: all fixed."""
    return t.fresh(node)


@register_rule("full", "zeros", "ones", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full")
def _filled(t: Tracer, node: Node) -> Any:
    """A tensor filled with one value: its dims are fixed, but uniform (they take the channels they meet)."""
    out = t.fresh(node, why="a constant filled with one value")
    for d in out or []:
        t.make_uniform(d)
    return out
