"""The package's logging: one ``hf_otfusion`` logger tree, warnings on stderr by default, a level the CLI sets.

Modules log with ``logging.getLogger(__name__)``. As in transformers, the library's root logger has its own stderr
handler (``warning: text``) and does not propagate, so a warning reaches the user of ``fuse`` or the CLI alike;
``set_verbosity`` (the CLI's ``--quiet`` / ``-v``) changes what else is shown.

Example:
    >>> import logging
    >>> from hf_otfusion.log import set_verbosity
    >>> set_verbosity(logging.ERROR)  # only errors
    >>> set_verbosity(logging.WARNING)  # the default
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Generic, TypeVar

T = TypeVar("T")

ROOT = "hf_otfusion"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def _root() -> logging.Logger:
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``), under the package's root logger."""
    _root()
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Show the package's log records at ``level`` and above (``logging.WARNING`` by default)."""
    _root().setLevel(level)


def verbosity_of(quiet: bool, verbose: int) -> int:
    """The CLI's level: ``--quiet`` warnings only, default information too, ``-v`` debugging records too.

    Warnings are never hidden: a plan that leaves channels fixed or an option that falls back must reach the user."""
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose > 0 else logging.INFO


_root()  # installed on import: a module using logging.getLogger(__name__) reports the same way


class Recorder(Generic[T]):
    """What a step of a fusion found (a verdict, a descent's objective), collected inside ``with recorder.recording()``
    for a caller that reports it (the merge command's card); outside a block, :meth:`record` keeps nothing."""

    def __init__(self, name: str) -> None:
        self._found: ContextVar[list[T] | None] = ContextVar(name, default=None)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[T]]:
        found: list[T] = []
        token = self._found.set(found)
        try:
            yield found
        finally:
            self._found.reset(token)

    def record(self, item: T) -> None:
        found = self._found.get()
        if found is not None:
            found.append(item)
