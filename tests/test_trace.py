import pytest
import torch
from torch import nn
from zoo import SMALL, TIMM, make

from hf_otfusion import PlanError, build_plan
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
    assert "3.weight:0" not in names  # GroupNorm(2, C): channels may not leave their group


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
