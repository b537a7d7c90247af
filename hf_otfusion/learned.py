"""Learned alignment (``fuse(..., alignment="learned")``): the maps beyond permutations trained on calibration data
against the parents' ensemble, every model weight frozen.

After the weights alignment (permutations, the orthogonal stream maps of ``residual="orthogonal"``, the maps inside
heads of ``head_maps="orthogonal"``), each other model's continuous maps get a trainable correction in their own
symmetry class, so that every carried model keeps its function at every step:

- a stream that takes orthogonal maps: ``exp(A - A^T)`` (an orthogonal ``n x n`` map, identity at the start; through
  LayerNorm, ``A`` projected on the complement of the all-ones vector first, so that the map keeps it);
- a head space that takes an orthogonal map per head: ``exp(B_h - B_h^T)`` per head (one for every head of a shared
  space); where a check shows that the heads take any invertible map (values and the output projection),
  ``exp(B_h)`` on one of the two layers and its inverse transpose ``exp(-B_h^T)`` on the other;
- a rotary head space: an angle per head and channel pair;
- a hidden space whose channels take a scale (an MLP's units: :mod:`hf_otfusion.scales`): ``exp(s)`` per channel.

The fused model is the weighted average of the target and the carried models, with the weights jittered by up to
±20% at each step (so the maps suit the average and its neighbourhood, as the interpolation weight drawn from
U(0.4, 0.6) of Theus et al., "Generalized Linear Mode Connectivity for Transformers", NeurIPS 2025); the loss is
``KL(ensemble || fused)`` of the output distributions on the calibration batches (no labels), minimised by Adam on
the corrections only. Memory: the models, one fused copy and its activations for one batch, and the maps.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import iter_batches
from .errors import FusionError
from .evaluate import logits_of
from .folding import mapped
from .head_maps import HeadMap, HeadMaps, rotations
from .log import get_logger
from .plan import AlignmentPlan, Space
from .scales import ChannelScale, scaled

State = dict[str, torch.Tensor]
log = get_logger(__name__)


def _skew_exp(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_exp(a - a.transpose(-1, -2))


class _Maps(nn.Module):
    """One model's trainable corrections: a matrix per space, identity at the start."""

    def __init__(self, streams: Sequence[Space], heads: Sequence[HeadMap], scales: Sequence[ChannelScale] = (),
                 invertible: Mapping[str, frozenset[str]] | None = None, centred: frozenset[str] = frozenset()):
        super().__init__()
        self.streams, self.heads, self.scales = list(streams), list(heads), list(scales)
        self.invertible = dict(invertible or {})
        self.centring = {s.name: torch.eye(s.size) - 1.0 / s.size for s in self.streams if s.name in centred}
        self.scale_params = nn.ParameterList([nn.Parameter(torch.zeros(c.space.size)) for c in scales])
        self.stream_params = nn.ParameterList([nn.Parameter(torch.zeros(s.size, s.size)) for s in streams])
        self.head_params = nn.ParameterList()
        for hm in heads:
            n = 1 if hm.space.shared else hm.space.heads
            d = hm.space.head_dim
            shape = (n, d, d) if hm.pairing is None else (n, d // 2)
            self.head_params.append(nn.Parameter(torch.zeros(shape)))

    def matrices(self) -> list[tuple[Space, torch.Tensor, torch.Tensor | None]]:
        """Each space's map, and the inverse transpose that its layers in ``invertible`` take (None: the same map)."""
        out: list[tuple[Space, torch.Tensor, torch.Tensor | None]] = []
        for s, a in zip(self.streams, self.stream_params, strict=True):
            if s.name in self.centring:  # a stream read through LayerNorm: exp(P K P) keeps the all-ones vector
                p = self.centring[s.name].to(a)
                a = p @ a @ p
            out.append((s, _skew_exp(a), None))
        for hm, p in zip(self.heads, self.head_params, strict=True):
            inverse_t = None
            if hm.space.name in self.invertible:  # exp(B), whose inverse transpose is exp(-B^T)
                blocks = list(torch.linalg.matrix_exp(p))
                inverse_t = list(torch.linalg.matrix_exp(-p.transpose(-1, -2)))
            elif hm.pairing is None:
                blocks = list(_skew_exp(p))
            else:
                blocks = [rotations(hm.pairs(), angle.cos(), angle.sin(), hm.space.head_dim) for angle in p]
            if hm.space.shared:
                blocks = blocks * hm.space.heads
                inverse_t = inverse_t * hm.space.heads if inverse_t is not None else None
            out.append((hm.space, torch.block_diag(*blocks),
                        torch.block_diag(*inverse_t) if inverse_t is not None else None))
        return out


def _carried(state: Mapping[str, torch.Tensor], maps: _Maps, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for space, matrix, inverse_t in maps.matrices():
        out = mapped(out, space, matrix, maps.invertible.get(space.name, frozenset()), inverse_t)
    for scale, logs in zip(maps.scales, maps.scale_params, strict=True):
        out = scaled(out, scale, logs)
    for alias, name in aliases.items():  # tied tensors stay tied
        if alias in out:
            out[alias] = out[name]
    return out


def _kl(ensemble: torch.Tensor, logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Mean KL(ensemble || fused) over the output positions (padding left out where the batch has a mask)."""
    log_q = torch.log_softmax(logits.float(), -1)
    kl = (ensemble * (ensemble.clamp_min(1e-30).log() - log_q)).sum(-1)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and mask.shape == kl.shape:
        return (kl * mask).sum() / mask.sum().clamp_min(1)
    return kl.mean()


def _call(model: nn.Module, batch: Any, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else ((batch,), {})
    if state is None:
        return logits_of(model(*args, **kwargs))
    return logits_of(torch.func.functional_call(model, dict(state), args, kwargs))


def learn_maps(target_model: nn.Module, parents: Sequence[nn.Module], states: Sequence[State], target: int,
               plan: AlignmentPlan, dense: frozenset[str], inner: HeadMaps | None, calibration: Any, *,
               weights: Sequence[float], steps: int, lr: float, device: torch.device, progress: bool = True,
               seed: int = 0, scales: Sequence[ChannelScale] = (),
               invertible: Mapping[str, frozenset[str]] | None = None, centred: frozenset[str] = frozenset(),
               ) -> tuple[list[State], list[float]]:
    """Each model's aligned ``states`` carried further by corrections of its maps trained on ``calibration``
    (see the module docstring); returns the carried states and the loss at each step. ``parents``: the models as
    given (their ensemble is the target of the training); ``plan``: the target's plan without folded gains;
    ``scales``: hidden spaces whose channels also take a learned scale (:mod:`hf_otfusion.scales`); ``invertible``:
    head spaces whose heads take any invertible map (:func:`~hf_otfusion.head_maps.find_invertible`), learned as
    ``exp(B)`` per head instead of an orthogonal block."""
    streams = [plan.space(name) for name in sorted(dense)]
    heads = list(inner.maps) if inner is not None else []
    if not streams and not heads:
        raise FusionError("alignment='learned' trains the maps beyond permutations, and this model has none (with "
                          "residual='orthogonal' / head_maps='orthogonal'; plan --maps says which spaces take them)")
    batches = list(iter_batches(calibration))
    if not batches:
        raise FusionError("alignment='learned' needs calibration data")
    frozen = [{k: v.detach().to(device) for k, v in s.items()} for s in states]
    maps = {k: _Maps(streams, heads, scales, invertible, centred).to(device) for k in range(len(states)) if k != target}
    params = [p for m in maps.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    work = target_model.to(device).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="learning maps", disable=not progress, leave=False)
    order = itertools.cycle(batches)
    for _ in bar:
        batch = _to(next(order), device)
        with torch.no_grad():
            probs = sum(w * _call(p, batch).float().softmax(-1) for w, p in zip(weights, parents, strict=True))
        jitter = torch.tensor(weights, dtype=torch.float64) * (1 + 0.4 * (torch.rand(len(weights), generator=gen) - .5))
        w = (jitter / jitter.sum()).tolist()
        carried = [frozen[k] if k == target else _carried(frozen[k], maps[k], plan.aliases) for k in range(len(states))]
        fused = {name: sum(w[k] * carried[k][name] for k in range(len(states))) if value.is_floating_point()
                 else value for name, value in frozen[target].items() if name not in plan.aliases}  # tied: one key
        loss = _kl(probs, _call(work, batch, fused), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"KL {losses[-1]:.4f}", refresh=False)
    log.info("alignment='learned': KL(ensemble || fused) %.4f at the first step, %.4f at the last (%d steps)",
             losses[0], losses[-1], len(losses))
    with torch.no_grad():
        out = [frozen[k] if k == target else _carried(frozen[k], maps[k], plan.aliases) for k in range(len(states))]
    return out, losses


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch
