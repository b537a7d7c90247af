"""The exceptions a user sees: one per kind of problem, each with a message naming it."""

from __future__ import annotations


class FusionError(ValueError):
    """A fusion that cannot work as asked (mismatched models, bad options, NaN weights, ...)."""


class PlanError(FusionError):
    """A model that cannot be traced into an alignment plan, or a plan that does not fit a model."""
