"""Data-free alignment of the causal LM's residual stream from the weights (issue 28): an orthogonal stream map found
by Procrustes over the weights, alternated with exact head and MLP matching, then averaged (and refitted).

The idea is that of generalized linear mode connectivity for transformers (Theus et al., NeurIPS 2025,
arXiv 2506.22712); the code is this project's own. On the causal LM of ``python -m experiments transformers`` (a 2-layer
Llama, width 64, same parents and ``--cache``) the other parent ``b`` is carried into the target ``a``'s basis by maps
that keep ``b``'s function exactly:

- **RMSNorm gains folded** into the layers reading each norm (``experiments.stream.fold_norms``), after which any
  orthogonal map ``q`` of the residual stream commutes with the norms.
- **Stream map** ``q`` (``b``'s stream becomes ``h @ q``): orthogonal Procrustes over the weights, with no data. It
  starts from the token embeddings and the LM head (rows paired by token identity); each later round uses every
  matrix touching the stream (embeddings, LM head, query/key/value/gate/up rows as readers, the attention and MLP
  output projections' columns as writers), rows paired by the current head and neuron matching, each matrix scaled by
  1/sqrt(its number of columns).
- **Head matching** given ``q``: key/value groups by an exact assignment, query heads within a group by an exact
  assignment, on the distance between the heads' circuits in the stream basis: the OV circuit ``W_O^h W_V^g`` and the
  QK circuit per rotary frequency pair (``W_Q^T W_K`` and ``W_Q^T J W_K`` over channels ``j, j + d_head/2``), which
  are invariant under the within-head maps below.
- **Within-head maps** (optional): per key/value group an orthogonal map of the value space (``W_V -> M W_V``,
  ``W_O -> W_O M^T`` for each query head of the group), and per group and rotary frequency pair a 2-D rotation and
  scale of the query and key channels (``W_Q -> s R W_Q``, ``W_K -> R W_K / s``), which commutes with the rotary
  embedding; each fitted by Procrustes (and a 1-D fit of the scale) on the weights.
- **MLP matching** given ``q``: an exact assignment of ``b``'s SwiGLU neurons onto ``a``'s on the distance between
  their gate and up rows and down columns in the stream basis, optionally with the sign of each neuron's up row and
  down column (an exact symmetry: ``silu(g) * (-u) * (-d)``).
- **Alternation** of the stream map and the matchings until no head or neuron changes its match (at most
  ``--rounds``), then the average of ``a`` and the carried ``b``; optionally the library's closed-form refit on top
  (``hf_otfusion.repairs.refit_model``).

Writes docs/results/glmc.md:

    python -m experiments glmc --cache /tmp/tx/cache   # 3 seeds, parents shared with `transformers`
    python -m experiments glmc --tiny --out /tmp/g     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.repairs import refit_model

from . import transformer as tx
from .harness import ROOT, context
from .stream import fold_norms

READERS = ("q_proj", "k_proj", "v_proj")


@dataclass
class LayerMaps:
    """The maps of one decoder layer of ``b``: fused index -> ``b``'s index, and the within-head maps."""

    groups: np.ndarray  # key/value group g of the fused model reads b's group groups[g]
    heads: np.ndarray  # query head h of the fused model is b's head heads[h] (within the matched group)
    neurons: np.ndarray  # MLP neuron i of the fused model is b's neuron neurons[i]
    signs: torch.Tensor  # per fused neuron, the factor of its up row (its down column divided by it): +-1, or a scale
    vo: torch.Tensor  # [groups, d_head, d_head] invertible (here orthogonal) maps of the value spaces
    vo_scale: torch.Tensor  # [groups] the value rows multiplied by it, the output columns divided by it
    qk: torch.Tensor  # [groups, d_head / 2, 2, 2] rotation-and-scale per rotary frequency pair (the query's)
    qk_scale: torch.Tensor  # [groups, d_head / 2] the scale s (the query is multiplied by s, the key divided by it)


@dataclass
class Maps:
    """Every map carrying ``b`` into ``a``'s basis: the stream map (``b``'s stream becomes ``h @ q``), the layers'."""

    q: torch.Tensor
    layers: list[LayerMaps] = field(default_factory=list)


