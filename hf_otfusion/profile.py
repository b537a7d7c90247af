"""Where the time of a fusion goes: named phases (load, trace, activations, cost, solve, transport, write, ...).

Code marks its work with :func:`timed`; nothing is recorded unless a :func:`profiling` block is active. Phases
nest and their times are exclusive (reading a tensor while computing a cost counts as ``load``, not ``cost``),
so the phases of a run add up to its profiled wall time. On CUDA the device is synchronised at each phase
boundary while profiling, so kernel time lands in the phase that launched it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

_current: ContextVar[Profile | None] = ContextVar("hf_otfusion_profile", default=None)


@dataclass
class Profile:
    """Seconds and call counts per phase, and the seconds each space of the plan took to solve."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    spaces: dict[str, float] = field(default_factory=dict)
    _stack: list[list] = field(default_factory=list, repr=False)

    def _now(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = self._now()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            yield
        finally:
            now = self._now()
            _, start = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + now - start
            if self._stack:
                self._stack[-1][1] = now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, slowest: int = 5) -> str:
        """A markdown table of the phases (and the ``slowest`` spaces), largest first."""
        lines = ["| phase | seconds | share | calls |", "|---|---:|---:|---:|"]
        total = self.total or 1.0
        for name, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {secs:.3f} | {100 * secs / total:.1f}% | {self.calls.get(name, 0)} |")
        lines.append(f"| **total** | **{self.total:.3f}** | | |")
        if self.spaces and slowest:
            lines += ["", "| slowest spaces | seconds |", "|---|---:|"]
            for name, secs in sorted(self.spaces.items(), key=lambda kv: -kv[1])[:slowest]:
                lines.append(f"| {name} | {secs:.3f} |")
        return "\n".join(lines)


@contextlib.contextmanager
def profiling() -> Iterator[Profile]:
    """Record the phases of everything run inside the block.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import fuse
        >>> from hf_otfusion.profile import profiling
        >>> models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
        >>> with profiling() as prof:
        ...     fused = fuse(models, example_input=torch.randn(2, 4), progress=False)
        >>> {"cost", "solve"} <= set(prof.seconds)
        True
    """
    profile = Profile()
    token = _current.set(profile)
    try:
        with profile.phase("other"):
            yield profile
    finally:
        _current.reset(token)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Count the block as phase ``name`` of the active profile (a no-op when none is active)."""
    profile = _current.get()
    if profile is None:
        yield
        return
    with profile.phase(name):
        yield


def record_space(name: str, seconds: float) -> None:
    """Note the time one space took (all models), when a profile is active."""
    profile = _current.get()
    if profile is not None:
        profile.spaces[name] = profile.spaces.get(name, 0.0) + seconds
