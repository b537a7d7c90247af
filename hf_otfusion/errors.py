"""The exceptions a user sees: one per kind of problem, each with a message naming it."""

from __future__ import annotations


class FusionError(ValueError):
    """A fusion that cannot work as asked (mismatched models, bad options, NaN weights, ...)."""


class PlanError(FusionError):
    """A model that cannot be traced into an alignment plan, or a plan that does not fit a model."""


class ConfigError(FusionError):
    """A merge configuration that is missing, not YAML, or has a bad field (the message names it)."""


class SourceError(FusionError):
    """A model reference that cannot be parsed, found, loaded or saved."""


class CheckpointError(FusionError):
    """A checkpoint that cannot be found, read or written as asked; the message names the file, tensor and problem."""


class DataError(FusionError):
    """A dataset that cannot be found, loaded or used as asked; the message names the dataset, split or column."""


class MergeError(FusionError):
    """A merge that cannot run as asked (output folder in the way, parents of different libraries, ...)."""


class OutputError(FusionError):
    """An output folder that cannot be written as asked (it holds other files, it is not writable, no room)."""


class PushError(FusionError):
    """A push to the Hub that failed: a missing folder, bad credentials, an unknown repo or revision, no network."""


class TokenizerMismatchError(FusionError):
    """Parents whose tokenizers differ, with no ``tokenizer_source`` in the config to say which one to keep."""


class UntrustedInputError(FusionError):
    """Data a public app does not read (a path, a builder name, file paths in an image column); says why."""


class DemoError(FusionError):
    """Input the demo refuses (a limit, a local path in a Space, an unknown example); the message says why."""


class DemoTimeout(DemoError):
    """A fusion stopped because it ran past the demo's time limit."""
