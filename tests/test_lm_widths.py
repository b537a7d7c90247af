"""The wider LMs of ``python -m experiments lm-widths`` (issue 28 item 6): their configs and cache tags, and a tiny
end-to-end run with every row."""

from __future__ import annotations

import argparse
import re

import hf_otfusion  # noqa: F401  (imported before transformers, as the experiments do)
from experiments import transformer as tx
from tests.test_scripts import _run


def _setting(*argv: str) -> tuple[tx.Setting, str]:
    return tx.lm_of(tx.lm_options(argparse.ArgumentParser(add_help=False), ["--tiny", *argv]))


def test_lm_models_configs_and_cache_tags():
    """llama64 is the default and keeps its cache tag; the wider two get their own tags and the issue's shapes."""
    args = tx.lm_options(argparse.ArgumentParser(add_help=False), [])
    assert args.lm_model == "llama64" and tx.lm_of.__doc__
    assert tx.LM_TRAINING["llama64"] == (1000, 3e-3)  # the cached width-64 parents: transformer-lm-s1000-lr0.003-*
    s, tag = _setting()
    assert tag == "tiny-s30-lr0.003"
    s, tag = _setting("--lm-model", "llama256")
    assert tag == "llama256-tiny-s30-lr0.002"
    c = s.build().config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (256, 688, 8, 2)
    assert not c.tie_word_embeddings and tx.LLAMA256["num_hidden_layers"] == 4
    s, tag = _setting("--lm-model", "gpt2", "--lm-steps", "20", "--lm-lr", "1e-3")
    assert re.fullmatch(r"gpt2-tiny-s\d+-lr0\.001", tag)  # --tiny scales the steps down
    m = s.build()
    assert type(m).__name__ == "GPT2LMHeadModel" and m.lm_head.weight is m.transformer.wte.weight
    assert (m.config.n_embd, m.config.n_head, m.config.n_positions, tx.GPT2["n_layer"]) == (128, 4, 128, 4)


def test_lm_widths_tiny_writes_every_row(tmp_path):
    """``--tiny``: one seed, one layer, a few training steps; both tables with every row and the floor's verdict."""
    proc = _run("-m", "experiments", "lm-widths", "--tiny", "--seeds", "1", "--lm-calibration", "8", "--out",
                str(tmp_path), "--threads", "1", timeout=900)
    report = (tmp_path / "lm_widths.md").read_text()
    assert report.strip() == proc.stdout.strip()
    assert "python -m experiments lm-widths --tiny" in report
    number = r"-?[\d.]+ ± [\d.]+"
    sections = report.split("\n## ")
    for name in ("llama256", "gpt2"):
        section = next(s for s in sections if s.startswith(f"Causal LM {name}"))
        rows = ["vanilla average", "OT (activations)", "OT (activations) + refit", "OT (weights)",
                "OT (weights) + refit", "OT (weights, Sinkhorn reg 0.05) + refit"]
        if name == "llama256":
            rows.append("GLMC weights alignment (alternation, V/O and Q/K maps, MLP signs) + refit, stream target")
        for row in rows:
            assert re.search(rf"^\| {re.escape(row)} \|" + rf" {number} \|" * 5 + "$", section, re.M), (name, row)
        assert re.search(rf"^\| ensemble \|( {number} \|){{2}} 100\.0 ± 0\.0 \| {number} \| - \|$", section, re.M)
    assert re.search(r"Floor \(≥ 85% of the loss gap, mean of 1 seed\(s\), no gradient step on any weight\): "
                     r"(met|\*\*not met\*\*)", report)
