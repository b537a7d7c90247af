"""Depth-expanded plans: a deep decoder traced on a shallow copy and expanded by layer index gives the plan a full
trace gives (sites aside); models that do not fit are refused; the plan cache, fuse() and the streamed merge use
it where no activation sites are needed, and trace in full where they are."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn
from zoo import randomize_state

from hf_otfusion import AlignmentPlan, build_plan, fuse, trace
from hf_otfusion.plan_cache import ENV_VAR, cached_plan
from hf_otfusion.trace.expand import reproducible_part

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder(kind: str, layers: int = 4, **extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        if kind == "Bert":  # an encoder with a classifier: the streamed merge of hf-bert takes this path too
            config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                             num_attention_heads=4, intermediate_size=48, max_position_embeddings=16,
                                             num_labels=3)
            return transformers.BertForSequenceClassification(config).eval()
        if kind == "GPT2":
            config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=layers, n_head=4,
                                             bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(config).eval()  # LM head tied to the token embeddings
        config = getattr(transformers, f"{kind}Config")(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
        return getattr(transformers, f"{kind.removesuffix('Text')}ForCausalLM")(config).eval()

    return build


DECODERS = {
    "llama_gqa": _decoder("Llama", num_key_value_heads=2),
    "qwen2_gqa_bias": _decoder("Qwen2", num_key_value_heads=2),  # qkv biases; a layer_types list to slice
    "qwen3_qk_norm": _decoder("Qwen3", num_key_value_heads=2, head_dim=8),  # fixed channels whose reason names a node
    "mistral_gqa": _decoder("Mistral", num_key_value_heads=2),
    "gemma_mqa_tied": _decoder("Gemma", num_key_value_heads=1, head_dim=8),
    "gpt2_tied": _decoder("GPT2"),
    "gpt_neox_partial_rotary": _decoder("GPTNeoX", rotary_pct=0.5),
    "bert_classifier": _decoder("Bert"),
    # sliding and full attention layers interleaved: one traced middle layer of each kind (a 4-layer copy)
    "gemma2_interleaved": _decoder("Gemma2", layers=6, num_key_value_heads=2, head_dim=8, sliding_window=4),
}


def _tokens(batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("name", list(DECODERS))
def test_expanded_plan_equals_the_full_trace(name):  # (the decoders and one encoder)
    model = DECODERS[name]()
    x = _tokens()
    expanded = trace.expanded_plan(model, x)
    assert expanded is not None and expanded.expanded
    assert all(not s.sites for s in expanded.spaces)
    full = build_plan(model, x)
    assert not full.expanded
    a, b = reproducible_part(expanded), reproducible_part(full)
    assert [s["name"] for s in a["spaces"]] == [s["name"] for s in b["spaces"]]
    for sa, sb in zip(a["spaces"], b["spaces"], strict=True):
        assert sa == sb, sa["name"]
    assert list(expanded.tensors.items()) == list(full.tensors.items())  # the real model's order too
    assert a["aliases"] == b["aliases"] and a["unhandled"] == b["unhandled"]
    assert a["fixed"] == b["fixed"]
    assert a == b
    depth = model.config.num_hidden_layers
    assert any(f"{depth - 1}." in m.tensor for s in expanded.spaces for m in s.members)  # it reaches the last layer
    assert AlignmentPlan.from_json(expanded.to_json()) == expanded  # the flag survives the round trip


def test_models_that_do_not_fit_are_refused():
    x = _tokens()
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert trace.expanded_plan(mlp, torch.randn(2, 8)) is None  # no transformers config
    assert trace.expanded_plan(_decoder("Llama", layers=3)(), x) is None  # nothing to gain
    assert trace.expanded_plan(_decoder("Llama", layers=4)(), x, layers=4) is None

    odd = _decoder("Llama")()  # one middle layer unlike the others: its tensors have no shallow counterpart
    from transformers.models.llama.modeling_llama import LlamaMLP

    wider = odd.config.__class__(**{**odd.config.to_dict(), "intermediate_size": 40})
    odd.model.layers[2].mlp = LlamaMLP(wider)
    assert trace.expanded_plan(odd, x) is None

    indexed = _decoder("Llama")()  # a per-layer setting given as layer indices cannot be sliced by position
    indexed.config.mlp_only_layers = [1]
    assert trace.expanded_plan(indexed, x) is None

    two_lists = _decoder("Llama")()  # a second list of layers: which one repeats?
    two_lists.extra = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
    assert trace.expanded_plan(two_lists, x) is None

    assert trace.expanded_plan(_decoder("Llama")(), x) is not None  # the same model untouched expands


def test_plan_cache_expands_when_no_sites_are_needed(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "plans"))
    exported: list[int] = []
    export = trace.core.export_model

    def counting(model, *args, **kwargs):
        exported.append(model.config.num_hidden_layers)
        return export(model, *args, **kwargs)

    monkeypatch.setattr(trace.core, "export_model", counting)
    model, x = _decoder("Llama", num_key_value_heads=2)(), _tokens()
    plan = cached_plan(model, x, sites=False)
    assert plan.expanded and exported == [3], "the deep model was traced"
    assert cached_plan(model, x, sites=False) == plan and exported == [3], "the cached expansion was not read"
    full = cached_plan(model, x)  # sites wanted: a full trace, under its own key
    assert not full.expanded and any(s.sites for s in full.spaces) and exported == [3, 4]
    assert reproducible_part(full) == reproducible_part(plan)
    assert len(list((tmp_path / "plans").glob("*.json"))) == 2
    for entry in (tmp_path / "plans").glob("*.json"):
        if '"expanded": true' in entry.read_text():
            entry.unlink()
    assert cached_plan(model, x, sites=False) == full and exported == [3, 4], "a full entry serves sites=False too"
    assert cached_plan(model, x, enabled=False, sites=False).expanded and exported == [3, 4, 3]


def test_fuse_with_an_expanded_plan(monkeypatch):
    models = [randomize_state(_decoder("Llama", layers=4, num_key_value_heads=2)(), seed) for seed in (0, 1)]
    x = _tokens(batch=4, seed=3)
    expanded, full = trace.expanded_plan(models[0], x), build_plan(models[0], x)
    assert expanded is not None
    kw = dict(progress=False)
    by_weights = fuse(models, plan=expanded, **kw).state_dict()
    reference = fuse(models, plan=full, **kw).state_dict()
    assert all(torch.equal(by_weights[k], reference[k]) for k in reference)
    # activations need the graph's sites: fuse traces the target again instead of using the expanded plan
    builds: list[int] = []
    build = trace.core.build_plan

    def counting(model, *args, **kwargs):
        builds.append(model.config.num_hidden_layers)
        return build(model, *args, **kwargs)

    monkeypatch.setattr(sys.modules["hf_otfusion.fuse"], "build_plan", counting)  # (the package's fuse: a function)
    by_activations = fuse(models, plan=expanded, alignment="activations", calibration=x, **kw).state_dict()
    assert builds == [4, 4]  # the target, traced again, then model 1 (a plan with heads is traced per model)
    reference = fuse(models, plan=full, alignment="activations", calibration=x, **kw).state_dict()
    assert all(torch.equal(by_activations[k], reference[k]) for k in reference)
    assert any(not torch.equal(by_activations[k], by_weights[k]) for k in reference)  # (the modes do differ)


def test_streamed_merge_of_deep_llamas_uses_the_expansion(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from hf_otfusion.config import parse_config
    from hf_otfusion.merge import merge
    from hf_otfusion.testing import tiny_llama

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "plans"))
    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s, layers=4, kv_heads=2) for s in (0, 1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents], "parameters": {"alignment": "weights"}})
    expanded = merge(config, tmp_path / "expanded", progress=False, plan_cache=False)
    assert expanded.streamed and expanded.plan.expanded
    monkeypatch.setattr(trace, "expanded_plan", lambda *args, **kwargs: None)  # the full trace, as before
    full = merge(config, tmp_path / "full", progress=False, plan_cache=False)
    assert full.streamed and not full.plan.expanded
    assert reproducible_part(full.plan) == reproducible_part(expanded.plan)
    a, b = load_file(tmp_path / "expanded" / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(parents[0] / "model.safetensors")[k]) for k in a)
