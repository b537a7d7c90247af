"""The tracer core: the rule registry, the graph walk and the plan built from the labels.

Op rules live in :mod:`hf_otfusion.trace.rules` (one module per op family) and depend on this module, never the
reverse; the package ``__init__`` imports them, so every rule is registered whenever the tracer can be used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from ..errors import PlanError
from ..plan import AlignmentPlan, AxisRef, FixedAxes, Site, Space
from ._atoms import Atoms
from .export import export_model, hidden_outputs, tied_tensors
from .labels import Desc, FakeNode, Labels, Stack, shape_of
from .ops import RuleOps

Rule = Callable[["Tracer", Node], Any]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a tracer rule for ATen ops by overload-packet name (e.g. ``"linear"``, ``"conv2d"``), for every
    trace from now on. A name that already has another rule gets the new one, with a warning (to change the rule of
    one trace only, pass ``rules=`` to :func:`build_plan`)."""

    def wrap(fn: Rule) -> Rule:
        for name in names:
            old = RULES.get(name)
            if old is not None and old is not fn:
                warnings.warn(f"tracer rule for op {name!r} registered twice: {_qualname(fn)} replaces "
                              f"{_qualname(old)}", stacklevel=3)
            RULES[name] = fn
        return fn

    return wrap


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


StackRule = Callable[["Tracer", Node, str, list[Node]], Any]
STACK_RULES: list[StackRule] = []


def register_stack_rule(fn: StackRule) -> StackRule:
    """Register a rule for ops that read a :class:`Stack`: it returns the op's labels, or None when it does not
    keep the stack (the stack is then resolved: its channels fixed, its first labelling standing for it)."""
    STACK_RULES.append(fn)
    return fn


INPUT, OUTPUT, VOCABULARY = "model input", "model output", "vocabulary"

# Integer tensors whose *values* index the channels of a dim (a router's top-k expert indices, their sort, the
# offsets of each expert's rows) carry that dim's label in :attr:`Tracer.values`. Ops named here read such values
# in a way their rule follows; any other op that reads them fixes the channels they index (see Tracer.apply).
READS_VALUES: set[str] = {"_assert_tensor_metadata", "sym_size", "sym_numel"}
# ops whose values are values of their one tensor input (its shape, dtype or a part of it changes): the label
# carries over
KEEPS_VALUES = frozenset(("view", "_unsafe_view", "reshape", "flatten", "clone", "contiguous", "_to_copy", "to",
                          "alias", "detach", "lift_fresh_copy", "unsqueeze", "squeeze", "select", "slice", "narrow",
                          "expand"))


def _filled_with_one_value(ep: ExportedProgram, spec: Any) -> bool:
    """Whether a graph constant (a non-persistent buffer, a lifted tensor) holds one value in every entry."""
    value = None if spec is None else ep.constants.get(spec.target, ep.state_dict.get(spec.target))
    if not isinstance(value, torch.Tensor) or value.is_meta or value.numel() < 2 or not value.is_floating_point():
        return False
    return bool((value == value.reshape(-1)[0]).all())
CONSTANT = "a constant of the graph (a non-persistent buffer or a computed table, e.g. rotary frequencies)"
TABLE = ("combined channel by channel with a table computed in the graph (e.g. rotary embeddings' cos/sin): no "
         "permutation of these channels keeps the function")
IO_REASONS = frozenset((INPUT, OUTPUT, VOCABULARY))  # the reasons of a model's own inputs and outputs


