"""The exported graph: one op table, and one runner of a ``torch.export`` program on any model's tensors.

Everything that runs calibration data through a traced model runs it here: the activations of the ground metric
(several models in lockstep, node by node), REPAIR's statistics (hooks that measure and correct node values) and the
refit's layer inputs and outputs. The graph is the lifted one (``ep.graph_module``: parameters and buffers are
placeholders), so it runs on the tensors of any model of the traced model's names and shapes: another parent, a
state being refitted (read when a node runs, so a later node sees an earlier rewrite), or a checkpoint read lazily
from disk, one node's weights at a time.

The op table says where a weight layer's and a norm's operands sit among its ATen op's arguments; REPAIR reads it to
find the values it corrects and the refit to find the layers it re-solves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx._pytree import tree_flatten_spec
from tqdm.auto import tqdm

from .checkpoint import TensorSource
from .errors import FusionError
from .profile import timed
from .trace import as_args

# ----------------------------------------------------------------------------------------------------------
# The op table


@dataclass(frozen=True)
class LayerOp:
    """Where a weight layer's operands sit among its op's arguments (positions; None: the op has no such one)."""

    x: int
    weight: int
    bias: int
    weight_out: int = 0  # the weight's axis of output channels
    out_dim: int = 1  # the output's channel dim (-1: the last)
    stride: int | None = None
    padding: int | None = None
    dilation: int | None = None
    groups: int | None = None
    transposed: int | None = None  # aten.convolution's flag: a transposed convolution is no layer of this table


_CONV = LayerOp(0, 1, 2, stride=3, padding=4, dilation=5, groups=6)

LAYER_OPS: dict[str, LayerOp] = {
    "linear": LayerOp(0, 1, 2, out_dim=-1),
    "addmm": LayerOp(1, 2, 0, weight_out=1, out_dim=-1),  # addmm(bias, x, W), W stored (in, out): GPT-2's Conv1D
    "conv1d": _CONV,
    "conv2d": _CONV,
    "conv3d": _CONV,  # REPAIR corrects it; the refit leaves it as fused (it unfolds 1-d and 2-d patches only)
    "convolution": LayerOp(0, 1, 2, stride=3, padding=4, dilation=5, transposed=6, groups=8),
}
# Left out: conv_transpose1d/2d/3d (the weight is (in, out / groups, ...): its rows are not the output channels that
# REPAIR scales and the refit solves for); mm/matmul/bmm/einsum (products of two activations, as in attention; a
# linear layer without a bias still exports as ``linear``).


@dataclass(frozen=True)
class NormOp:
    """Where a norm's affine operands sit among its op's arguments, and the channel dim it normalises."""

    weight: int
    bias: int
    dim: int  # the channel dim of its input and output (-1: the last)
    running: tuple[int, int, int] | None = None  # a BatchNorm's (running_mean, running_var, eps) positions


NORM_OPS: dict[str, NormOp] = {
    "_native_batch_norm_legit_no_training": NormOp(1, 2, 1, running=(3, 4, 6)),
    "batch_norm": NormOp(1, 2, 1, running=(3, 4, 7)),
    "layer_norm": NormOp(2, 3, -1),
    "native_layer_norm": NormOp(2, 3, -1),
    "group_norm": NormOp(2, 3, 1),
    "native_group_norm": NormOp(1, 2, 1),
}
# Left out: _native_batch_norm_legit (training mode; the graphs are exported in eval mode, so it does not occur);
# rms_norm and instance_norm, which REPAIR has never corrected (adding them would change what it does).


def op_name(node: torch.fx.Node) -> str:
    """A node's op without its overload (``conv2d`` for ``aten.conv2d.default``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def arg(node: torch.fx.Node, i: int) -> Any:
    """A node's ``i``-th positional argument, or None when it was left to its default."""
    return node.args[i] if len(node.args) > i else None


def tensor_names(ep: ExportedProgram) -> dict[str, str]:
    """Placeholder node name -> the state_dict name of the parameter or buffer it stands for."""
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def main_value(value: Any) -> Any:
    """A node's value, or its first element when the op returns several (a BatchNorm's output and statistics)."""
    return value[0] if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------------------------------------------------------
# Inputs


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (alone, in dicts, tuples or lists) moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: to_device(v, device) for k, v in dict(value).items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def static_batch(ep: ExportedProgram) -> int | None:
    """The batch size baked into an exported graph, or None when its user inputs have a dynamic batch dim."""
    user = set(ep.graph_signature.user_inputs)
    sizes = set()
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            if not isinstance(val.shape[0], int):
                return None
            sizes.add(val.shape[0])
    return sizes.pop() if len(sizes) == 1 else None


@contextlib.contextmanager
def graph_errors(who: str) -> Iterator[None]:
    """Any error but a ``FusionError`` raised while a batch runs through a graph, as a ``FusionError`` that names
    ``who`` ran it and the error's first line."""
    try:
        yield
    except FusionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exported graph that does not take this batch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FusionError(f"{who} could not run a calibration batch through the model's graph: {first}") from exc


