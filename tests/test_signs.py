"""A sign per hidden unit (``hidden_maps="signed"``): found by a check on the model, matched with the permutation."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_folding import X, llama, logits, relative, traced
from torch import nn

from hf_otfusion import FusionError, fuse, random_permutation
from hf_otfusion.scales import ChannelScale, multiplied
from hf_otfusion.signs import find_signs, recording


def flipped(model: nn.Module, plan, signed: list[ChannelScale], seed: int) -> nn.Module:
    """``model`` with a random half of each signed space's units flipped (``up`` and ``down`` together)."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for c in signed:
        signs = torch.where(torch.rand(c.space.size, generator=gen) < 0.5, -1.0, 1.0).double()
        state = multiplied(state, c, signs)
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


def test_llama_mlp_units_take_a_sign_on_up_and_down_not_on_gate():
    model = llama(0)
    _, plan = traced(model)
    found = find_signs(model, plan, X)
    kinds = {c.space.name: ({m.tensor for m in c.up}, {m.tensor for m in c.down}) for c in found.spaces}
    assert kinds == {f"model.layers.{i}.mlp.gate_proj.weight:0": ({f"model.layers.{i}.mlp.up_proj.weight"},
                                                                  {f"model.layers.{i}.mlp.down_proj.weight"})
                     for i in range(2)}
    ref = logits(model)
    b = flipped(model, plan, list(found.spaces), 1)
    assert relative(logits(b), ref) < 1e-8
    moved = b.model.layers[0].mlp.up_proj.weight - model.model.layers[0].mlp.up_proj.weight
    assert float(moved.detach().abs().max()) > 0.1
    # the check can fail: a sign on the gate instead of up breaks the function
    wrong = ChannelScale(found.spaces[0].space, found.spaces[0].space.members[:1], found.spaces[0].down)
    assert "gate_proj" in wrong.up[0].tensor
    assert relative(logits(flipped(model, plan, [wrong], 1)), ref) > 1e-2


def test_relu_mlp_units_take_no_sign():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    from hf_otfusion import build_plan

    plan = build_plan(model, x)
    found = find_signs(model, plan, x)
    assert not found.spaces and list(found.refused) == [plan.spaces[0].name]


def test_signed_matching_recovers_a_permuted_and_sign_flipped_copy():
    a = llama(0)
    _, plan = traced(a)
    found = find_signs(a, plan, X)
    b = random_permutation(flipped(a, plan, list(found.spaces), 3), seed=4, example_input=X)
    assert relative(logits(b), logits(a)) < 1e-6
    with recording() as verdicts:
        fused = fuse([a, b], hidden_maps="signed", sweeps=3, example_input=X, progress=False)
    assert len(verdicts) == 1 and len(verdicts[0].spaces) == 2
    assert relative(logits(fused), logits(a)) < 1e-6
    permutations = fuse([a, b], sweeps=3, example_input=X, progress=False)  # the flipped units cancel
    assert relative(logits(permutations), logits(a)) > 1e-2


def test_signed_with_weights_0_1_computes_the_other_model():
    a, b = llama(0), llama(1)
    fused = fuse([a, b], hidden_maps="signed", sweeps=2, weights=[0, 1], example_input=X, progress=False)
    assert relative(logits(fused), logits(b)) < 1e-6
    both = fuse([a, b], hidden_maps="signed", head_maps="orthogonal", residual="orthogonal", sweeps=2,
                weights=[0, 1], example_input=X, progress=False)
    assert relative(logits(both), logits(b)) < 1e-6


def test_signed_matching_raises_the_weight_similarity():
    from hf_otfusion.matching import recording as matching_recording

    a, b = llama(0), llama(1)
    with matching_recording() as plain:
        fuse([a, b], sweeps=5, example_input=X, progress=False)
    with matching_recording() as signed:
        fuse([a, b], sweeps=5, hidden_maps="signed", example_input=X, progress=False)
    assert signed[0].objective[-1] > plain[0].objective[-1]


def test_signed_needs_weight_matching_and_says_why_a_space_keeps_permutations(caplog):
    a, b = llama(0), llama(1)
    with pytest.raises(FusionError, match="sweeps >= 1"):
        fuse([a, b], hidden_maps="signed", example_input=X, progress=False)
    carried = fuse([a, b], hidden_maps="signed", sweeps=1, alignment="activations", calibration=[X], weights=[0, 1],
                   progress=False)  # activations mode: signed units are matched by their weights
    assert relative(logits(carried), logits(b)) < 1e-6
    torch.manual_seed(0)
    mlps = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="hf_otfusion"):
        fuse(mlps, hidden_maps="signed", sweeps=1, example_input=torch.randn(2, 6), progress=False)
    assert "no hidden space takes a sign" in caplog.text and "not odd" in caplog.text
