"""Rules for the remaining vision ops (issue 26 item 4): ``roll`` (timm Swin's shifted windows, and a roll along
channels) and timm LeViT's stage views. Every test randomises every parameter and buffer, checks that a random
permutation by the plan keeps the outputs (float64) and that the tensors the rule is meant to move do move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import live_batch_norms, randomize_state

from hf_otfusion import AlignmentPlan, build_plan, random_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def _check(model: nn.Module, x: torch.Tensor, must_move: set[str], op: str) -> AlignmentPlan:
    """Plan ``model`` (randomised), with ``op`` handled; a random permutation keeps the float64 outputs and moves
    every tensor of ``must_move`` (and every tensor the plan names)."""
    model = randomize_state(model).eval()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        live_batch_norms(model, x)
    plan = build_plan(model, x)
    assert op not in plan.unhandled, plan.unhandled
    assert not plan.unhandled, plan.unhandled
    m64, x64 = model.double(), x.double()
    permuted = random_permutation(m64, plan, seed=3)
    with torch.no_grad():
        ref, out = m64(x64), permuted(x64)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-9
    before, after = m64.state_dict(), permuted.state_dict()
    planned = {m.tensor for s in plan.spaces for m in s.members}
    assert must_move <= planned, must_move - planned
    unmoved = {k for k in planned if torch.equal(before[k], after[k])}
    assert not unmoved, unmoved
    return plan


class ChannelRoll(nn.Module):
    """conv -> roll along channels -> conv -> roll along both spatial dims -> pool -> linear."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 3)
        self.norm = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x)).roll(self.shift, 1)
        x = self.norm(self.b(x)).roll((2, -1), (2, 3))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("shift", [3, -5, 8])
def test_roll_along_channels_is_two_segments_and_along_positions_passes(shift):
    torch.manual_seed(0)
    model = ChannelRoll(shift)
    plan = _check(model, torch.randn(2, 3, 8, 8), {"a.weight", "a.bias", "b.weight", "norm.running_mean"}, "roll")
    reads = sorted((m.axis, m.offset) for s in plan.spaces for m in s.members if m.tensor == "b.weight")
    assert reads[0] == (0, 0) and [r for r in reads if r[0] == 1] == ([(1, 0)] if shift % 8 == 0 else
                                                                      [(1, 0), (1, shift % 8)])


def test_roll_of_the_flattened_tensor_fixes_its_channels_and_says_so():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1))

    plan = build_plan(Flat(), torch.randn(2, 4))
    assert plan.unhandled == ("roll",) and not plan.spaces


def test_timm_swin_shifted_windows_plan_with_nothing_unhandled():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=32,
                              window_size=2, depths=(2, 2), num_heads=(2, 4), embed_dim=16)
    x = torch.randn(2, 3, 32, 32)
    assert any(getattr(b.attn, "window_size", None) is not None and b.shift_size != (0, 0)
               for b in model.modules() if type(b).__name__ == "SwinTransformerBlock")
    _check(model, x, {"layers.0.blocks.1.attn.qkv.weight", "layers.0.blocks.1.mlp.fc1.weight",
                      "layers.1.blocks.1.attn.proj.weight", "layers.1.downsample.reduction.weight"}, "roll")


def test_timm_levit_at_a_small_input_plans_its_one_token_stage_with_nothing_unhandled():
    """At 64 x 64 LeViT's last stage holds one token: its LinearNorm's (B, d) -> (B, 1, d) is that token, not the
    single head of multi-query attention, so the stage's attention splits its channels into heads as the others."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=3, img_size=64)
    plan = _check(model, torch.randn(2, 3, 64, 64), {
        "stages.2.downsample.attn_downsample.q.ln.linear.weight", "stages.2.blocks.0.attn.qkv.linear.weight",
        "stages.2.blocks.0.attn.proj.ln.linear.weight", "stages.2.blocks.0.mlp.ln1.linear.weight"}, "view")
    assert not plan.fixed, plan.fixed


class ResampledTable(nn.Module):
    """A conv plus a position table resampled to the feature map (as timm resamples a ViT's at another size)."""

    def __init__(self, mode: str, antialias: bool):
        super().__init__()
        self.mode, self.antialias = mode, antialias
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.randn(1, 8, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = F.interpolate(self.table, size=x.shape[-2:], mode=self.mode, antialias=self.antialias,
                              **({} if self.mode == "nearest" else {"align_corners": False}))
        return self.head(F.gelu(self.conv(x) + table).mean((2, 3)))


@pytest.mark.parametrize("mode,antialias", [("bicubic", True), ("bicubic", False), ("bilinear", True),
                                            ("nearest", False)])
def test_a_resampled_table_moves_with_the_channels_it_is_added_to(mode, antialias):
    torch.manual_seed(0)
    _check(ResampledTable(mode, antialias), torch.randn(2, 3, 8, 8), {"table", "conv.weight", "head.weight"}, "")


class StateConv(nn.Module):
    """EfficientViM's hidden-state mixer in small: a state projection split into b, c, dt; ``h = x @ (a * b)^T``
    puts the state on h's last dim, which a conv1d then reads as its length (kernel ``k``); ``y = h @ c``."""

    def __init__(self, k: int):
        super().__init__()
        self.bcdt, self.hz = nn.Conv1d(6, 3 * 4, 1), nn.Conv1d(6, 8, k, padding=k // 2)
        self.a, self.head = nn.Parameter(torch.randn(4)), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, dt = self.bcdt(x).split([4, 4, 4], dim=1)
        a = (dt + self.a.view(1, -1, 1)).softmax(-1)
        h = F.gelu(self.hz(x @ (a * b).transpose(-2, -1)))
        return self.head((h @ c).mean(-1))


@pytest.mark.parametrize("k", [1, 3])
def test_a_conv_over_a_dim_that_holds_channels_passes_them_with_kernel_1_else_fixes_them(k):
    torch.manual_seed(0)
    plan = _check(StateConv(k), torch.randn(2, 6, 5), {"hz.weight", "head.weight"} | ({"bcdt.weight", "a"} if k == 1
                                                                                        else set()), "")
    state = [s for s in plan.spaces if any(m.tensor == "a" for m in s.members)]
    assert len(state) == (1 if k == 1 else 0)


class Scatter(nn.Module):
    """In-place slice assignments (exported as ``slice_scatter``): a conv's channels 2:5 overwritten by another
    conv's, and a zero buffer filled in two ranges (GhostNet's and latent attention's layouts)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.d, self.head = nn.Conv2d(8, 7, 1), nn.Linear(7 + 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.a(x))
        y[:, 2:5] = self.b(x)
        z = x.new_zeros(x.shape[0], 10, *x.shape[2:])
        z[:, 1:5] = self.c(x)
        z[:, 6:9] = F.relu(self.b(x))
        h = torch.cat([self.d(y), z], 1)
        return self.head(F.gelu(h).mean((2, 3)))


def test_slice_scatter_puts_the_sources_channels_in_the_slice():
    torch.manual_seed(0)
    _check(Scatter(), torch.randn(2, 3, 6, 6), {"a.weight", "b.weight", "c.weight", "d.weight", "head.weight"},
           "slice_scatter")
