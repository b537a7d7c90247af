"""Derive an :class:`AlignmentPlan` from a model by exporting one forward pass.

Every dimension of every value in the exported ATen graph gets a label; op rules join labels with union-find
(a linear layer joins its weight's input axis with its input's channel axis, a residual add joins both
streams, ...). Labels can be *composite*: a concat is a sequence of segments and a flatten after a conv is a
channel-major repeat. Graph inputs, outputs and every axis that is not a channel (batch, space, tokens) are
fixed. Each class of labels that holds a parameter axis and is not fixed becomes a space.

An op without a rule fixes every label it touches (a fixed space is never wrong, only less aligned) and is
reported in ``plan.unhandled``; ``strict=True`` turns that into an error. New ops get a rule with
:func:`register_rule` (every trace) or ``build_plan(..., rules={...})`` (one trace); the fusion engine never needs to
know about them. :mod:`.api` is what a rule may use, with a worked example.

Layout: :mod:`.labels` (label types, the union-find over atoms, shape helpers), :mod:`.export` (``torch.export``),
:mod:`.ops` (the label operations of a rule, methods of the tracer), :mod:`.core` (the rule registry, the graph
walk, the plan), :mod:`.api` (the names rules import) and :mod:`.rules` (one module per op family; rules import
:mod:`.api` only, and the core never imports them).
"""

from ..errors import PlanError
from .core import RULES, STACK_RULES, Rule, Tracer, build_plan, register_rule, register_stack_rule
from .expand import expanded_plan
from .export import as_args, export_model, tied_tensors
from .labels import Desc, Labels, Piece

__all__ = [
    "RULES",
    "STACK_RULES",
    "Desc",
    "Labels",
    "PlanError",
    "Piece",
    "Rule",
    "Tracer",
    "as_args",
    "build_plan",
    "expanded_plan",
    "export_model",
    "register_rule",
    "register_stack_rule",
    "tied_tensors",
]

from . import rules  # noqa: E402, F401  (registers every rule; the rules import the core, so this comes last)
