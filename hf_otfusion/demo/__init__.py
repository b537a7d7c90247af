"""The gradio demo (``hf-otfusion demo``; a Hugging Face Space runs it with ``space_mode=True``).

The logic (limits, checks, the fusion and its explanations) lives in :mod:`hf_otfusion.demo.core` and needs no
gradio; ``build_app`` and ``launch`` import gradio when first used (``pip install 'hf-otfusion[demo]'``).

Example:
    >>> from hf_otfusion.demo import DemoLimits, build_app
    >>> demo = build_app(limits=DemoLimits(timeout_s=120))  # doctest: +SKIP
    >>> demo.launch()                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .core import DemoError, DemoLimits, DemoTimeout, FusionRequest, run_demo_fusion

__all__ = ["DemoError", "DemoLimits", "DemoTimeout", "FusionRequest", "build_app", "launch", "run_demo_fusion"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "launch", "in_space"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
