"""One options object: ``fuse(models, options, **overrides)`` and ``align`` validate ``FusionParameters`` once, name a
bad option, and the repair's own parameters (refit's alpha, prior, target) reach it from the YAML."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from hf_otfusion import FusionError, align, build_plan, fuse
from hf_otfusion.config import ConfigError, FusionParameters, parse_config, resolve_options
from hf_otfusion.repairs import RefitParameters

TWO = [{"model": "org/a"}, {"model": "org/b"}]
CALIB = {"dataset": "ylecun/mnist", "num_samples": 8}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.fixture(scope="module")
def pair():
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    return [_mlp(0), _mlp(1)], x


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_options_and_overrides_give_the_keyword_call(pair):
    models, x = pair
    keywords = dict(solver="sinkhorn", reg=0.01, marginals="importance")
    by_name = fuse(models, example_input=x[:2], progress=False, **keywords)
    assert _same(fuse(models, FusionParameters(**keywords), example_input=x[:2], progress=False), by_name)
    assert _same(fuse(models, options=FusionParameters(solver="sinkhorn", reg=0.5), reg=0.01, marginals="importance",
                      example_input=x[:2], progress=False), by_name)
    assert not _same(fuse(models, example_input=x[:2], progress=False), by_name)


def test_resolve_options_keeps_what_was_set():
    base = FusionParameters(solver="sinkhorn", reg=0.2)
    assert resolve_options(base) is base and resolve_options() == FusionParameters()
    merged = resolve_options(base, {"marginals": "importance"})
    assert (merged.solver, merged.reg, merged.marginals) == ("sinkhorn", 0.2, "importance")
    assert merged.model_fields_set == {"solver", "reg", "marginals"}  # defaults stay unset (the written config)
    assert resolve_options(base, {"solver": "emd"}).solver == "emd"


def test_overrides_are_validated_once(pair, monkeypatch):
    models, x = pair
    calls = []
    original = FusionParameters.model_validate.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(FusionParameters, "model_validate", classmethod(counting))
    fuse(models, alignment="activations", calibration=x, residual="mean", sweeps=0, progress=False)
    assert len(calls) == 1 and calls[0]["alignment"] == "activations"
    calls.clear()
    fuse(models, FusionParameters(match_heads=False), example_input=x[:2], progress=False)
    assert calls == []  # an options object is validated already


@pytest.mark.parametrize(("overrides", "message"), [
    ({"solver": "hungarian"}, "solver: unknown solver 'hungarian': choose one of emd, sinkhorn"),
    ({"repair": "bogus"}, "repair: unknown repair 'bogus': choose one of none, reset_bn, repair, refit"),
    ({"alignment": "gradients"}, "alignment: unknown alignment 'gradients': choose one of weights, activations"),
    ({"residual": "sum"}, "residual: unknown residual 'sum': choose one of shared, mean"),
    ({"reg": -1.0}, "reg: Input should be greater than 0"),
    ({"match_heads": "maybe"}, "match_heads: Input should be a valid boolean"),
    ({"sweeps": -2}, "sweeps must be an integer >= 0, got -2"),
    ({"heads": False}, "fuse() got an unknown option 'heads': the options are alignment, solver"),
    ({"repair": "refit", "repair_parameters": {"alpha": -1}}, "repair_parameters.alpha: Input should be greater"),
    ({"repair": "refit", "repair_parameters": {"beta": 1}},
     "repair_parameters.beta: unknown field: repair 'refit' takes alpha, prior, target"),
    ({"repair": "reset_bn", "repair_parameters": {"alpha": 1}}, "repair_parameters: repair 'reset_bn' takes no"),
    ({"repair": "refit", "repair_parameters": 0.1}, "repair_parameters: should be a mapping of the options of repair "
                                                    "'refit': alpha, prior, target"),
])
def test_a_bad_option_is_named(pair, overrides, message):
    models, x = pair
    with pytest.raises(FusionError) as info:
        fuse(models, calibration=x, progress=False, **overrides)
    assert message in str(info.value)


def test_every_bad_field_is_named_once():
    with pytest.raises(FusionError) as info:
        resolve_options(None, {"solver": "x", "reg": 0})
    assert str(info.value).splitlines() == ["solver: unknown solver 'x': choose one of emd, sinkhorn",
                                            "reg: Input should be greater than 0"]
    with pytest.raises(FusionError, match="options must be a FusionParameters, got dict"):
        resolve_options({"solver": "emd"})  # type: ignore[arg-type]


def test_refit_parameters_from_the_yaml_reach_refit(pair, tmp_path):
    models, x = pair
    path = tmp_path / "refit.yml"
    path.write_text(yaml.safe_dump({"models": TWO, "calibration": CALIB,
                                    "parameters": {"repair": "refit", "repair_parameters": {"alpha": 10.0}}}))
    config = parse_config(yaml.safe_load(path.read_text()))
    params = config.fusion_parameters
    assert params.repair_params == RefitParameters(alpha=10.0) and params.alignment == "activations"
    assert "repair_parameters:\n    alpha: 10.0" in config.to_yaml()  # only what was set, under its repair
    assert parse_config(yaml.safe_load(config.to_yaml())) == config

    strong = fuse(models, params, calibration=x, progress=False)
    default = fuse(models, params, repair_parameters=None, calibration=x, progress=False)
    assert not torch.allclose(strong[-1].weight, default[-1].weight, atol=1e-4)  # alpha changed the refit
    by_name = fuse(models, alignment="activations", repair="refit", repair_parameters=RefitParameters(alpha=10.0),
                   calibration=x, progress=False)
    assert _same(strong, by_name)
    zero_prior = fuse(models, params, repair_parameters={"alpha": 10.0, "prior": "zero"}, calibration=x,
                      progress=False)
    assert not torch.allclose(zero_prior[-1].weight, strong[-1].weight, atol=1e-4)


def test_repair_parameters_in_the_config_are_checked():
    data = {"models": TWO, "calibration": CALIB}
    for params, message in [
        ({"repair": "refit", "repair_parameters": {"prior": "ones"}},
         "parameters.repair_parameters.prior: Input should be 'fused' or 'zero'"),
        ({"repair": "refit", "repair_parameters": {"alpah": 0.1}},
         "parameters.repair_parameters.alpah: unknown field: repair 'refit' takes alpha, prior, target"),
        ({"repair": "reset_bn", "repair_parameters": {"alpha": 0.1}},
         "parameters.repair_parameters: repair 'reset_bn' takes no parameters"),
        ({"repair": "bogus", "repair_parameters": {"alpha": 0.1}},
         "parameters.repair: Input should be 'none', 'reset_bn', 'repair' or 'refit'"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config({**data, "parameters": params})
        assert message in str(info.value).splitlines()
    # the repair defaults to refit with calibration data: its parameters may come alone
    assert parse_config({**data, "parameters": {"repair_parameters": {"target": "stream"}}}).fusion_parameters \
        .repair_params == RefitParameters(target="stream")


def test_align_takes_the_options_object():
    a, b = _mlp(2), _mlp(3)
    x = torch.randn(2, 6)
    plan = build_plan(a, x)
    options = FusionParameters(solver="sinkhorn", reg=0.05)
    state, couplings = align(b.state_dict(), plan, a.state_dict(), plan, options)
    by_name, _ = align(b.state_dict(), plan, a.state_dict(), plan, solver="sinkhorn", reg=0.05)
    assert all(torch.equal(state[k], by_name[k]) for k in state) and set(couplings) == {s.name for s in plan.spaces}
    with pytest.raises(FusionError, match="align\\(\\) got an unknown option 'heads'"):
        align(b.state_dict(), plan, a.state_dict(), plan, heads=False)
    kept, _ = align(b.state_dict(), plan, a.state_dict(), plan, match_heads=False)
    assert kept.keys() == state.keys()
