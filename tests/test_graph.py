"""graph.py: the op table matches the ATen schemas; the runner runs a model's graph on tensors read lazily from a
source (each weight fetched when its node runs and let go after its last use, giving the values of the model in
memory), on a state rewritten between runs, with hooks, several models in lockstep, and one error wrapping."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import zoo
from accelerate import init_empty_weights

from hf_otfusion import build_plan
from hf_otfusion.checkpoint import StateSource
from hf_otfusion.errors import FusionError
from hf_otfusion.graph import LAYER_OPS, NORM_OPS, Runner, lockstep, op_name, run
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


@pytest.mark.parametrize("op", sorted(LAYER_OPS))
def test_the_layer_table_names_each_ops_own_arguments(op):
    """Every position in the op table is the argument of that name in the ATen schema (addmm: bias, x, W)."""
    layer = LAYER_OPS[op]
    names = [a.name for a in getattr(torch.ops.aten, op).default._schema.arguments]
    expected = {"x": "mat1", "weight": "mat2", "bias": "self"} if op == "addmm" else {
        "x": "input", "weight": "weight", "bias": "bias"}
    for field, name in {**expected, "stride": "stride", "padding": "padding", "dilation": "dilation",
                        "groups": "groups", "transposed": "transposed"}.items():
        if getattr(layer, field) is not None:
            assert names[getattr(layer, field)] == name, (op, field)


@pytest.mark.parametrize("op", sorted(NORM_OPS))
def test_the_norm_table_names_each_ops_own_arguments(op):
    norm = NORM_OPS[op]
    names = [a.name for a in getattr(torch.ops.aten, op).default._schema.arguments]
    assert (names[norm.weight], names[norm.bias]) == ("weight", "bias")
    if norm.running is not None:
        assert [names[i] for i in norm.running] == ["running_mean", "running_var", "eps"]


def _mlp_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    return model, x, export_model(model, x)


def test_run_on_a_state_hooks_and_errors():
    """One batch through the graph: on another state (read when a node runs), with a hook that changes a value
    the rest of the graph then uses, stopping at the wanted values; an error names who ran the graph."""
    model, x, ep = _mlp_graph()
    linears = [n.name for n in ep.graph.nodes if n.op == "call_function" and op_name(n) == "linear"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(ep, None, CPU, state=state)
    out = run(runner, x, who="test", wanted={linears[-1]})
    torch.testing.assert_close(out[linears[-1]], model(x).detach())
    state["2.bias"] = state["2.bias"] + 1  # a rewrite between runs is seen by the next one
    torch.testing.assert_close(run(runner, x, who="test", wanted={linears[-1]})[linears[-1]], model(x).detach() + 1)
    state["2.bias"] = model.state_dict()["2.bias"]

    def zero(env, node):
        return env.compute(node) * 0

    hooked = run(runner, x, who="test", hooks={linears[0]: zero}, wanted={linears[-1]})[linears[-1]]
    torch.testing.assert_close(hooked, model[2].bias.detach().expand(5, 3))
    assert run(runner, x, who="test", wanted={linears[0]}).keys() == {linears[0]}
    with pytest.raises(FusionError, match="test could not run a calibration batch through the model's graph"):
        run(runner, torch.randn(5, 6), who="test")


def test_lockstep_runs_several_models_on_several_chunks():
    model, x, ep = _mlp_graph()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(2)
    node = next(n.name for n in ep.graph.nodes if n.op == "call_function" and op_name(n) == "linear")
    seen = {}
    lockstep([Runner(ep, model, CPU), Runner(ep, other, CPU)], [x[:2], x[2:]], [{node}, {node}],
             lambda k, name, c, value: seen.__setitem__((k, c), value))
    for c, part in enumerate((x[:2], x[2:])):
        torch.testing.assert_close(seen[(0, c)], model[0](part).detach())
        torch.testing.assert_close(seen[(1, c)], other[0](part).detach())
