"""Plans that verify themselves: a wrong tracer rule's spaces are found (exactly those) by group testing, fixed with
the reason and reported; a good plan passes untouched; strict refuses a repaired plan; the cache keeps the verdict;
MNASNet (whose loading reads the state dict's version metadata) permutes and fuses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import live_batch_norms, make, randomize_state

from hf_otfusion import build_plan, fuse, random_permutation, trace
from hf_otfusion.errors import PlanError
from hf_otfusion.merge import check_plan
from hf_otfusion.plan_cache import ENV_VAR, cache_dir, cached_plan
from hf_otfusion.transport import ChannelMap, transport_axis
from hf_otfusion.verify import permute_axis, verify_plan

pytestmark = pytest.mark.usefixtures("one_thread")


class Flips(nn.Module):
    """A stack of ``depth`` linear layers; the output of the layers in ``flipped`` is reversed along its channels
    (``torch.flip``: no permutation of those channels commutes with it)."""

    def __init__(self, depth: int, flipped: tuple[int, ...], widths: tuple[int, ...] = ()):
        super().__init__()
        self.flipped = flipped
        widths = (6, *(widths or (8,) * depth))
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(depth))
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x))
            if i in self.flipped:
                x = x.flip(-1)
        return self.head(x)


def _wrong_flip(t, node):
    """A wrong rule: ``flip`` taken for an op that keeps channels in place."""
    return t.of(node.args[0])


@pytest.fixture
def broken_flip(monkeypatch):
    monkeypatch.setitem(trace.RULES, "flip", _wrong_flip)


def _flips(depth: int, flipped: tuple[int, ...], widths: tuple[int, ...] = ()) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Flips(depth, flipped, widths).eval(), torch.randn(2, 6, generator=torch.Generator().manual_seed(1))


def _keeps_function(model: nn.Module, plan, x, seed: int = 5) -> float:
    """The relative output change of a random permutation by ``plan`` of ``model`` randomised (in float64)."""
    model = randomize_state(model, seed).double()
    permuted = random_permutation(model, plan, seed=seed)
    with torch.no_grad():
        ref, out = model(x.double()), permuted(x.double())
    return float((out - ref).abs().max() / ref.abs().max())


def test_a_wrong_rule_s_spaces_are_found_fixed_and_reported(broken_flip, capsys):
    model, x = _flips(4, (1, 3))
    plan = build_plan(model, x)
    bad = {"layers.1.weight:0", "layers.3.weight:0"}  # the spaces whose channels the flips reverse
    assert bad <= {s.name for s in plan.spaces} and not plan.fixed
    assert _keeps_function(model, plan, x) > 1e-3, "the broken rule should give a wrong plan"
    checked = verify_plan(model, plan, x)
    v = checked.verification
    assert v.verified and set(v.repaired) == bad and not v.heads_fixed
    assert {s.name for s in checked.spaces} == {s.name for s in plan.spaces} - bad
    assert len(checked.fixed) == 2 and all("failed verification: permuting it changes the output by" in f.reason
                                           for f in checked.fixed)
    assert {m.split(":")[0] for f in checked.fixed for m in f.members} >= {"layers.1.weight", "layers.2.weight",
                                                                           "layers.3.weight", "head.weight"}
    assert _keeps_function(model, checked, x) < 1e-10
    assert "repaired: 2 spaces" in str(checked) and "failed verification" in str(checked)
    check_plan(checked, strict=False)
    err = capsys.readouterr().err
    assert "warning: 2 hidden spaces left fixed" in err and "failed verification" in err
    with pytest.raises(PlanError, match="failed verification"):
        check_plan(checked, strict=True)


def test_a_good_plan_is_verified_without_repairs():
    model, x = _flips(4, ())
    plan = build_plan(model, x)
    checked = verify_plan(model, plan, x)
    assert checked.verified and checked.verification.repaired == () and checked.verification.dtype == "float64"
    assert checked.model_copy(update={"verification": None}) == plan
    assert checked.verification.passes == 2  # the reference and one permutation of every space
    assert "check: verified" in str(checked)
    checked.check_strict()


@pytest.mark.parametrize("name", ["vgg_bn", "head_scaled_attention", "llama_gqa"])
def test_zoo_plans_are_verified_without_repairs(name):
    model, x = make(name)
    checked = verify_plan(model, build_plan(model, x), x)
    assert checked.verified, checked.verification
    assert checked.verification.repaired == () and checked.verification.heads_fixed == ()


def test_group_testing_stays_within_its_bound(broken_flip):
    n, bad = 16, (4, 11)
    model, x = _flips(n, bad)
    plan = build_plan(model, x)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))  # deep copies of the model keep the hook
    checked = verify_plan(model, plan, x)
    assert set(checked.verification.repaired) == {f"layers.{i}.weight:0" for i in bad}
    k, items = len(bad), len(checked.spaces) + len(bad)
    passes = checked.verification.passes
    assert passes == len(calls)
    # reference, first check and the repaired plan's check, plus at most 2·log2(n) per bad space
    assert passes <= 3 + 2 * k * math.ceil(math.log2(items)), passes
    assert passes < items, "no better than testing each space on its own"


def test_a_wrong_head_space_fixes_its_heads_too():
    model, x = make("head_scaled_attention")
    plan = build_plan(model, x)
    vo = next(s for s in plan.spaces if any(m.tensor == "o.weight" and m.axis == 1 for m in s.members))
    group = vo.head_group
    assert group is not None
    wrong = vo.model_copy(update={"members": tuple(m for m in vo.members if m.tensor != "o.weight")})
    broken = plan.model_copy(update={"spaces": tuple(wrong if s is vo else s for s in plan.spaces)})
    checked = verify_plan(model, broken, x)
    v = checked.verification
    assert v.verified and v.repaired == (vo.name,) and v.heads_fixed == (group,)
    others = [s for s in checked.spaces if s.heads > 1]
    assert others and all(s.head_group is None for s in others)  # their heads now stay in place
    assert any(f.reason.startswith("the order of the heads: failed verification of space") for f in checked.fixed)
    assert _keeps_function(model, checked, x) < 1e-10


def test_the_cache_stores_the_verified_plan(broken_flip, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "plans"))
    model, x = _flips(4, (1,))
    import hf_otfusion.verify as verify

    count = {"verify": 0}
    real = verify._verify

    def counting(*args, **kwargs):
        count["verify"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "_verify", counting)
    first = cached_plan(model, x)
    assert count["verify"] == 1 and first.verification.repaired == ("layers.1.weight:0",)
    (entry,) = cache_dir().glob("*.json")
    assert '"verification"' in entry.read_text() and "failed verification" in entry.read_text()
    second = cached_plan(model, x)
    assert count["verify"] == 1, "the second call verified again"
    assert second == first
    assert cached_plan(model, x, enabled=False) == first and count["verify"] == 2


def test_a_plan_traced_on_meta_is_verified_on_a_real_input():
    with torch.device("meta"):
        model = Flips(3, ()).eval()
    x = torch.randn(2, 6)
    plan = build_plan(model, x.to("meta"))
    assert verify_plan(model, plan, x).verified
    unchecked = verify_plan(model, plan, x.to("meta"))
    assert not unchecked.verified and "meta device" in unchecked.verification.note
    assert "check: not verified: the example input is on the meta device" in str(unchecked)


def test_other_widths_get_the_target_s_repairs(broken_flip):
    wide, x = _flips(3, (1,), (10, 8, 8))
    narrow, _ = _flips(3, (1,), (6, 8, 8))  # the flipped space has the target's width: it can stay fixed
    fused = fuse([wide, narrow], example_input=x, progress=False)  # model 1's plan gets the target's repairs
    assert fused(x).shape == (2, 3) and fused.layers[0].weight.shape == (10, 6)


def test_mnasnet_permutes_and_fuses_back():
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model = live_batch_norms(randomize_state(torchvision.models.mnasnet0_5(num_classes=10)), x).eval()
    plan = build_plan(model, x)
    permuted = random_permutation(model, plan, seed=1)
    with torch.no_grad():
        ref = model(x)
        assert float((permuted(x) - ref).abs().max() / ref.abs().max()) < 1e-4
        assert not torch.equal(permuted.layers[0].weight, model.layers[0].weight)
        fused = fuse([permuted, model], target=1, plan=plan, example_input=x, progress=False)
        assert float((fused(x) - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("name", ["vgg_bn", "llama_gqa"])
def test_the_check_permutes_as_the_engine_transports(name):
    """The check's one-index_select permutation is the engine's transport of a permutation map (repeats, tiles)."""
    model, x = make(name)
    plan = build_plan(model, x)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    for space in plan.spaces:
        order = torch.randperm(space.size, generator=gen)
        for m in space.members:
            t = state[m.tensor]
            expected = transport_axis(t, ChannelMap.permutation(order), space.layout(m))
            assert torch.equal(permute_axis(t, order, space.layout(m), m.tensor), expected), (space.name, m)