class Tracer(RuleOps):
    """Walks an exported graph once, applying the rule of each op to the labels of its values.

    Rules receive it: the label operations are its methods (:class:`~hf_otfusion.trace.ops.RuleOps` and below;
    :mod:`hf_otfusion.trace.api` lists them)."""

    def __init__(self, ep: ExportedProgram, state: dict[str, torch.Tensor], aliases: dict[str, str],
                 strict: bool = False, rules: Mapping[str, Rule] | None = None):
        self.ep = ep
        self.rules: Mapping[str, Rule] = RULES if not rules else {**RULES, **rules}  # this trace's rule table
        self.aliases = aliases
        self._atoms = Atoms()
        self.labels: dict[str, Any] = {}
        self.param_axes: dict[str, list[int]] = {}  # tensor name -> atom per axis
        self.param_of_node: dict[str, str] = {}
        self.first_use: dict[str, int] = {}
        self.producers: list[tuple[int, Desc]] = []  # (op index, output channel desc) of weight layers
        self.consumer_sites: list[tuple[str, int, Desc]] = []
        self.producer_sites: list[tuple[str, int, Desc]] = []
        self.unhandled: list[str] = []
        self.notes: list[str] = []
        self.node_name = ""
        self.op_name = ""
        self.strict = strict
        self.state = state
        self.index = 0
        self.hidden_outputs = hidden_outputs(ep)
        # node name (``name#i`` for an item of a tuple) -> (kind, label): an integer tensor whose values index the
        # channels of that label ("index"), or the cumulative row counts of those channels ("offsets")
        self.values: dict[str, tuple[str, Desc]] = {}

    # -- labels -------------------------------------------------------------------------------------------
    def new(self, size: int | None, fixed: bool = True, why: str | None = None) -> Desc:
        return ((self._atoms.new(size, fixed, why), 1),)

    def fresh(self, node: Any, fixed: bool = True, why: str | None = None) -> Labels | None:
        shape = shape_of(node)
        return None if shape is None else [self.new(s, fixed, why) for s in shape]

    def of(self, arg: Any) -> Labels | None:
        if isinstance(arg, Node):
            value = self.labels.get(arg.name)
            return value if isinstance(value, list) else None
        return None

    def fix_all(self, labels: Any, why: str | None = None) -> None:
        if isinstance(labels, list):
            for d in labels:
                self._atoms.fix(d, why)
        elif isinstance(labels, tuple):
            for item in labels:
                self.fix_all(item, why)
        elif isinstance(labels, Stack):
            for item in labels.items:
                self.fix_all(item, why)

    def is_free(self, labels: Any) -> bool:
        if isinstance(labels, list):
            return any(not self._atoms.is_fixed(d) for d in labels)
        if isinstance(labels, tuple):
            return any(self.is_free(item) for item in labels)
        if isinstance(labels, Stack):
            return any(self.is_free(item) for item in labels.items)
        return False

    def join(self, d1: Desc, d2: Desc) -> None:
        self._atoms.unify(d1, d2)

    # -- walking ------------------------------------------------------------------------------------------
    def run(self) -> None:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                spec = specs.get(node.name)
                free = (
                    spec is not None
                    and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
                    and spec.target in self.state
                    and self.state[spec.target].is_floating_point()
                )
                if free:
                    name = self.aliases.get(spec.target, spec.target)  # tied tensors share their labels
                    if name not in self.param_axes:
                        self.param_axes[name] = [d[0][0] for d in self.fresh(node, fixed=False)]
                    self.labels[node.name] = [((a, 1),) for a in self.param_axes[name]]
                    self.param_of_node[node.name] = name
                else:
                    user = spec is not None and spec.kind == InputKind.USER_INPUT
                    self.labels[node.name] = self.fresh(node, fixed=True, why=INPUT if user else CONSTANT)
                    if not user and _filled_with_one_value(self.ep, spec):
                        # e.g. EVA's zero key bias, concatenated between the q and v biases: any order of its
                        # channels is the same tensor, so it takes on the channels it meets, as a zeros op does
                        for d in self.labels[node.name]:
                            self._atoms.uniform.update(a for a, _ in d)
            elif node.op == "call_function":
                self.index += 1
                self.node_name = node.name
                target = node.target
                self.op_name = (target._overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload)
                                else getattr(target, "__name__", str(target)))
                self._atoms.context = f"op '{self.op_name}' (node {node.name})"
                for arg in node.all_input_nodes:
                    if arg.name in self.param_of_node:
                        self.first_use.setdefault(self.param_of_node[arg.name], self.index)
                self.labels[node.name] = self.apply(node)
            elif node.op == "output":
                outputs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                for index, arg in enumerate(outputs):
                    if isinstance(arg, Node) and index not in self.hidden_outputs:
                        self.fix_all(self.labels.get(arg.name), OUTPUT)

    def apply(self, node: Node) -> Any:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            if getattr(target, "__name__", "") == "getitem":
                return _getitem(self, node)
            name = getattr(target, "__name__", str(target))
        else:
            name = target._overloadpacket.__name__
        read = [a for a in node.all_input_nodes if a.name in self.values]
        if read and name in KEEPS_VALUES and len(node.all_input_nodes) == 1:
            self.values[node.name] = self.values[read[0].name]
        elif read and name not in READS_VALUES:
            self.drop_values(node)
        return self._apply(node, name)

    def drop_values(self, node: Node) -> None:
        """The values of ``node``'s inputs that index channels are used in a way the tracer does not follow: those
        channels are fixed."""
        for a in node.all_input_nodes:
            if a.name in self.values:
                kind, desc = self.values[a.name]
                self._atoms.fix(desc, f"{kind} of these channels read by op '{self.op_name}' (node {node.name}), "
                                     "which the tracer cannot follow")

    def _apply(self, node: Node, name: str) -> Any:
        stacks = [a for a in node.all_input_nodes if isinstance(self.labels.get(a.name), Stack)]
        if stacks:
            for stack_rule in STACK_RULES:
                out = stack_rule(self, node, name, stacks)
                if out is not None:
                    return out
            for a in stacks:  # any other op: the stack's channels are fixed, its first labelling stands for it
                value = self.labels[a.name]
                self.fix_all(value)
                self.labels[a.name] = value.items[0]
        rule = self.rules.get(name)
        if rule is not None:
            return rule(self, node)
        return self.unknown(node, name)

    def structural(self, why: str) -> None:
        """The current op has a rule but meets a channel structure the plan cannot express: its channels are fixed
        and the op is reported in ``plan.unhandled`` (an error with ``strict=True``)."""
        message = f"op '{self.op_name}' (node {self.node_name}): {why}"
        if self.strict:
            raise PlanError(f"cannot plan {message}; strict=False would fix those channels instead")
        if self.op_name not in self.unhandled:
            self.unhandled.append(self.op_name)
        self.notes.append(message)
        self._atoms.context = message  # the reason of whatever the rule fixes next
        self._atoms.failures.add(f"at {message}")

    def unknown(self, node: Node, name: str) -> Any:
        inputs = [self.labels.get(a.name) for a in node.all_input_nodes]
        if any(self.is_free(x) for x in inputs):
            if self.strict:
                raise PlanError(f"no tracer rule for op '{name}' (node {node.name}) which touches hidden "
                                "channels; register one with hf_otfusion.trace.register_rule")
            if name not in self.unhandled:
                self.unhandled.append(name)
            why = f"no tracer rule for op '{name}' (node {node.name})"
            self._atoms.failures.add(why)
            for x in inputs:
                self.fix_all(x, why)
        else:
            why = None
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(self.fresh(FakeNode(v), why=why) for v in val)
        return self.fresh(node, why=why)

    # -- result -------------------------------------------------------------------------------------------
    def plan(self, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> AlignmentPlan:
        atoms = self._atoms
        atoms.close()
        members: dict[int, list[AxisRef]] = {}
        broken: dict[int, str] = {}  # spaces left out whole: a tensor holds their channels in a way not expressible
        for tensor, axes in self.param_axes.items():
            roots = [atoms.find(a) for a in axes]
            stacked = {axis: self._stacked_head(atom) for axis, atom in enumerate(axes)}
            head_axes = {axis: roots.index(h) if h in roots else None for axis, h in stacked.items() if h is not None}
            for axis, atom in enumerate(axes):
                if axis in head_axes.values():
                    continue  # the heads of a stacked member of this tensor: they move with it
                head_axis = head_axes.get(axis)
                for root, offset, repeat, tile, block in self._segments(((atom, 1),), stacked=True):
                    if axis in head_axes and (head_axis is None or tile != 1 or block is not None):
                        why = f"{tensor}:{axis} holds channels inside heads that no other axis of it indexes"
                        broken[root] = why
                        if stacked[axis] in atoms.heads:  # and those heads, which this tensor cannot follow
                            broken[stacked[axis]] = why
                    members.setdefault(root, []).append(AxisRef(tensor=tensor, axis=axis, offset=offset,
                                                                repeat=repeat, tile=tile, block=block,
                                                                head_axis=head_axis))
        sites: dict[int, list[Site]] = {}
        for kind in (self.consumer_sites, self.producer_sites):
            found: dict[int, list[Site]] = {}
            for node, dim, desc in kind:
                parts = self._segments(desc)
                if any(part[0] in atoms.head_tiles for part in parts):  # query heads: their tiles' order is the
                    parts = [part for part in parts if part[3] == 1]  # queries space's, so only it reads them here
                for root, offset, repeat, tile, block in parts:
                    site = Site(node=node, dim=dim, offset=offset, repeat=repeat, tile=tile, block=block)
                    if site not in found.setdefault(root, []):
                        found[root].append(site)
            for root, s in found.items():
                sites.setdefault(root, s)
        order: dict[int, int] = {}
        n_producers: dict[int, int] = {}
        for index, desc in self.producers:
            for root in dict.fromkeys(seg[0] for seg in self._segments(desc, stacked=True)):
                order.setdefault(root, index)
                n_producers[root] = n_producers.get(root, 0) + 1
        spaces = []
        names: set[str] = set()
        for root, refs in members.items():
            if root in broken:
                continue
            if root not in sites and root not in atoms.heads and all(m.head_axis is None for m in refs):
                continue  # a parameter axis that never meets an activation is not a space (unused tensor)
            if atoms.size[root] == 1:
                continue  # one channel (e.g. the single key/value head of multi-query attention): nothing moves
            # (per-head parameters move with their heads even where no activation carries them)
            key = order.get(root, min(self.first_use.get(m.tensor, 1 << 30) for m in refs))
            first = min(refs, key=lambda m: (self.first_use.get(m.tensor, 1 << 30), m.axis != 0, m.offset))
            name = f"{first.tensor}:{first.axis}" + (f"@{first.offset}" if first.offset else "")
            while name in names:
                name += "'"
            names.add(name)
            queries = root in atoms.head_tiles
            heads, group = self._query_heads(root) if queries else self._heads(root)
            shared = heads > 1 and any(m.block == 0 for m in (*refs, *sites.get(root, ())))
            kind = "residual" if n_producers.get(root, 0) > 1 and heads == 1 and not queries else "hidden"
            spaces.append((key, group, dict(name=name, size=atoms.size[root] or 0, kind=kind, members=tuple(refs),
                                            sites=() if queries else tuple(sites.get(root, ())), heads=heads,
                                            shared=shared, queries=queries)))
        spaces.sort(key=lambda kv: kv[0])
        spaces = _queries_last(spaces)
        group_names: dict[int, str] = {}
        for _, group, fields in spaces:
            if group is not None:
                group_names.setdefault(group, fields["name"])
        return AlignmentPlan(
            spaces=tuple(Space(**fields, head_group=group_names.get(group)) for _, group, fields in spaces),
            tensors={k: tuple(v.shape) for k, v in state.items()},
            aliases=aliases,
            unhandled=tuple(self.unhandled),
            fixed=self._fixed_report() + tuple(
                FixedAxes(size=atoms.size[root] or 0, members=tuple(f"{m.tensor}:{m.axis}" for m in members[root]),
                          reason=why) for root, why in broken.items()),
        )

    def _fixed_report(self) -> tuple[FixedAxes, ...]:
        """Hidden channels left fixed for a reason other than being a model input or output: the output channels
        of a layer (or the channels inside its heads) that the plan keeps in place, with the tensors that hold them."""
        atoms = self._atoms
        found: dict[int, None] = {}
        for _, desc in self.producers:
            for atom, _ in atoms.expand(desc):
                root = atoms.find(atom)
                src = atoms.tiles.get(root, (root, 1))[0]
                for r in (root, atoms.find(src)):
                    for part in atoms.parts(r):
                        if (atoms.fixed[part] and atoms.why.get(part, "") not in IO_REASONS
                                and (atoms.size[part] or 0) > 1):
                            found.setdefault(part)
        if not found:
            return ()
        holders: dict[int, list[str]] = {root: [] for root in found}
        for tensor, axes in self.param_axes.items():
            for axis, atom in enumerate(axes):
                for a, _ in atoms.expand(((atom, 1),)):
                    r = atoms.find(a)
                    r = atoms.find(atoms.tiles.get(r, (r, 1))[0])
                    for part in atoms.parts(r):
                        if part in holders and f"{tensor}:{axis}" not in holders[part]:
                            holders[part].append(f"{tensor}:{axis}")
        out = []
        for root in found:
            if not holders[root]:
                continue
            reason = atoms.why.get(root, "fixed")
            if root in atoms.owner:
                reason = f"the channels inside each head (or conv group): {reason}"
            elif root in atoms.heads:
                reason = f"the order of the heads: {reason}"
            out.append(FixedAxes(size=atoms.size[root] or 0, members=tuple(holders[root]), reason=reason,
                                 necessary=atoms.why.get(root) == TABLE))
        return tuple(out)

    def _resolve(self, root: int) -> tuple[int, int, int] | None:
        """The space a free root atom's channels belong to (a key atom), the repeat of each channel there and the
        tile of each head block.

        A headed atom whose head-dim channels are fixed is its heads, each repeated head_dim times. A tile of a
        headed atom (grouped-query attention) is that atom's space, each head block tiled.
        """
        atoms = self._atoms
        if root in atoms.tiles:
            src, g = atoms.tiles[root]
            inner = self._resolve(atoms.find(src))
            return None if inner is None or atoms.fixed[root] else (inner[0], inner[1], inner[2] * g)
        if atoms.fixed[root]:
            return None
        if root in atoms.head_tiles:  # query heads, each reading its group's key/value head
            src, g = atoms.head_tiles[root]
            inner = self._resolve(atoms.find(src))
            return None if inner is None else (inner[0], inner[1], inner[2] * g)
        if root in atoms.split:
            h, w = (atoms.find(a) for a in atoms.split[root])
            if atoms.fixed[w]:
                inner = None if atoms.fixed[h] else self._resolve(h)
                return None if inner is None else (inner[0], inner[1] * (atoms.size[w] or 1), inner[2])
        return root, 1, 1

    def _heads(self, key: int) -> tuple[int, int | None]:
        """(number of heads, head atom shared by its head group or None when heads stay in place) of a space."""
        atoms = self._atoms
        if key in atoms.heads:
            size = atoms.size[key] or 1
            return (size, key) if size > 1 else (1, None)
        if key in atoms.split:
            h = atoms.find(atoms.split[key][0])
            n = atoms.size[h] or 1
            return (n, None if atoms.fixed[h] or n == 1 else h) if n > 1 else (1, None)
        return 1, None

    def _queries(self, root: int, offset: int, repeat: int, block: int | None,
                 ) -> list[tuple[int, int, int, int, int | None]]:
        """The part of grouped- or multi-query attention's query heads (a tile of key/value heads, or its head
        atom) in their queries space: each query head one channel, keyed by the tile's head atom."""
        atoms = self._atoms
        if root in atoms.split:  # query heads (their head atom a tile of the key/value heads'), each head whole
            head, per = atoms.find(atoms.split[root][0]), atoms.size[atoms.find(atoms.split[root][1])] or 0
        elif root in atoms.head_tiles:
            head, per = root, 1
        else:
            return []
        if block is not None or atoms.fixed[head] or atoms.head_tiles.get(head, (0, 1))[1] < 2 or not per:
            return []
        return [(head, offset, repeat * per, 1, None)]

    def _query_heads(self, key: int) -> tuple[int, int | None]:
        """(number of key/value heads, their head atom when they move) of a queries space's key."""
        atoms = self._atoms
        kv = atoms.find(atoms.head_tiles[key][0])
        n = atoms.size[kv] or 1
        return (n, None if atoms.fixed[kv] else kv) if n > 1 else (1, None)

    def _segments(self, desc: Desc, stacked: bool = False) -> list[tuple[int, int, int, int, int | None]]:
        """(space key, offset, repeat, tile, block) of each free segment of a dimension. ``stacked``: a within-head
        dim (each expert's channels, the expert given by another axis or by the row) counts as its headed space's;
        else it carries no space (an activation there holds one channel of every head at once)."""
        out, offset = [], 0
        for atom, repeat in self._atoms.expand(desc):
            out += self._place(atom, offset, repeat, None, stacked)
            offset += (self._atoms.size[atom] or 0) * repeat
        return out

    def _stacked_head(self, atom: int) -> int | None:
        """The head root of a dimension that holds channels inside heads whose heads lie elsewhere (stacked
        experts), or None for any other dimension."""
        atoms = self._atoms
        heads = set()
        for root, _ in atoms.expand(((atom, 1),)):
            if root not in atoms.owner or atoms.fixed[root] or atoms.sharer_of(root) is not None:
                continue
            heads.add(atoms.find(atoms.split[atoms.find(atoms.owner[root])][0]))
        return heads.pop() if len(heads) == 1 else -1 if heads else None

    def _place(self, root: int, offset: int, repeat: int, block: int | None, stacked: bool = False,
               ) -> list[tuple[int, int, int, int, int | None]]:
        """(space key, offset, repeat, tile, block) of the free parts of a root atom's channels at ``offset``.

        A headed atom whose within-head channels are cut into segments is one part per segment, each at its offset
        inside the heads and with the heads' block stride; neighbouring parts of one space of whole heads (fixed
        segments side by side) are one part.
        """
        atoms = self._atoms
        if root in atoms.owner and not atoms.fixed[root] and atoms.sharer_of(root) is None:
            if not stacked:
                return []
            resolved = self._resolve(atoms.find(atoms.owner[root]))
            return [] if resolved is None else [(resolved[0], offset, repeat * resolved[1], resolved[2], None)]
        within = None if atoms.fixed[root] else atoms.sharer_of(root)
        if within is not None:  # one head's channels, read by every head: the headed space, every block on them
            resolved = self._resolve(atoms.find(atoms.owner[within]))
            if resolved is None or resolved[1] != 1:
                return []
            heads = self._heads(resolved[0])[0]
            return [(resolved[0], offset, repeat, 1, 0 if heads > 1 else None)]
        segments = None if atoms.fixed[root] else atoms.segments(root)
        if segments is None:
            resolved = self._resolve(root)
            if resolved is None:
                return []
            key, rep, tile = resolved
            d = (atoms.size[key] or 0) // self._heads(key)[0]  # the space's head_dim
            return [(key, offset, repeat * rep, tile, None if block == d * repeat * rep else block),
                    *self._queries(root, offset, repeat, block)]
        queries = self._queries(root, offset, repeat, block)  # whole query heads, across the segments inside them
        out: list[tuple[int, int, int, int, int | None]] = []
        if block is None:
            block = (atoms.size[atoms.find(atoms.split[root][1])] or 0) * repeat
        for seg, inside in segments:
            for part in self._place(seg, offset + inside * repeat, repeat, block):
                last = out[-1] if out else None
                if (last is not None and last[0] == part[0] and part[0] in atoms.heads and last[3:] == part[3:]
                        and last[1] + last[2] == part[1]):
                    part = (*last[:2], last[2] + part[2], *part[3:])
                    out.pop()
                    if part[2] == block:
                        part = (*part[:4], None)
                out.append(part)
        return out + queries


def _queries_last(spaces: list[tuple[int, int | None, dict[str, Any]]]) -> list[tuple[int, int | None, dict]]:
    """Each queries space after every other space on its axes: their tiled members move its heads and order the
    entries of its channels, so its cost is read once they are solved."""
    def axes(fields: dict[str, Any]) -> set[tuple[str, int]]:
        return {(m.tensor, m.axis) for m in fields["members"]}

    out = [s for s in spaces if not s[2]["queries"]]
    for q in (s for s in spaces if s[2]["queries"]):
        mine = axes(q[2])
        out.insert(max((i for i, s in enumerate(out) if axes(s[2]) & mine), default=len(out) - 1) + 1, q)
    return out


def _getitem(t: Tracer, node: Node) -> Any:
    src, i = node.args
    if f"{src.name}#{i}" in t.values:
        t.values[node.name] = t.values[f"{src.name}#{i}"]
    value = t.labels.get(src.name)
    if isinstance(value, tuple) and i < len(value):
        return value[i]
    return t.fresh(node)


def build_plan(
    model: nn.Module,
    example_input: Any,
    *,
    strict: bool = False,
    exported: ExportedProgram | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> AlignmentPlan:
    """Trace ``model`` on ``example_input`` and derive its alignment plan.

    Args:
        model: the network (any ``nn.Module`` that ``torch.export`` can trace).
        example_input: a batch of inputs: a tensor, a tuple of tensors, or a dict of keyword tensors.
        strict: raise :class:`PlanError` on an op without a tracer rule instead of fixing its spaces.
        exported: an already exported program of ``model`` (skips the export).
        rules: tracer rules by op name for this trace only, over the registered ones (:func:`register_rule`);
            the next trace uses the registered rules again.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import build_plan
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plan = build_plan(mlp, torch.randn(2, 4))
        >>> [(s.name, s.size) for s in plan.spaces]
        [('0.weight:0', 8)]
    """
    ep = exported if exported is not None else export_model(model, example_input)
    state = model.state_dict()
    aliases = tied_tensors(model)
    tracer = Tracer(ep, state, aliases, strict=strict, rules=rules)
    tracer.run()
    return tracer.plan(state, aliases)
