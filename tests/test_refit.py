"""Closed-form layer refit (repair="refit"): exact on a model refitted onto itself, better than BN reset / REPAIR
against the ensemble on models trained on real digits, state_dict keys kept, chunk size irrelevant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_otfusion import FusionError, ensemble, fuse, random_permutation, reset_norm_stats
from hf_otfusion.config import FusionParameters
from hf_otfusion.repairs.refit import find_units, refit_model
from hf_otfusion.trace import export_model

X = torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.normalized_shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.normalized_shape, generator=gen) - 0.5)
    return model.eval()


def _mlp(seed: int, hidden: tuple[int, int] = (24, 16)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU(),
                         nn.Linear(hidden[1], 10)).eval()


def _bn_cnn(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10),
    ).eval()


class _Zoo(nn.Module):
    """Every kind of layer the refit handles: conv with bias, conv + BN, grouped and depthwise convs ('same'
    padding), a conv1d, linear + LayerNorm, attention projections, a BatchNorm after a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.post = nn.BatchNorm2d(8)  # after the residual add: fed by no single layer
        self.conv1d = nn.Conv1d(8, 12, 3, padding=1)
        self.proj = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.post(h + self.depthwise(F.relu(self.bn1(self.grouped(h))))))
        t = F.relu(self.conv1d(h.mean(2)))  # (N, 12, 8)
        t = self.norm(self.proj(t.transpose(1, 2)))  # (N, 8, 16)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


class _ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(64, 16), nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x.flatten(1)))
        return self.head(h + self.down(F.relu(self.up(h))))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------------------------------------
# (a) exactness


@pytest.mark.parametrize("build", [_mlp, _bn_cnn, lambda s: _Zoo().eval()], ids=["mlp", "bn_cnn", "zoo"])
def test_refit_of_a_model_with_a_permutation_of_itself_is_the_model(build):
    a = _randomize_norms(build(0), 1)
    b = random_permutation(a, example_input=X[:2], seed=3)
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    fused = fuse([a, b], calibration=X, repair="refit", progress=False)
    ref = _outputs(a, X)
    assert torch.allclose(_outputs(fused, X), ref, atol=1e-4 * ref.abs().max().item())
    assert list(fused.state_dict()) == list(a.state_dict())


def test_fusing_with_weights_0_1_and_refit_computes_the_second_model():
    a, b = _randomize_norms(_bn_cnn(0), 1), _randomize_norms(_bn_cnn(5), 2)
    fused = fuse([a, b], weights=[0, 1], alignment="activations", calibration=X, repair="refit", progress=False)
    ref = _outputs(b, X)
    assert torch.allclose(_outputs(fused, X), ref, atol=1e-4 * ref.abs().max().item())


def test_every_layer_of_the_zoo_is_refitted():
    model = _Zoo().eval()
    units, resets = find_units(export_model(model, X[:2]))
    weights = {u.weight for u in units}
    assert weights == {"stem.weight", "grouped.weight", "depthwise.weight", "post.weight", "conv1d.weight",
                       "proj.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    by_weight = {u.weight: u for u in units}
    assert by_weight["grouped.weight"].groups == 4 and by_weight["grouped.weight"].norm is not None
    assert by_weight["depthwise.weight"].groups == 8 and by_weight["depthwise.weight"].norm is None
    assert by_weight["proj.weight"].norm is None  # a LayerNorm does not fold: fitted before the norm
    assert by_weight["depthwise.weight"].level == by_weight["grouped.weight"].level + 1
    assert by_weight["post.weight"].kind == "bn" and by_weight["post.weight"].groups == 8  # per-channel affine
    assert not resets
    # a layer added straight onto a value of an earlier level feeds a residual stream
    assert by_weight["depthwise.weight"].stream is not None
    assert all(u.stream is None for u in units if u.weight != "depthwise.weight")


def test_stream_target_fits_the_residual_stream_after_the_add_not_the_layer_alone():
    torch.manual_seed(0)
    a, b = _ResidualMLP().eval(), _ResidualMLP().eval()
    avg = fuse([a, b], calibration=X, progress=False)
    aligned = [a, fuse([a, b], weights=[0, 1], calibration=X, progress=False)]
    units = {u.weight: u for u in find_units(export_model(avg, X[:2]))[0]}
    assert units["down.weight"].stream is not None and units["up.weight"].stream is None

    def stream(model: nn.Module) -> torch.Tensor:  # the head's input: the residual stream after the add
        seen = []
        hook = model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        _outputs(model, X)
        hook.remove()
        return seen[0]

    want = (stream(aligned[0]) + stream(aligned[1])) / 2
    errors = {t: (stream(refit_model(avg, aligned, X, alpha=0.0, target=t)) - want).norm().item()
              for t in ("layer", "stream")}
    assert errors["stream"] < 0.9 * errors["layer"], errors


# ----------------------------------------------------------------------------------------------------------
# (b) better than BN reset and REPAIR on models trained on real digits


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1200]], y[perm[:1200]], x[perm[1200:]]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 150) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def _loss_vs_ensemble(model: nn.Module, ens: nn.Module, x: torch.Tensor) -> float:
    """Cross-entropy of the model's predictions against the ensemble's probabilities (minus the ensemble's own)."""
    with torch.no_grad():
        p = ens(x).exp()
        return float(-(p * model(x).log_softmax(-1)).sum(-1).mean() + (p * p.clamp_min(1e-30).log()).sum(-1).mean())


