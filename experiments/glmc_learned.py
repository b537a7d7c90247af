"""Learned alignment of the causal LM (issue 28, item 5): the data-free maps of ``experiments.glmc`` trained by
gradient on the calibration text against the parents' ensemble, the model weights frozen.

The idea is that of Theus et al. (generalized linear mode connectivity for transformers, NeurIPS 2025,
arXiv 2506.22712); the code is this project's own. On the norm-folded parents of ``python -m experiments glmc``:

- **Initial maps**: the best data-free variant of ``experiments.glmc`` (orthogonal stream map, head and MLP
  matching with signs, V/O orthogonal maps per key/value group, Q/K rotation and scale per rotary pair).
- **Parametrisation that stays in the symmetry class** (``LearnedMaps``): the stream map ``q = q0 exp(A - A^T)``;
  per group the value map ``exp(S - S^T) M0`` and its scale ``c0 exp(t)``; per group and rotary pair the rotation
  ``R(phi) R0`` and the scale ``s0 exp(u)``; per MLP neuron the factor ``sign0 exp(v)`` of its up row (its down
  column divided by it). The permutations stay those of the weight matching. A second learned row lets the value
  maps be any of positive determinant (``exp(S) M0``, the output projection carried by the inverse), the class the
  function admits. Every value of the parameters gives
  maps under which the carried ``b`` computes ``b``'s function exactly; all parameters start at zero (the
  data-free maps).
- **Training**: the fused weights ``(1 - lam) W_a + lam carry(W_b, maps)`` are computed differentiably (float64
  maps, the forward in the model's float32) and run with ``torch.func.functional_call`` on ``a``'s module; ``lam``
  is drawn from U(0.4, 0.6) per step. Loss: KL(ensemble || fused) of the next-token distributions on a batch of
  calibration sequences, the ensemble being the mean of the two parents' probabilities (no labels). Adam on the
  map parameters only, a fixed number of steps.
- **Then** the fused model at ``lam = 0.5`` (the plain average of ``a`` and the carried ``b``), and the library's
  closed-form refit on top (``hf_otfusion.repairs.refit_model``, layer and stream targets).

Writes docs/results/glmc_learned.md (with the learning-rate sweep on seed 0 that fixed ``LR``):

    python -m experiments glmc-learned --cache /tmp/tx/cache --threads 1
    python -m experiments glmc-learned --tiny --out /tmp/g     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hf_otfusion import ensemble, vanilla_average
from hf_otfusion.repairs import refit_model

from . import glmc
from . import transformer as tx
from .harness import ROOT, context
from .stream import fold_norms

STEPS = 500
LR = 1e-2  # fixed by the sweep on seed 0 (lowest calibration KL; the table in docs/results/glmc_learned.md)
BATCH = 32
LAM = (0.4, 0.6)
SWEEP = (1e-3, 3e-3, 1e-2, 3e-2)
# the learned rows: name -> value maps of any positive determinant (else orthogonal)
LEARNED = {"learned maps": False, "learned maps, V/O invertible": True}


def skew(a: torch.Tensor) -> torch.Tensor:
    """``a - a^T`` over the last two axes."""
    return a - a.transpose(-1, -2)


def rotation(phi: torch.Tensor) -> torch.Tensor:
    """[..., 2, 2] the 2-D rotations by the angles ``phi``."""
    c, s = phi.cos(), phi.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


class LearnedLayer(nn.Module):
    """One decoder layer's trainable map parameters (all zero: the initial maps); the value maps orthogonal
    (``exp(S - S^T) M0``) or, with ``invertible``, any map of positive determinant (``exp(S) M0``)."""

    def __init__(self, init: glmc.LayerMaps, invertible: bool = False) -> None:
        super().__init__()
        self.init = init
        self.invertible = invertible
        self.vo = nn.Parameter(torch.zeros_like(init.vo))
        self.vo_log = nn.Parameter(torch.zeros_like(init.vo_scale))
        self.qk_angle = nn.Parameter(torch.zeros_like(init.qk_scale))
        self.qk_log = nn.Parameter(torch.zeros_like(init.qk_scale))
        self.mlp_log = nn.Parameter(torch.zeros_like(init.signs))

    def maps(self) -> glmc.LayerMaps:
        m = self.init
        return glmc.LayerMaps(m.groups, m.heads, m.neurons, m.signs * self.mlp_log.exp(),
                              torch.linalg.matrix_exp(self.vo if self.invertible else skew(self.vo)) @ m.vo,
                              m.vo_scale * self.vo_log.exp(),
                              rotation(self.qk_angle) @ m.qk, m.qk_scale * self.qk_log.exp())


class LearnedMaps(nn.Module):
    """The maps carrying ``b`` into ``a``'s basis as functions of trainable parameters around ``init``: every value
    of the parameters stays in the symmetry class (orthogonal, rotations, positive scales; permutations fixed)."""

    def __init__(self, init: glmc.Maps, invertible: bool = False) -> None:
        super().__init__()
        self.q0 = init.q
        self.stream = nn.Parameter(torch.zeros_like(init.q))
        self.layers = nn.ModuleList(LearnedLayer(lm, invertible) for lm in init.layers)

    def maps(self) -> glmc.Maps:
        return glmc.Maps(self.q0 @ torch.linalg.matrix_exp(skew(self.stream)), [lay.maps() for lay in self.layers])

    def detached(self) -> glmc.Maps:
        """The current maps as plain tensors."""
        with torch.no_grad():
            return self.maps()


@dataclass
class Trained:
    """A training run's result: the maps, the KL at lam = 0.5 on the calibration set before and after, seconds."""

    maps: glmc.Maps
    kl_before: float
    kl_after: float
    seconds: float


