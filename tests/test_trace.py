import copy

import pytest
import torch
from torch import nn
from zoo import SMALL, TIMM, live_batch_norms, make, randomize_state, run

from hf_otfusion import PlanError, build_plan, fuse, random_permutation
from hf_otfusion.trace import RULES, register_rule

FAMILIES = SMALL + ["timm_resnet18", "timm_resnet50", "timm_vgg11", "timm_mobilenetv3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_random_permutation_keeps_function_and_changes_weights(family, name):
    model, x, plan, permuted = family(name)
    assert len(plan.spaces) > 0
    assert not plan.unhandled
    with torch.no_grad():
        ref, out = model(x), permuted(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])]
    state = model.state_dict()
    moved = {m.tensor for s in plan.spaces for m in s.members}
    # every moved tensor changes, unless all its entries are equal (zero-initialised biases)
    assert set(changed) == {k for k in moved if not (state[k] == state[k].flatten()[0]).all()}


def test_mlp_plan_spaces_and_fixed_classifier():
    model, x = make("mlp")
    plan = build_plan(model, x)
    assert [(s.name, s.size) for s in plan.spaces] == [("0.weight:0", 32), ("2.weight:0", 24)]
    assert plan.spaces[0].tensors() == {"0.weight", "0.bias", "2.weight"}
    # the classifier's output units are never moved
    assert "5.bias" in plan.fixed_tensors()
    assert all(not (m.tensor == "5.weight" and m.axis == 0) for s in plan.spaces for m in s.members)


def test_flatten_after_conv_is_a_repeated_space():
    model, x = make("vgg")
    plan = build_plan(model, x)
    last_conv = plan.space("6.weight:0")
    fc = [m for m in last_conv.members if m.tensor == "9.weight"]
    assert len(fc) == 1 and fc[0].axis == 1 and fc[0].repeat == 16


def test_residual_stream_is_one_space_with_every_norm_buffer():
    model, x = make("resnet_basic")
    plan = build_plan(model, x)
    stream = plan.space("stem.0.weight:0")
    assert stream.kind == "residual"
    tensors = stream.tensors()
    for name in ("stem.1.running_mean", "stem.1.running_var", "blocks.0.bn2.weight", "blocks.1.bn2.bias",
                 "blocks.0.conv1.weight", "blocks.2.shortcut.0.weight"):
        assert name in tensors


def test_concat_stacks_spaces_at_offsets():
    model, x = make("densenet")
    plan = build_plan(model, x)
    growth = plan.space("1.conv.weight:0")
    bn = [m for m in growth.members if m.tensor == "2.bn.weight"]
    assert bn[0].offset == 8 and growth.size == 4


def test_depthwise_and_grouped_convs():
    model, x = make("mobilenet_se")
    plan = build_plan(model, x)
    stem = plan.space("0.weight:0")
    dw = [m for m in stem.members if m.tensor == "3.weight"]
    assert dw and dw[0].repeat == 2  # channel multiplier 2: each input channel owns two outputs
    gn_model, gx = make("groupnorm_cnn")
    gn_plan = build_plan(gn_model, gx)
    names = [s.name for s in gn_plan.spaces]
    assert "0.weight:0" in names  # GroupNorm(1, C): free
    groups = gn_plan.space("3.weight:0")  # GroupNorm(2, C): its groups are heads, each moving as a whole
    assert (groups.heads, groups.head_group, groups.shared) == (2, "3.weight:0", False)
    assert not gn_plan.fixed
    gn_model = randomize_state(gn_model, 0)
    permuted = random_permutation(gn_model, gn_plan, seed=1)
    assert not torch.equal(permuted.state_dict()["3.weight"], gn_model.state_dict()["3.weight"])
    with torch.no_grad():
        assert _rel(run(permuted, gx), run(gn_model, gx)) < 1e-5


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.special.bessel_j0(self.fc1(x)))


def test_op_without_rule_fixes_its_spaces_and_is_reported():
    plan = build_plan(Mystery(), torch.randn(2, 4))
    assert plan.spaces == ()
    assert plan.unhandled == ("special_bessel_j0",)
    with pytest.raises(PlanError, match="special_bessel_j0"):
        build_plan(Mystery(), torch.randn(2, 4), strict=True)


