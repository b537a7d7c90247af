"""Every fusion method on wider language models (issue 28 item 6): a width-256, 4-layer Llama (GQA, rotary) and a
GPT-2-style LM (LayerNorm, learned positions, tied embeddings), trained on the same stdlib text as the width-64 Llama
of ``python -m experiments transformers`` (``experiments.transformer``: ``--lm-model``, same data, same scoring).

Per model and seed: the parents, their vanilla average and ensemble, the library's fusions (activations alignment,
with and without the closed-form refit; weights alignment, exact and Sinkhorn, with the refit), on the Llama the
data-free weights alignment of ``experiments.glmc`` (its best variant, with the refit onto the stream), and, where the
library offers it, ``residual="orthogonal"`` with and without the refit. Writes docs/results/lm_widths.md:

    python -m experiments lm-widths --cache /tmp/tx/cache --threads 1            # 3 seeds, both models
    python -m experiments lm-widths --tiny --seeds 1 --out /tmp/w                 # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.repairs import refit_model

from . import glmc
from . import transformer as tx
from .harness import ROOT, Ctx, context
from .stream import fold_norms

MODELS = ("llama256", "gpt2")
FLOORS = {"llama256": 0.85}  # the floor on the mean loss-gap closure, no gradient step on any weight
FIXED = ("parents (mean)", "vanilla average", "ensemble")
GLMC = f"GLMC weights alignment ({glmc.BEST.removeprefix('+ ')}) + refit, stream target"
ORTHOGONAL = "OT (weights, residual orthogonal, 15 sweeps)"
CHECK_SECONDS: list[float] = []  # seconds spent checking a carried parent, taken out of the fusion time


def step_seconds(s: tx.Setting, batch: int = 32, steps: int = 4) -> float:
    """Seconds per training step of a fresh model of ``s`` (AdamW, ``batch`` sequences of 128 bytes), the mean of
    ``steps`` steps after one warm-up step."""
    torch.manual_seed(0)
    model = s.build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = s.calib["input_ids"][:batch]
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def folding_report(lines: list[str]) -> Iterator[None]:
    """The library's report of which streams took an orthogonal map (``hf_otfusion.folding``'s log: info and
    warnings) appended to ``lines``, each message once."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message not in lines:
                lines.append(message)

    logger = logging.getLogger("hf_otfusion.folding")
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def glmc_fusion(a: nn.Module, b: nn.Module, calib: object, notes: list[str],
                score: Callable[[nn.Module], float]) -> nn.Module:
    """``experiments.glmc``'s best data-free alignment of ``b`` onto ``a`` (both norm-folded), averaged, then refitted
    onto the stream; the alternation's log and how far the carried ``b``'s ``score`` moved go to ``notes``."""
    fa, fb = fold_norms(a), fold_norms(b)
    maps, log = glmc.align(fa, fb, glmc.VARIANTS[glmc.BEST])
    carried = glmc.carry(fb, maps)
    start = time.perf_counter()
    moved = abs(score(carried) - score(b))
    CHECK_SECONDS.append(time.perf_counter() - start)  # the check is not part of the fusion's time
    notes.append(f"{len(log)} round(s) ({log[-1]}), weight distance {glmc.weight_distance(fa, fb):.3f} -> "
                 f"{glmc.weight_distance(fa, carried):.3f}, the carried parent's loss moved by {moved:.1e}")
    return refit_model(vanilla_average([fa, carried]), [fa, carried], calib, target="stream")


def methods(key: str, s: tx.Setting, notes: list[str]) -> dict[str, Callable[[nn.Module, nn.Module], nn.Module]]:
    """The fused rows of model ``key`` (setting ``s``): name -> the fusion of two parents."""
    calib = s.calib
    kw = dict(calibration=calib, example_input=s.example, progress=False)
    rows: dict[str, Callable[[nn.Module, nn.Module], nn.Module]] = {
        "OT (activations)": lambda a, b: fuse([a, b], alignment="activations", **kw),
        "OT (activations) + refit": lambda a, b: fuse([a, b], alignment="activations", repair="refit", **kw),
        "OT (weights)": lambda a, b: fuse([a, b], alignment="weights", **kw),
        "OT (weights) + refit": lambda a, b: fuse([a, b], alignment="weights", repair="refit", **kw),
        f"{tx.SINKHORN} + refit": lambda a, b: fuse([a, b], **glmc.SINKHORN, **kw),
    }
    if key.startswith("llama"):
        rows[GLMC] = lambda a, b: glmc_fusion(a, b, calib, notes, s.score)
    orthogonal = dict(alignment="weights", residual="orthogonal", sweeps=15, **kw)
    rows[ORTHOGONAL] = lambda a, b: fuse([a, b], **orthogonal)
    rows[f"{ORTHOGONAL} + refit"] = lambda a, b: fuse([a, b], repair="refit", **orthogonal)
    return rows


