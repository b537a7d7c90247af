"""Tracer rules, one module per op family. Importing this package registers every rule.

A new architecture is a new rule: write ``@register_rule("op_name")`` on a function ``(tracer, node) -> labels``
in the module of its family (or in your own code), using only :mod:`hf_otfusion.trace.api`; the core and the
fusion engine never need to change.
"""

from . import (  # noqa: F401
    attention,
    einsum,
    experts,
    gather,
    linear,
    norms,
    pointwise,
    repeat,
    resample,
    roll,
    scatter,
    shape,
)
