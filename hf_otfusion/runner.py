"""Runs models through an exported graph node by node: several models in lockstep, each on one or several input
chunks at once, with every weight fetched when its node runs (from memory, or read lazily from a checkpoint on
disk) and let go after its last use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree
from torch import nn
from torch.export import ExportedProgram
from torch.fx._pytree import tree_flatten_spec
from tqdm.auto import tqdm

from .checkpoint import TensorSource
from .errors import FusionError
from .profile import timed
from .trace import as_args


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (alone, in dicts, tuples or lists) moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: to_device(v, device) for k, v in dict(value).items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


class Runner:
    """One model, run through an exported graph on its own tensors; neither the model nor the graph is changed.

    The graph may come from another model of the same shapes. In memory (``source=None``) the tensors are the
    model's own, moved to ``device``. With a ``source`` (e.g. a checkpoint's :class:`~hf_otfusion.checkpoint.
    TensorSource`), ``model`` may be an empty build (parameters on the ``meta`` device, real non-persistent
    buffers): each parameter is read from the source when a node needs it and not kept, so a model larger than
    memory can be run; ``aliases`` names the stored tensor of a tied one (an LM head tied to the embeddings).
    """

    def __init__(self, ep: ExportedProgram, model: nn.Module, device: torch.device, *,
                 source: TensorSource | None = None, aliases: Mapping[str, str] | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.gm = ep.module()  # shares the exported model's tensors; used read-only, never moved
        params = dict(self.gm.named_parameters(remove_duplicate=False))
        graph_tensors = {**params, **dict(self.gm.named_buffers(remove_duplicate=False))}
        self.device = device
        self.in_spec = self.gm._in_spec
        self.static_batch = _static_batch(ep)
        self.source = source
        self.aliases = dict(aliases or {})
        if source is None:
            own = model.state_dict()
            self.state = {k: own.get(k, v).detach().to(device) for k, v in graph_tensors.items()}  # tied: every name
        else:
            stored = set(source.keys())
            buffers = dict(model.named_buffers(remove_duplicate=False))
            self.state = {}
            for k, v in graph_tensors.items():
                if self.aliases.get(k, k) in stored:
                    continue
                value = buffers.get(k, v)
                if k in params or value.is_meta:
                    raise FusionError(f"{k!r} is not in the checkpoint and the model does not build it (build it "
                                      "with accelerate.init_empty_weights(include_buffers=False), not on the meta "
                                      "device): the graph cannot run on tensors read from disk")
                self.state[k] = value.detach().to(device)
        self.tensor_names = set(graph_tensors)
        self._dtypes = {k: v.dtype for k, v in graph_tensors.items() if v.is_floating_point()}
        for name, sub in self.gm.named_modules():
            if name and isinstance(sub, torch.fx.GraphModule) and any(
                    n.op == "get_attr" and isinstance(getattr(sub, str(n.target), None), torch.Tensor)
                    for n in sub.graph.nodes):
                raise FusionError(f"the exported graph's nested graph {name!r} reads tensors of its own; they "
                                  "cannot be substituted by another model's, so the models cannot be run on it")
        self._fetched: dict[str, torch.Tensor] = {}
        self._last_uses = _last_uses(self.gm.graph)

    def flat_inputs(self, batch: Any) -> list[Any]:
        """A batch as the graph's flat list of inputs, on this runner's device."""
        args, kwargs = as_args(to_device(batch, self.device))
        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        sizes = {t.shape[0] for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
        if self.static_batch is not None and sizes and sizes != {self.static_batch}:
            raise FusionError(f"the model was traced with a fixed batch size of {self.static_batch} (torch.export "
                              f"could not keep the batch dimension dynamic), but a calibration batch has "
                              f"{sorted(sizes)} rows: pass calibration batches of exactly {self.static_batch}")
        return flat

    def attr(self, name: str) -> torch.Tensor:
        """A graph tensor by name: read once per node (and shared by the chunks run at that node)."""
        value = self.state.get(name)
        if value is not None:
            return value
        value = self._fetched.get(name)
        if value is None:
            assert self.source is not None
            with timed("load"):
                value = self.source.get(self.aliases.get(name, name))
                value = value.to(self.device, self._dtypes.get(name, value.dtype))  # the graph's own dtype
            self._fetched[name] = value
        return value

    def next_node(self) -> None:
        """Forget the tensors read for the last node (the environments that use them still hold them)."""
        self._fetched.clear()


@dataclass(frozen=True)
class _Deferred:
    """A graph tensor not read yet: export puts every weight's ``get_attr`` at the top of the graph, so it is read
    only when a node that uses it runs."""

    name: str


class _Env(torch.fx.Interpreter):
    """One chunk's environment in one runner's graph; graph tensors come from the runner when a node uses them."""

    def __init__(self, runner: Runner, flat: list[Any]):
        super().__init__(runner.gm, garbage_collect_values=False)
        self.runner = runner
        self.user_to_last_uses = runner._last_uses
        self.args_iter = iter(self.graph.process_inputs(*flat))

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.runner.tensor_names:
            return _Deferred(target)
        return super().get_attr(target, args, kwargs)

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return torch.utils._pytree.tree_map_only(_Deferred, lambda d: self.runner.attr(d.name), (args, kwargs))


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


OnValue = Callable[[int, str, int, torch.Tensor], None]


@torch.no_grad()
def lockstep(runners: Sequence[Runner], chunks: Sequence[Any], wanted: Sequence[set[str]], on_value: OnValue, *,
             progress: bool = False) -> None:
    """Run every runner on every chunk, node by node: node ``i`` of each model's graph on all chunks, then node
    ``i + 1``. ``on_value(model, node, chunk, value)`` gets each ``wanted[model]`` node's value as it is computed.

    Memory holds the values live across the current node for every chunk (a layer's inputs for all of them), and
    the weights of the current node only: models of the same architecture reach each layer together.
    """
    envs = [[_Env(r, r.flat_inputs(chunk)) for chunk in chunks] for r in runners]
    nodes = [list(r.gm.graph.nodes) for r in runners]
    steps = max(len(n) for n in nodes)
    for i in tqdm(range(steps), desc="calibration (layer by layer)", disable=not progress, leave=False,
                  unit="node", mininterval=1.0):
        for k, runner in enumerate(runners):
            if i >= len(nodes[k]):
                continue
            node = nodes[k][i]
            for c, env in enumerate(envs[k]):
                value = env.run_node(node)
                if node.op != "output":
                    env.env[node] = value
                if node.name in wanted[k]:
                    on_value(k, node.name, c, value)
                for dead in env.user_to_last_uses.get(node, ()):
                    del env.env[dead]
            runner.next_node()


def _static_batch(ep: ExportedProgram) -> int | None:
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
