"""Activation statistics: the lockstep calibration gives the same costs run chunk by chunk or layer by layer, and
layer by layer holds only the statistics of the spaces being read."""

from __future__ import annotations

import pytest
import torch
import zoo

from hf_otfusion import build_plan
from hf_otfusion.activations import SpilledCosts, _Costs, activation_statistics
from hf_otfusion.graph import Runner
from hf_otfusion.trace import export_model

CPU = torch.device("cpu")


def _setup(name: str, rows: int = 70):
    a, _ = zoo.make(name, seed=0)
    b, _ = zoo.make(name, seed=1)
    calibration = zoo.inputs(name, rows, seed=7)  # 70 rows: chunks of 32, 32 and 6
    example = zoo.inputs(name, 2, seed=8)
    ep = export_model(a, example)
    plan = build_plan(a, example, exported=ep)
    return [Runner(ep, a, CPU), Runner(ep, b, CPU)], [plan, plan], calibration


@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "llama_gqa"])
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_layer_by_layer_gives_the_chunk_by_chunk_costs(name, standardize, tmp_path):
    runners, plans, calibration = _setup(name)
    streams = {s.name for s in plans[0].spaces if s.kind == "residual"}
    chunked, chunked_similar = activation_statistics(runners, plans, 0, calibration, per_site=streams,
                                                     standardize=standardize, progress=False, similarity=True)
    layered, layered_similar = activation_statistics(runners, plans, 0, calibration, per_site=streams,
                                                     standardize=standardize, progress=False, layerwise=True,
                                                     spill=tmp_path, similarity=True)
    assert chunked_similar[0] is None and chunked_similar[1].keys() == layered_similar[1].keys()
    for name, similar in chunked_similar[1].items():  # E[a_i b_j], the same either way
        torch.testing.assert_close(similar, layered_similar[1][name], rtol=1e-9, atol=1e-9)
    assert isinstance(layered[1], SpilledCosts)
    assert len(list((tmp_path / "model-1").iterdir())) == len(plans[0].spaces)  # one file a space
    assert chunked[0] is None and layered[0] is None
    assert chunked[1].keys() == layered[1].keys() == {s.name for s in plans[0].spaces}
    for space, cost in chunked[1].items():
        # spilled as float32, the dtype the walk reads it in
        torch.testing.assert_close(layered[1][space], cost.float(), rtol=1e-5, atol=1e-5, msg=space)
    assert any(cost.std() > 0 for cost in chunked[1].values())


def test_layer_by_layer_holds_only_the_spaces_in_flight(monkeypatch):
    """Chunk by chunk, every space's sums live until the end; layer by layer a space's sums are let go at its last
    site, so far fewer are held at once."""
    runners, plans, calibration = _setup("vgg_bn")
    peaks = {}
    value = _Costs.value

    def counting(self, *args):
        value(self, *args)
        held = sum(1 for s in self.stats.values() if s.sums)
        peaks[mode] = max(peaks.get(mode, 0), held)

    monkeypatch.setattr(_Costs, "value", counting)
    for mode in ("chunked", "layered"):
        activation_statistics(runners, plans, 0, calibration, progress=False, layerwise=mode == "layered")
    n_spaces = len(plans[0].spaces)
    assert n_spaces >= 4
    assert peaks["chunked"] == n_spaces
    assert peaks["layered"] <= 2


def test_empty_calibration_is_an_error():
    runners, plans, _ = _setup("mlp")
    from hf_otfusion.errors import FusionError

    with pytest.raises(FusionError, match="empty"):
        activation_statistics(runners, plans, 0, [], progress=False, layerwise=True)


def test_spilled_costs_read_back_what_was_written(tmp_path):
    costs = SpilledCosts(tmp_path / "costs")
    a, b = torch.rand(3, 5, dtype=torch.float64), torch.rand(4, 4)
    costs["a"], costs["b"] = a, b
    assert list(costs) == ["a", "b"] and len(costs) == 2
    assert torch.equal(costs["a"], a.float()) and torch.equal(costs["b"], b)
    costs["a"] = b  # replaced, its old file gone
    del costs["b"]
    assert list(costs) == ["a"] and torch.equal(costs["a"], b)
    assert len(list((tmp_path / "costs").iterdir())) == 1
