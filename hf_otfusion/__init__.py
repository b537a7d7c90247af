"""hf-otfusion: model fusion via optimal transport (Singh & Jaggi, NeurIPS 2020) for the Hugging Face stack."""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .config import FusionParameters, MergeConfig, load_config  # noqa: E402
from .engine import align  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    DemoError,
    DemoTimeout,
    FusionError,
    MergeError,
    OutputError,
    PlanError,
    PushError,
    SourceError,
    TokenizerMismatchError,
    UntrustedInputError,
)
from .fuse import ensemble, fuse, random_permutation, vanilla_average  # noqa: E402
from .merge import merge  # noqa: E402
from .plan import AlignmentPlan, AxisRef, Space  # noqa: E402
from .repairs import repair_model, reset_norm_stats  # noqa: E402
from .streaming import fuse_checkpoints  # noqa: E402
from .trace import build_plan, register_rule  # noqa: E402
from .train import finetune  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AlignmentPlan",
    "AxisRef",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DemoError",
    "DemoTimeout",
    "FusionError",
    "FusionParameters",
    "MergeConfig",
    "MergeError",
    "OutputError",
    "PlanError",
    "PushError",
    "SourceError",
    "Space",
    "TokenizerMismatchError",
    "UntrustedInputError",
    "align",
    "build_plan",
    "ensemble",
    "finetune",
    "fuse",
    "fuse_checkpoints",
    "load_config",
    "merge",
    "random_permutation",
    "register_rule",
    "repair_model",
    "reset_norm_stats",
    "vanilla_average",
]