def run_model(ctx: Ctx, key: str, table: tx.Results, notes: list[str], skipped: dict[str, str],
              folds: list[str]) -> tx.Setting:
    """Every row of model ``key`` over the seeds, into ``table``; ``skipped``: '<model>: <row>' of the optional rows
    the library refused, and why; ``folds``: the library's report on the orthogonal rows' streams."""
    args = copy.copy(ctx.args)
    args.lm_model = key
    s, tag = tx.lm_of(args)
    log: list[str] = []
    rows = methods(key, s, log)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        a, b = (tx.parent(ctx, s, 100 * seed + i, tag) for i in range(2))
        la, lb = s.score(a), s.score(b)
        start = time.perf_counter()
        vanilla_model = vanilla_average([a, b])
        scores = {"vanilla average": (s.score(vanilla_model), time.perf_counter() - start),
                  "ensemble": (s.score(ensemble([a, b])), None)}
        for name, fn in rows.items():
            if f"{key}: {name}" in skipped:
                continue
            start = time.perf_counter()
            try:
                with folding_report(folds) if name.startswith(ORTHOGONAL) else contextlib.nullcontext():
                    fused = fn(a, b)
            except Exception as err:  # noqa: BLE001 - an option the library does not offer (yet) is reported, not fatal
                if name.startswith(ORTHOGONAL):
                    skipped[f"{key}: {name}"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                    continue
                raise
            seconds = time.perf_counter() - start - sum(CHECK_SECONDS)
            CHECK_SECONDS.clear()
            scores[name] = (s.score(fused), seconds)
            if log:
                notes.append(f"{key} seed {seed}, {name}: {log.pop()}")
        mean = (la + lb) / 2
        notes.append(f"{key} seed {seed}: the parents' test losses {la:.3f} and {lb:.3f} nats")
        vanilla, ens = scores["vanilla average"][0], scores["ensemble"][0]
        table.add("parents (mean)", "score", mean)
        table.add("parents (mean)", "barrier", 0.0)
        table.add("parents (mean)", "gap", (vanilla - mean) / (vanilla - ens))
        for name, (value, seconds) in scores.items():
            table.add(name, "score", value)
            table.add(name, "gap", (vanilla - value) / (vanilla - ens))
            table.add(name, "barrier", value - mean)
            if seconds is not None:
                table.add(name, "time", seconds)
        for name in table.values:
            table.add(name, "ppl", math.exp(table.values[name]["score"][-1]))
        print(f"[{key} seed {seed}: parents {la:.3f} {lb:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, (v, _) in
                                                                          scores.items()) + "]",
              file=sys.stderr, flush=True)
    return s


