"""Runner: a model's graph run on tensors read lazily from a source, each weight fetched when its node runs and
let go after its last use, giving the values of the model in memory."""

from __future__ import annotations

import weakref

import pytest
import torch
import zoo
from accelerate import init_empty_weights

from hf_otfusion import build_plan
from hf_otfusion.checkpoint import StateSource
from hf_otfusion.errors import FusionError
from hf_otfusion.graph import Runner, lockstep
from hf_otfusion.sources import unwritten_parameters
from hf_otfusion.trace import export_model

CPU = torch.device("cpu")


class _Counting(StateSource):
    """A source that counts the tensors it handed out that are still alive."""

    def __init__(self, state):
        super().__init__(state)
        self.alive = self.peak = 0
        self.reads: list[str] = []

    def get(self, name):
        t = super().get(name).clone()
        self.reads.append(name)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._gone)
        return t

    def _gone(self):
        self.alive -= 1


def _hollow(name: str) -> torch.nn.Module:
    """The zoo model built with no weights in memory and real buffers (as ``load_model(hollow=True)`` builds)."""
    with init_empty_weights(include_buffers=False):
        torch.manual_seed(0)
        model = zoo.ZOO[name].build()
    unwritten_parameters(model)
    return model.eval()


def _values(runner: Runner, x, wanted: set[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    lockstep([runner], [x], [wanted], lambda _k, node, _c, value: seen.__setitem__(node, value.clone()))
    return seen


@pytest.mark.parametrize("name", ["llama_gqa", "resnet_basic"])
def test_a_graph_runs_on_weights_read_as_each_node_needs_them(name):
    model, x = zoo.make(name, seed=3)
    hollow = _hollow(name)
    ep = export_model(hollow, x)
    plan = build_plan(hollow, x, exported=ep)
    wanted = {s.node for space in plan.spaces for s in space.sites}
    source = _Counting({k: v for k, v in model.state_dict().items() if k not in plan.aliases})
    lazy = Runner(ep, hollow, CPU, source=source, aliases=plan.aliases)
    in_memory = Runner(export_model(model, x), model, CPU)
    got, expected = _values(lazy, x, wanted), _values(in_memory, x, wanted)
    assert got.keys() == expected.keys() == wanted
    for node in wanted:
        torch.testing.assert_close(got[node], expected[node], msg=node)
    stored = source.keys()
    used = [k for k in stored if not k.endswith("num_batches_tracked")]  # not read in eval mode
    assert sorted(source.reads) == sorted(used) and len(used) > 10  # each stored tensor read once
    assert source.peak <= 5  # one node's tensors (a BatchNorm reads four), never the whole model at once
    assert source.alive == 0


def test_a_parameter_the_checkpoint_lacks_is_named():
    model, x = zoo.make("mlp")
    hollow = _hollow("mlp")
    state = model.state_dict()
    del state["2.weight"]
    with pytest.raises(FusionError, match="'2.weight' is not in the checkpoint"):
        Runner(export_model(hollow, x), hollow, CPU, source=StateSource(state))
