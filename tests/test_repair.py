"""Norm-statistics reset and REPAIR: exact statistics on tiny models, architecture kept, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_otfusion import (
    FusionError,
    align,
    build_plan,
    fuse,
    random_permutation,
    repair_model,
    reset_norm_stats,
    vanilla_average,
)
from hf_otfusion.registry import REPAIRS

X = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _mlp(seed: int, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), *([nn.LayerNorm(24)] if norm else []), nn.ReLU(),
                         nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))


def _bn_cnn(seed: int, bias: bool = False, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6) if bn else nn.Identity(), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8) if bn else nn.Identity(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    with torch.no_grad():  # running statistics that do not describe X, and affine weights of both signs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _channel_stats(model: nn.Module, kinds: tuple[type, ...], x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(mean, std) per channel of the output of every module of the given kinds (the classifier excluded)."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in model.modules()
             if isinstance(m, kinds) and not (isinstance(m, nn.Linear) and m.out_features == 5)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    stats = []
    for o in outs:
        rows = o.movedim(1, -1).reshape(-1, o.shape[1]).double()
        stats.append((rows.mean(0), rows.std(0, unbiased=False)))
    return stats


def _target(parents, weights, kinds, x):
    per = [_channel_stats(p, kinds, x) for p in parents]
    return [(sum(w * s[i][0] for w, s in zip(weights, per, strict=True)),
             sum(w * s[i][1] for w, s in zip(weights, per, strict=True))) for i in range(len(per[0]))]


# ----------------------------------------------------------------------------------------------------------
# reset_norm_stats


def test_reset_bn_recomputes_the_statistics_of_the_calibration_data():
    model = _bn_cnn(0)
    reset = reset_norm_stats(model, X)  # one batch of 96 (split into chunks of 32 by the calibration reader)
    bn = reset[1]
    with torch.no_grad():
        conv = model[0](X)
    chunks = conv.split(32)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[1].running_mean, bn.running_mean)  # a copy: the input is untouched
    assert not reset.training and reset[1].momentum == model[1].momentum
    with pytest.raises(FusionError, match="needs calibration"):
        reset_norm_stats(model, None)
    with pytest.raises(FusionError, match="empty"):
        reset_norm_stats(model, [])


# ----------------------------------------------------------------------------------------------------------
# repair_model: statistics equal the parents' weighted average, architecture kept


@pytest.mark.parametrize(
    ("make", "kinds"),
    [
        (lambda s: _mlp(s), (nn.Linear,)),  # no norms: the linear layers' pre-activations
        (lambda s: _mlp(s, norm=True), (nn.LayerNorm, nn.Linear)),  # a LayerNorm after the first layer
        (lambda s: _bn_cnn(s), (nn.BatchNorm2d,)),  # BatchNorm outputs
        (lambda s: _bn_cnn(s, bias=True, bn=False), (nn.Conv2d,)),  # convs with biases, no norms
    ],
    ids=["mlp", "mlp-layernorm", "bn-cnn", "cnn"],
)
def test_repair_sets_each_channel_to_the_parents_average_statistics(make, kinds):
    parents = [make(1), make(2)]
    weights = [0.3, 0.7]
    fused = vanilla_average(parents, weights)
    repaired = repair_model(fused, parents, X, weights=weights)
    target = _target(parents, weights, kinds, X)
    got = _channel_stats(repaired, kinds, X)
    if kinds == (nn.LayerNorm, nn.Linear):  # the linear layer feeding the LayerNorm is not corrected (LN renormalises)
        target, got = target[1:], got[1:]
    assert len(got) == len(target) >= 2
    for (m, s), (mt, st) in zip(got, target, strict=True):
        torch.testing.assert_close(s, st, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m, mt, rtol=1e-4, atol=1e-5 * float(st.max()))
    before = _channel_stats(fused, kinds, X)
    assert any(not torch.allclose(b[1], t[1], rtol=1e-2) for b, t in zip(before, target, strict=False))
    # the same architecture: same keys and shapes, nothing added; the inputs are untouched
    assert {k: v.shape for k, v in repaired.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    assert all(torch.equal(v, vanilla_average(parents, weights).state_dict()[k]) for k, v in fused.state_dict().items())
    assert not repaired.training


def test_repair_over_several_batches(monkeypatch):
    parents = [_mlp(1), _mlp(2)]
    fused = vanilla_average(parents)
    target = _target(parents, [0.5, 0.5], (nn.Linear,), X)
    # (input, label) batches are joined into batches of REPAIR_CHUNK rows: here all of X, so the statistics are exact
    exact = repair_model(fused, parents, [(x, 0) for x in X.split(16)])
    for (m, s), (mt, st) in zip(_channel_stats(exact, (nn.Linear,), X), target, strict=True):
        torch.testing.assert_close(s, st, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m, mt, rtol=1e-4, atol=1e-5)
    # in batches of 24 the pass normalises with each batch's statistics; the polishing passes correct the rest
    monkeypatch.setattr("hf_otfusion.repairs.repair.REPAIR_CHUNK", 24)
    errors = []
    for polish in (0, 2):
        repaired = repair_model(fused, parents, X, polish=polish)
        got = _channel_stats(repaired, (nn.Linear,), X)
        errors.append(max(float(((s - st).abs() / st.clamp_min(1e-3)).max()) for (_, s), (_, st) in zip(got, target,
                                                                                                      strict=True)))
    assert errors[1] < 0.01 and errors[1] < errors[0]


def test_a_producer_without_bias_is_only_rescaled():
    parents = [_bn_cnn(1, bias=False, bn=False), _bn_cnn(2, bias=False, bn=False)]
    fused = vanilla_average(parents)
    repaired = repair_model(fused, parents, X)
    first = [_channel_stats(m, (nn.Conv2d,), X)[0] for m in (fused, repaired)]
    target = _target(parents, [0.5, 0.5], (nn.Conv2d,), X)[0]
    torch.testing.assert_close(first[1][1], target[1], rtol=1e-4, atol=1e-6)  # std matched
    scale = target[1] / first[0][1]
    torch.testing.assert_close(first[1][0], first[0][0] * scale, rtol=1e-4, atol=1e-6)  # mean only scaled
    assert set(repaired.state_dict()) == set(fused.state_dict())


# ----------------------------------------------------------------------------------------------------------
# fuse(..., repair=...)


@pytest.mark.parametrize("name", ["mlp", "vgg_bn", "resnet_basic", "densenet", "groupnorm_cnn"])
def test_fusing_a_permuted_copy_with_repair_returns_the_original_function(family, name):
    model, x, plan, permuted = family(name)
    calibration = torch.randn(48, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    fused = fuse([model, permuted], calibration=calibration, example_input=x, plan=plan, repair="repair",
                 progress=False)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fuse_repair_options_and_errors():
    model = _bn_cnn(0)
    x = X[:4]
    permuted = random_permutation(model, example_input=x)
    assert REPAIRS.names() == ("none", "reset_bn", "repair", "refit")
    reset = fuse([model, permuted], example_input=x, calibration=X, repair="reset_bn", progress=False)
    torch.testing.assert_close(reset[1].running_mean, reset_norm_stats(model, X)[1].running_mean)
    with pytest.raises(FusionError, match="unknown repair 'bogus': choose one of none, reset_bn, repair"):
        fuse([model, permuted], example_input=x, calibration=X, repair="bogus")
    with pytest.raises(FusionError, match="repair='repair' needs calibration data"):
        fuse([model, permuted], example_input=x, repair="repair")
    with pytest.raises(FusionError, match="repair='reset_bn' needs calibration data"):
        fuse([model, permuted], example_input=x, repair="reset_bn")


def test_repair_model_errors():
    parents = [_mlp(1), _mlp(2)]
    fused = vanilla_average(parents)
    with pytest.raises(FusionError, match="needs calibration data"):
        repair_model(fused, parents, None)
    with pytest.raises(FusionError, match="empty"):
        repair_model(fused, parents, [])
    with pytest.raises(FusionError, match="one non-negative weight per parent"):
        repair_model(fused, parents, X, weights=[1.0])
    wider = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    with pytest.raises(FusionError, match="aligned parent 1 does not have the fused model's shapes"):
        repair_model(fused, [parents[0], wider], X)
    with pytest.raises(FusionError, match="needs the aligned parents"):
        repair_model(fused, [], X)


def test_repair_with_couplings_uses_each_parents_own_statistics_for_other_widths():
    """A wide parent's statistics are measured on the wide parent and carried to the narrow channels by the coupling
    (the aligned wide weights average several neurons, so their own statistics would be too small)."""
    torch.manual_seed(3)
    narrow = _mlp(1)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
    x = X[:4]
    plan_n, plan_w = build_plan(narrow, x), build_plan(wide, x)
    aligned, couplings = align(wide.state_dict(), plan_w, narrow.state_dict(), plan_n)
    fused = vanilla_average([narrow, _with(narrow, aligned)])
    repaired = repair_model(fused, [narrow, wide], X, couplings=[None, couplings])
    got = _channel_stats(repaired, (nn.Linear,), X)
    own = [_channel_stats(m, (nn.Linear,), X) for m in (narrow, wide)]
    for k, space in enumerate(s.name for s in plan_n.spaces):
        t = couplings[space].double()
        bary = t / t.sum(0, keepdim=True)
        for stat in (0, 1):
            expected = 0.5 * own[0][k][stat] + 0.5 * bary.T @ own[1][k][stat]
            torch.testing.assert_close(got[k][stat], expected, rtol=1e-4, atol=1e-5)
    # through fuse: the same result, in the narrow model's shapes
    via_fuse = fuse([wide, narrow], target=1, calibration=X, example_input=x, repair="repair", progress=False)
    shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert {k: v.shape for k, v in via_fuse.state_dict().items()} == shapes
    for (m, s), (mt, st) in zip(_channel_stats(via_fuse, (nn.Linear,), X), got, strict=True):
        torch.testing.assert_close(s, st, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m, mt, rtol=1e-4, atol=1e-5)
    with pytest.raises(FusionError, match="must be the model itself"):
        repair_model(fused, [narrow, wide.state_dict()], X, couplings=[None, couplings])
    with pytest.raises(FusionError, match="2 couplings for 1 parents"):
        repair_model(fused, [narrow], X, couplings=[None, couplings])


def _with(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    out = vanilla_average([model])
    out.load_state_dict(state)
    return out
