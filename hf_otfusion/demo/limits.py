"""What one demo fusion may use and how the demo refuses: the limits, its errors, the report/check callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DemoError, DemoTimeout  # noqa: F401 - re-exported for the demo's modules

Report = Callable[[float, str], None]
Check = Callable[[str], None]



@dataclass(frozen=True)
class DemoLimits:
    """What one fusion in the demo may use; a public Space keeps the defaults or lowers them."""

    max_models: int = 4
    max_params: int = 30_000_000  # values in a model's weights (parameters and buffers)
    max_calibration_samples: int = 1000
    max_eval_samples: int = 1000
    max_interpolation_points: int = 11
    max_dataset_mb: float = 500.0  # download size of a Hub dataset, when the Hub says it
    max_download_mb: float = 200.0  # the files downloaded for one Hub model (weights, config, tokenizer...)
    timeout_s: float = 300.0
    max_queue: int = 16  # waiting fusions; more are turned away by gradio's queue

    def __post_init__(self) -> None:
        for name in ("max_models", "max_params", "max_calibration_samples", "max_eval_samples",
                     "max_interpolation_points", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DemoError(f"DemoLimits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_models < 2:
            raise DemoError("DemoLimits.max_models must be at least 2 (a fusion needs two models)")
        if self.max_interpolation_points < 3:
            raise DemoError("DemoLimits.max_interpolation_points must be at least 3")
        if not self.timeout_s > 0 or not self.max_dataset_mb > 0 or not self.max_download_mb > 0:
            raise DemoError("DemoLimits.timeout_s, max_dataset_mb and max_download_mb must be positive")