def verdict(key: str, table: tx.Results, seeds: int) -> str:
    """The best fused row of ``key`` and, where the issue sets one, its floor's verdict."""
    fused = [r for r in table.values if r not in FIXED]
    best = max(fused, key=lambda r: table.mean(r, "gap"))
    gap = table.mean(best, "gap")
    text = (f"**{key}**: parents {table.mean('parents (mean)', 'score'):.3f} nats, vanilla average "
            f"{table.mean('vanilla average', 'score'):.3f}, ensemble {table.mean('ensemble', 'score'):.3f}; the best "
            f"fused model is **{best}**: {table.mean(best, 'score'):.3f} nats, {100 * gap:.1f}% ± "
            f"{100 * table.std(best, 'gap'):.1f} of the loss gap, barrier {table.mean(best, 'barrier'):.3f} nats.")
    if key in FLOORS:
        floor = FLOORS[key]
        text += (f" Floor (≥ {100 * floor:.0f}% of the loss gap, mean of {seeds} seed(s), no gradient step on any "
                 "weight): " + ("met." if gap >= floor else f"**not met**, {100 * (floor - gap):.1f} points short."))
    return text


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (those of ``transformers``' LM, plus ``--out``, ``--models``); writes
    lm_widths.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    own.add_argument("--first-seed", type=int, default=0, help="seeds s = first, first + 1, ... (--seeds of them)")
    args = tx.lm_options(own, argv)
    ctx = context(args)
    started = time.perf_counter()
    body: list[str] = []
    shows: list[str] = []
    notes: list[str] = []
    skipped: dict[str, str] = {}
    columns = [("score", "test loss (nats/token)"), ("ppl", "perplexity"), ("gap", "loss gap closed (%)"),
               ("barrier", "barrier (nats)"), ("time", "fusion time (s)")]
    scales = {"score": 1.0, "ppl": 1.0, "barrier": 1.0, "time": 1.0}
    for key in args.models:
        table = tx.Results({"score": 3, "barrier": 3, "gap": 1, "time": 1})
        trained = ctx.train_seconds
        folds: list[str] = []
        s = run_model(ctx, key, table, notes, skipped, folds)
        per_step = step_seconds(s)
        trained = ctx.train_seconds - trained
        body += [f"## {s.title}", "", s.describe, "",
                 f"One training step (batch 32) takes {per_step:.2f} s on {torch.get_num_threads()} CPU thread(s) "
                 f"in this run (a fresh model, mean of 4 steps)"
                 + (f"; the parents trained here took {trained:.0f} s in all." if trained else
                    "; the parents came from `--cache`."), "",
                 *table.markdown(columns, scales=scales), ""]
        if folds:
            body += [f"The library's report on `residual=\"orthogonal\"` for {key} (`hf_otfusion.folding`):", "",
                     *[f"- {line}" for line in folds], ""]
        shows.append(verdict(key, table, args.seeds))
    command = " ".join(argv)
    orth = ("Left out, the library refused them: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()) + ".") \
        if skipped else ""
    lines = [
        "# Every fusion method on wider language models: a width-256 Llama and a GPT-2-style LM",
        "",
        f"Produced by `python -m experiments lm-widths{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); "
        f"mean ± std over {args.seeds} seed(s) (s = {args.first_seed}..{args.first_seed + args.seeds - 1}), each with "
        "two new parents (seeds 100·s and 100·s + 1, same data).",
        "",
        "Training (`experiments.transformer.LM_TRAINING`, batch 32 sequences): "
        + "; ".join(f"{k} {st} steps at lr {lr:g}" for k, (st, lr) in tx.LM_TRAINING.items() if k in MODELS)
        + ", sized so that one parent trains in about 6 minutes on one otherwise idle CPU thread (one step measured "
        "before choosing: 1.16 s for llama256, 0.52 s for gpt2; each table gives this run's own measurement). The "
        "width-64 Llama of docs/results/transformers.md trains 1000 steps.",
        "",
        "Rows: the vanilla average; the prediction ensemble (the mean of the parents' probabilities, twice the "
        "compute); the library's OT fusion (`hf_otfusion.fuse`) with activations alignment, without and with the "
        "closed-form layer refit (`repair=\"refit\"`); weights alignment, exact (`alignment=\"weights\"`) without "
        f"and with the refit, and Sinkhorn (`solver=\"sinkhorn\", reg={tx.SINKHORN_REG:g}`) with the refit; on the "
        "Llama only (it is written for RMSNorm, rotary and SwiGLU), the data-free weights alignment of "
        "`experiments.glmc` (docs/results/glmc.md: RMSNorm gains folded, "
        "an orthogonal stream map by Procrustes over the weights alternated with exact head and MLP matching, V/O and "
        "rotary Q/K maps, MLP signs) averaged and refitted onto the stream (`refit_model(..., target=\"stream\")`); "
        "and `fuse(..., alignment=\"weights\", residual=\"orthogonal\", sweeps=15)` with and without the refit where "
        "the library offers it. No labels and no gradient step on any weight after training. Loss gap closed = "
        "(vanilla loss - loss) / (vanilla loss - ensemble loss), per seed; barrier = loss - the two parents' mean "
        "loss; fusion time: the whole call (tracing, alignment, averaging, refit).",
        "",
        *body,
        "## What the run shows",
        "",
        *[p + "\n" for p in shows],
        *([orth, ""] if orth else []),
        "Per seed: the parents' losses, and the GLMC alignment (rounds of the alternation, the relative weight "
        "distance ||W_a - W_b|| / sqrt(||W_a|| ||W_b||) before and after carrying b, and how far the carried parent's "
        "loss moved: it should not move):",
        "",
        *[f"- {n}" for n in notes],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_widths.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"[lm-widths: {time.perf_counter() - started:.0f} s]", file=sys.stderr)
