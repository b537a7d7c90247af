"""Learned alignment (``alignment="learned"``): maps trained against the ensemble, every weight frozen."""

from __future__ import annotations

import pytest
import torch
from test_folding import X, gpt2, llama, logits, relative, traced

from hf_otfusion import FusionError, fuse
from hf_otfusion.folding import fold_state, rotatable, without_gains
from hf_otfusion.head_maps import find_head_maps, find_invertible
from hf_otfusion.learned import learn_maps
from hf_otfusion.verify import randomised_copy

CALIBRATION = [torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(s)) for s in range(3)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_learned_maps_lower_the_kl_and_keep_every_carried_function(family):
    a, b = (llama(0, layers=1), llama(1, layers=1)) if family == "llama" else (gpt2(0, False), gpt2(1, False))
    ep, plan = traced(a)
    rot = rotatable(a, plan, ep, X)
    inner = find_head_maps(a, plan, X)
    invertible = find_invertible(inner, randomised_copy(a, plan, X))
    assert len(invertible) == (1 if family == "llama" else 2)  # per layer: values (queries and keys do not)
    assert rot.centred == (rot.spaces if family == "gpt2" else frozenset())
    states = [fold_state(m.state_dict(), rot.all_folds()) for m in (a, b)]
    out, losses = learn_maps(a, [a, b], states, 0, without_gains(plan, rot), rot.spaces, inner, CALIBRATION,
                             weights=[0.5, 0.5], steps=25, lr=0.02, device=torch.device("cpu"), progress=False,
                             invertible=invertible, centred=rot.centred)
    assert losses[-1] < 0.8 * losses[0]
    moved = max(float((out[1][k] - states[1][k]).abs().max()) for k in states[1])
    assert moved > 1e-3  # the maps did move b's weights
    assert relative(logits(b, {**b.state_dict(), **out[1]}), logits(b)) < 1e-5  # and b still computes b
    assert all(torch.equal(out[0][k], states[0][k]) for k in states[0])  # the target is never moved


@pytest.mark.parametrize("learn_from", ["weights", "activations"])
def test_learned_with_weights_0_1_computes_the_other_model(learn_from):
    a, b = llama(0, layers=1), llama(1, layers=1)
    fused = fuse([a, b], alignment="learned", residual="orthogonal", head_maps="orthogonal", sweeps=2, learn_steps=5,
                 weights=[0, 1], calibration=CALIBRATION, example_input=X, progress=False, learn_from=learn_from)
    assert relative(logits(fused), logits(b)) < 1e-5


def test_learned_from_activations_starts_from_the_activations_matching():
    from hf_otfusion.matching import recording

    a, b = llama(0), llama(1)
    options = dict(residual="orthogonal", sweeps=3, calibration=CALIBRATION, example_input=X, progress=False)
    objectives = {}
    for name, extra in (("activations", dict(alignment="activations")),
                        ("learned from activations", dict(alignment="learned", learn_from="activations",
                                                          learn_steps=1)),
                        ("learned", dict(alignment="learned", learn_steps=1))):
        with recording() as results:
            fuse([a, b], **options, **extra)
        objectives[name] = results[0].objective
    assert objectives["learned from activations"] == pytest.approx(objectives["activations"], rel=1e-12)
    assert objectives["learned"][-1] != pytest.approx(objectives["activations"][-1], rel=1e-6)


def test_learned_options_are_checked():
    a, b = llama(0, layers=1), llama(1, layers=1)
    with pytest.raises(FusionError, match="residual='orthogonal' and/or head_maps='orthogonal'"):
        fuse([a, b], alignment="learned", calibration=CALIBRATION, progress=False)
    with pytest.raises(FusionError, match="needs calibration"):
        fuse([a, b], alignment="learned", head_maps="orthogonal", example_input=X, progress=False)
    with pytest.raises(FusionError, match="learn_steps: only alignment='learned'"):
        fuse([a, b], learn_steps=3, example_input=X, progress=False)
    with pytest.raises(FusionError, match="learn_from: only alignment='learned'"):
        fuse([a, b], learn_from="activations", alignment="activations", calibration=CALIBRATION, progress=False)
    with pytest.raises(FusionError, match="learn_from"):
        fuse([a, b], alignment="learned", head_maps="orthogonal", learn_from="data", calibration=CALIBRATION,
             progress=False)


def test_mlp_units_take_a_scale_in_up_and_its_inverse_in_down():
    from hf_otfusion.scales import ChannelScale, find_scales, scaled

    model = llama(0)
    _, plan = traced(model)
    found = find_scales(model, plan, X)
    assert [(sorted(m.tensor for m in c.up), sorted(m.tensor for m in c.down)) for c in found] == [
        ([f"model.layers.{i}.mlp.up_proj.weight"], [f"model.layers.{i}.mlp.down_proj.weight"]) for i in range(2)]
    logs = torch.randn(found[0].space.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert relative(logits(model, scaled(model.state_dict(), found[0], logs)), logits(model)) < 1e-6
    gate = ChannelScale(found[0].space, tuple(m for m in found[0].space.members if "gate" in m.tensor), found[0].down)
    assert relative(logits(model, scaled(model.state_dict(), gate, logs)), logits(model)) > 1e-2  # silu is not linear


def test_learned_on_a_tied_lm_head_computes_the_other_model():
    from test_folding import gpt2

    a, b = gpt2(0, tied=True), gpt2(1, tied=True)  # the LM head is the token embedding: one key to call with
    fused = fuse([a, b], alignment="learned", residual="orthogonal", head_maps="orthogonal", sweeps=2, learn_steps=3,
                 weights=[0, 1], calibration=CALIBRATION, example_input=X, progress=False)
    assert relative(logits(fused), logits(b)) < 1e-5
