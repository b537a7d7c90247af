"""Rules for the hybrid (linear-attention / SSM) families (issue 26 item 4): ``repeat_interleave`` on channels and on
heads (Qwen3-Next's gated delta net and Mamba-2 repeat key or B/C heads over value heads this way). Each test
randomises every parameter and buffer, checks in float64 that a random permutation by the plan keeps the outputs,
and that the tensors meant to move do move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rules_vision import _check
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


class InterleavedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.b(F.gelu(self.a(x)).repeat_interleave(3, dim=-1))))


class InterleavedHeads(nn.Module):
    """Grouped-query attention whose key/value heads are repeated with ``repeat_interleave`` over the head dim."""

    def __init__(self, heads: int = 4, kv: int = 2, d: int = 3, dim: int = 8):
        super().__init__()
        self.h, self.kv, self.d = heads, kv, d
        self.q, self.k, self.v = nn.Linear(dim, heads * d), nn.Linear(dim, kv * d), nn.Linear(dim, kv * d)
        self.o, self.head = nn.Linear(heads * d, dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.h * self.d)
        return self.head((x + self.o(y)).mean(1))


def test_repeat_interleave_of_channels_is_a_channel_major_repeat():
    torch.manual_seed(0)
    plan = _check(InterleavedChannels(), torch.randn(2, 5), {"a.weight", "a.bias", "b.weight"}, "repeat_interleave")
    reads = [m for s in plan.spaces for m in s.members if m.tensor == "b.weight" and m.axis == 1]
    assert [m.repeat for m in reads] == [3]


def test_repeat_interleave_of_key_value_heads_tiles_them_like_repeat_kv():
    torch.manual_seed(0)
    plan = _check(InterleavedHeads(), torch.randn(2, 5, 8), {"q.weight", "k.weight", "v.weight", "o.weight"},
                  "repeat_interleave")
    assert plan.head_groups() and all(s.heads == 2 for s in plan.spaces if s.heads > 1)


class Einsums(nn.Module):
    """A hidden layer read by einsums: a weight contracted with its channels, an ellipsis scale, a per-position
    gate from a contraction of two hidden values, an outer product summed back (as Mamba-2's chunked scan)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
        self.w, self.scale = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = F.gelu(self.a(x)), self.b(x)
        gate = torch.einsum("btc,btc->bt", h, g).sigmoid()
        outer = torch.einsum("btc,bsc->bts", h, g).softmax(-1)
        y = torch.einsum("bts,bsc->btc", outer, h) * gate[..., None]
        z = torch.einsum("...c,c->...c", torch.einsum("btc,cd->btd", y, self.w), self.scale)
        return self.head(F.gelu(z).mean(1))


def test_einsum_joins_the_dims_each_letter_names():
    torch.manual_seed(0)
    plan = _check(Einsums(), torch.randn(2, 5, 5), {"a.weight", "b.weight", "w", "scale", "head.weight"}, "einsum")
    space = next(s for s in plan.spaces if any(m.tensor == "a.weight" for m in s.members))
    assert {m.tensor for m in space.members} >= {"a.weight", "a.bias", "b.weight", "b.bias", "w"}


class OneGroup(nn.Module):
    """Mamba-2's shape in small: one group of B (a state per position) repeated over every head with
    ``repeat_interleave``, a per-head decay, heads contracted with B by einsum, then the heads merged back."""

    def __init__(self, heads: int = 4, p: int = 3, n: int = 5):
        super().__init__()
        self.h, self.p = heads, p
        self.x, self.b = nn.Linear(6, heads * p), nn.Linear(6, n)
        self.decay, self.o = nn.Parameter(torch.randn(heads)), nn.Linear(heads * p, 3)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        bs, t, _ = u.shape
        x = self.x(u).view(bs, t, self.h, self.p) * self.decay[:, None]
        b = self.b(u).view(bs, t, 1, -1).repeat_interleave(self.h, dim=2)
        y = torch.einsum("bthn,bshn,bshp->bthp", b, b, x)
        return self.o(F.gelu(y.reshape(bs, t, self.h * self.p))).mean(1)


def test_a_single_group_repeated_over_heads_takes_on_the_heads():
    torch.manual_seed(0)
    plan = _check(OneGroup(), torch.randn(2, 5, 6), {"x.weight", "decay", "o.weight", "b.weight"}, "einsum")
    assert plan.head_groups() and not plan.fixed
