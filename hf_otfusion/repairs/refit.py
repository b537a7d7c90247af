"""Closed-form layer refit: a layer-wise distillation of the parents into the fused model, with no gradient step.

After alignment and averaging, the fused model's linear and convolution layers are re-solved in forward order. For a
layer with weight ``W`` (a convolution through its unfolded input patches, each group of a grouped or depthwise
convolution on its own), let ``X`` be its inputs on unlabelled calibration data *as the fused model computes them*
(so every layer refitted before it counts) and ``Y`` the target: the weighted mean of the parents' outputs of the
same layer, each parent run on its own inputs and its outputs carried into the fused model's channels (the
coupling's barycentric map: a permutation for equal widths, a transport-weighted mean of neurons otherwise). The
layer becomes the ridge solution

    W = (Y Xᵀ + λ W₀) (X Xᵀ + λ I)⁻¹,    λ = alpha · mean diag(X Xᵀ),

with an unregularised bias column when the layer has a bias. ``W₀`` (``prior="fused"``, the default) is the layer
as fusion left it, so directions the calibration data does not reach keep the averaged weights and a model refitted
onto its own outputs comes back exactly; ``prior="zero"`` is the plain ridge ``Y Xᵀ (X Xᵀ + λ I)⁻¹``.

With ``target="stream"`` a layer whose output is added straight onto a value of an earlier level (a residual
block's last layer: a transformer's attention output and MLP down projections, a ResNet block's last conv + BN) is
fitted onto the residual stream instead: ``Y`` is the parents' mean of the add's output, less the fused model's own
value of the other operand, so each block also corrects the error the fused stream has gathered before it.

A linear or convolution whose only user is a BatchNorm (eval mode, running statistics) is fitted together with it,
as one affine map onto the norm's output, and folded back: the weights take the fitted map, the BatchNorm's running
statistics become the refitted layer's own mean and variance on the calibration data and its weight and bias undo
the normalisation (so a later ``reset_bn`` or a fine-tune in training mode sees consistent statistics). The
architecture and the state_dict keys are unchanged. A LayerNorm or GroupNorm normalises each sample, which no affine
map folds: the layer before it is fitted onto its own output and the norm is left as it is. A BatchNorm not fed by
a single layer (after a residual add, on the input) is refitted on its own, as a per-channel affine map (a
depthwise 1x1 layer) onto the parents' mean output, with running statistics set to its input's on the fused model;
one without an affine weight and bias only gets its running statistics recomputed.

``X Xᵀ`` and ``Y Xᵀ`` are accumulated chunk by chunk in float64: memory grows with the layers' channels (and, per
chunk, with ``chunk`` inputs), never with the number of calibration samples. Layers whose inputs do not depend on
each other (the branches of a residual block, the query, key and value projections) are solved from one pass.

It uses unlabelled inputs and the parents' own outputs: no labels and no gradient. RegMean (Jin et al., "Dataless
Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) solves the same normal equations with the
parents' own input Gram matrices, ``W = (Σ wᵢ Wᵢ Xᵢ Xᵢᵀ)(Σ wᵢ Xᵢ Xᵢᵀ)⁻¹``: ``inputs="parents"`` computes that
(ridge-regularised) for comparison.

Layout: ``_refit_units`` (what to refit, read from the exported graph), ``_refit_passes`` (calibration chunks
through the graph, :mod:`hf_otfusion.graph`'s runner, a layer's inputs and outputs as rows), ``_refit_solve`` (the
normal equations, the ridge solution and its fold into the state) and this module (:func:`refit_model`, which runs
them level by level, and the registered repair ``refit``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.export import ExportedProgram

from ..distributed import all_reduce, shard, sum_numbers
from ..errors import FusionError
from ..graph import Runner, to_device
from ..plan import AlignmentPlan
from ..registry import REPAIRS, Unit
from ..trace import build_plan, export_model
from ._common import State, parent_weights, run_device, shapes, state_of
from ._refit_passes import Held, carried, chunks, collect, hold, input_rows, output_rows
from ._refit_solve import Normal, current_map, solve, write
from ._refit_units import F64, FitUnit, find_units, node_depths

Prior = Literal["fused", "zero"]
Inputs = Literal["fused", "parents"]
Target = Literal["layer", "stream"]
REFIT_ALPHA = 1e-3  # ridge strength relative to the Gram matrix's mean diagonal (measured: docs/results/refit.md)
REFIT_CHUNK = 64  # inputs per forward pass: the unfolded patches of one chunk are held at a time
REFIT_HOLD = 2 << 30  # bytes of held values (all models, all chunks) up to which the passes are held, not re-run


# ----------------------------------------------------------------------------------------------------------
# The refit


@dataclass
class _Parent:
    runner: Runner
    state: State
    weight: float
    coupling: Mapping[str, torch.Tensor] | None
    units: dict[str, FitUnit]  # by weight name


def _target_node(unit: FitUnit, streamed: bool) -> str:
    """The node whose value a parent's unit gives the target from: its residual add's output when streamed."""
    return unit.stream[0] if streamed and unit.stream is not None else unit.out


def refit_model(
    fused: nn.Module,
    parents: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    calibration: Any,
    *,
    weights: Sequence[float] | None = None,
    couplings: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    alpha: float = REFIT_ALPHA,
    prior: Prior = "fused",
    inputs: Inputs = "fused",
    target: Target = "layer",
    chunk: int = REFIT_CHUNK,
    device: str | torch.device | None = None,
    plan: AlignmentPlan | None = None,
    example_input: Any = None,
    exported: ExportedProgram | None = None,
) -> nn.Module:
    """A copy of ``fused`` whose linear and convolution layers are refitted, in forward order, by ridge least squares
    onto the weighted mean of the parents' outputs of the same layer (see the module docstring).

    Args:
        fused: the fused model (architecture, widths and state_dict keys are kept).
        parents: without ``couplings``, the parents aligned to the fused model's channels (modules or state dicts of
            the fused model's shapes). With ``couplings``, the parents as they are (modules; widths may differ).
        calibration: unlabelled inputs: a tensor, or an iterable of input batches or of (input, label) batches (the
            labels are ignored).
        weights: one non-negative weight per parent (default equal), normalised.
        couplings: per parent, the OT coupling of every space (``{space: (parent channels, fused channels)}``) or
            None for a parent already in the fused model's channels (the target). A parent's outputs are computed by
            the parent itself and carried to the fused channels by the coupling's barycentric map.
        alpha: ridge strength, relative to the mean diagonal of each layer's input Gram matrix.
        prior: ``"fused"``: shrink towards the layer as fused (exact on a model refitted onto itself); ``"zero"``:
            plain ridge.
        inputs: ``"fused"`` (the refit: each layer's inputs as the fused model computes them) or ``"parents"``
            (RegMean: each parent's own inputs and Gram matrix; needs parents in the fused model's shapes).
        target: ``"layer"`` (each layer onto the parents' mean output of that layer) or ``"stream"`` (a layer added
            straight onto a residual stream onto the parents' mean stream after the add, less the fused model's own
            stream before it; RegMean, ``inputs="parents"``, always fits the layer).
        chunk: inputs per forward pass (memory holds one chunk's unfolded patches).
        device: where the passes run (default: the fused model's device).
        plan: the fused model's alignment plan, needed with ``couplings`` (traced when omitted).
        example_input: a batch to trace the models with (default: the first calibration batch).
        exported: an exported program of a model of the fused model's architecture and shapes (skips that export).

    Example:
        >>> refitted = refit_model(fused, [aligned_a, aligned_b], calibration=x_train[:1000])  # doctest: +SKIP
    """
    if calibration is None:
        raise FusionError("repair='refit' needs calibration data")
    if len(parents) < 1:
        raise FusionError("refit needs the parents")
    if couplings is not None and len(couplings) != len(parents):
        raise FusionError(f"refit: got {len(couplings)} couplings for {len(parents)} parents")
    if prior not in ("fused", "zero"):
        raise FusionError(f"unknown refit prior {prior!r}: choose fused or zero")
    if inputs not in ("fused", "parents"):
        raise FusionError(f"unknown refit inputs {inputs!r}: choose fused or parents")
    if target not in ("layer", "stream"):
        raise FusionError(f"unknown refit target {target!r}: choose layer or stream")
    if not alpha >= 0 or not math.isfinite(alpha):
        raise FusionError(f"refit needs alpha >= 0, got {alpha}")
    if chunk < 1:
        raise FusionError(f"refit needs chunk >= 1, got {chunk}")
    w = parent_weights(weights, len(parents))
    dev = run_device(fused, device)
    if example_input is None:
        example_input = next(iter(chunks(calibration, chunk, True)), None)
        if example_input is None:
            raise FusionError("the calibration data is empty")
    model = copy.deepcopy(fused).to(dev).eval()
    ep = exported if exported is not None else export_model(model, to_device(example_input, dev))
    state = state_of(model, dev)
    units, resets = find_units(ep)
    program = Runner(ep, None, dev, state=state)
    if couplings is not None and any(c is not None for c in couplings) and plan is None:
        plan = build_plan(model, example_input, exported=ep)

    members: list[_Parent] = []
    for i, (wi, parent) in enumerate(zip(w, parents, strict=True)):
        if wi == 0:
            continue
        coupling = couplings[i] if couplings is not None else None
        p_state = state_of(parent, dev)
        same = shapes(p_state) == shapes(state)
        if coupling is None and not same:
            bad = next((k for k in state if k not in p_state or p_state[k].shape != state[k].shape), "?")
            raise FusionError(f"refit: parent {i} does not have the fused model's shapes (tensor {bad!r}): pass the "
                              "parents aligned to the fused model, or their couplings")
        if inputs == "parents" and coupling is not None:
            raise FusionError("refit with inputs='parents' (RegMean) needs the parents aligned to the fused model "
                              "(no couplings)")
        if same:
            p_ep, p_units = ep, units
        else:
            if not isinstance(parent, nn.Module):
                raise FusionError(f"refit: parent {i} has other widths, so it must be the model itself (a module)")
            p_ep = export_model(copy.deepcopy(parent).to(dev).eval(), to_device(example_input, dev))
            p_units = find_units(p_ep)[0]
        members.append(_Parent(Runner(p_ep, None, dev, state=p_state), p_state, wi, coupling,
                               {u.weight: u for u in p_units}))
        for unit in units:
            if unit.weight not in members[-1].units:
                raise FusionError(f"refit: parent {i} has no layer with weight {unit.weight!r}")
    splittable = program.static_batch is None and all(p.runner.static_batch is None for p in members)

    levels = sorted({u.level for u in units} | {r.level for r in resets})
    todos = {level: [u for u in units if u.level == level] for level in levels}
    streams = {level: {u.node for u in todos[level] if target == "stream" and inputs == "fused"
                       and u.stream is not None and all(p.units[u.weight].stream is not None for p in members)}
               for level in levels}
    wanted_f: dict[int, set[str]] = {}
    wanted_p: list[dict[int, set[str]]] = [{} for _ in members]
    for level in levels:
        todo, streamed = todos[level], streams[level]
        wanted_f[level] = {r.source for r in resets if r.level == level}
        if inputs == "fused":
            wanted_f[level] |= {u.source for u in todo} | {u.stream[1] for u in todo if u.node in streamed}
        for p, wp in zip(members, wanted_p, strict=True):
            wp[level] = {_target_node(p.units[u.weight], u.node in streamed) for u in todo}
            if inputs == "parents":
                wp[level] |= {p.units[u.weight].source for u in todo}
    held = hold(calibration, chunk, splittable, [program] + [p.runner for p in members], REFIT_HOLD)
    if held is not None:  # every graph runs once: each chunk's values are kept from one level to the next
        depth = node_depths(ep, units, resets)
        lanes = [Held(program, held, wanted_f, depth)] + [
            Held(p.runner, held, wp, None) for p, wp in zip(members, wanted_p, strict=True)]

    def run(k: int, c: int, batch: Any, level: int) -> dict[str, Any]:
        """Model ``k``'s (0: the fused model, then the members) values wanted at ``level`` on chunk ``c``."""
        if held is not None:
            return lanes[k].values(c, level)
        runner = program if k == 0 else members[k - 1].runner
        return collect(runner, batch, wanted_f[level] if k == 0 else wanted_p[k - 1][level])

    for level in levels:
        todo, streamed = todos[level], streams[level]
        stats = [r for r in resets if r.level == level]
        normals: dict[str, Normal] = {}
        for unit in todo:
            shape = state[unit.weight].shape
            out = shape[unit.out_axis]
            d_in = (shape[0] if unit.kind == "addmm" else int(math.prod(shape[1:]))) + (1 if unit.affine else 0)
            normals[unit.node] = Normal(torch.zeros(unit.groups, d_in, d_in, dtype=F64, device=dev),
                                         torch.zeros(unit.groups, out // unit.groups, d_in, dtype=F64, device=dev))
        sums = {r.node: [torch.zeros(state[r.mean].shape[0], dtype=F64, device=dev)] * 2 + [0] for r in stats}
        seen = 0
        for c, batch in enumerate(held if held is not None else shard(chunks(calibration, chunk, splittable))):
            seen += 1
            values = run(0, c, batch, level)
            for r in stats:
                rows = values[r.source].movedim(1, -1).reshape(-1, values[r.source].shape[1]).to(F64)
                s, sq, n = sums[r.node]
                sums[r.node] = [s + rows.sum(0), sq + (rows * rows).sum(0), n + rows.shape[0]]
            wanted_out: dict[str, torch.Tensor] = {}
            for k, p in enumerate(members, 1):
                got = run(k, c, batch, level)
                for unit in todo:
                    pu = p.units[unit.weight]
                    y = output_rows(pu, got[_target_node(pu, unit.node in streamed)])
                    if p.coupling is not None:
                        y = carried(y, plan, unit.weight, unit.out_axis, state[unit.weight].shape[unit.out_axis],
                                   p.coupling)
                    if inputs == "parents":
                        x = input_rows(unit, got[pu.source], state[unit.weight].shape)
                        normals[unit.node].add(x, y, p.weight)
                    else:
                        wanted_out[unit.node] = wanted_out.get(unit.node, 0) + p.weight * y
            if inputs == "fused":
                for unit in todo:
                    x = input_rows(unit, values[unit.source], state[unit.weight].shape)
                    if unit.node in streamed:  # the stream after the add, less what the fused model adds to it
                        wanted_out[unit.node] = wanted_out[unit.node] - output_rows(unit, values[unit.stream[1]])
                    normals[unit.node].add(x, wanted_out[unit.node])
        if sum_numbers(seen)[0] == 0:
            raise FusionError("the calibration data is empty")
        for unit in todo:  # a distributed run: every process's sums
            normals[unit.node].reduce()
        for r in stats:
            s, sq, n = sums[r.node]
            sums[r.node] = [all_reduce(s), all_reduce(sq), sum_numbers(n)[0]]
        for unit in todo:
            prior_map = current_map(unit, state) if prior == "fused" else None
            fit = solve(normals[unit.node], prior_map, alpha, unit.affine)
            write(unit, state, fit, normals[unit.node])
        for r in stats:
            s, sq, n = sums[r.node]
            mean = s / max(n, 1)
            state[r.mean] = mean.to(state[r.mean].dtype)
            state[r.var] = (sq / max(n, 1) - mean * mean).clamp_min(0).to(state[r.var].dtype)
    model.load_state_dict({k: v for k, v in state.items()})
    if plan is not None:
        for alias, name in plan.aliases.items():  # tied tensors stay tied
            model.state_dict()[alias].copy_(state[name])
    return model.train().eval()  # train() drops weight-derived caches (see fuse)


class RefitParameters(BaseModel):
    """The options of the closed-form refit (see :func:`refit_model`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(REFIT_ALPHA, ge=0.0, allow_inf_nan=False,
                         description="ridge strength, relative to the mean diagonal of each layer's input Gram matrix")
    prior: Prior = Field("fused", description="what the ridge shrinks towards: the fused weights or zero")
    target: Target = Field("layer", description="fit each layer's own output (layer) or, for a layer added onto a "
                           "residual stream, the parents' mean stream after the add (stream)")


def refit_repair(fused: nn.Module, parents: Sequence[nn.Module], calibration: Any, *, weights: list[float],
                 couplings: Any, device: torch.device, plan: AlignmentPlan, example_input: Any,
                 exported: ExportedProgram | None, params: BaseModel) -> nn.Module:
    """The registered repair: :func:`refit_model` with ``params`` (a :class:`RefitParameters`)."""
    if not isinstance(params, RefitParameters):
        params = RefitParameters.model_validate(params.model_dump() if isinstance(params, BaseModel) else params)
    return refit_model(fused, parents, calibration, weights=weights, couplings=couplings, alpha=params.alpha,
                       prior=params.prior, target=params.target, device=device, plan=plan,
                       example_input=example_input, exported=exported)


REFIT = REPAIRS.register(Unit(
    name="refit",
    description="every linear and conv layer re-solved in forward order by ridge least squares so that, on the "
    "unlabelled calibration inputs as the fused model computes them, it reproduces the mean of its parents' outputs; "
    "a layer-wise closed-form distillation: no labels, no gradient step",
    fn=refit_repair,
    reference="docs/results/refit.md; the same normal equations as RegMean (Jin et al., Dataless Knowledge Fusion by "
              "Merging Weights of Language Models, ICLR 2023), on the fused model's own inputs",
    needs=frozenset({"calibration", "couplings"}),
    parameters=RefitParameters,
))
