"""The causal LM's residual stream: what an orthogonal stream map and twice the width would give (issue 13, item 4).

The causal LM of ``python -m experiments transformers`` (a 2-layer Llama, width 64, on stdlib text) closes about two
thirds of the loss gap with OT + refit. This experiment asks where the rest goes, on the same parents (same seeds,
same ``--cache``), and writes docs/results/stream.md:

- **Orthogonal stream alignment.** Each parent's RMSNorm gains are folded into the layers that read the norm (the
  query, key, value, gate and up projections and the LM head), which keeps its function. The stream of the other
  parent, already permuted by OT, is then rotated by the orthogonal map that best carries its stream activations onto
  the target's (Procrustes over every stream site: the embeddings and each layer's output, on the calibration
  sequences). RMSNorm commutes with any orthogonal map, so the rotated parent computes the same function. The two
  are averaged and refitted as usual.
- **Twice the width on one stream** (a diagnostic, not a fusion: the model is twice as wide inside its blocks). Both
  parents' attention heads and MLP neurons side by side, each block adding the mean of the two parents' block outputs
  onto one averaged stream. Its loss is what averaging the stream alone costs.
- The mean of the two parents' logits, beside the ensemble of their probabilities.

    python -m experiments stream --cache /tmp/tx/cache   # 3 seeds, parents shared with `transformers`
    python -m experiments stream --tiny --out /tmp/s     # a smoke run

The orthogonal map is built here for Llama-style decoders only (RMSNorm, untied head): an experiment, not an option
of ``fuse``, since it gave little (see the written page).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_otfusion import ensemble, fuse, vanilla_average
from hf_otfusion.repairs import refit_model

from . import transformer as tx
from .harness import ROOT, context

ROWS = (
    ("vanilla average", "the parents' weights averaged, no alignment"),
    ("ensemble", "the mean of the two parents' probabilities"),
    ("logit average", "the mean of the two parents' logits (twice the compute)"),
    ("OT (activations) + refit", "permutation alignment of every space, averaged, refitted (`repair=\"refit\"`)"),
    ("OT (activations) + refit, stream target", "the same, `target=\"stream\"`"),
    ("+ sequential MLP alignment + refit", "MLP neurons re-matched layer by layer on the fused model's own inputs, "
     "refitted"),
    ("+ orthogonal stream + refit", "the other parent's stream rotated by Procrustes after OT, averaged, refitted"),
    ("+ orthogonal stream + refit, stream target", "the same, `target=\"stream\"`"),
    ("twice the width, permuted stream", "both parents' heads and neurons side by side on one averaged stream"),
    ("twice the width, orthogonal stream", "the same after the stream's rotation"),
)


def fold_norms(model: nn.Module) -> nn.Module:
    """A copy of a Llama-style decoder with every RMSNorm gain folded into the layers that read that norm (gains 1)."""
    m = copy.deepcopy(model)
    pairs = []
    for layer in m.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        pairs += [(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))]
    pairs.append((m.model.norm, (m.lm_head,)))
    with torch.no_grad():
        for norm, readers in pairs:
            for lin in readers:
                lin.weight.mul_(norm.weight)
            norm.weight.fill_(1.0)
    return m


def rotate_stream(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """A copy of a norm-folded decoder whose residual stream is ``h @ q`` where it was ``h`` (``q`` orthogonal)."""
    m = copy.deepcopy(model)
    q = q.to(next(m.parameters()).dtype)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight @ q)
        readers, writers = [m.lm_head], []
        for layer in m.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            readers += [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
            writers += [attn.o_proj, mlp.down_proj]
        for lin in readers:
            lin.weight.copy_(lin.weight @ q)
        for lin in writers:
            lin.weight.copy_(q.T @ lin.weight)
            if lin.bias is not None:
                lin.bias.copy_(lin.bias @ q)
    return m


def stream_rows(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream at every site (embeddings, each layer's output), one row per token."""
    outs: list[torch.Tensor] = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, i, o: outs.append(o[0] if isinstance(o, tuple)
                                                                                      else o))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in (*hidden[:-1], *outs)]).double()


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``q`` minimising ``||source @ q - target||`` (rows are samples)."""
    u, _, vh = torch.linalg.svd(source.T @ target)
    return u @ vh


def side_by_side(a: nn.Module, b: nn.Module) -> nn.Module:
    """Both parents' heads and MLP neurons in one model of twice their widths inside the blocks, on the averaged
    stream: every block adds the mean of the two parents' block outputs."""
    from transformers import LlamaForCausalLM

    c = a.config
    config = copy.deepcopy(c)
    config.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    config.num_attention_heads *= 2
    config.num_key_value_heads *= 2
    config.intermediate_size *= 2
    wide = LlamaForCausalLM(config).eval()
    sa, sb = a.state_dict(), b.state_dict()
    state = {}
    for k in wide.state_dict():
        if any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            state[k] = torch.cat([sa[k], sb[k]], 0)
        elif any(p in k for p in ("o_proj", "down_proj")):
            state[k] = torch.cat([sa[k], sb[k]], 1) / 2
        else:
            state[k] = (sa[k] + sb[k]) / 2
    wide.load_state_dict(state)
    return wide