class Objective:
    """KL(ensemble || fused) on calibration sequences, the fused weights computed from ``LearnedMaps``."""

    def __init__(self, a: nn.Module, b: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> None:
        self.module = copy.deepcopy(a).requires_grad_(False).eval()
        self.wa, self.wb = glmc.weights_of(a), glmc.weights_of(b)
        self.shape = glmc.shape_of(a)
        self.dtype = next(a.parameters()).dtype
        self.ids, self.target = ids, target  # target: the ensemble's log-probabilities [n, length, vocab]

    def fused(self, maps: glmc.Maps, lam: float) -> dict[str, torch.Tensor]:
        carried = glmc.carried_weights(self.wb, maps, self.shape)
        return {k: ((1 - lam) * self.wa[k] + lam * v).to(self.dtype) for k, v in carried.items()}

    def kl(self, weights: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The mean per-token KL(ensemble || fused) over the calibration sequences ``rows``."""
        logits = functional_call(self.module, weights, (), {"input_ids": self.ids[rows]}).logits
        target = self.target[rows]
        logp = F.log_softmax(logits.float(), -1)
        return (target.exp() * (target - logp)).sum(-1).mean()

    def full_kl(self, maps: glmc.Maps, lam: float = 0.5, chunk: int = 50) -> float:
        with torch.no_grad():
            weights = self.fused(maps, lam)
            n = len(self.ids)
            return sum(self.kl(weights, torch.arange(i, min(n, i + chunk))).item() * min(chunk, n - i)
                       for i in range(0, n, chunk)) / n


def ensemble_logp(a: nn.Module, b: nn.Module, ids: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    """log of the mean of the two parents' next-token probabilities, [n, length, vocab]."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            x = ids[i:i + chunk]
            lp = torch.stack([F.log_softmax(m(input_ids=x).logits.float(), -1) for m in (a, b)])
            out.append(torch.logsumexp(lp, 0) - math.log(2))
    return torch.cat(out)


def train(objective: Objective, init: glmc.Maps, steps: int, lr: float, batch: int = BATCH, seed: int = 0,
          invertible: bool = False, label: str = "") -> Trained:
    """Adam on the map parameters for ``steps`` steps, lam ~ U(LAM) and a random batch of sequences per step
    (``invertible``: the value maps any of positive determinant); a progress line on stderr every tenth of the run."""
    params = LearnedMaps(init, invertible)
    opt = torch.optim.Adam(params.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(objective.ids)
    started = time.perf_counter()
    before = objective.full_kl(init)
    every = max(1, steps // 10)
    for step in range(steps):
        lam = LAM[0] + (LAM[1] - LAM[0]) * torch.rand((), generator=gen, dtype=torch.float64).item()
        rows = torch.randperm(n, generator=gen)[:batch]
        loss = objective.kl(objective.fused(params.maps(), lam), rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            print(f"[{label}step {step + 1}/{steps}: KL {loss.item():.4f} at lam {lam:.3f}, "
                  f"{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    maps = params.detached()
    return Trained(maps, before, objective.full_kl(maps), time.perf_counter() - started)


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (those of ``transformers``, plus ``--out``, ``--steps``, ``--lr``,
    ``--sweep``); writes glmc_learned.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--steps", type=int, default=STEPS)
    own.add_argument("--lr", type=float, default=LR)
    own.add_argument("--sweep", type=float, nargs="*", default=list(SWEEP),
                     help="learning rates tried on seed 0 (reported, not used to pick the run's lr)")
    args = tx.lm_options(own, argv)
    ctx = context(args)
    s, tag = tx.lm_of(args)
    steps = min(args.steps, 5) if args.tiny else args.steps
    calib = s.calib["input_ids"]
    started = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    seeds: list[str] = []
    sweep: list[str] = []

    def add(name: str, value: float, seconds: float, ref: tuple[float, float, float]) -> None:
        vanilla, ens, parents = ref
        r = rows.setdefault(name, {"loss": [], "gap": [], "barrier": [], "time": []})
        r["loss"].append(value)
        r["gap"].append((vanilla - value) / (vanilla - ens))
        r["barrier"].append(value - parents)
        r["time"].append(seconds)

    for seed in range(args.seeds):
        a, b = (tx.parent(ctx, s, 100 * seed + i, tag) for i in range(2))
        fa, fb = fold_norms(a), fold_norms(b)
        la, lb = s.score(a), s.score(b)
        ref = (s.score(vanilla_average([a, b])), s.score(ensemble([a, b])), (la + lb) / 2)
        add("parents (mean)", ref[2], 0.0, ref)
        add("vanilla average", ref[0], 0.0, ref)
        add("ensemble", ref[1], 0.0, ref)
        t0 = time.perf_counter()
        init, _ = glmc.align(fa, fb, glmc.VARIANTS[glmc.BEST])
        align_s = time.perf_counter() - t0
        objective = Objective(fa, fb, calib, ensemble_logp(a, b, calib))
        if seed == 0:
            for lr in args.sweep:  # the learned maps with orthogonal value maps
                run = train(objective, init, steps, lr, seed=seed, label=f"sweep lr {lr:g}: ")
                loss = s.score(vanilla_average([fa, glmc.carry(fb, run.maps)]))
                sweep.append(f"| {lr:g} | {run.kl_before:.4f} | {run.kl_after:.4f} | {loss:.3f} | {run.seconds:.0f} |")
        runs = {name: train(objective, init, steps, args.lr, seed=seed, invertible=inv, label=f"seed {seed}, {name}: ")
                for name, inv in LEARNED.items()}
        for name, maps, extra in (("data-free maps (glmc best)", init, 0.0),
                                  *((name, run.maps, run.seconds) for name, run in runs.items())):
            carried = glmc.carry(fb, maps)
            kept = abs(s.score(carried) - lb)
            if kept > 1e-4:
                raise SystemExit(f"{name}: the carried parent does not keep its function (loss moved by {kept:.2e})")
            t1 = time.perf_counter()
            fused = vanilla_average([fa, carried])
            base = align_s + extra + time.perf_counter() - t1
            add(name, s.score(fused), base, ref)
            for suffix, target in (("", "layer"), (", stream target", "stream")):
                t1 = time.perf_counter()
                refitted = refit_model(fused, [fa, carried], s.calib, target=target)
                add(f"{name} + refit{suffix}", s.score(refitted), base + time.perf_counter() - t1, ref)
            if name in runs:
                run = runs[name]
                seeds.append(f"| {seed} | {name} | {align_s:.1f} | {run.seconds:.0f} | {run.kl_before:.4f} | "
                             f"{run.kl_after:.4f} | {kept:.1e} |")
        print(f"[seed {seed}: " + ", ".join(f"{k} {v['loss'][-1]:.3f}" for k, v in rows.items()) + "]",
              file=sys.stderr, flush=True)
    write(args, argv, rows, seeds, sweep, steps, time.perf_counter() - started)


def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def write(args: argparse.Namespace, argv: Sequence[str], rows: dict[str, dict[str, list[float]]], seeds: list[str],
          sweep: list[str], steps: int, seconds: float) -> None:
    """The report: the table, the floor, the per-seed training and the sweep."""
    s, _ = tx.lm_of(args)
    table = ["| model | test loss (nats/token) | loss gap closed (%) | barrier (nats) | fusion time (s) |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {name} | {cell(r['loss'])} | {cell(r['gap'], 100, 1)} | {cell(r['barrier'])} | "
              f"{cell(r['time'], digits=0)} |" for name, r in rows.items()]
    learned = [n for n in rows if n.startswith("learned")]
    best = min(learned, key=lambda n: statistics.fmean(rows[n]["barrier"]))
    barrier = statistics.fmean(rows[best]["barrier"])
    summary = (f"Best learned row: **{best}**, {cell(rows[best]['loss'])} nats, "
               f"{100 * statistics.fmean(rows[best]['gap']):.1f}% of the loss gap, barrier "
               f"{cell(rows[best]['barrier'])} nats. The issue's floor for learned alignment (barrier <= 0.1 nats) is "
               f"stated for a width-256 Llama; on this LM it is "
               + ("met." if barrier <= 0.1 else f"**not met** ({barrier - 0.1:.3f} nats above it)."))
    free = min((n for n in rows if n.startswith("data-free")), key=lambda n: statistics.fmean(rows[n]["loss"]))
    gain = [f - v for f, v in zip(rows[free]["loss"], rows[best]["loss"], strict=True)]
    refit = [[r - v for r, v in zip(rows[f"{n} + refit{t}"]["loss"], rows[n]["loss"], strict=True)]
             for n in LEARNED for t in ("", ", stream target")]
    summary += (f" Against the best data-free row ({free}) the best learned row gains {cell(gain)} nats (per "
                f"seed). The refit on top of a learned row changes its loss by "
                f"{min(map(statistics.fmean, refit)):+.3f} to {max(map(statistics.fmean, refit)):+.3f} nats (mean per "
                "seed)"
                + (": worse, since it fits each layer to the two aligned parents' mean output, not to the ensemble's "
                   "predictions that the maps were trained on." if min(map(statistics.fmean, refit)) > 0 else "."))
    command = " ".join(argv)
    lines = [
        "# Learned alignment of the causal LM: the data-free maps trained on the calibration text, weights frozen",
        "",
        f"Produced by `python -m experiments glmc-learned{' ' + command if command else ''}` in {seconds:.0f} s "
        f"({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); mean ± std over {args.seeds} seed(s), "
        "the parents of `python -m experiments transformers` and `glmc` (same seeds).",
        "",
        s.describe,
        "",
        "Rows: `data-free maps (glmc best)` is the best variant of docs/results/glmc.md (`+ alternation, V/O and Q/K "
        "maps, MLP signs`), recomputed here: the other parent carried by the orthogonal stream map, head and MLP "
        "matching with signs, V/O and Q/K maps found from the weights alone, averaged with the target; `+ refit`: "
        "`hf_otfusion.repairs.refit_model` onto the two aligned parents (`target=\"stream\"`: the layers writing the "
        "stream fitted onto the parents' mean stream). `learned maps`: the same maps as the starting point, then "
        f"trained for {steps} steps of Adam (lr {args.lr:g}, batch {BATCH} of the {len(s.calib['input_ids'])} "
        "calibration sequences) on KL(ensemble || fused) of the next-token distributions, the fused weights "
        f"(1 - lam) W_a + lam carry(W_b, maps) with lam ~ U{LAM} per step, the model weights frozen (see the module's "
        "docstring for the parametrisation: stream map q0 exp(A - A^T), value maps exp(S - S^T) M0 with a log-scale "
        "per group, a rotation angle and log-scale per rotary pair, a log-scale per MLP neuron; permutations fixed); "
        "evaluated at lam = 0.5; `V/O invertible`: the same with the value maps exp(S) M0 (S unconstrained: any "
        "map of positive determinant, the output projection's columns carried by its inverse), the same lr and steps. "
        "Every carried parent keeps its function (checked on every seed: its loss moves by "
        "under 1e-4). Fusion time: the data-free alignment, plus the training for the learned rows, plus the refit "
        "where named (the parents and the ensemble's probabilities are not counted). Loss gap closed = (vanilla "
        "loss - loss) / (vanilla loss - ensemble loss), per seed; barrier = loss - the two parents' mean loss.",
        "",
        *table,
        "",
        summary,
        "",
        "Per seed: seconds of the data-free alignment and of the training, the KL(ensemble || fused) at lam = 0.5 on "
        "the whole calibration set before and after the training, and how far the carried parent's test loss moved "
        "under the learned maps:",
        "",
        "| seed | maps | alignment (s) | training (s) | KL before | KL after | carried b's loss moved |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *seeds,
        "",
        f"Learning-rate sweep on seed 0 ({steps} steps each, same batch and lam draws; the lr of the table, "
        f"{args.lr:g}, was fixed from this sweep by the calibration KL, and is the same for every seed): KL at "
        "lam = 0.5 on the calibration set, and the test loss of the fused model at lam = 0.5 (no refit).",
        "",
        "| lr | KL before | KL after | test loss | training (s) |",
        "|---:|---:|---:|---:|---:|",
        *sweep,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "glmc_learned.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))
