"""The registries of merge methods, solvers and repairs: names resolve, an unknown name lists the choices, a
duplicate warns, every unit says what it does, and a repair registered anywhere reaches the config, ``fuse``, the
card, the demo and ``hf-otfusion merge --help`` with no list to edit."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from typer.testing import CliRunner

from hf_otfusion import FusionError, fuse
from hf_otfusion.card import render_card
from hf_otfusion.cli import app
from hf_otfusion.config import ConfigError, FusionParameters, parse_config
from hf_otfusion.fuse import vanilla_average
from hf_otfusion.methods import linear_merge, linear_streamed
from hf_otfusion.registry import MERGE_METHODS, REPAIRS, SOLVERS, NoParameters, Registry, Unit
from hf_otfusion.repairs import RefitParameters
from hf_otfusion.streaming import fuse_sources
from hf_otfusion.transport import emd_coupling, sinkhorn_coupling

REGISTRIES = {"merge method": MERGE_METHODS, "solver": SOLVERS, "repair": REPAIRS}
TWO = [{"model": "org/a"}, {"model": "org/b"}]
CALIB = {"dataset": "ylecun/mnist", "num_samples": 8}
THROWAWAY = "throwaway_shift"
DESCRIPTION = "adds a constant to the last layer's bias (a repair that exists only in this test)"


def _normalized(text: str) -> str:
    """Text as wrapped for a terminal, joined again: one space between words, no box characters."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_names_resolve_to_their_units():
    assert MERGE_METHODS.names() == ("otfusion", "linear")
    assert SOLVERS.names() == ("emd", "sinkhorn")
    assert REPAIRS.names() == ("none", "reset_bn", "repair", "refit")
    otfusion, linear = MERGE_METHODS.get("otfusion"), MERGE_METHODS.get("linear")
    assert (otfusion.fn, otfusion.streamed, otfusion.parameters) == (fuse, fuse_sources, FusionParameters)
    assert (linear.fn, linear.streamed, linear.parameters) == (linear_merge, linear_streamed, NoParameters)
    assert otfusion.takes_parameters and not linear.takes_parameters
    assert otfusion.aligns and not linear.aligns
    assert "Singh & Jaggi" in otfusion.reference and "NeurIPS 2020" in otfusion.reference
    assert (SOLVERS.get("emd").fn, SOLVERS.get("sinkhorn").fn) == (emd_coupling, sinkhorn_coupling)
    assert REPAIRS.get("none").fn is None and REPAIRS.get("refit").parameters is RefitParameters
    assert REPAIRS.get("refit").needs == {"calibration", "couplings"} and REPAIRS.get("reset_bn").needs_data
    assert "emd" in SOLVERS and "hungarian" not in SOLVERS


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_an_unknown_name_lists_the_choices(kind):
    registry = REGISTRIES[kind]
    with pytest.raises(FusionError, match=f"unknown {kind} 'nope': choose one of {', '.join(registry.names())}$"):
        registry.get("nope")


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_unit_says_what_it_does(kind):
    for unit in REGISTRIES[kind]:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", unit.name), unit.name
        assert isinstance(unit.description, str) and len(unit.description.split()) >= 2, unit.name
        assert issubclass(unit.parameters, BaseModel) and unit.title
        assert unit.fn is None or callable(unit.fn)
    assert REGISTRIES[kind].help().splitlines()[0].startswith(f"{REGISTRIES[kind].names()[0]}: ")