@pytest.mark.parametrize("build", [_mlp, _bn_cnn], ids=["mlp", "bn_cnn"])
def test_refit_is_closer_to_the_ensemble_than_reset_bn_and_repair(build):
    x, y, held_out = _digits()
    parents = [_train(build(seed), x, y, seed) for seed in (0, 1)]
    ens = ensemble(parents)
    calib = x[:500]
    kw = dict(alignment="activations", calibration=calib, progress=False)
    losses = {repair: _loss_vs_ensemble(fuse(parents, repair=repair, **kw), ens, held_out)
              for repair in ("reset_bn", "repair", "refit")}
    assert losses["refit"] < min(losses["reset_bn"], losses["repair"]), losses


def test_refit_of_models_of_different_widths_and_of_three_models():
    x, y, held_out = _digits()
    narrow, wide = _train(_mlp(0, (16, 12)), x, y, 0), _train(_mlp(1, (32, 24)), x, y, 1)
    kw = dict(alignment="activations", calibration=x[:500], progress=False)
    ens = ensemble([narrow, wide])
    plain, refit = fuse([narrow, wide], **kw), fuse([narrow, wide], repair="refit", **kw)
    assert refit.state_dict()["1.weight"].shape == (16, 64)
    assert _loss_vs_ensemble(refit, ens, held_out) < _loss_vs_ensemble(plain, ens, held_out)
    three = [_train(_bn_cnn(s), x, y, s, steps=60) for s in (0, 1, 2)]
    ens3 = ensemble(three)
    reset, refit3 = fuse(three, repair="reset_bn", **kw), fuse(three, repair="refit", **kw)
    assert _loss_vs_ensemble(refit3, ens3, held_out) < _loss_vs_ensemble(reset, ens3, held_out)


# ----------------------------------------------------------------------------------------------------------
# (c) conv + BN folded back: keys, shapes, consistent statistics


def test_conv_bn_fold_keeps_keys_and_leaves_consistent_statistics():
    a, b = _randomize_norms(_bn_cnn(0), 1), _randomize_norms(_bn_cnn(5), 2)
    fused = fuse([a, b], alignment="activations", calibration=X, repair="refit", progress=False)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}
    assert type(fused) is type(a) and [type(m) for m in fused.modules()] == [type(m) for m in a.modules()]
    # the BatchNorms' running statistics are the refitted convs' own on the calibration data
    seen: dict[nn.Module, torch.Tensor] = {}
    norms = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, args[0])) for m in norms]
    _outputs(fused, X)
    for h in hooks:
        h.remove()
    for m in norms:
        x = seen[m].transpose(0, 1).reshape(m.num_features, -1).double()
        assert torch.allclose(m.running_mean.double(), x.mean(1), atol=1e-4)
        assert torch.allclose(m.running_var.double(), x.var(1, unbiased=False), atol=1e-4, rtol=1e-3)
    # so recomputing them in training mode (batch statistics) hardly moves the model
    out = _outputs(fused, X)
    again = _outputs(reset_norm_stats(fused, X), X)
    assert (again - out).abs().max() < 0.05 * out.abs().max()


