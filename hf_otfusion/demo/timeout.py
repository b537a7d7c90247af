"""A demo job with a time limit: the fusion runs in a worker thread, one at a time, and is stopped past its deadline."""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .limits import Check, DemoTimeout, Report

# ----------------------------------------------------------------------------------------------------------
# A job with a time limit


_JOB_LOCK = threading.Lock()  # one fusion computes at a time, including one that is being stopped


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Ask ``thread`` to raise ``exc_type`` at its next Python instruction (CPython's async exception)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def run_with_timeout(
    work: Callable[[Report, Check], Any],
    timeout_s: float,
    *,
    on_progress: Report | None = None,
    grace_s: float = 5.0,
) -> Any:
    """Run ``work(report, check)`` in a worker thread and return its result, or raise ``DemoTimeout``.

    ``work`` calls ``check(stage)`` between steps; past the deadline that raises ``DemoTimeout`` inside the worker,
    which unwinds cleanly (temporary folders are removed by their own ``finally`` blocks). A step that does not
    return in time is interrupted with an asynchronous ``DemoTimeout`` at its next Python instruction; the caller
    gets the message at the deadline either way, and the next job waits (at most ``grace_s`` extra) for this one.
    """
    messages: queue.Queue = queue.Queue()
    cancel = threading.Event()
    deadline = time.monotonic() + timeout_s

    def message(stage: str) -> str:
        return (f"the fusion took longer than this demo's limit of {timeout_s:g} s and was stopped (while {stage}); "
                "try smaller models or fewer samples")

    def check(stage: str) -> None:
        if cancel.is_set() or time.monotonic() > deadline:
            raise DemoTimeout(message(stage))

    def report(fraction: float, text: str) -> None:
        messages.put(("progress", (fraction, text)))

    def target() -> None:
        try:
            if not _JOB_LOCK.acquire(timeout=max(0.0, deadline - time.monotonic()) + grace_s):
                raise DemoTimeout(message("waiting for the previous fusion to stop"))
            try:
                check("starting")
                messages.put(("done", work(report, check)))
            finally:
                _JOB_LOCK.release()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            messages.put(("error", err))

    worker = threading.Thread(target=target, name="hf-otfusion-demo-fusion", daemon=True)
    worker.start()
    stage = "starting"
    while True:
        remaining = deadline - time.monotonic()
        try:
            kind, payload = messages.get(timeout=max(remaining, 0.0) + 0.05)
        except queue.Empty:
            cancel.set()
            _raise_in_thread(worker, DemoTimeout)
            raise DemoTimeout(message(stage)) from None
        if kind == "progress":
            stage = payload[1]
            if on_progress is not None:
                on_progress(*payload)
        elif kind == "error":
            if isinstance(payload, DemoTimeout) and not str(payload):
                raise DemoTimeout(message(stage)) from None
            raise payload
        else:
            return payload
