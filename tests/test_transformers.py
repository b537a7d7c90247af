"""Transformers: timm ViT/DeiT (fused qkv, sdpa and eager), transformers ViT and BERT (sdpa and eager).

Attention heads are plan data (``Space.heads``, ``Space.head_group``): a random permutation inside heads and of
whole heads keeps every output, and fusing a model with such a permuted copy returns the original function.
"""

from __future__ import annotations

import pytest
import torch
from zoo import TRANSFORMERS, assert_states_close, inputs, make, moved_from, randomize_state, run

from hf_otfusion import FusionError, build_plan, fuse, random_permutation

TOL = {"rtol": 1e-4, "atol": 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=TOL["rtol"], atol=TOL["atol"] * ref.abs().max().item())


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_plan_has_heads_and_permutation_keeps_the_function(family, name):
    model, x, plan, permuted = family(name)
    assert not plan.unhandled
    groups = plan.head_groups()
    # one head group per attention op: queries/keys and values/outputs (and per-head parameters) share it
    assert len(groups) == (1 if name == "head_scaled_attention" else 2)
    assert all(len(spaces) >= 2 and len({s.heads for s in spaces}) == 1 for spaces in groups.values())
    with torch.no_grad():
        ref, out = run(model, x), run(permuted, x)
    _close(out, ref)
    state, moved_state = model.state_dict(), permuted.state_dict()
    changed = {k for k, v in state.items() if not torch.equal(v, moved_state[k])}
    moved = {m.tensor for s in plan.spaces for m in s.members}
    moved |= {alias for alias, tensor in plan.aliases.items() if tensor in moved}
    assert changed == moved


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_fusing_a_permuted_copy_returns_the_original_function(family, other, name, alignment):
    """A permuted copy fuses back into the original; and, which a fuse that returned the target would fail, another
    model B of the family arrives: ``fuse([A, perm(B)], weights=[0, 1])`` computes B's function, and (weights mode)
    is ``fuse([A, B], weights=[0, 1])``, so ``fuse([A, perm(B)]) == fuse([A, B])`` for any weights."""
    model, x, plan, permuted = family(name)
    calibration = inputs(name, 16, seed=7)
    options = dict(alignment=alignment, calibration=calibration, example_input=x, plan=plan, progress=False)
    with torch.no_grad():
        ref = run(model, x)
        for match_heads, copy in ((True, permuted), (False, random_permutation(model, plan, 2, permute_heads=False))):
            fused = fuse([model, copy], match_heads=match_heads, **options)
            _close(run(fused, x), ref)
        b, shuffled = other(name)
        carried = fuse([model, shuffled], weights=[0, 1], **options)
        _close(run(carried, x), run(b, x))
        if alignment == "weights":
            assert_states_close(carried, fuse([model, b], weights=[0, 1], **options))


def test_head_permuted_copy_needs_head_matching(family):
    model, x, plan, permuted = family("hf_vit_sdpa")
    fused = fuse([model, permuted], example_input=x, plan=plan, match_heads=False, progress=False)
    with torch.no_grad():
        assert not torch.allclose(run(fused, x), run(model, x), rtol=1e-3, atol=1e-3)


def test_timm_fused_qkv_is_three_headed_segments(family):
    model, x, plan, _ = family("timm_vit")
    qk, vo = plan.space("blocks.0.attn.qkv.weight:0"), plan.space("blocks.0.attn.qkv.weight:0@384")
    assert (qk.size, qk.heads, qk.head_dim) == (192, 3, 64) and qk.head_group == vo.head_group == qk.name
    assert {(m.tensor, m.offset) for m in qk.members} == {
        ("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.qkv.weight", 192),
        ("blocks.0.attn.qkv.bias", 0), ("blocks.0.attn.qkv.bias", 192)}
    vo_axes = {(m.tensor, m.axis) for m in vo.members}
    assert vo_axes >= {("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.proj.weight", 1)}
    stream = plan.spaces[0]
    assert stream.kind == "residual" and {"cls_token", "pos_embed", "norm.weight", "head.weight"} <= stream.tensors()
    text = str(plan)
    assert "3x64 g0" in text and "head group g0" in text


