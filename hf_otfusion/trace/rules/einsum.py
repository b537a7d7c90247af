"""``einsum``: dims named by the same letter are the same entries, so their labels join (a letter kept in the output
is an elementwise product there, a contracted one a sum of products, which any permutation applied to every
operand alike keeps); the output's dims take their letter's label. Dims of size 1 broadcast and join nothing; an
ellipsis stands for the same trailing dims in every operand (aligned from the right, as broadcasting aligns them).
Mamba-2's chunked scan (transformers' ``torch_forward``) contracts its states and heads this way.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..api import Desc, Tracer, register_rule, shape_of


def _letters(term: str, ndim: int) -> list[str] | None:
    """One name per dim of an operand: letters, an ellipsis expanded to numbered names aligned from the right."""
    if "..." not in term:
        return list(term) if len(term) == ndim else None
    head, tail = term.split("...")
    n = ndim - len(head) - len(tail)
    return None if n < 0 else [*head, *(f"#{n - k}" for k in range(n)), *tail]


@register_rule("einsum")
def _einsum(t: Tracer, node: Node) -> Any:
    equation, operands = node.args[0], node.args[1]
    dst = shape_of(node)
    out = t.fresh(node)
    if not isinstance(equation, str) or not isinstance(operands, (list, tuple)) or dst is None or out is None:
        return t.unknown(node, "einsum")
    equation = equation.replace(" ", "")
    inputs, _, result = equation.partition("->")
    terms = inputs.split(",")
    if "->" not in equation or len(terms) != len(operands):
        return t.unknown(node, "einsum")  # implicit output (sorted letters): rare, left to the generic refusal
    labels: dict[str, Desc] = {}
    for term, x in zip(terms, operands, strict=True):
        xl, shape = t.of(x), shape_of(x)
        names = None if xl is None or shape is None else _letters(term, len(xl))
        if names is None:
            return t.unknown(node, "einsum")
        for name, d, size in zip(names, xl, shape, strict=True):
            if size == 1:
                continue
            if name in labels:
                t.join(labels[name], d)
                labels[name] = t.within_side(labels[name], d)
            else:
                labels[name] = d
    names = _letters(result, len(dst))
    if names is None:
        return t.unknown(node, "einsum")
    for k, name in enumerate(names):
        if name in labels and dst[k] != 1:
            out[k] = labels[name]
    return out
