"""Decoder LLMs with their default configs: grouped-query and multi-query attention, rotary embeddings, q/k norms.

Every entry of each model's state dict is random, so a wrong plan changes the outputs under a random permutation,
and the other model must really arrive: ``fuse([A, perm(B)], weights=[0, 1])`` computes B's function.
"""

from __future__ import annotations

import pytest
import torch
from zoo import DECODERS, inputs, make, randomize_state, run

from hf_otfusion import FusionError, build_plan, fuse, random_permutation

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
    for fixed in plan.fixed:  # only what no permutation may move (Qwen3's q/k norm is followed by rotary)
        assert fixed.necessary, str(fixed)
    plan.check_strict()


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
    # each kv head's group of 2 query heads (rotary: channels stay in the head, whole heads contiguous)
    assert (q.tile, q.repeat, q.block) == (2, 8, None)
    assert (o.tile, o.axis) == (2, 1)  # the output projection reads every value head once per query head
    assert any(f"{layer}.q_proj.weight:0" in f.members and f.necessary for f in plan.fixed)
    # the query heads inside each kv head's group: a space of their own, whose heads the group above moves
    queries = next(s for s in plan.spaces if s.queries and s.head_group == heads.head_group)
    assert (queries.size, queries.heads, queries.head_dim, queries.sites) == (4, 2, 2, ())
    assert {(m.tensor, m.axis, m.repeat, m.tile) for m in queries.members} == {
        (f"{layer}.q_proj.weight", 0, 8, 1), (f"{layer}.o_proj.weight", 1, 8, 1)}
    assert [s.name for s in plan.spaces].index(queries.name) > [s.name for s in plan.spaces].index(values.name)


def _swap_kv_heads(model: torch.nn.Module, layer: int, groups: int, d: int) -> torch.nn.Module:
    """By hand: swap kv heads 0 and 1 with their groups of query heads, reverse the query heads inside each group,
    and shuffle value channels in each head."""
    import copy

    out = copy.deepcopy(model)
    attn = out.model.layers[layer].self_attn
    g = attn.config.num_attention_heads // attn.config.num_key_value_heads
    kv_order = torch.arange(groups).roll(1)
    within = torch.randperm(d, generator=torch.Generator().manual_seed(3))
    kv_idx = torch.cat([h * d + torch.arange(d) for h in kv_order])
    v_idx = torch.cat([h * d + within for h in kv_order])
    q_idx = torch.cat([(h * g + s) * d + torch.arange(d) for h in kv_order for s in reversed(range(g))])
    o_idx = torch.cat([(h * g + s) * d + within for h in kv_order for s in reversed(range(g))])
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[q_idx])
        attn.k_proj.weight.copy_(attn.k_proj.weight[kv_idx])
        attn.v_proj.weight.copy_(attn.v_proj.weight[v_idx])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, o_idx])
    return out


def test_fuse_undoes_a_hand_built_kv_head_and_query_head_permutation(family):
    model, x, plan, _ = family("llama_gqa")
    swapped = _swap_kv_heads(model, 0, groups=2, d=8)
    with torch.no_grad():
        ref = run(model, x)
        assert _rel(run(swapped, x), ref) < 1e-5  # a function-preserving transform, built without the plan
        naive = {k: (v + swapped.state_dict()[k]) / 2 for k, v in model.state_dict().items()}
        averaged = make("llama_gqa")[0]
        averaged.load_state_dict(naive)
        assert _rel(run(averaged, x), ref) > 1e-2  # plain averaging does not undo it
        other = randomize_state(make("llama_gqa")[0], seed=11)
        other_swapped = _swap_kv_heads(other, 0, groups=2, d=8)  # and another model, so swapped, arrives
        for alignment in ("weights", "activations"):
            options = dict(example_input=x, plan=plan, alignment=alignment, progress=False,
                           calibration=[x] if alignment == "activations" else None)
            fused = fuse([model, swapped], **options)
            assert _rel(run(fused, x), ref) < 1e-5, alignment
            carried = fuse([model, other_swapped], weights=[0, 1], **options)
            assert _rel(run(carried, x), run(other, x)) < 1e-5, alignment
        fused = fuse([model, swapped], example_input=x, plan=plan, sweeps=2, progress=False)
        assert _rel(run(fused, x), ref) < 1e-5