def test_bert_embeddings_and_buffers(family):
    model, x, plan, _ = family("hf_bert_sdpa")
    stream = plan.spaces[0]
    assert {f"bert.embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")} <= stream.tensors()
    # the vocabulary, positions and the non-persistent position ids never move
    assert all(m.axis == 1 for m in stream.members if "embeddings.word" in m.tensor)
    assert "bert.embeddings.position_ids" not in plan.tensors or "bert.embeddings.position_ids" in plan.fixed_tensors()
    q = plan.space("bert.encoder.layer.0.attention.self.query.weight:0")
    assert q.tensors() == {f"bert.encoder.layer.0.attention.self.{n}.{p}" for n in ("query", "key")
                           for p in ("weight", "bias")}


def test_tied_decoder_stays_tied(family, other):
    model, x, plan, permuted = family("hf_bert_mlm")
    assert plan.aliases["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    fused = fuse([model, permuted], example_input=x, plan=plan, progress=False)
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        _close(run(fused, x), run(model, x))
    b, shuffled = other("hf_bert_mlm")  # the other model's tied table arrives, and stays tied
    carried = fuse([model, shuffled], weights=[0, 1], example_input=x, plan=plan, progress=False)
    assert carried.cls.predictions.decoder.weight is carried.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        _close(run(carried, x), run(b, x))


def test_different_mlp_widths_fuse_into_the_target():
    import timm

    x = inputs("timm_vit")
    a = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                          depth=2).eval()
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                             depth=2, mlp_ratio=6).eval()
    fused = fuse([a, wide], example_input=x, progress=False)
    assert [p.shape for p in fused.parameters()] == [p.shape for p in a.parameters()]
    assert torch.isfinite(fused(x)).all()
    assert moved_from(fused, a)


def test_different_head_counts_are_a_clear_error():
    from transformers import ViTConfig, ViTForImageClassification

    def vit(heads: int):
        torch.manual_seed(heads)
        return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=heads, intermediate_size=48)).eval()

    with pytest.raises(FusionError, match="4 attention heads in model 1 but 2 in the target"):
        fuse([vit(2), vit(4)], example_input=inputs("hf_vit_sdpa"), progress=False)


def test_plan_json_round_trip_keeps_heads(family):
    from hf_otfusion import AlignmentPlan

    _, _, plan, _ = family("timm_vit")
    again = AlignmentPlan.from_json(plan.to_json())
    assert again == plan and any(s.heads == 3 for s in again.spaces)
    with pytest.raises(ValueError, match="cannot form 5 equal heads"):
        type(plan.spaces[0])(name="s", size=12, members=(), heads=5)


def test_tracing_a_transformer_is_strict_clean():
    model, x = make("hf_bert_eager")
    assert build_plan(model, x, strict=True).head_groups()


def test_per_head_parameters_and_shared_head_norms_move_with_the_heads(family):
    _, _, plan, _ = family("head_scaled_attention")
    temperature = next(s for s in plan.spaces if "temperature" in s.tensors())
    assert (temperature.size, temperature.heads, temperature.head_dim) == (4, 4, 1)
    assert len(plan.head_groups()[temperature.head_group]) == 3
    # timm's qk_norm: a LayerNorm over head_dim whose one weight every head reads: the channels inside the
    # query/key heads move alike in every head (a shared space, the norm's members on one head's channels)
    import timm

    def build(seed: int) -> torch.nn.Module:
        return randomize_state(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4,
                                                 img_size=32, patch_size=8, depth=1, qk_norm=True).eval(), seed)

    model, other = build(0), build(1)
    x = inputs("timm_vit")
    qk_plan = build_plan(model, x, strict=True)
    qk = qk_plan.space("blocks.0.attn.qkv.weight:0")
    assert (qk.size, qk.heads, qk.shared) == (192, 3, True)
    assert {m.tensor for m in qk.members if m.block == 0} == {f"blocks.0.attn.{n}_norm.{p}" for n in "qk"
                                                              for p in ("weight", "bias")}
    values = qk_plan.space("blocks.0.attn.qkv.weight:0@384")
    assert qk.head_group == values.head_group and not values.shared
    assert not qk_plan.fixed and not qk_plan.unhandled
    permuted = random_permutation(model, qk_plan, 1)
    for key in ("blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"):
        assert not torch.equal(model.state_dict()[key], permuted.state_dict()[key]), f"{key} did not move"
    with torch.no_grad():
        _close(run(permuted, x), run(model, x))
        for alignment in ("weights", "activations"):
            fused = fuse([model, permuted], example_input=x, plan=qk_plan, alignment=alignment,
                         calibration=[x] if alignment == "activations" else None, progress=False)
            _close(run(fused, x), run(model, x))
        carried = fuse([model, random_permutation(other, qk_plan, 2)], weights=[0, 1], plan=qk_plan, progress=False)
        _close(run(carried, x), run(other, x))