def sequential_mlp(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A copy of ``b`` (already in ``a``'s channels) whose MLP neurons are re-matched to ``a``'s layer by layer, in
    forward order: each layer's cost compares the two parents' MLP neurons on the inputs that the fused model (the
    average of ``a`` and the re-matched ``b`` so far) gives that layer (sequential alignment)."""
    from hf_otfusion.transport import assignment, pairwise_distance

    b = copy.deepcopy(b)
    for index in range(len(a.model.layers)):
        fused = vanilla_average([a, b])
        seen: list[torch.Tensor] = []
        hook = fused.model.layers[index].mlp.register_forward_hook(lambda mod, i, o, seen=seen: seen.append(i[0]))
        try:
            with torch.no_grad():
                fused(input_ids=ids)
        finally:
            hook.remove()
        x = seen[0].reshape(-1, seen[0].shape[-1])
        with torch.no_grad():
            hidden = [m.act_fn(m.gate_proj(x)) * m.up_proj(x) for m in (a.model.layers[index].mlp,
                                                                        b.model.layers[index].mlp)]
        rows, cols = assignment(pairwise_distance(hidden[0].T.double(), hidden[1].T.double()).numpy())
        order = torch.as_tensor(cols[rows.argsort()])  # a's neuron i is matched with b's neuron order[i]
        mlp = b.model.layers[index].mlp
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[order])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[order])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])
    return b.eval()


def logit_loss(models: list[nn.Module], test_ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = sum(m(input_ids=test_ids).logits for m in models) / len(models)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), test_ids[:, 1:].reshape(-1)).item()


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (those of ``transformers``, plus ``--out``); writes stream.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = tx.lm_options(own, argv)
    ctx = context(args)
    s, tag = tx.lm_of(args)
    _, test_ids = tx.text_ids(args.tiny)
    calib = s.calib["input_ids"]
    kw = dict(calibration=s.calib, example_input=s.example, progress=False)
    scores: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    gaps: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    cosines: dict[str, list[float]] = {"permutation": [], "orthogonal": []}
    started = time.perf_counter()
    for seed in range(args.seeds):
        a, b = (tx.parent(ctx, s, 100 * seed + i, tag) for i in range(2))
        b_aligned = fuse([a, b], weights=[0, 1], alignment="activations", **kw)  # b, in a's channels
        plain = fuse([a, b], alignment="activations", **kw)
        fa, fb = fold_norms(a), fold_norms(b_aligned)
        ha, hb = stream_rows(fa, calib), stream_rows(fb, calib)
        q = procrustes(hb, ha)
        fq = rotate_stream(fb, q)
        b_loss = s.score(b)  # what the rotated and the re-matched copies of b must keep
        kept = abs(s.score(fq) - b_loss)
        if kept > 1e-4:
            raise SystemExit(f"the rotated parent does not keep its function (loss moved by {kept:.2e})")
        cosines["permutation"].append(F.cosine_similarity(ha, hb).mean().item())
        cosines["orthogonal"].append(F.cosine_similarity(ha, hb @ q).mean().item())
        rotated = vanilla_average([fa, fq])
        sequential = sequential_mlp(a, b_aligned, calib)
        if abs(s.score(sequential) - b_loss) > 1e-4:
            raise SystemExit("the re-matched parent does not keep its function")
        row = {
            "vanilla average": vanilla_average([a, b]),
            "ensemble": ensemble([a, b]),
            "OT (activations) + refit": refit_model(plain, [a, b_aligned], s.calib),
            "OT (activations) + refit, stream target": refit_model(plain, [a, b_aligned], s.calib, target="stream"),
            "+ sequential MLP alignment + refit": refit_model(vanilla_average([a, sequential]), [a, sequential],
                                                              s.calib),
            "+ orthogonal stream + refit": refit_model(rotated, [fa, fq], s.calib),
            "+ orthogonal stream + refit, stream target": refit_model(rotated, [fa, fq], s.calib, target="stream"),
            "twice the width, permuted stream": side_by_side(fa, fb),
            "twice the width, orthogonal stream": side_by_side(fa, fq),
        }
        result = {name: s.score(m) for name, m in row.items()}
        result["logit average"] = logit_loss([a, b], test_ids)
        vanilla, ens = result["vanilla average"], result["ensemble"]
        for name, _ in ROWS:
            scores[name].append(result[name])
            gaps[name].append((vanilla - result[name]) / (vanilla - ens))
        print(f"[seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()) + "]", file=sys.stderr,
              flush=True)

    def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"

    table = ["| model | what it is | test loss (nats/token) | loss gap closed (%) |", "|---|---|---:|---:|"]
    table += [f"| {name} | {what} | {cell(scores[name])} | {cell(gaps[name], 100, 1)} |" for name, what in ROWS]
    command = " ".join(argv)
    lines = [
        "# The causal LM's residual stream: an orthogonal map, and what averaging the stream costs",
        "",
        f"Produced by `python -m experiments stream{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}); "
        f"mean ± std over {args.seeds} seed(s), the parents of `python -m experiments transformers` (same seeds).",
        "",
        s.describe,
        "",
        "Orthogonal stream: each parent's RMSNorm gains folded into the layers reading them; the other parent (already "
        "permuted by OT activations alignment) rotated by the Procrustes map of its stream onto the target's over "
        "every stream site on the calibration sequences, which keeps its function (checked on every seed: its loss "
        "moves by under 1e-4); then averaged and refitted. Sequential MLP alignment: after OT, the other "
        "parent's MLP neurons re-matched to the target's layer by layer (exact assignment of the distances between "
        "the two parents' neuron outputs on the inputs the fused model, the average so far, gives that layer), then "
        "averaged and refitted; the re-matched parent keeps its function (checked). No labels, no gradient step. "
        "Loss gap closed = (vanilla loss - loss) / (vanilla loss - ensemble loss), per seed.",
        "",
        *table,
        "",
        f"Mean cosine similarity of the two parents' stream rows (every site, every calibration token): after the OT "
        f"permutation {cell(cosines['permutation'])}, after the orthogonal map {cell(cosines['orthogonal'])}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))