def test_a_duplicate_name_warns_and_replaces():
    things: Registry[Unit] = Registry("thing")
    first = things.register(Unit(name="a", description="the first a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        things.register(first)  # the same unit again: nothing to say
    with pytest.warns(UserWarning, match="thing 'a' registered twice: the new one replaces the old"):
        things.register(Unit(name="a", description="the second a"))
    assert things.get("a").description == "the second a" and things.names() == ("a",)
    assert things.unregister("a").description == "the second a" and things.names() == ()


def test_the_solver_is_resolved_through_the_registry():
    from hf_otfusion.transport import marginal, solve

    with pytest.raises(FusionError, match="unknown solver 'magic': choose one of emd, sinkhorn"):
        solve(torch.zeros(2, 2), marginal(2), marginal(2), solver="magic")
    calls = []
    SOLVERS.register(Unit(name="test_uniform", description="the independent coupling (a test's solver)",
                          fn=lambda cost, a, b, **kw: calls.append(kw) or a[:, None] * b[None, :]))
    try:
        t = solve(torch.rand(3, 3), marginal(3), marginal(3), solver="test_uniform", reg=0.5)
        assert torch.allclose(t, torch.full((3, 3), 1 / 9, dtype=t.dtype)) and calls == [{"reg": 0.5, "uniform": True}]
        assert parse_config({"models": TWO, "parameters": {"solver": "test_uniform"}}).fusion_parameters.solver \
            == "test_uniform"
    finally:
        SOLVERS.unregister("test_uniform")


class ShiftParameters(BaseModel):
    """The throwaway repair's options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shift: float = 1.0


@pytest.fixture
def throwaway() -> Iterator[list[dict]]:
    """A repair registered for one test (and removed after it), recording each call's keywords."""
    calls: list[dict] = []

    def shift_bias(fused: nn.Module, parents, calibration, **kw) -> nn.Module:
        calls.append({"parents": len(parents), "calibration": calibration is not None, **kw})
        with torch.no_grad():
            fused[-1].bias += kw["params"].shift
        return fused

    REPAIRS.register(Unit(name=THROWAWAY, description=DESCRIPTION, fn=shift_bias, needs=frozenset({"calibration"}),
                          parameters=ShiftParameters))
    try:
        yield calls
    finally:
        REPAIRS.unregister(THROWAWAY)
    assert THROWAWAY not in REPAIRS


def test_a_registered_repair_reaches_the_config_and_fuse(throwaway):
    data = {"models": TWO, "calibration": CALIB,
            "parameters": {"repair": THROWAWAY, "repair_parameters": {"shift": 2.5}}}
    params = parse_config(data).fusion_parameters
    assert params.repair == THROWAWAY and params.repair_params == ShiftParameters(shift=2.5)
    with pytest.raises(ConfigError, match=f"parameters.repair_parameters.scale: unknown field: repair '{THROWAWAY}' "
                                          "takes shift"):
        parse_config({**data, "parameters": {"repair": THROWAWAY, "repair_parameters": {"scale": 2}}})
    with pytest.raises(ConfigError, match=f"calibration: parameters.repair '{THROWAWAY}' needs a calibration"):
        parse_config({"models": TWO, "parameters": {"repair": THROWAWAY}})

    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2))
    x = torch.randn(16, 4)
    plain = fuse([a, b], calibration=x, progress=False)
    shifted = fuse([a, b], calibration=x, repair=THROWAWAY, repair_parameters={"shift": 2.5}, progress=False)
    torch.testing.assert_close(shifted[-1].bias, plain[-1].bias + 2.5)
    (call,) = throwaway
    assert call["params"] == ShiftParameters(shift=2.5) and call["parents"] == 2 and call["calibration"]
    assert set(call) >= {"weights", "couplings", "device", "plan", "example_input", "exported", "params"}
    assert call["couplings"] == [None, {}]  # the unit does not need them: none kept
    with pytest.raises(FusionError, match=f"repair='{THROWAWAY}' needs calibration data"):
        fuse([a, b], example_input=x[:2], repair=THROWAWAY)


def test_a_registered_repair_is_described_in_the_card_the_demo_and_help(throwaway):
    config = parse_config({"models": TWO, "calibration": CALIB, "parameters": {"repair": THROWAWAY}})
    card = render_card(config, library="timm", pipeline_tag=None).text
    assert f"| repair | {THROWAWAY} ({DESCRIPTION}) |" in card

    help_text = _normalized(CliRunner().invoke(app, ["merge", "--help"], terminal_width=200).output)
    for registry in REGISTRIES.values():
        for unit in registry:
            assert _normalized(f"{unit.name} ({unit.description})") in help_text, unit.name
    assert "parameters.repair:" in help_text and "parameters.solver:" in help_text

    schema = FusionParameters.model_json_schema()["properties"]["repair"]
    assert THROWAWAY in schema["enum"] and DESCRIPTION in schema["description"]

    core = pytest.importorskip("hf_otfusion.demo.core")
    assert f"{THROWAWAY}: {DESCRIPTION}" in core.choices_help(REPAIRS)
    examples = core.find_examples(Path(__file__).resolve().parents[1] / "examples")
    request = core.FusionRequest(models=("example:mnist-resnet-seed0", "example:mnist-resnet-seed1"),
                                 alignment="weights", repair=THROWAWAY, evaluation_samples=10, calibration_samples=10,
                                 interpolation_points=3)
    demo_config, _, _ = core.build_config(request, examples, core.DemoLimits(), space_mode=True)
    assert demo_config.fusion_parameters.repair == THROWAWAY and demo_config.calibration is not None


def test_the_linear_method_is_the_vanilla_average():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    merged = MERGE_METHODS.get("linear").fn(models, None, target=0, weights=[0.25, 0.75], calibration=None,
                                            example_input=None, plan=None, device="cpu", progress=False)
    expected = vanilla_average(models, weights=[0.25, 0.75])
    for name, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[name], value)
