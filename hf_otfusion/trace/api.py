"""What a tracer rule may use: every rule in :mod:`hf_otfusion.trace.rules` imports from here and nowhere else in
the tracer (the union-find of atoms behind the labels stays private to the core).

A rule is a function ``(t, node) -> labels`` registered for ATen op names with :func:`register_rule` (for every
trace) or passed to ``build_plan(..., rules={"op": rule})`` (for one trace). ``t`` is the :class:`Tracer` walking
the exported graph, ``node`` the ``torch.fx`` node of the op. It returns the labels of the op's output: a list of
labels (:data:`Desc`), one per dim, or a tuple of such lists for an op with several outputs.

A label stands for the channels (or positions) a dim holds. The operations a rule needs:

- reading: ``t.of(value)`` the labels of an input value (None for a non-tensor), :func:`argument` an argument of the
  node by position or keyword, :func:`shape_of` a value's static shape (None entries for symbolic sizes);
- new labels: ``t.fresh(node)`` a fixed label per dim of the node's output (positions: batch, tokens, space),
  ``t.new(size, fixed=...)`` one label;
- joining: ``t.join(d1, d2)`` makes two dims the same channels (a weight's input axis with the input's channel dim;
  the two sides of a residual add);
- fixing: ``t.fix(desc, why)``, ``t.fix_all(labels, why)`` leave channels in place, with the reason the plan reports;
  ``t.is_fixed(desc)``, ``t.is_free(labels)``; ``t.unknown(node, name)`` does what an op without a rule does (fix
  every input it touches), ``t.structural(why)`` reports a structure the plan cannot express;
- heads: ``t.head_split(desc, heads, head_dim)`` the (heads, head_dim) labels of a view that splits channels into
  heads, ``t.head_merge(head, within)`` their inverse, ``t.repeat_heads(...)`` grouped-query attention's repeated
  heads, ``t.stack_heads(head, within)`` stacked experts, ``t.within_side``, ``t.is_head_label``, ``t.inside_heads``;
- structure: ``t.expand(desc)`` the label's plain segments, ``t.width(desc)``, ``t.slice_desc(desc, start, end)`` a
  slice of a label, ``t.chunks(desc, n)``, ``t.is_uniform`` / ``t.make_uniform`` (a dim filled with one value);
- what the plan records: ``t.producer(node, out, dim)`` (a weight layer writes these channels: the order spaces
  are solved in, and where activations are read), ``t.consumer(value, dim, desc)`` (a weight layer reads them);
- ``t.context`` names the op being traced, for reasons; :class:`Stack` and :func:`register_stack_rule` handle values
  whose one dim selects between labellings (timm's fused qkv).

Example: a rule for a made-up elementwise op. Without a rule the op fixes the hidden channels it touches (and
``strict=True`` refuses it); with one, its output carries its input's labels and the layer before it is a space:

    >>> import torch
    >>> from torch import nn
    >>> from hf_otfusion.trace import build_plan
    >>> from hf_otfusion.trace.api import argument, register_rule
    >>> @torch.library.custom_op("hf_otfusion_demo::shift", mutates_args=())
    ... def shift(x: torch.Tensor) -> torch.Tensor:
    ...     return x + 1.0
    >>> @shift.register_fake
    ... def _(x):
    ...     return torch.empty_like(x)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.b(shift(self.a(x)))
    >>> net, x = Net(), torch.randn(2, 4)
    >>> plan = build_plan(net, x)
    >>> plan.unhandled, len(plan.spaces)
    (('shift',), 0)
    >>> @register_rule("shift")
    ... def _shift(t, node):
    ...     return t.of(argument(node, 0, "x"))  # elementwise: the output's dims are the input's
    >>> [(s.name, s.size) for s in build_plan(net, x).spaces]
    [('a.weight:0', 8)]

The same rule for one trace only leaves the registered table as it is (here emptied of the example's rule again):

    >>> from hf_otfusion.trace import RULES
    >>> del RULES["shift"]
    >>> [(s.name, s.size) for s in build_plan(net, x, rules={"shift": _shift}).spaces]
    [('a.weight:0', 8)]
    >>> "shift" in RULES
    False
"""

from __future__ import annotations

from .core import (
    CONSTANT,
    INPUT,
    IO_REASONS,
    OUTPUT,
    READS_VALUES,
    TABLE,
    VOCABULARY,
    Rule,
    StackRule,
    Tracer,
    register_rule,
    register_stack_rule,
)
from .labels import Desc, FakeNode, Labels, Piece, Stack, argument, shape_of

__all__ = [
    "CONSTANT",
    "INPUT",
    "IO_REASONS",
    "OUTPUT",
    "READS_VALUES",
    "TABLE",
    "VOCABULARY",
    "Desc",
    "FakeNode",
    "Labels",
    "Piece",
    "Rule",
    "Stack",
    "StackRule",
    "Tracer",
    "argument",
    "register_rule",
    "register_stack_rule",
    "shape_of",
]