def shape_of(model: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, key/value groups, head dim, hidden size) of a Llama decoder."""
    c = model.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, d_head, c.hidden_size


def identity_maps(model: nn.Module) -> Maps:
    n_heads, n_groups, d_head, hidden = shape_of(model)
    half = d_head // 2
    layers = []
    for layer in model.model.layers:
        width = layer.mlp.gate_proj.out_features
        layers.append(LayerMaps(np.arange(n_groups), np.arange(n_heads), np.arange(width),
                                torch.ones(width, dtype=torch.float64),
                                torch.eye(d_head, dtype=torch.float64).repeat(n_groups, 1, 1),
                                torch.ones(n_groups, dtype=torch.float64),
                                torch.eye(2, dtype=torch.float64).repeat(n_groups, half, 1, 1),
                                torch.ones(n_groups, half, dtype=torch.float64)))
    return Maps(torch.eye(hidden, dtype=torch.float64), layers)


def pair_index(d_head: int) -> torch.Tensor:
    """[d_head / 2, 2]: the channels of each rotary frequency pair (HF Llama: ``j`` with ``j + d_head / 2``)."""
    half = d_head // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def carried_layer(w: dict[str, torch.Tensor], prefix: str, m: LayerMaps, shape: tuple[int, int, int, int],
                  ) -> dict[str, torch.Tensor]:
    """One layer's matrices of ``b`` after its head and neuron maps (not yet the stream map), by their short names."""
    n_heads, n_groups, d_head, hidden = shape
    rep = n_heads // n_groups
    pairs = pair_index(d_head)
    att, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    wq = w[att + "q_proj.weight"].reshape(n_heads, d_head, hidden)[torch.as_tensor(m.heads)]
    wk = w[att + "k_proj.weight"].reshape(n_groups, d_head, hidden)[torch.as_tensor(m.groups)]
    wv = w[att + "v_proj.weight"].reshape(n_groups, d_head, hidden)[torch.as_tensor(m.groups)]
    wo = w[att + "o_proj.weight"].reshape(hidden, n_heads, d_head)[:, torch.as_tensor(m.heads)]
    # the rotary pairs' rotation and scale: query s R, key R / s
    qk_q = m.qk * m.qk_scale[..., None, None]
    qk_k = m.qk / m.qk_scale[..., None, None]
    wq_p, wk_p = wq[:, pairs], wk[:, pairs]  # [heads, half, 2, hidden]
    group_of = torch.arange(n_heads) // rep
    wq = torch.einsum("hjab,hjbd->hjad", qk_q[group_of], wq_p)
    wk = torch.einsum("gjab,gjbd->gjad", qk_k, wk_p)
    unpair = pairs.T.reshape(-1).argsort()  # back to HF's channel order
    wq = wq.transpose(1, 2).reshape(n_heads, d_head, hidden)[:, unpair]
    wk = wk.transpose(1, 2).reshape(n_groups, d_head, hidden)[:, unpair]
    wv = torch.einsum("gab,gbd->gad", m.vo, wv) * m.vo_scale[:, None, None]
    # W_O M^-1 / c (M^-1 = M^T for the weights alignment's orthogonal maps; experiments.glmc_learned's may be any)
    wo = torch.einsum("dhb,hba->dha", wo, torch.linalg.inv(m.vo)[group_of]) / m.vo_scale[group_of][None, :, None]
    neurons = torch.as_tensor(m.neurons)
    return {
        "q_proj": wq.reshape(n_heads * d_head, hidden), "k_proj": wk.reshape(n_groups * d_head, hidden),
        "v_proj": wv.reshape(n_groups * d_head, hidden), "o_proj": wo.reshape(hidden, n_heads * d_head),
        "gate_proj": w[mlp + "gate_proj.weight"][neurons],
        "up_proj": w[mlp + "up_proj.weight"][neurons] * m.signs[:, None],
        "down_proj": w[mlp + "down_proj.weight"][:, neurons] / m.signs[None],
    }


def carry(model: nn.Module, maps: Maps) -> nn.Module:
    """A copy of a norm-folded Llama decoder ``b`` carried by ``maps`` (it computes the same function)."""
    m = copy.deepcopy(model)
    state = carried_weights(weights_of(model), maps, shape_of(model))
    dtype = next(m.parameters()).dtype
    m.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return m.eval()