def _mobilevit(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return randomize_state(timm.create_model("mobilevit_xxs", pretrained=False, num_classes=4).eval(), seed)


def test_timm_mobilevit_plans_exactly_through_its_unfolding_into_the_batch():
    # MobileViT unfolds (B, C, H, W) into (B * C * nh, ph, nw, pw) patches and folds them back: the channels pass
    # through a dim merged with the symbolic batch, and a reshape that splits and merges dims at once
    model, x = _mobilevit(0), torch.randn(2, 3, 64, 64)
    plan = build_plan(model, x, strict=True)
    assert not plan.unhandled and not plan.fixed
    permuted = random_permutation(model, plan, 1)
    for key, value in model.state_dict().items():
        if value.dim() >= 2 and key not in ("stem.conv.weight", "head.fc.weight"):
            assert not torch.equal(value, permuted.state_dict()[key]), f"{key} did not move"
    other = _mobilevit(1)
    with torch.no_grad():
        _close(run(permuted, x), run(model, x))
        _close(run(fuse([model, permuted], plan=plan, progress=False), x), run(model, x))
        moved_other = random_permutation(other, plan, 2)
        carried = fuse([model, moved_other], weights=[0, 1], plan=plan, progress=False)
        _close(run(carried, x), run(other, x))
        by_activations = fuse([model, moved_other], weights=[0, 1], plan=plan, alignment="activations",
                              calibration=x, progress=False)
        _close(run(by_activations, x), run(other, x))


def test_timm_swin_plans_exactly_through_windows_and_patch_merging():
    import timm

    # Swin: the relative position bias is gathered by index, per head (its head axis moves with the heads), windows
    # are rolled and partitioned, and patch merging flattens (2, 2, C) -> 4C, the stream's channels once per position
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4, img_size=56,
                              embed_dim=32, depths=(1, 1), num_heads=(2, 4)).eval()
    randomize_state(model, 0)
    x = torch.randn(2, 3, 56, 56)
    plan = build_plan(model, x, strict=True)
    assert not plan.unhandled and not plan.fixed
    table = next(s for s in plan.spaces if any("relative_position_bias_table" in m.tensor for m in s.members))
    assert table.head_group is not None and table.heads == table.size == 2
    merge_norm = [m for s in plan.spaces for m in s.members if m.tensor == "layers.1.downsample.norm.weight"]
    assert sorted(m.offset for m in merge_norm) == [0, 32, 64, 96]  # the first stage's stream, four times over
    permuted = random_permutation(model, plan, 1)
    for key, value in model.state_dict().items():
        if value.dim() >= 2 and key not in ("patch_embed.proj.weight", "head.fc.weight"):
            assert not torch.equal(value, permuted.state_dict()[key]), f"{key} did not move"
    with torch.no_grad():
        _close(run(permuted, x), run(model, x))
        other = randomize_state(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4,
                                                  img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 4)).eval(), 1)
        carried = fuse([model, random_permutation(other, plan, 2)], weights=[0, 1], plan=plan, progress=False)
        _close(run(carried, x), run(other, x))
