"""Orthogonal maps of residual streams (``residual="orthogonal"``): norm gains folded, streams checked, maps found."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_otfusion  # noqa: F401 - before transformers models are built
from hf_otfusion import FusionError, build_plan, fuse, random_permutation
from hf_otfusion.folding import (
    find_folds,
    fold_state,
    random_orthogonal,
    recording,
    rotatable,
    rotate,
    without_gains,
)
from hf_otfusion.matching import recording as matching_recording
from hf_otfusion.trace import export_model
from hf_otfusion.verify import randomise_state

X = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def llama(seed: int, tied: bool = False, layers: int = 2) -> LlamaForCausalLM:
    """A float64 Llama with GQA and rotary positions, every parameter random (norm gains around one)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).double().eval()
    randomise_state(model, None, seed)
    return model


def logits(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state)
    with torch.no_grad():
        return model(X).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def traced(model: torch.nn.Module):
    ep = export_model(model, X)
    return ep, build_plan(model, X, exported=ep)


def test_llama_norm_gains_fold_and_the_stream_takes_any_orthogonal_map():
    model = llama(0)
    ep, plan = traced(model)
    found = find_folds(ep, plan)
    (stream, folds), = found.folds.items()
    assert found.refused == {}
    assert {f.gain for f in folds} == {"model.norm.weight", *(f"model.layers.{i}.{n}.weight" for i in range(2)
                                                              for n in ("input_layernorm", "post_attention_layernorm"))}
    layer0 = next(f for f in folds if f.gain == "model.layers.0.input_layernorm.weight")
    assert {t for t, _ in layer0.readers} == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    final = next(f for f in folds if f.gain == "model.norm.weight")
    assert final.readers == (("lm_head.weight", 1),)  # read through the slice of the positions to score

    ref = logits(model)
    folded = fold_state(model.state_dict(), list(folds))
    assert relative(logits(model, folded), ref) < 1e-6
    assert torch.equal(folded["model.norm.weight"], torch.ones(32, dtype=torch.float64))
    q = random_orthogonal(32, torch.Generator().manual_seed(1))
    rotated = rotate(folded, without_gains(plan, found).space(stream), q)
    assert relative(logits(model, rotated), ref) < 1e-6
    # the check can fail: the same map with the gains still on the stream (unfolded) changes the function
    assert relative(logits(model, rotate(model.state_dict(), plan.space(stream), q)), ref) > 1e-2

    checked = rotatable(model, plan, ep, X)
    assert checked.spaces == {stream} and not checked.refused


def test_orthogonal_residual_recovers_a_rotated_and_permuted_copy():
    a = llama(0)
    ep, plan = traced(a)
    found = rotatable(a, plan, ep, X)
    folded = fold_state(a.state_dict(), found.all_folds())
    stream = without_gains(plan, found).space(next(iter(found.folds)))
    b = copy.deepcopy(a)
    b.load_state_dict(rotate(folded, stream, random_orthogonal(32, torch.Generator().manual_seed(3))))
    b = random_permutation(b, plan, seed=4)  # heads and MLP neurons shuffled too
    assert relative(logits(b), logits(a)) < 1e-6
    assert float((b.lm_head.weight - a.lm_head.weight).detach().abs().max()) > 0.1

    fused = fuse([a, b], residual="orthogonal", sweeps=5, example_input=X, progress=False)
    assert relative(logits(fused), logits(a)) < 1e-8  # every map found exactly: the average is a's function
    permutations = fuse([a, b], sweeps=5, example_input=X, progress=False)
    assert relative(logits(permutations), logits(a)) > 1e-2  # a permutation cannot undo the rotation


@pytest.mark.parametrize("repair", ["none", "refit"])
def test_orthogonal_residual_with_weights_0_1_computes_the_other_model(repair):
    a, b = llama(0), llama(1)
    calibration = [torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    fused = fuse([a, b], residual="orthogonal", sweeps=3, weights=[0, 1], example_input=X, progress=False,
                 repair=repair, calibration=calibration if repair != "none" else None)
    assert relative(logits(fused), logits(b)) < (1e-6 if repair == "none" else 1e-3)
    assert float(fused.model.norm.weight.sub(1).abs().max()) == 0  # the gains are folded into the readers
    assert set(fused.state_dict()) == set(b.state_dict())


def gpt2(seed: int, tied: bool) -> GPT2LMHeadModel:
    """A float64 GPT-2 (LayerNorm, learned positions, biases everywhere), every parameter random."""
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).double().eval()
    randomise_state(model, None, seed)
    return model