def carried_weights(w: dict[str, torch.Tensor], maps: Maps, shape: tuple[int, int, int, int],
                    ) -> dict[str, torch.Tensor]:
    """Every matrix of a norm-folded decoder's weights ``w`` carried by ``maps``, by state-dict key (differentiable in
    the maps' tensors)."""
    q = maps.q
    state = {}
    for i, lm in enumerate(maps.layers):
        prefix = f"model.layers.{i}."
        for name, mat in carried_layer(w, prefix, lm, shape).items():
            where = f"{prefix}{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}.weight"
            state[where] = q.T @ mat if name in ("o_proj", "down_proj") else mat @ q
    state["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] @ q
    state["lm_head.weight"] = w["lm_head.weight"] @ q
    return state


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``q`` minimising ``||source @ q - target||`` (rows are samples)."""
    u, _, vh = torch.linalg.svd(source.T @ target)
    return u @ vh


def stream_map(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], maps: Maps | None,
               shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The orthogonal stream map from the weights: token embeddings and LM head paired by token (``maps`` None), or
    every matrix touching the stream, paired by ``maps``' head and neuron matching; each matrix scaled by
    1/sqrt(its columns)."""
    cross = torch.zeros(shape[3], shape[3], dtype=torch.float64)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        cross += wb[key].T @ wa[key] / wa[key].shape[1]
    if maps is not None:
        for i, lm in enumerate(maps.layers):
            prefix = f"model.layers.{i}."
            carried = carried_layer(wb, prefix, lm, shape)
            ours = carried_layer(wa, prefix, identity_layer(lm, shape), shape)
            for name, mb in carried.items():
                ma = ours[name]
                if name in ("o_proj", "down_proj"):  # writers: q^T W_b ~ W_a, i.e. W_b^T q ~ W_a^T
                    cross += mb @ ma.T / ma.shape[1]
                else:  # readers: W_b q ~ W_a
                    cross += mb.T @ ma / ma.shape[1]
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def identity_layer(lm: LayerMaps, shape: tuple[int, int, int, int]) -> LayerMaps:
    n_heads, n_groups, d_head, _ = shape
    width = len(lm.neurons)
    return LayerMaps(np.arange(n_groups), np.arange(n_heads), np.arange(width), torch.ones(width, dtype=torch.float64),
                     torch.eye(d_head, dtype=torch.float64).repeat(n_groups, 1, 1),
                     torch.ones(n_groups, dtype=torch.float64),
                     torch.eye(2, dtype=torch.float64).repeat(n_groups, d_head // 2, 1, 1),
                     torch.ones(n_groups, d_head // 2, dtype=torch.float64))


def head_circuits(w: dict[str, torch.Tensor], prefix: str, q: torch.Tensor, shape: tuple[int, int, int, int],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head, in the stream basis carried by ``q``: the QK circuit per rotary pair, [heads, half, 2, d, d]
    (``W_Q_j^T W_K_j`` and ``W_Q_j^T J W_K_j``), and the OV circuit ``W_O^h W_V^g``, [heads, d, d]."""
    n_heads, n_groups, d_head, hidden = shape
    rep = n_heads // n_groups
    pairs = pair_index(d_head)
    att = f"{prefix}self_attn."
    wq = (w[att + "q_proj.weight"] @ q).reshape(n_heads, d_head, hidden)[:, pairs]  # [h, half, 2, d]
    wk = (w[att + "k_proj.weight"] @ q).reshape(n_groups, d_head, hidden)[:, pairs]
    wv = (w[att + "v_proj.weight"] @ q).reshape(n_groups, d_head, hidden)
    wo = (q.T @ w[att + "o_proj.weight"]).reshape(hidden, n_heads, d_head)
    group_of = torch.arange(n_heads) // rep
    k = wk[group_of]
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    sym = torch.einsum("hjad,hjae->hjde", wq, k)
    skew = torch.einsum("hjad,ab,hjbe->hjde", wq, j, k)
    ov = torch.einsum("dha,hae->hde", wo, wv[group_of])
    return torch.stack([sym, skew], 2), ov


def match_heads(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], prefix: str, q: torch.Tensor,
                shape: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Groups, then query heads within each group, by exact assignment of the circuit distances."""
    n_heads, n_groups, _, _ = shape
    rep = n_heads // n_groups
    qk_a, ov_a = head_circuits(wa, prefix, torch.eye(q.shape[0], dtype=torch.float64), shape)
    qk_b, ov_b = head_circuits(wb, prefix, q, shape)
    qk_a, qk_b = qk_a.flatten(1), qk_b.flatten(1)
    ov_a, ov_b = ov_a.flatten(1), ov_b.flatten(1)
    cost = (torch.cdist(qk_a, qk_b) ** 2 / qk_a.pow(2).sum(1).mean()
            + torch.cdist(ov_a, ov_b) ** 2 / ov_a.pow(2).sum(1).mean()).numpy()
    group_cost = np.zeros((n_groups, n_groups))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for g in range(n_groups):
        for h in range(n_groups):
            block = cost[g * rep:(g + 1) * rep, h * rep:(h + 1) * rep]
            r, c = linear_sum_assignment(block)
            group_cost[g, h] = block[r, c].sum()
            inner[g, h] = c[np.argsort(r)]
    r, c = linear_sum_assignment(group_cost)
    groups = c[np.argsort(r)]
    heads = np.concatenate([groups[g] * rep + inner[g, groups[g]] for g in range(n_groups)])
    return groups, heads


def fit_vo(wa: dict[str, torch.Tensor], carried: dict[str, torch.Tensor], shape: tuple[int, int, int, int],
           q: torch.Tensor, prefix: str, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the orthogonal map M of the value space best carrying ``b``'s (already matched, stream-mapped)
    value rows and output columns onto ``a``'s, ``M W_V ~ W_V^a``, ``W_O M^T ~ W_O^a``; with ``scale``, then the
    scale c of ``c M W_V``, ``W_O M^T / c``."""
    n_heads, n_groups, d_head, hidden = shape
    rep = n_heads // n_groups
    att = f"{prefix}self_attn."
    va = wa[att + "v_proj.weight"].reshape(n_groups, d_head, hidden) / math.sqrt(hidden)
    vb = (carried["v_proj"] @ q).reshape(n_groups, d_head, hidden) / math.sqrt(hidden)
    width = n_heads * d_head
    oa = wa[att + "o_proj.weight"].reshape(hidden, n_heads, d_head) / math.sqrt(width)
    ob = (q.T @ carried["o_proj"]).reshape(hidden, n_heads, d_head) / math.sqrt(width)
    maps = []
    for g in range(n_groups):
        hs = slice(g * rep, (g + 1) * rep)
        ya = torch.cat([va[g], oa[:, hs].permute(2, 0, 1).reshape(d_head, -1)], 1)  # [d_head, samples]
        yb = torch.cat([vb[g], ob[:, hs].permute(2, 0, 1).reshape(d_head, -1)], 1)
        maps.append(procrustes(yb.T, ya.T).T)  # M yb ~ ya
    maps = torch.stack(maps)
    scales = torch.ones(n_groups, dtype=torch.float64)
    if scale:
        for g in range(n_groups):
            hs = slice(g * rep, (g + 1) * rep)
            v = maps[g] @ vb[g]
            o = torch.einsum("dhb,ab->dha", ob[:, hs], maps[g])
            scales[g] = balance(v.pow(2).sum(), (v * va[g]).sum(), o.pow(2).sum(), (o * oa[:, hs]).sum())
    return maps, scales


def balance(a2: torch.Tensor, b1: torch.Tensor, c2: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
    """The scale s > 0 minimising ``||s x - x_a||^2 + ||y / s - y_a||^2`` given ``a2 = ||x||^2``, ``b1 = <x, x_a>``,
    ``c2 = ||y||^2``, ``e1 = <y, y_a>`` (elementwise over tensors): a grid over log s in [-3, 3], then Newton steps."""
    a2, b1, c2, e1 = (torch.as_tensor(v, dtype=torch.float64)[..., None] for v in (a2, b1, c2, e1))
    grid = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    f = a2 * (2 * grid).exp() - 2 * b1 * grid.exp() + c2 * (-2 * grid).exp() - 2 * e1 * (-grid).exp()
    t = grid[f.argmin(-1)][..., None]
    for _ in range(20):
        d1 = 2 * a2 * (2 * t).exp() - 2 * b1 * t.exp() - 2 * c2 * (-2 * t).exp() + 2 * e1 * (-t).exp()
        d2 = 4 * a2 * (2 * t).exp() - 2 * b1 * t.exp() + 4 * c2 * (-2 * t).exp() - 2 * e1 * (-t).exp()
        t = torch.where(d2 > 0, (t - d1 / d2.clamp_min(1e-300)).clamp(-3.0, 3.0), t)
    return t[..., 0].exp()


def fit_qk(wa: dict[str, torch.Tensor], carried: dict[str, torch.Tensor], shape: tuple[int, int, int, int],
           q: torch.Tensor, prefix: str, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and rotary pair, the rotation R (and the scale s) best carrying ``b``'s matched query rows (``s R``)
    and key rows (``R / s``) onto ``a``'s."""
    n_heads, n_groups, d_head, hidden = shape
    rep = n_heads // n_groups
    pairs = pair_index(d_head)
    att = f"{prefix}self_attn."
    qa = wa[att + "q_proj.weight"].reshape(n_heads, d_head, hidden)[:, pairs]
    ka = wa[att + "k_proj.weight"].reshape(n_groups, d_head, hidden)[:, pairs]
    qb = (carried["q_proj"] @ q).reshape(n_heads, d_head, hidden)[:, pairs]  # already carried by the current qk maps
    kb = (carried["k_proj"] @ q).reshape(n_groups, d_head, hidden)[:, pairs]
    rotations = torch.empty(n_groups, d_head // 2, 2, 2, dtype=torch.float64)
    scales = torch.ones(n_groups, d_head // 2, dtype=torch.float64)
    for g in range(n_groups):
        for j in range(d_head // 2):
            za = torch.cat([ka[g, j], *qa[g * rep:(g + 1) * rep, j]], 1)  # [2, samples]
            zb = torch.cat([kb[g, j], *qb[g * rep:(g + 1) * rep, j]], 1)
            c = za @ zb.T
            phi = math.atan2(c[1, 0] - c[0, 1], c[0, 0] + c[1, 1])
            r = torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)
            rotations[g, j] = r
            if scale:
                rq = torch.cat([r @ x for x in qb[g * rep:(g + 1) * rep, j]], 1)
                tq = torch.cat(list(qa[g * rep:(g + 1) * rep, j]), 1)
                rk = r @ kb[g, j]
                scales[g, j] = balance(rq.pow(2).sum(), (rq * tq).sum(), rk.pow(2).sum(), (rk * ka[g, j]).sum())
    return rotations, scales


def match_mlp(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], prefix: str, q: torch.Tensor,
              signs: bool, scale: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """``b``'s MLP neurons onto ``a``'s by exact assignment of the distances of their gate and up rows and down
    columns in the stream basis (each matrix scaled by 1/sqrt(its columns)); with ``signs``, each pair's cheaper sign
    of the up row and down column; with ``scale``, then each matched neuron's balance of its up row (times c) and
    down column (divided by c)."""
    mlp = f"{prefix}mlp."
    ga, ua, da = (wa[mlp + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    gb, ub, db = (wb[mlp + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    gb, ub, db = gb @ q, ub @ q, q.T @ db
    d, f = ga.shape[1], da.shape[1]
    gate = torch.cdist(ga, gb) ** 2 / d
    plus = torch.cdist(ua, ub) ** 2 / d + torch.cdist(da.T, db.T) ** 2 / f
    minus = torch.cdist(ua, -ub) ** 2 / d + torch.cdist(da.T, -db.T) ** 2 / f
    flip = (minus < plus) if signs else torch.zeros_like(plus, dtype=torch.bool)
    cost = gate + torch.where(flip, minus, plus)
    r, c = linear_sum_assignment(cost.numpy())
    neurons = c[np.argsort(r)]
    sign = torch.where(flip[torch.arange(len(neurons)), torch.as_tensor(neurons)], -1.0, 1.0).double()
    if scale:  # each neuron's up row times c, its down column divided by c
        u, dn = ub[neurons] * sign[:, None], db[:, neurons] * sign[None]
        sign = sign * balance(u.pow(2).sum(1) / d, (u * ua).sum(1) / d, dn.pow(2).sum(0) / f, (dn * da).sum(0) / f)
    return neurons, sign


@dataclass
class Options:
    rounds: int = 15  # 0: the token-paired stream map and one matching pass, no alternation
    vo: bool = False
    qk: bool = False
    qk_scale: bool = False
    vo_scale: bool = False
    signs: bool = False
    mlp_scale: bool = False


def align(a: nn.Module, b: nn.Module, opts: Options) -> tuple[Maps, list[str]]:
    """The maps carrying the norm-folded ``b`` into the norm-folded ``a``'s basis, from the weights alone, and a log
    of the alternation (one line per round)."""
    wa, wb = weights_of(a), weights_of(b)
    shape = shape_of(a)
    maps = identity_maps(a)
    maps.q = stream_map(wa, wb, None, shape)
    log = []
    for rnd in range(max(1, opts.rounds + 1)):
        changed = 0
        for i, lm in enumerate(maps.layers):
            prefix = f"model.layers.{i}."
            groups, heads = match_heads(wa, wb, prefix, maps.q, shape)
            neurons, sign = match_mlp(wa, wb, prefix, maps.q, opts.signs, opts.mlp_scale)
            changed += int((heads != lm.heads).sum() + (neurons != lm.neurons).sum()
                           + (sign.sign() != lm.signs.sign()).sum().item())
            lm.groups, lm.heads, lm.neurons, lm.signs = groups, heads, neurons, sign
            if opts.vo or opts.qk:
                plain = copy.copy(lm)
                ident = identity_layer(lm, shape)
                plain.vo, plain.vo_scale, plain.qk, plain.qk_scale = ident.vo, ident.vo_scale, ident.qk, ident.qk_scale
                carried = carried_layer(wb, prefix, plain, shape)
                if opts.vo:
                    lm.vo, lm.vo_scale = fit_vo(wa, carried, shape, maps.q, prefix, opts.vo_scale)
                if opts.qk:
                    lm.qk, lm.qk_scale = fit_qk(wa, carried, shape, maps.q, prefix, opts.qk_scale)
        log.append(f"round {rnd}: {changed} matches changed")
        if rnd == opts.rounds or (rnd > 0 and changed == 0 and not (opts.vo or opts.qk)):
            break
        previous = maps.q
        maps.q = stream_map(wa, wb, maps, shape)
        if rnd > 0 and changed == 0 and (maps.q - previous).abs().max() < 1e-6:
            break
    return maps, log


def weight_distance(a: nn.Module, b: nn.Module) -> float:
    """The relative distance of two models' matrices: ||a - b|| / sqrt(||a|| ||b||) over every stream matrix."""
    sa, sb = weights_of(a), weights_of(b)
    keys = [k for k in sa if sa[k].dim() == 2]
    diff = sum((sa[k] - sb[k]).pow(2).sum() for k in keys)
    na, nb = sum(sa[k].pow(2).sum() for k in keys), sum(sb[k].pow(2).sum() for k in keys)
    return (diff / (na * nb).sqrt()).sqrt().item()


VARIANTS = {
    "weights Procrustes (embeddings + head), one matching": Options(rounds=0),
    "+ alternation": Options(),
    "+ alternation, Q/K rotary maps": Options(qk=True, qk_scale=True),
    "+ alternation, V/O and Q/K maps": Options(vo=True, qk=True, qk_scale=True),
    "+ alternation, V/O and Q/K maps, MLP signs": Options(vo=True, qk=True, qk_scale=True, signs=True),
}
BEST = "+ alternation, V/O and Q/K maps, MLP signs"
SINKHORN = dict(alignment="weights", solver="sinkhorn", reg=tx.SINKHORN_REG, repair="refit")


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (those of ``transformers``, plus ``--out``); writes glmc.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = tx.lm_options(own, argv)
    ctx = context(args)
    s, tag = tx.lm_of(args)
    kw = dict(calibration=s.calib, example_input=s.example, progress=False)
    started = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    notes: list[str] = []

    def add(name: str, value: float, vanilla: float, ens: float, parents: float) -> None:
        r = rows.setdefault(name, {"loss": [], "gap": [], "barrier": []})
        r["loss"].append(value)
        r["gap"].append((vanilla - value) / (vanilla - ens))
        r["barrier"].append(value - parents)

    for seed in range(args.seeds):
        a, b = (tx.parent(ctx, s, 100 * seed + i, tag) for i in range(2))
        fa, fb = fold_norms(a), fold_norms(b)
        la, lb = s.score(a), s.score(b)
        parents = (la + lb) / 2
        vanilla, ens = s.score(vanilla_average([a, b])), s.score(ensemble([a, b]))
        result = {"parents (mean)": parents, "vanilla average": vanilla, "ensemble": ens}
        result["OT (activations)"] = s.score(fuse([a, b], alignment="activations", **kw))
        result["OT (activations) + refit"] = s.score(fuse([a, b], alignment="activations", repair="refit", **kw))
        result[f"{tx.SINKHORN} + refit"] = s.score(fuse([a, b], **SINKHORN, **kw))
        for name, opts in VARIANTS.items():
            t0 = time.perf_counter()
            maps, log = align(fa, fb, opts)
            seconds = time.perf_counter() - t0
            carried = carry(fb, maps)
            kept = abs(s.score(carried) - lb)
            if kept > 1e-4:
                raise SystemExit(f"{name}: the carried parent does not keep its function (loss moved by {kept:.2e})")
            fused = vanilla_average([fa, carried])
            result[name] = s.score(fused)
            result[f"{name} + refit"] = s.score(refit_model(fused, [fa, carried], s.calib))
            if name == BEST:
                result[f"{name} + refit, stream target"] = s.score(refit_model(fused, [fa, carried], s.calib,
                                                                               target="stream"))
            notes.append(f"seed {seed}, {name}: {len(log)} round(s) ({log[-1]}), {seconds:.1f} s, weight distance "
                         f"{weight_distance(fa, fb):.3f} -> {weight_distance(fa, carried):.3f}")
            print(f"[{notes[-1]}]", file=sys.stderr, flush=True)
        for name, value in result.items():
            add(name, value, vanilla, ens, parents)
        print(f"[seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()) + "]", file=sys.stderr,
              flush=True)

    def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"

    table = ["| model | test loss (nats/token) | loss gap closed (%) | barrier (nats) |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {cell(r['loss'])} | {cell(r['gap'], 100, 1)} | {cell(r['barrier'])} |"
              for name, r in rows.items()]
    floor = 0.80
    best = max(rows, key=lambda n: statistics.fmean(rows[n]["gap"]) if n not in ("parents (mean)", "ensemble")
               else -1.0)
    gap = statistics.fmean(rows[best]["gap"])
    summary = (f"Best fused model: **{best}**, {cell(rows[best]['loss'])} nats, {100 * gap:.1f}% of the loss gap, "
               f"barrier {cell(rows[best]['barrier'])} nats. Floor (>= {floor:.0%} of the loss gap, mean of "
               f"{args.seeds} seed(s), no gradient step): " + ("met." if gap >= floor else
                                                               f"**not met**, {100 * (floor - gap):.1f} points short."))
    command = " ".join(argv)
    lines = [
        "# Data-free alignment of the causal LM's residual stream from the weights",
        "",
        f"Produced by `python -m experiments glmc{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); "
        f"mean ± std over {args.seeds} seed(s), the parents of `python -m experiments transformers` (same seeds).",
        "",
        s.describe,
        "",
        "Rows: the vanilla average; the library's OT fusion with activations alignment, without and with the "
        f"closed-form refit (`repair=\"refit\"`), and `{tx.SINKHORN} + refit`, the best of "
        "docs/results/transformers.md; then the data-free weights alignment of this script (see its docstring): both "
        "parents' RMSNorm gains folded into their readers; the orthogonal stream map by Procrustes over the token "
        "embeddings and LM head rows (paired by token) with one pass of head matching (key/value groups, then query "
        "heads, exact assignment of the distances between the heads' OV circuits and per-rotary-pair QK circuits) "
        "and MLP matching (exact assignment on the gate/up rows and down columns); `+ alternation`: the stream map "
        "re-solved over every matrix touching the stream (each scaled by 1/sqrt(its columns)) and the matchings "
        f"redone, until no match changes (at most {Options().rounds} rounds); `Q/K rotary maps`: per key/value group "
        "and rotary frequency pair (channels j, j + d_head/2) a 2-D rotation and scale of the query and key rows, "
        "which commutes with the rotary embedding; `V/O`: per group an orthogonal map of the value space (value rows "
        "and the output projection's columns); `MLP signs`: each matched neuron's up row and down column negated "
        "together where that is closer. Every carried parent keeps its function (checked on every seed: its loss "
        "moves by under 1e-4). `+ refit`: `hf_otfusion.repairs.refit_model` of the average onto the two aligned "
        "parents (`target=\"stream\"`: the layers writing the stream fitted onto the parents' mean stream). No labels, "
        "no gradient step; only the rows with OT (activations) and the refits read the calibration text, the weights "
        "alignment reads none. Loss gap closed = (vanilla loss - loss) / (vanilla loss - ensemble loss), per seed; "
        "barrier = loss - the two parents' mean loss.",
        "",
        *table,
        "",
        summary,
        "",
        "The alternation per seed and variant (rounds, seconds of the weights alignment, the relative distance "
        "||W_a - W_b|| / sqrt(||W_a|| ||W_b||) over every matrix before and after carrying b):",
        "",
        *[f"- {n}" for n in notes],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "glmc.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))

