"""Maps inside attention heads (``head_maps="orthogonal"``): found by a check on the model, fitted after alignment."""

from __future__ import annotations

import copy

import torch
from test_folding import X, llama, logits, relative, traced
from transformers import GPT2Config, GPT2LMHeadModel

from hf_otfusion import fuse
from hf_otfusion.folding import rotate
from hf_otfusion.head_maps import HeadMap, find_head_maps, fitted_map, recording


def random_map(head_map: HeadMap, seed: int) -> torch.Tensor:
    """A random map of the kind ``head_map`` allows: the fit on a random similarity is one (it is orthogonal, block
    by block, and rotation pair by pair for rotary spaces)."""
    n = head_map.space.size
    return fitted_map(head_map, torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_llama_heads_take_rotary_pair_rotations_and_value_maps():
    model = llama(0)
    _, plan = traced(model)
    found = find_head_maps(model, plan, X)
    assert not found.refused
    kinds = {m.space.name: m.pairing for m in found.maps}
    assert kinds == {f"model.layers.{i}.self_attn.{p}_proj.weight:0": pairing for i in range(2)
                     for p, pairing in (("q", "half"), ("v", None))}
    ref = logits(model)
    for head_map in found.maps:
        m = random_map(head_map, 1)
        assert relative(logits(model, rotate(model.state_dict(), head_map.space, m)), ref) < 1e-6
        if head_map.pairing is not None:  # the check can fail: HF Llama pairs j with j + d/2, not 2j with 2j + 1
            wrong = HeadMap(head_map.space, "interleaved")
            assert relative(logits(model, rotate(model.state_dict(), wrong.space, random_map(wrong, 1))), ref) > 1e-2


def test_head_maps_recover_a_copy_rotated_inside_its_heads():
    a = llama(0)
    _, plan = traced(a)
    found = find_head_maps(a, plan, X)
    state = a.state_dict()
    for seed, head_map in enumerate(found.maps):
        state = rotate(state, head_map.space, random_map(head_map, seed + 10))
    b = copy.deepcopy(a)
    b.load_state_dict(state)
    assert relative(logits(b), logits(a)) < 1e-6
    moved = b.model.layers[0].self_attn.v_proj.weight - a.model.layers[0].self_attn.v_proj.weight
    assert float(moved.detach().abs().max()) > 0.1

    # heads kept in place: the rotated heads' weights no longer look like their own head's to head matching
    fused = fuse([a, b], head_maps="orthogonal", match_heads=False, example_input=X, progress=False)
    assert relative(logits(fused), logits(a)) < 1e-8
    permutations = fuse([a, b], match_heads=False, example_input=X, progress=False)
    assert relative(logits(permutations), logits(a)) > 1e-2


def test_head_maps_with_weights_0_1_compute_the_other_model():
    a, b = llama(0, layers=1), llama(1, layers=1)
    with recording() as verdicts:
        fused = fuse([a, b], head_maps="orthogonal", residual="orthogonal", sweeps=2, weights=[0, 1],
                     example_input=X, progress=False)
    assert len(verdicts) == 1 and len(verdicts[0].maps) == 2
    assert relative(logits(fused), logits(b)) < 1e-6


def test_gpt2_heads_take_any_orthogonal_map_inside_queries_keys_and_values():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    a, b = GPT2LMHeadModel(cfg).double().eval(), GPT2LMHeadModel(cfg).double().eval()
    _, plan = traced(a)
    found = find_head_maps(a, plan, X)
    assert len(found.maps) == 2 and all(m.pairing is None for m in found.maps)  # no rotary: any orthogonal map
    fused = fuse([a, b], head_maps="orthogonal", weights=[0, 1], plan=plan, example_input=X, progress=False)
    assert relative(logits(fused), logits(b)) < 1e-8


def test_value_heads_take_any_invertible_map_with_its_inverse_transpose_on_the_output_projection():
    from hf_otfusion.folding import mapped
    from hf_otfusion.head_maps import find_invertible
    from hf_otfusion.verify import randomised_copy

    model = llama(0)
    _, plan = traced(model)
    found = find_head_maps(model, plan, X)
    invertible = find_invertible(found, randomised_copy(model, plan, X))
    assert set(invertible) == {f"model.layers.{i}.self_attn.v_proj.weight:0" for i in range(2)}
    for i in range(2):  # one of the two layers takes the inverse transpose (either way round keeps o_proj(v))
        assert invertible[f"model.layers.{i}.self_attn.v_proj.weight:0"] in (
            {f"model.layers.{i}.self_attn.{p}_proj.weight"} for p in "vo")
    ref = logits(model)
    space = next(m.space for m in found.maps if m.space.name in invertible)
    gen = torch.Generator().manual_seed(3)
    matrix = torch.eye(space.size, dtype=torch.float64) + 0.3 * torch.randn(space.size, space.size, generator=gen,
                                                                            dtype=torch.float64)
    d = space.head_dim  # block-diagonal per key/value head
    mask = torch.block_diag(*[torch.ones(d, d, dtype=torch.float64)] * space.heads)
    matrix = torch.eye(space.size, dtype=torch.float64) + (matrix - torch.eye(space.size, dtype=torch.float64)) * mask
    state = mapped(model.state_dict(), space, matrix, invertible[space.name], torch.linalg.inv(matrix).T)
    assert relative(logits(model, state), ref) < 1e-8
    # the check can fail: the same map on the output projection (right for an orthogonal map only) breaks it
    assert relative(logits(model, mapped(model.state_dict(), space, matrix)), ref) > 1e-2
