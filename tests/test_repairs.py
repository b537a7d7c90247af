"""The repairs package: each repair registered by its own module, in the order the config lists them, and each
registered function a thin adapter over the public one (same result, refit's parameters passed through)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from hf_otfusion import fuse, repair_model, reset_norm_stats
from hf_otfusion.registry import REPAIRS
from hf_otfusion.repairs import RefitParameters, refit_model

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_each_repair_registers_itself_in_order():
    assert REPAIRS.names() == ("none", "reset_bn", "repair", "refit")
    modules = {u.name: u.fn.__module__ for u in REPAIRS if u.fn is not None}
    assert modules == {"reset_bn": "hf_otfusion.repairs.reset_bn", "repair": "hf_otfusion.repairs.repair",
                       "refit": "hf_otfusion.repairs.refit"}
    assert all(u.description for u in REPAIRS)


def test_refit_parameters_are_refit_models_knobs_with_its_defaults():
    signature = inspect.signature(refit_model).parameters
    for name, field in RefitParameters.model_fields.items():
        assert field.default == signature[name].default, name


def test_the_registered_functions_are_the_public_ones():
    a, b = _net(0), _net(1)
    aligned_b = fuse([a, b], weights=[0, 1], calibration=X, progress=False)
    avg = fuse([a, b], calibration=X, progress=False)
    context = dict(weights=[0.5, 0.5], couplings=None, device=torch.device("cpu"), plan=None, example_input=None,
                   exported=None)
    parents = [a, aligned_b]
    cases = {
        "reset_bn": (reset_norm_stats(avg, X), REPAIRS.get("reset_bn").parameters()),
        "repair": (repair_model(avg, parents, X), REPAIRS.get("repair").parameters()),
        "refit": (refit_model(avg, parents, X, alpha=0.1, prior="zero"), RefitParameters(alpha=0.1, prior="zero")),
    }
    for name, (expected, params) in cases.items():
        got = REPAIRS.get(name).fn(avg, parents, X, params=params, **context)
        for key, value in expected.state_dict().items():
            torch.testing.assert_close(got.state_dict()[key], value, msg=f"{name}: {key}")