# ----------------------------------------------------------------------------------------------------------
# The runner


class Runner:
    """One model's tensors bound to an exported graph; neither the model nor the graph is changed.

    The graph may come from another model of the same shapes. Its tensors come from one of:

    - ``model`` (the default): the model's own, moved to ``device``;
    - ``state``: a mapping by state_dict name, used as it is and read when a node runs (a caller may replace entries
      between runs: the refit rewrites layers as it goes); names it lacks are the graph's own;
    - ``source`` (e.g. a checkpoint's :class:`~hf_otfusion.checkpoint.TensorSource`): ``model`` may then be an
      empty build (parameters on the ``meta`` device, real non-persistent buffers); each parameter is read from the
      source when a node needs it and not kept, so a model larger than memory can be run; ``aliases`` names the
      stored tensor of a tied one (an LM head tied to the embeddings).
    """

    def __init__(self, ep: ExportedProgram, model: nn.Module | None, device: torch.device, *,
                 state: Mapping[str, torch.Tensor] | None = None, source: TensorSource | None = None,
                 aliases: Mapping[str, str] | None = None):
        self.ep = ep
        self.gm = ep.graph_module  # read-only: shared by every runner of this graph
        self.nodes = list(self.gm.graph.nodes)
        self.device = device
        self.in_spec = ep.call_spec.in_spec
        self.static_batch = static_batch(ep)
        self.source = source
        self.aliases = dict(aliases or {})
        specs = list(ep.graph_signature.input_specs)
        # per placeholder: None for a user input, else the name of the graph tensor it stands for
        self.input_names = [None if s.kind == InputKind.USER_INPUT else s.target for s in specs]
        graph_tensors = {s.target: ep.state_dict[s.target] if s.target in ep.state_dict else ep.constants.get(s.target)
                         for s in specs if s.kind != InputKind.USER_INPUT and s.target is not None}
        params = {s.target for s in specs if s.kind == InputKind.PARAMETER}
        self.state: Mapping[str, torch.Tensor]
        self.own: dict[str, Any] = {}  # tensors read after ``state``: the graph's own, or buffers no source holds
        if state is not None:
            self.state = state
            self.own = {k: _on(v, device) for k, v in graph_tensors.items() if k not in state}
        elif source is None:
            if model is None:
                raise FusionError("a graph runner needs a model, a state or a source of tensors")
            own = model.state_dict()
            self.state = {k: _on(own.get(k, v), device) for k, v in graph_tensors.items()}  # tied: every name
        else:
            stored = set(source.keys())
            buffers = dict(model.named_buffers(remove_duplicate=False)) if model is not None else {}
            self.state = {}
            for k, v in graph_tensors.items():
                if self.aliases.get(k, k) in stored:
                    continue
                value = buffers.get(k, v)
                if k in params or isinstance(value, torch.Tensor) and value.is_meta:
                    raise FusionError(f"{k!r} is not in the checkpoint and the model does not build it (build it "
                                      "with accelerate.init_empty_weights(include_buffers=False), not on the meta "
                                      "device): the graph cannot run on tensors read from disk")
                self.own[k] = _on(value, device)
        self._dtypes = {k: v.dtype for k, v in graph_tensors.items()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()}
        for name, sub in self.gm.named_modules():
            if name and isinstance(sub, torch.fx.GraphModule) and any(
                    n.op == "get_attr" and isinstance(getattr(sub, str(n.target), None), torch.Tensor)
                    for n in sub.graph.nodes):
                raise FusionError(f"the exported graph's nested graph {name!r} reads tensors of its own; they "
                                  "cannot be substituted by another model's, so the models cannot be run on it")
        self._fetched: dict[str, torch.Tensor] = {}
        self.last_uses = _last_uses(self.gm.graph)

    def flat_inputs(self, batch: Any, *, check_batch: bool = True) -> list[Any]:
        """A batch as the graph's flat list of user inputs, on this runner's device. ``check_batch``: refuse a batch
        of another size than a graph traced with a fixed batch size was."""
        args, kwargs = as_args(to_device(batch, self.device))
        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        sizes = {t.shape[0] for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
        if check_batch and self.static_batch is not None and sizes and sizes != {self.static_batch}:
            raise FusionError(f"the model was traced with a fixed batch size of {self.static_batch} (torch.export "
                              f"could not keep the batch dimension dynamic), but a calibration batch has "
                              f"{sorted(sizes)} rows: pass calibration batches of exactly {self.static_batch}")
        return flat

    def attr(self, name: str) -> Any:
        """A graph tensor by name: read once per node (and shared by the chunks run at that node)."""
        value = self.state.get(name)
        if value is not None:
            return value
        if name in self.own:
            return self.own[name]
        value = self._fetched.get(name)
        if value is None:
            if self.source is None:
                raise FusionError(f"the graph reads {name!r}, which the model's tensors do not hold")
            with timed("load"):
                value = self.source.get(self.aliases.get(name, name))
                value = value.to(self.device, self._dtypes.get(name, value.dtype))  # the graph's own dtype
            self._fetched[name] = value
        return value

    def next_node(self) -> None:
        """Forget the tensors read for the last node (the environments that use them still hold them)."""
        self._fetched.clear()


def _on(value: Any, device: torch.device) -> Any:
    return value.detach().to(device) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class _Deferred:
    """A graph tensor not read yet: it is read only when a node that uses it runs."""

    name: str


Hook = Callable[["Env", torch.fx.Node], Any]  # computes a node's value in its stead (``env.compute(node)``: as is)


class Env(torch.fx.Interpreter):
    """One batch's values in one runner's graph, computed node by node (``step``).

    ``hooks``: node name -> a function that returns the node's value in its stead (it may compute the node as it
    is, ``env.compute(node)``, and measure or change the result); the graph goes on with what it returns. ``free``:
    let each value go after its last use (otherwise the caller drops values itself, with ``drop``).
    """

    def __init__(self, runner: Runner, batch: Any, *, hooks: Mapping[str, Hook] | None = None, free: bool = True,
                 check_batch: bool = True):
        super().__init__(runner.gm, garbage_collect_values=False)
        self.runner = runner
        self.hooks = hooks or {}
        self.frees = runner.last_uses if free else {}
        user = runner.flat_inputs(batch, check_batch=check_batch)
        placeholders = [n for n in runner.nodes if n.op == "placeholder"]
        if len(user) != runner.input_names.count(None):
            raise FusionError(f"a calibration batch has {len(user)} inputs, the model's graph takes "
                              f"{runner.input_names.count(None)}")
        taken = iter(user)
        for node, name in zip(placeholders, runner.input_names, strict=True):
            self.env[node] = next(taken) if name is None else _Deferred(name)

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return torch.utils._pytree.tree_map_only(_Deferred, lambda d: self.runner.attr(d.name), (args, kwargs))

    def inputs(self, node: torch.fx.Node) -> tuple[tuple, dict]:
        """A node's arguments, with the graph tensors among them read."""
        return self.fetch_args_kwargs_from_env(node)

    def compute(self, node: torch.fx.Node) -> Any:
        """A node's value as its op computes it (no hook)."""
        return self.run_node(node)

    def step(self, node: torch.fx.Node) -> Any:
        """Compute ``node`` (through its hook, if any), keep its value and let go of the values it used last."""
        if node.op == "placeholder":
            return self.env[node]
        value = None
        if node.op != "output":
            hook = self.hooks.get(node.name)
            value = self.compute(node) if hook is None else hook(self, node)
            self.env[node] = value
        for dead in self.frees.get(node, ()):
            del self.env[dead]
        return value

    def drop(self, node: torch.fx.Node) -> None:
        """Let a node's value go."""
        self.env.pop(node, None)


def _last_uses(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """node -> the nodes whose value is not needed after it (as ``torch.fx.Interpreter`` frees them)."""
    seen: set[torch.fx.Node] = set()
    out: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in reversed(graph.nodes):
        for n in node._input_nodes:
            if n not in seen:
                seen.add(n)
                out.setdefault(node, []).append(n)
    return out


@torch.no_grad()
def run(runner: Runner, batch: Any, *, who: str, hooks: Mapping[str, Hook] | None = None,
        wanted: set[str] | None = None) -> dict[str, Any]:
    """Run one batch through the graph; the values of the ``wanted`` nodes (the run stops once they are all known;
    None: the whole graph runs). An error is a ``FusionError`` naming ``who`` (see :func:`graph_errors`); the batch
    size is not checked against a fixed one."""
    seen: dict[str, Any] = {}
    with graph_errors(who):
        env = Env(runner, batch, hooks=hooks, check_batch=False)
        for node in runner.nodes:
            value = env.step(node)
            runner.next_node()
            if wanted is not None and node.name in wanted:
                seen[node.name] = value
                if len(seen) == len(wanted):
                    break
    return seen


OnValue = Callable[[int, str, int, torch.Tensor], None]


@torch.no_grad()
def lockstep(runners: Sequence[Runner], chunks: Sequence[Any], wanted: Sequence[set[str]], on_value: OnValue, *,
             progress: bool = False) -> None:
    """Run every runner on every chunk, node by node: node ``i`` of each model's graph on all chunks, then node
    ``i + 1``. ``on_value(model, node, chunk, value)`` gets each ``wanted[model]`` node's value as it is computed.

    Memory holds the values live across the current node for every chunk (a layer's inputs for all of them), and
    the weights of the current node only: models of the same architecture reach each layer together.
    """
    envs = [[Env(r, chunk) for chunk in chunks] for r in runners]
    steps = max(len(r.nodes) for r in runners)
    for i in tqdm(range(steps), desc="calibration (layer by layer)", disable=not progress, leave=False,
                  unit="node", mininterval=1.0):
        for k, runner in enumerate(runners):
            if i >= len(runner.nodes):
                continue
            node = runner.nodes[i]
            for c, env in enumerate(envs[k]):
                value = env.step(node)
                if node.name in wanted[k]:
                    on_value(k, node.name, c, value)
            runner.next_node()