def test_build_plan_leaves_the_cache_setting_and_generates_after():
    model, x = make("llama_gqa")
    build_plan(model, x)
    assert model.config.use_cache
    out = model.generate(**inputs("llama_gqa", 1), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


def _origins(orig: torch.Tensor, moved: torch.Tensor) -> list[int]:
    """For each row of ``moved``, the row of ``orig`` it came from: rows are matched by their sorted entries, which
    do not depend on how the columns (the residual stream) were permuted."""
    keys = {tuple(torch.sort(r).values.tolist()): i for i, r in enumerate(orig)}
    assert len(keys) == len(orig), "random rows are distinct"
    return [keys[tuple(torch.sort(r).values.tolist())] for r in moved]


def _head_moves(orig: torch.Tensor, moved: torch.Tensor, heads: int) -> tuple[list[int], list[list[int]]]:
    """(origin head of each head, origin position inside its head of each row of each head) of a permuted weight
    whose rows are ``heads`` blocks, each row's origin found by :func:`_origins`."""
    d = orig.shape[0] // heads
    src = _origins(orig, moved)
    head_of = [src[h * d] // d for h in range(heads)]
    assert all(src[h * d + i] // d == head_of[h] for h in range(heads) for i in range(d)), "heads move whole"
    return head_of, [[src[h * d + i] % d for i in range(d)] for h in range(heads)]


PARTIAL_ROTARY = {"gpt_neox_partial_rotary": "gpt_neox.layers.0.attention", "phi_partial_rotary":
                  "model.layers.0.self_attn"}


@pytest.mark.parametrize("name", list(PARTIAL_ROTARY))
def test_partial_rotary_plan_fixes_only_the_rotary_channels(family, name):
    model, _, plan, _ = family(name)
    d = model.config.hidden_size // model.config.num_attention_heads
    rot = int(d * 0.5)
    assert plan.fixed and all(f.necessary and f.size == rot for f in plan.fixed), [str(f) for f in plan.fixed]
    layer = PARTIAL_ROTARY[name]
    assert all(f"{layer}.v_proj.weight:0" not in f.members and f"{layer}.dense.weight:1" not in f.members
               for f in plan.fixed)  # values move (NeoX's fused qkv holds its rotary rows too: size says which)
    strided = [m for s in plan.spaces for m in s.members if m.block is not None]
    assert strided and all(m.block == (3 * d if "neox" in name else d) for m in strided)
    again = type(plan).from_json(plan.to_json())
    assert again == plan


def test_gpt_neox_permutation_moves_value_and_pass_rows_inside_heads(family):
    model, _, _, permuted = family("gpt_neox_partial_rotary")
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    rot = d // 2
    head_of, inside = _head_moves(model.state_dict()[name], permuted.state_dict()[name], heads)
    assert head_of != list(range(heads))  # whole heads moved
    for h in range(heads):  # per head: [q rot | q pass | k rot | k pass | v], each segment stays a segment
        q, k, v = inside[h][:d], inside[h][d : 2 * d], inside[h][2 * d :]
        assert q[:rot] == list(range(rot)) and k[:rot] == list(range(d, d + rot))  # rotary: in place
        assert sorted(q[rot:]) == list(range(rot, d)) and [i - d for i in k[rot:]] == q[rot:]  # one q/k map
        assert sorted(v) == list(range(2 * d, 3 * d))
    assert any(inside[h][rot:d] != list(range(rot, d)) for h in range(heads)), "no pass channel moved"
    assert any(inside[h][2 * d :] != list(range(2 * d, 3 * d)) for h in range(heads)), "no value channel moved"


def test_phi_permutation_moves_pass_rows_with_one_map_per_query_group(family):
    model, _, _, permuted = family("phi_partial_rotary")
    layer, config = "model.layers.0.self_attn", model.config
    d = config.hidden_size // config.num_attention_heads
    rot, g = d // 2, config.num_attention_heads // config.num_key_value_heads
    state, moved = model.state_dict(), permuted.state_dict()
    q_heads, q_in = _head_moves(state[f"{layer}.q_proj.weight"], moved[f"{layer}.q_proj.weight"],
                                config.num_attention_heads)
    k_heads, k_in = _head_moves(state[f"{layer}.k_proj.weight"], moved[f"{layer}.k_proj.weight"],
                                config.num_key_value_heads)
    v_heads, v_in = _head_moves(state[f"{layer}.v_proj.weight"], moved[f"{layer}.v_proj.weight"],
                                config.num_key_value_heads)
    assert k_heads == v_heads != list(range(config.num_key_value_heads))
    for h, within in enumerate(q_in):
        assert q_heads[h] // g == k_heads[h // g]  # a query head stays in the group of its kv head
        assert within[:rot] == list(range(rot)) and within[rot:] == k_in[h // g][rot:]  # the kv head's pass map
    assert all(k[:rot] == list(range(rot)) for k in k_in)
    assert any(k[rot:] != list(range(rot, d)) for k in k_in), "no pass channel moved"
    assert any(v != list(range(d)) for v in v_in), "no value channel moved"


def test_grouped_query_models_of_different_head_widths_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(head_dim: int) -> torch.nn.Module:
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim))

    x = {"input_ids": torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(FusionError, match="different head widths with grouped- or multi-query attention"):
        fuse([build(8), build(16)], example_input=x, progress=False)
