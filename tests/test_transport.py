import pytest
import torch

from hf_otfusion import FusionError
from hf_otfusion.plan import AxisRef, Layout, Space
from hf_otfusion.transport import (
    ChannelMap,
    barycentric_map,
    carry,
    marginal,
    pairwise_distance,
    rows,
    solve,
    solve_heads,
    transport_axis,
)


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
    out = transport_axis(x, swap, Layout(axis=1, size=2, offset=3, repeat=2))
    assert out[0].tolist() == [0, 1, 2, 5, 6, 3, 4]
    merge = ChannelMap(torch.tensor([[0.5, 0.5]]))  # two channels onto one: their mean
    assert transport_axis(x, merge, Layout(axis=1, size=2, offset=3, repeat=2))[0].tolist() == [0, 1, 2, 4, 5]


def test_strided_member_maps_only_its_positions():
    # axis 1 = 2 heads of 6 entries, [2 fixed | 3 channels of the member | 1 fixed] each: block 6, offset 2
    x = torch.arange(3 * 12, dtype=torch.float32).reshape(3, 12)
    where = [2, 3, 4, 8, 9, 10]  # channel c of the member, by hand
    layout = Layout(axis=1, size=6, heads=2, block=6, offset=2)
    assert layout.positions().tolist() == where
    order = torch.tensor([4, 3, 5, 1, 2, 0])  # heads swapped, channels moved inside them
    out = transport_axis(x, ChannelMap(torch.eye(6)[order]), layout)
    expected = x.clone()
    expected[:, where] = x[:, [where[i] for i in order]]
    assert torch.equal(out, expected)
    assert torch.equal(rows(x, layout), x[:, where].T)
    # tiled (each head block twice, as grouped-query attention reads it) and repeated, blocks 7 apart
    tiled = [1 + (h * 2 + s) * 7 + i * 2 + r for h in range(2) for i in range(2) for r in range(2) for s in range(2)]
    assert Layout(axis=1, size=4, heads=2, repeat=2, tile=2, block=7, offset=1).positions().tolist() == tiled
    with pytest.raises(FusionError, match="cannot change width"):
        transport_axis(x, ChannelMap(torch.ones(4, 6) / 6), layout)


def test_a_permutation_is_one_gather_with_the_general_paths_entries():
    # the permutation fast path of transport_axis against the general one (a map scaled by one)
    gen = torch.Generator().manual_seed(3)
    layouts = [dict(axis=1, offset=3), dict(axis=0, offset=0, repeat=2), dict(axis=1, offset=2, heads=2, block=6),
               dict(axis=1, offset=1, heads=2, repeat=2, tile=2, block=7), dict(axis=0, offset=0, heads=2, tile=2),
               dict(axis=2, offset=1)]
    for layout in layouts:
        n = 4 if layout.get("block") == 7 else 6 if layout.get("block") else 4
        x = torch.randn(32, 32, 5, generator=gen)
        order = torch.randperm(n, generator=gen)
        if layout.get("heads", 1) > 1 and layout.get("block") is not None:  # stays inside the member's head blocks
            d = n // layout["heads"]
            order = torch.cat([h * d + torch.randperm(d, generator=gen) for h in torch.randperm(layout["heads"])])
        fast = transport_axis(x, ChannelMap.permutation(order), Layout(size=n, **layout))
        scaled = ChannelMap.permutation(order)
        scaled.scale = torch.ones(n, 1)  # takes the general path, exactly
        general = transport_axis(x, scaled, Layout(size=n, **layout))
        assert torch.equal(fast, general) and fast.is_contiguous(), layout


def test_carry_moves_strided_members_in_place():
    values = torch.arange(12, dtype=torch.float64)
    member = AxisRef(tensor="w", axis=0, offset=2, block=6)
    layout = Space(name="s", size=6, heads=2, members=(member,)).layout(member)
    assert layout == Layout(axis=0, size=6, heads=2, offset=2, block=6)
    swap_heads = torch.zeros(6, 6, dtype=torch.float64)
    swap_heads[[0, 1, 2, 3, 4, 5], [3, 4, 5, 0, 1, 2]] = 1 / 6  # parent head 0 -> fused head 1 and back
    out = carry(values, [(layout, swap_heads)], 12, "mismatch")
    assert out.tolist() == [0, 1, 8, 9, 10, 5, 6, 7, 2, 3, 4, 11]
    with pytest.raises(FusionError, match="mismatch"):
        carry(values, [(layout, swap_heads[:, :4] * 1.5)], 10, "mismatch")


def _assignment_costs():
    """Seeded square costs of the kinds fusions produce: independent rows, a noisy permuted copy, uniform noise."""
    gen = torch.Generator().manual_seed(14)
    for n in (1, 7, 64, 300):
        w = torch.randn(n, 16, generator=gen)
        yield pairwise_distance(w, torch.randn(n, 16, generator=gen))
        yield pairwise_distance(w, w[torch.randperm(n, generator=gen)] + 0.3 * torch.randn(n, 16, generator=gen))
        yield torch.rand(n, n, generator=gen)
    yield torch.randint(0, 3, (40, 40), generator=gen).float()  # many tied optima


