import pytest
import torch

from hf_otfusion import FusionError
from hf_otfusion.transport import ChannelMap, barycentric_map, marginal, pairwise_distance, solve, transport_axis


def test_assignment_fast_path_finds_the_permutation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 7, generator=gen)
    perm = torch.randperm(50, generator=gen)
    t = solve(pairwise_distance(a[perm], a), marginal(50), marginal(50))
    assert torch.equal(t.argmax(1), perm)
    assert torch.allclose(t.sum(), torch.tensor(1.0, dtype=t.dtype))


def test_rectangular_emd_respects_marginals():
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(7, 4, generator=gen)
    a, b = marginal(7), marginal(4)
    t = solve(cost, a, b)
    assert torch.allclose(t.sum(1), a) and torch.allclose(t.sum(0), b)
    m = barycentric_map(t, b)
    assert (m.n_out, m.n_in) == (4, 7)


def test_sinkhorn_approaches_emd_and_importance_marginals():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=gen)
    perm = torch.randperm(20, generator=gen)
    cost = pairwise_distance(x[perm], x)
    t = solve(cost, marginal(20), marginal(20), solver="sinkhorn", reg=0.005)
    assert torch.equal(t.argmax(1), perm)
    scores = torch.arange(1, 21.0)
    a = marginal(20, scores)
    assert torch.allclose(a.sum(), torch.tensor(1.0, dtype=a.dtype)) and a[-1] == a.max()


def test_solver_errors_are_clear():
    with pytest.raises(FusionError, match="NaN"):
        solve(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), marginal(2), marginal(2))
    with pytest.raises(FusionError, match="unknown solver"):
        solve(torch.zeros(2, 2), marginal(2), marginal(2), solver="magic")


def test_transport_axis_with_offset_and_repeat():
    # axis 1 = [3 fixed entries | 2 channels repeated 2x]
    x = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7)
    swap = ChannelMap(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    out = transport_axis(x, swap, axis=1, offset=3, repeat=2)
    assert out[0].tolist() == [0, 1, 2, 5, 6, 3, 4]
    merge = ChannelMap(torch.tensor([[0.5, 0.5]]))  # two channels onto one: their mean
    assert transport_axis(x, merge, axis=1, offset=3, repeat=2)[0].tolist() == [0, 1, 2, 4, 5]
