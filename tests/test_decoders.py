"""Decoder LLMs with their default configs: grouped-query and multi-query attention, rotary embeddings, q/k norms.

Every entry of each model's state dict is random, so a wrong plan changes the outputs under a random permutation,
and the other model must really arrive: ``fuse([A, perm(B)], weights=[0, 1])`` computes B's function.
"""

from __future__ import annotations

import pytest
import torch
from zoo import DECODERS, inputs, make, randomize_state, run

from hf_otfusion import build_plan, fuse, random_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", DECODERS)
def test_default_config_plans_exactly_and_moves_every_projection(family, name):
    model, x, plan, permuted = family(name)
    assert model.config.use_cache, "tracing must not change the model's own config"
    assert not plan.unhandled
    with torch.no_grad():
        assert _rel(run(permuted, x), run(model, x)) < 1e-4
    state, moved = model.state_dict(), permuted.state_dict()
    for key, value in state.items():
        is_projection = value.dim() == 2 and "embed" not in key and "lm_head" not in key and "embed_out" not in key
        if is_projection:
            assert not torch.equal(value, moved[key]), f"{key} did not move"
    for fixed in plan.fixed:  # only what no permutation may move, or a structure named with its reason
        assert fixed.necessary or "inside attention heads" in fixed.reason or "inside every head alike" \
            in fixed.reason, str(fixed)


@pytest.mark.parametrize("name", DECODERS)
def test_the_other_model_arrives_in_the_targets_basis(family, name):
    model, x, plan, _ = family(name)
    other = randomize_state(make(name)[0], seed=11)
    shuffled = random_permutation(other, plan, seed=5)
    with torch.no_grad():
        fused = fuse([model, shuffled], weights=[0, 1], example_input=x, plan=plan, progress=False)
        assert _rel(run(fused, x), run(other, x)) < 1e-4
        both = fuse([model, other], example_input=x, plan=plan, progress=False)
        again = fuse([model, shuffled], example_input=x, plan=plan, progress=False)
        torch.testing.assert_close(run(again, x), run(both, x), rtol=1e-4, atol=1e-5)
        assert _rel(run(both, x), run(model, x)) > 1e-2  # and the average is not the target


def test_grouped_query_plan_ties_kv_heads_to_their_query_groups(family):
    model, x, plan, _ = family("llama_gqa")
    layer = "model.layers.0.self_attn"
    heads = next(s for s in plan.spaces if any(m.tensor == f"{layer}.k_proj.weight" and m.axis == 0 for m in s.members))
    values = next(s for s in plan.spaces if any(m.tensor == f"{layer}.v_proj.weight" and m.axis == 0
                                                for m in s.members))
    assert heads.heads == values.heads == 2 and heads.head_group == values.head_group  # kv heads, one order
    q = next(m for m in heads.members if m.tensor == f"{layer}.q_proj.weight" and m.axis == 0)
    o = next(m for m in values.members if m.tensor == f"{layer}.o_proj.weight")
    assert (q.tile, q.repeat) == (2, 8)  # each kv head's group of 2 query heads (rotary: channels stay in the head)
    assert (o.tile, o.axis) == (2, 1)  # the output projection reads every value head once per query head
    assert any(f"{layer}.q_proj.weight:0" in f.members and f.necessary for f in plan.fixed)


def _swap_kv_heads(model: torch.nn.Module, layer: int, groups: int, d: int) -> torch.nn.Module:
    """By hand: swap kv heads 0 and 1 with their groups of query heads, and shuffle value channels in each head."""
    import copy

    out = copy.deepcopy(model)
    attn = out.model.layers[layer].self_attn
    g = attn.config.num_attention_heads // attn.config.num_key_value_heads
    kv_order = torch.arange(groups).roll(1)
    within = torch.randperm(d, generator=torch.Generator().manual_seed(3))
    kv_idx = torch.cat([h * d + torch.arange(d) for h in kv_order])
    v_idx = torch.cat([h * d + within for h in kv_order])
    q_idx = torch.cat([(h * g + s) * d + torch.arange(d) for h in kv_order for s in range(g)])
    o_idx = torch.cat([(h * g + s) * d + within for h in kv_order for s in range(g)])
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[q_idx])
        attn.k_proj.weight.copy_(attn.k_proj.weight[kv_idx])
        attn.v_proj.weight.copy_(attn.v_proj.weight[v_idx])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, o_idx])
    return out


def test_fuse_undoes_a_hand_built_kv_head_permutation(family):
    model, x, plan, _ = family("llama_gqa")
    swapped = _swap_kv_heads(model, 0, groups=2, d=8)
    with torch.no_grad():
        ref = run(model, x)
        assert _rel(run(swapped, x), ref) < 1e-5  # a function-preserving transform, built without the plan
        naive = {k: (v + swapped.state_dict()[k]) / 2 for k, v in model.state_dict().items()}
        averaged = make("llama_gqa")[0]
        averaged.load_state_dict(naive)
        assert _rel(run(averaged, x), ref) > 1e-2  # plain averaging does not undo it
        fused = fuse([model, swapped], example_input=x, plan=plan, progress=False)
        assert _rel(run(fused, x), ref) < 1e-5


def test_build_plan_leaves_the_cache_setting_and_generates_after():
    model, x = make("llama_gqa")
    build_plan(model, x)
    assert model.config.use_cache
    out = model.generate(**inputs("llama_gqa", 1), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)
