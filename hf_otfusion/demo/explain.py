"""The demo's explanations: the aligned pair with its transport maps, and the vanilla vs aligned interpolation path."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import FusionParameters
from ..evaluate import accuracy, language_model_kind, loss
from ..plan import AlignmentPlan
from ..repairs import reset_norm_stats
from ..sources import LoadedModel, example_input
from .limits import Check, DemoError

# ----------------------------------------------------------------------------------------------------------
# Explanations: the aligned pair, the interpolation path


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def align_pair(
    target: LoadedModel,
    other: LoadedModel,
    plan: AlignmentPlan,
    options: FusionParameters | None = None,
    *,
    calibration: Any = None,
    example: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``other``'s state transported onto ``target``'s channels, and the transport map of each space.

    The same steps as ``fuse`` takes for one model (``hf_otfusion.engine.align``), kept apart so the demo can show
    them: averaging ``(1 - w)·target + w·aligned`` is the fused model of the pair. ``options``: the fusion options
    (default: every default), as for ``fuse``.
    """
    from ..activations import activation_statistics
    from ..engine import align
    from ..graph import Runner
    from ..trace import build_plan, export_model

    example = example_input(target) if example is None else example  # text: a calibration batch's length
    same_shapes = {k: tuple(v.shape) for k, v in other.model.state_dict().items()} == plan.tensors
    plan_o = plan if same_shapes else build_plan(other.model, example)
    options = options if options is not None else FusionParameters()
    costs = None
    if options.alignment == "activations":
        if calibration is None:
            raise DemoError("activations alignment needs calibration data")
        device = torch.device("cpu")
        exported = export_model(target.model, example)  # one graph serves both when the shapes are equal (as in fuse)
        runners = [Runner(exported, target.model, device),
                   Runner(exported if same_shapes else export_model(other.model, example), other.model, device)]
        costs = activation_statistics(runners, [plan, plan_o], 0, calibration, progress=False)[0][1]
    state, couplings = align(_state(other.model), plan_o, _state(target.model), plan, options, costs=costs)
    for alias, name in plan.aliases.items():
        state[alias] = state[name]
    return state, couplings


@dataclass(frozen=True)
class InterpolationCurve:
    """Accuracy (0-1) of a classifier, or token loss of a language model, at points ``t`` of the straight path from
    model A (t=0) to model B (t=1)."""

    t: tuple[float, ...]
    aligned: tuple[float, ...]
    vanilla: tuple[float, ...] | None  # None when B's shapes differ from A's (no vanilla path exists)
    norms_recomputed: bool = False  # BatchNorm statistics recomputed at each point
    metric: str = "accuracy"  # or "loss" (language models: the mean next-token or masked-token cross-entropy)

    def at(self, t: float, which: str = "aligned") -> float:
        values = self.aligned if which == "aligned" else self.vanilla
        if values is None:
            raise ValueError("no vanilla path")
        return values[min(range(len(self.t)), key=lambda i: abs(self.t[i] - t))]


def _interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: torch.lerp(v, b[k].to(v.dtype), t) if v.is_floating_point() else v for k, v in a.items()}


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    aligned_b: dict[str, torch.Tensor],
    data: Any,
    points: int = 7,
    *,
    norm_data: Any = None,
    check: Check | None = None,
    report: Callable[[int, int], None] | None = None,
) -> InterpolationCurve:
    """Accuracy (a language model: token loss) along ``(1-t)·A + t·B`` (vanilla) and ``(1-t)·A + t·aligned(B)`` at
    ``points`` values of t.

    ``data``: ``(x, y)`` tensors or a list of ``(input, label)`` batches (iterated once per point and path).
    ``norm_data``: inputs (or ``(input, label)`` batches) on which each interpolated model's BatchNorm running
    statistics are recomputed before it is evaluated (``hf_otfusion.repairs.reset_norm_stats``, the ``reset_bn``
    repair), as interpolation studies do; None keeps the interpolated statistics.
    """
    if points < 2:
        raise DemoError("an interpolation path needs at least 2 points")
    ts = tuple(i / (points - 1) for i in range(points))
    metric = "loss" if language_model_kind(model_a) is not None else "accuracy"
    measure = loss if metric == "loss" else accuracy
    state_a, state_b = _state(model_a), _state(model_b)
    vanilla_ok = all(k in state_b and state_b[k].shape == v.shape for k, v in state_a.items())
    work = copy.deepcopy(model_a).cpu().eval()
    paths = [("aligned", aligned_b)] + ([("vanilla", state_b)] if vanilla_ok else [])
    total = len(ts) * len(paths) - (len(paths) - 1)  # t=0 is model A on both paths
    out: dict[str, list[float]] = {name: [] for name, _ in paths}
    done = 0
    for name, end in paths:
        for i, t in enumerate(ts):
            if check is not None:
                check(f"evaluating the {name} path at t={t:.2f}")
            if i == 0 and name != "aligned":
                out[name].append(out["aligned"][0])
                continue
            work.load_state_dict(_interpolate(state_a, end, t))
            model = reset_norm_stats(work, norm_data) if norm_data is not None else work
            out[name].append(measure(model, data))
            done += 1
            if report is not None:
                report(done, total)
    return InterpolationCurve(t=ts, aligned=tuple(out["aligned"]),
                              vanilla=tuple(out["vanilla"]) if vanilla_ok else None,
                              norms_recomputed=norm_data is not None and has_batchnorm(model_a), metric=metric)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def default_space(couplings: dict[str, torch.Tensor]) -> str | None:
    """The space whose map the demo shows first: the first with 8 to 256 channels, else the first one."""
    names = list(couplings)
    return next((n for n in names if 8 <= couplings[n].shape[1] <= 256), names[0] if names else None)