def test_a_layernorm_stream_takes_the_orthogonal_maps_that_keep_the_ones():
    model = gpt2(0, tied=False)
    ep, plan = traced(model)
    found = rotatable(model, plan, ep, X)
    (stream, folds), = found.folds.items()
    assert found.centred == {stream} and all(f.centred and f.bias is not None for f in folds)
    assert {f.gain for f in folds} == {"transformer.ln_f.weight", *(f"transformer.h.{i}.ln_{j}.weight"
                                                                    for i in range(2) for j in (1, 2))}
    ref = logits(model)
    folded = fold_state(model.state_dict(), list(folds))
    assert relative(logits(model, folded), ref) < 1e-8
    space = without_gains(plan, found).space(stream)
    gen = torch.Generator().manual_seed(1)
    q = random_orthogonal(32, gen, centred=True)
    assert torch.allclose(q @ torch.ones(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64))
    assert relative(logits(model, rotate(folded, space, q)), ref) < 1e-8
    # the check can fail: an orthogonal map that moves the ones (the LayerNorm's centring) changes the function
    assert relative(logits(model, rotate(folded, space, random_orthogonal(32, gen))), ref) > 1e-2

    b = copy.deepcopy(model)
    b.load_state_dict(rotate(folded, space, q))
    b = random_permutation(b, plan, seed=4)
    fused = fuse([model, b], residual="orthogonal", sweeps=5, example_input=X, progress=False)
    assert relative(logits(fused), ref) < 1e-8
    assert relative(logits(fuse([model, b], sweeps=5, example_input=X, progress=False)), ref) > 1e-2

    other = gpt2(1, tied=False)
    fused = fuse([model, other], residual="orthogonal", head_maps="orthogonal", sweeps=2, weights=[0, 1],
                 example_input=X, progress=False)
    assert relative(logits(fused), logits(other)) < 1e-8
    assert float(fused.transformer.ln_f.weight.sub(1).abs().max()) == 0


def test_a_layernorm_stream_read_by_a_tied_head_keeps_permutations_and_says_why(caplog):
    a, b = gpt2(0, tied=True), gpt2(1, tied=True)
    with recording() as verdicts, caplog.at_level(logging.WARNING, logger="hf_otfusion"):
        fused = fuse([a, b], residual="orthogonal", sweeps=2, weights=[0, 1], example_input=X, progress=False)
    (verdict,) = verdicts
    assert not verdict.folds
    assert "tied" in next(iter(verdict.refused.values()))
    assert "keeps permutations" in caplog.text and "ln_f" in caplog.text
    assert relative(logits(fused), logits(b)) < 1e-8


def test_a_gain_read_by_a_tied_head_is_refused():
    model = llama(0, tied=True)
    ep, plan = traced(model)
    found = find_folds(ep, plan)
    assert not found.folds
    assert "tied" in next(iter(found.refused.values()))


def test_orthogonal_residual_options_are_checked():
    a, b = llama(0, layers=1), llama(1, layers=1)
    with pytest.raises(FusionError, match="sweeps >= 1"):
        fuse([a, b], residual="orthogonal", example_input=X, progress=False)
    from hf_otfusion.streaming import fuse_checkpoints

    with pytest.raises(FusionError, match="in memory"):
        fuse_checkpoints(["x", "y"], "out", residual="orthogonal", sweeps=2)
    with pytest.raises(FusionError, match="in memory"):
        fuse_checkpoints(["x", "y"], "out", head_maps="orthogonal")
    with pytest.raises(FusionError, match="in memory"):  # weight matching on activations, from disk
        fuse_checkpoints(["x", "y"], "out", sweeps=2, model=a, calibration=X)


def test_orthogonal_residual_in_activations_mode_counts_the_streams_activations():
    a, b = llama(0), llama(1)
    calibration = [torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    options = dict(residual="orthogonal", sweeps=3, example_input=X, progress=False, calibration=calibration)
    fused = fuse([a, b], alignment="activations", weights=[0, 1], **options)
    assert relative(logits(fused), logits(b)) < 1e-6
    with matching_recording() as by_activations:
        fuse([a, b], alignment="activations", **options)
    with matching_recording() as by_weights:
        fuse([a, b], alignment="weights", **options)
    # the stream's activations enter the objective (trace(M E) > 0 for the activations' own single pass)
    assert by_activations[0].objective[0] != pytest.approx(by_weights[0].objective[0])


def test_a_timm_vit_stream_through_layernorm_takes_maps_that_keep_the_ones():
    import timm

    def vit(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  embed_dim=32, num_heads=2, num_classes=5).double().eval()
        randomise_state(model, None, seed)
        return model

    a, b = vit(0), vit(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ep = export_model(a, x)
    found = rotatable(a, build_plan(a, x, exported=ep), ep, x)
    assert found.centred == found.spaces == {"patch_embed.proj.weight:0"}  # the conv's bias moves with the stream
    fused = fuse([a, b], residual="orthogonal", head_maps="orthogonal", sweeps=2, weights=[0, 1], example_input=x,
                 progress=False)
    assert relative(fused(x), b(x)) < 1e-8


def pythia(seed: int) -> torch.nn.Module:
    """A float64 GPT-NeoX with Pythia's layout (rotary on a quarter of each head, parallel residual, fused per-head
    qkv, untied head), every parameter random."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=32, use_parallel_residual=True)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).double().eval()
    randomise_state(model, None, seed)
    return model


def test_a_pythia_stream_takes_maps_that_keep_the_ones_and_weight_matching_runs_on_its_partial_rotary_heads():
    a, b = pythia(0), pythia(1)
    ep = export_model(a, X)
    found = rotatable(a, build_plan(a, X, exported=ep), ep, X)
    assert found.centred == found.spaces and len(found.spaces) == 1  # the LayerNorm stream, every gain folded
    # weight matching on the fused per-head qkv (its head-coupled solve must give exact permutations)
    fused = fuse([a, b], residual="orthogonal", head_maps="orthogonal", sweeps=2, weights=[0, 1], example_input=X,
                 progress=False)
    assert relative(logits(fused), logits(b)) < 1e-8
    assert relative(logits(fuse([a, b], sweeps=2, example_input=X, progress=False)), logits(b)) > 1e-2