def test_assignment_solver_matches_scipy_optimum():
    pytest.importorskip("lap")
    from scipy.optimize import linear_sum_assignment

    from hf_otfusion import transport

    assert transport._lapjvs() is not None  # lapx is a dependency: the fast solver is the one in use
    for cost in _assignment_costs():
        c = cost.double().numpy()
        n = c.shape[0]
        t = solve(cost, marginal(n), marginal(n))
        perm = t.argmax(1)
        assert torch.equal(torch.sort(perm).values, torch.arange(n))  # a permutation, every entry 1/n
        assert torch.allclose(t.sum(0), marginal(n)) and torch.allclose(t.sum(1), marginal(n))
        rows, cols = linear_sum_assignment(c)
        assert abs(c[torch.arange(n).numpy(), perm.numpy()].sum() - c[rows, cols].sum()) <= 1e-9 * max(1, n)


def test_assignment_falls_back_to_scipy_without_lapx(monkeypatch):
    import sys

    from hf_otfusion import transport

    monkeypatch.setitem(sys.modules, "lap", None)  # `from lap import ...` now raises ImportError
    assert transport._lapjvs() is None
    calls = []
    real = transport.linear_sum_assignment
    monkeypatch.setattr(transport, "linear_sum_assignment", lambda c: calls.append(c.shape) or real(c))
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(30, 5, generator=gen)
    perm = torch.randperm(30, generator=gen)
    t = solve(pairwise_distance(a[perm], a), marginal(30), marginal(30))
    assert calls == [(30, 30)] and torch.equal(t.argmax(1), perm)


def test_distance_of_blocks_wide_path_equals_cdist_of_the_joined_rows(monkeypatch):
    """Wide members (a vocabulary-wide embedding) are summed block by block instead of joined: same distances."""
    from hf_otfusion import transport

    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, d, generator=g).to(torch.bfloat16), torch.randn(5, d, generator=g).to(torch.bfloat16))
             for d in (7, 40, 3)]
    joined_a = torch.cat([a.float() for a, _ in pairs], 1)
    joined_b = torch.cat([b.float() for _, b in pairs], 1)
    small, na, nb = transport.distance_of_blocks(pairs, 6, 5)
    assert torch.equal(small, torch.cdist(joined_a, joined_b))  # the small path is cdist itself
    monkeypatch.setattr(transport, "_LARGE", 10)
    wide, wa, wb = transport.distance_of_blocks(pairs, 6, 5)
    assert wide.dtype == torch.float32 and wide.shape == (6, 5)
    torch.testing.assert_close(wide, small, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wa, na, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wb, nb, rtol=1e-5, atol=1e-6)
    same = [(a, a) for a, _ in pairs]  # a model against itself: zero on the diagonal, not a small negative's NaN
    d, _, _ = transport.distance_of_blocks(same, 6, 6)
    assert torch.isfinite(d).all() and d.diagonal().abs().max() < 1e-2 and (d + torch.eye(6) * 1e9).min() > 0.1
    empty, za, zb = transport.distance_of_blocks([], 3, 4)
    assert empty.shape == (3, 4) and not empty.any() and za.shape == (3,) and zb.shape == (4,)


def test_shared_heads_get_one_map_inside_every_head_and_block_zero_members_hold_one_head():
    gen = torch.Generator().manual_seed(0)
    heads, d = 3, 4
    sigma, order = torch.tensor([2, 0, 3, 1]), [1, 2, 0]  # one map inside every head, and a head order
    feats = torch.randn(heads * d, 5, generator=gen, dtype=torch.float64)
    source = torch.cat([h * d + sigma for h in order])  # target channel j <- channel source[j]
    noise = torch.randn(heads * d, 5, generator=gen, dtype=torch.float64)
    cost = pairwise_distance(feats, feats[source] + 1.5 * noise)
    uniform = marginal(heads * d)
    t = solve_heads(cost, uniform, uniform.clone(), heads, order, shared=True)
    assert torch.equal(t.argmax(0), source)  # the heads' summed costs find the map that one head alone misses
    assert not torch.equal(solve_heads(cost, uniform, uniform.clone(), heads, order).argmax(0), source)
    m = barycentric_map(t, uniform)
    one_head = torch.randn(d, 2, generator=gen, dtype=torch.float64)  # an axis every head reads (block 0)
    shared = Layout(axis=0, size=heads * d, heads=heads, block=0)
    moved = transport_axis(one_head, m, shared)
    torch.testing.assert_close(moved, one_head[sigma])
    assert shared.positions().tolist() == list(range(d)) * heads


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("n, heads", [(24, 4), (48, 8), (72, 12)])
def test_head_blocks_of_a_permutation_map_channels_with_weights_of_exactly_one(n, heads, shared):
    # uniform marginals 1/n: the blocks' columns must sum to b exactly, so that the map is the permutation itself
    # (weight matching starts from it); scaling a block by its head's mass left these sizes one ulp off
    gen = torch.Generator().manual_seed(0)
    d = n // heads
    inner = torch.randperm(d, generator=gen)
    cost = torch.ones(n, n)
    for h in range(heads):
        cost[h * d + inner, h * d + torch.arange(d)] = 0.0
    b = marginal(n)
    m = barycentric_map(solve_heads(cost, b, b.clone(), heads, list(range(heads)), shared=shared), b)
    assert m.scale is None and m.index is not None
    assert torch.equal(m.index, torch.cat([h * d + inner for h in range(heads)]))