# ----------------------------------------------------------------------------------------------------------
# (d) memory: the normal equations are summed over chunks


def test_chunking_does_not_change_the_refit():
    a, b = _randomize_norms(_bn_cnn(0), 1), _randomize_norms(_bn_cnn(5), 2)
    avg = fuse([a, b], calibration=X, progress=False)
    aligned_b = fuse([a, b], weights=[0, 1], calibration=X, progress=False)
    one = refit_model(avg, [a, aligned_b], X, chunk=len(X))
    many = refit_model(avg, [a, aligned_b], X, chunk=7)
    as_batches = refit_model(avg, [a, aligned_b], [(X[i : i + 13], None) for i in range(0, len(X), 13)])
    for other in (many, as_batches):
        for name, value in one.state_dict().items():
            assert torch.allclose(other.state_dict()[name], value, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("kwargs", [{}, dict(target="layer"), dict(inputs="parents")], ids=["stream", "layer",
                                                                                           "regmean"])
def test_held_passes_equal_passes_rerun_at_every_level(kwargs, monkeypatch):
    """Each graph runs once with every chunk's values held between levels; re-running each level from the inputs
    (when held values would not fit the budget) gives the same weights, bit for bit."""
    import hf_otfusion.repairs.refit as refit

    torch.manual_seed(0)
    a, b = _randomize_norms(_Zoo().eval(), 1), _randomize_norms(_Zoo().eval(), 2)
    avg = fuse([a, b], calibration=X, progress=False)
    aligned_b = fuse([a, b], weights=[0, 1], calibration=X, progress=False)
    held = refit_model(avg, [a, aligned_b], X, chunk=7, **kwargs).state_dict()
    monkeypatch.setattr(refit, "REFIT_HOLD", 0)
    rerun = refit_model(avg, [a, aligned_b], X, chunk=7, **kwargs).state_dict()
    assert all(torch.equal(held[k], rerun[k]) for k in held)
    if kwargs:
        return
    # parents of other widths (their own graphs, carried by couplings)
    narrow, wide = _mlp(0, (16, 12)), _mlp(1, (32, 24))
    fused = {}
    for hold in (0, 1 << 30):
        monkeypatch.setattr(refit, "REFIT_HOLD", hold)
        fused[hold] = fuse([narrow, wide], alignment="activations", calibration=X, repair="refit", progress=False)
    assert all(torch.equal(fused[0].state_dict()[k], v) for k, v in fused[1 << 30].state_dict().items())


def test_refit_options_and_errors():
    a, b = _mlp(0), _mlp(1)
    avg = fuse([a, b], calibration=X, progress=False)
    aligned_b = fuse([a, b], weights=[0, 1], calibration=X, progress=False)
    for kwargs in (dict(alpha=0.0), dict(prior="zero"), dict(inputs="parents"), dict(alpha=0.1), dict(target="layer"),
                   dict(target="stream", inputs="parents")):
        out = _outputs(refit_model(avg, [a, aligned_b], X, **kwargs), X)
        assert torch.isfinite(out).all(), kwargs
    with pytest.raises(FusionError, match="calibration"):
        refit_model(avg, [a, aligned_b], None)
    with pytest.raises(FusionError, match="alpha"):
        refit_model(avg, [a, aligned_b], X, alpha=-1)
    with pytest.raises(FusionError, match="target"):
        refit_model(avg, [a, aligned_b], X, target="logits")
    with pytest.raises(FusionError, match="shapes"):
        refit_model(avg, [a, _mlp(2, (20, 16))], X)
    with pytest.raises(FusionError, match="calibration"):
        fuse([a, b], repair="refit", example_input=X[:2], progress=False)
    assert FusionParameters(repair="refit").repair == "refit"