class MysteryBranch(nn.Module):
    """A stream that a branch through an op without a rule is added to (as an MoE block's experts are)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc3(h + torch.special.bessel_j0(self.fc2(h)))


def test_channels_joined_with_an_unruled_ops_output_are_fixed_for_that_op_not_as_a_table():
    plan = build_plan(MysteryBranch(), torch.randn(2, 4))
    assert plan.unhandled == ("special_bessel_j0",)
    stream = next(f for f in plan.fixed if "fc1.weight:0" in f.members)
    assert "no tracer rule for op 'special_bessel_j0'" in stream.reason and not stream.necessary, str(stream)


def test_register_rule_teaches_the_tracer_a_new_op():
    try:
        register_rule("special_bessel_j0")(RULES["relu"])
        plan = build_plan(Mystery(), torch.randn(2, 4), strict=True)
        assert [s.name for s in plan.spaces] == ["fc1.weight:0"]
    finally:
        RULES.pop("special_bessel_j0")


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if x.sum() > 0 else x

    with pytest.raises(PlanError, match="could not trace DataDependent"):
        build_plan(DataDependent(), torch.randn(2, 4))


def test_tied_weights_are_reported_as_aliases():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.emb(ids))))

    plan = build_plan(Tied(), torch.randint(0, 10, (2, 3)))
    assert plan.aliases == {"head.weight": "emb.weight"}


@pytest.mark.parametrize("name", [n for n in TIMM if n not in FAMILIES][:1])
def test_more_timm_families_plan_without_unhandled_ops(name):
    model, x = make(name)
    assert not build_plan(model, x).unhandled


# ----------------------------------------------------------------------------------------------------------
# Per-head tables and grouped convolutions, with every entry of the state dict random: a wrong plan changes the
# function under a random permutation, and fusing with weights [0, 1] must carry the other model over exactly.


def _hf_swin() -> tuple[nn.Module, object]:
    import transformers

    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                     window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(config), torch.randn(2, 3, 32, 32)


def _hf_t5() -> tuple[nn.Module, object]:
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 64, (2, 7), generator=gen),
           "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=gen)}
    return transformers.T5ForConditionalGeneration(config), ids


def _timm_model(name: str):
    def build() -> tuple[nn.Module, object]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=4), torch.randn(2, 3, 32, 32)

    return build


def _timm_levit() -> tuple[nn.Module, object]:
    import timm  # per-head attention biases gathered by index, BatchNorm after every linear (96 px: no 1x1 stage)

    return timm.create_model("levit_128s", pretrained=False, num_classes=4, img_size=96), torch.randn(2, 3, 96, 96)


def _timm_eva02() -> tuple[nn.Module, object]:
    import timm  # interleaved rotary (a stack), a zero key bias buffer between the q and v biases, SwiGLU

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=4, img_size=28, depth=2)
    return model, torch.randn(2, 3, 28, 28)


BLOCKED = {"hf_swin": _hf_swin, "hf_t5": _hf_t5, "timm_regnetx_002": _timm_model("regnetx_002"),
           "timm_resnext26ts": _timm_model("resnext26ts"), "timm_levit": _timm_levit, "timm_eva02": _timm_eva02}
_BLOCKED_CACHE: dict[str, tuple] = {}


def _random_state(model: nn.Module, seed: int) -> nn.Module:
    randomize_state(model, seed)
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if key.endswith("running_var"):
                value.abs_().add_(0.5)
    return model.eval()


def _blocked(name: str) -> tuple:
    if name not in _BLOCKED_CACHE:
        torch.manual_seed(0)
        model, x = BLOCKED[name]()
        model = live_batch_norms(_random_state(model, 0), x)
        plan = build_plan(model, x)
        with torch.no_grad():  # a live signal: outputs that depend on the input (else invariance proves nothing)
            out = run(model, x)
            assert float((out - out.mean(0)).abs().max()) > 1e-3 * float(out.abs().max()), f"{name}: dead signal"
        _BLOCKED_CACHE[name] = (model, x, plan, random_permutation(model, plan, seed=1))
    return _BLOCKED_CACHE[name]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _in_float64(model: nn.Module, x: object) -> torch.Tensor:
    double = copy.deepcopy(model).double()
    if isinstance(x, dict):
        return run(double, {k: v.double() if v.is_floating_point() else v for k, v in x.items()}).double()
    return run(double, x.double())


def _space_of(plan, tensor: str, axis: int):
    return next(s for s in plan.spaces if any(m.tensor == tensor and m.axis == axis for m in s.members))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(BLOCKED))
def test_per_head_tables_and_grouped_convs_plan_exactly(name):
    model, x, plan, permuted = _blocked(name)
    assert not plan.unhandled
    with torch.no_grad():  # in float64: random BatchNorm statistics give LeViT outputs too large for float32's error
        assert _rel(_in_float64(permuted, x), _in_float64(model, x)) < 1e-5  # T5 norms in float32 inside
    state, moved = model.state_dict(), permuted.state_dict()
    for key, value in state.items():  # every hidden weight layer moves (not the stem's input, nor the classifier)
        if value.dim() >= 2 and not any(io in key for io in ("embed", "stem", "head", "classifier", "lm_head",
                                                              "shared", "relative_position_index", "bias_idxs")):
            assert not torch.equal(value, moved[key]), f"{key} did not move"


@pytest.mark.parametrize("name", ["hf_swin", "hf_t5", "timm_levit"])
def test_relative_position_bias_tables_move_with_their_heads(name):
    model, x, plan, permuted = _blocked(name)
    tables = [k for k in plan.tensors if k.endswith(("relative_position_bias_table", "relative_attention_bias.weight",
                                                     "attention_biases"))]
    assert tables
    for table in tables:
        assert not torch.equal(model.state_dict()[table], permuted.state_dict()[table]), f"{table} did not move"
        heads = _space_of(plan, table, 0 if name == "timm_levit" else 1)  # a member of its attention's heads
        query = {"hf_t5": table.split(".relative")[0] + ".q.weight",
                 "hf_swin": table.split(".relative")[0] + ".q_proj.weight",
                 "timm_levit": table.removesuffix("attention_biases") + "qkv.linear.weight"}[name]
        if query not in plan.tensors:  # LeViT's downsampling attention: keys and values from their own projection
            query = query.replace(".qkv.", ".kv.")
        assert heads.head_group is not None and heads.heads == heads.size
        assert _space_of(plan, query, 0).head_group == heads.head_group


def test_eva02_leaves_only_its_rotary_channels_in_place():
    model, _, plan, permuted = _blocked("timm_eva02")
    assert plan.fixed and all(f.necessary and "rotary" in f.reason for f in plan.fixed)
    assert not any("v_bias" in m or "proj.weight" in m for f in plan.fixed for m in f.members)  # values move
    v_bias = model.state_dict()["blocks.0.attn.v_bias"]  # inside its heads, and with them
    assert not torch.equal(v_bias, permuted.state_dict()["blocks.0.attn.v_bias"])
    assert torch.equal(permuted.blocks[0].attn.k_bias, torch.zeros_like(v_bias))  # (not saved: a constant)


def test_t5_bias_shared_by_every_layer_ties_their_heads():
    _, _, plan, _ = _blocked("hf_t5")
    table = _space_of(plan, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1)
    tied = {m.tensor for s in plan.head_groups()[table.head_group] for m in s.members}
    assert {"encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.1.layer.0.SelfAttention.q.weight",
            "encoder.block.1.layer.0.SelfAttention.o.weight"} <= tied
    # cross-attention adds a zero bias: its heads stay free, one order per layer
    cross = [_space_of(plan, f"decoder.block.{i}.layer.1.EncDecAttention.q.weight", 0) for i in range(2)]
    assert all(s.head_group is not None for s in cross) and cross[0].head_group != cross[1].head_group


@pytest.mark.parametrize("name", ["timm_regnetx_002", "timm_resnext26ts"])
def test_grouped_conv_moves_whole_groups_and_the_channels_inside_alike(name):
    model, _, plan, permuted = _blocked(name)
    convs = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert convs
    for key, conv in convs:
        out = _space_of(plan, f"{key}.weight", 0)
        into = _space_of(plan, f"{key}.weight", 1)
        assert into.head_group == out.head_group is not None and into is not out
        assert out.heads == into.heads == conv.groups and out.head_dim == conv.out_channels // conv.groups
        assert into.shared and not out.shared  # one input map for every group; outputs free inside each group
        assert [m.block for m in into.members if m.tensor == f"{key}.weight"] == [0]
        w, moved = model.state_dict()[f"{key}.weight"], permuted.state_dict()[f"{key}.weight"]
        # the input channels inside the groups moved: some output channel reads its inputs in another order
        assert not any(torch.equal(moved[i], w[j]) for i in range(2) for j in range(w.shape[0]))
    assert not plan.fixed and not plan.refusals()
    plan.check_strict()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_grouped_conv_fused_with_its_own_permutation_is_itself(alignment):
    model, x, plan, permuted = _blocked("timm_regnetx_002")
    model, permuted, x = copy.deepcopy(model).double(), copy.deepcopy(permuted).double(), x.double()
    options = dict(alignment=alignment, calibration=[x] if alignment == "activations" else None, example_input=x,
                   plan=plan, progress=False)
    with torch.no_grad():  # in float64: random BatchNorm statistics give activations whose squares overflow float32
        fused = fuse([model, permuted], **options)
        assert _rel(run(fused, x), run(model, x)) < 1e-9
        # and another model, permuted, arrives in the target's basis (which a copy of the target would not)
        torch.manual_seed(11)
        built, x_other = BLOCKED["timm_regnetx_002"]()
        other = live_batch_norms(_random_state(built, seed=11), x_other, seed=11).double()
        carried = fuse([model, random_permutation(other, plan, seed=5)], weights=[0, 1], **options)
        assert _rel(run(carried, x), run(other, x)) < 1e-9


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(BLOCKED))
def test_the_other_blocked_model_arrives_in_the_targets_basis(name):
    model, x, plan, _ = _blocked(name)
    built, x_other = BLOCKED[name]()
    other = live_batch_norms(_random_state(built, seed=11), x_other, seed=11)
    with torch.no_grad():
        shuffled = random_permutation(other, plan, seed=5)
        fused = fuse([model, shuffled], weights=[0, 1], example_input=x, plan=plan, progress=False)
        assert _rel(_in_float64(fused, x), _in_float64(other, x)) < 1e-5
