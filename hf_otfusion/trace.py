"""Derive an :class:`AlignmentPlan` from a model by exporting one forward pass.

Every dimension of every value in the exported ATen graph gets a label; op rules join labels with union-find
(a linear layer joins its weight's input axis with its input's channel axis, a residual add joins both
streams, ...). Labels can be *composite*: a concat is a sequence of segments and a flatten after a conv is a
channel-major repeat. Graph inputs, outputs and every axis that is not a channel (batch, space, tokens) are
fixed. Each class of labels that holds a parameter axis and is not fixed becomes a space.

An op without a rule fixes every label it touches (a fixed space is never wrong, only less aligned) and is
reported in ``plan.unhandled``; ``strict=True`` turns that into an error. New ops get a rule with
:func:`register_rule`; the fusion engine never needs to know about them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from .errors import PlanError
from .plan import AlignmentPlan, AxisRef, Site, Space

Piece = tuple[int, int]  # (atom, repeat)
Desc = tuple[Piece, ...]  # one dimension: concatenated segments, each a channel-major repeated atom
Labels = list[Desc]  # one tensor: a Desc per dimension

Rule = Callable[["Tracer", Node], Any]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a tracer rule for ATen ops by overload-packet name (e.g. ``"linear"``, ``"conv2d"``)."""

    def wrap(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return wrap


# ----------------------------------------------------------------------------------------------------------
# Export


def as_args(example_input: Any) -> tuple[tuple, dict]:
    """Split an example input (tensor, tuple/list of tensors, or dict of keyword tensors) into args, kwargs."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, dict) or hasattr(example_input, "keys"):
        return (), {k: v for k, v in dict(example_input).items() if k != "labels"}
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise PlanError(f"cannot use an example input of type {type(example_input).__name__}: pass a tensor, "
                    "a tuple of tensors or a dict of keyword tensors")


def _at_least_two(value: Any) -> Any:
    # View arguments bake the batch size in when it is 1; a batch of 2 keeps it symbolic.
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def export_model(model: nn.Module, example_input: Any) -> ExportedProgram:
    """Export one forward pass of ``model`` (eval mode) as an ATen graph with a dynamic batch dimension."""
    args, kwargs = as_args(example_input)
    args = tuple(_at_least_two(a) for a in args)
    kwargs = {k: _at_least_two(v) for k, v in kwargs.items()}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _export(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the user needs one clear message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"could not trace {type(model).__name__} with torch.export: {first}") from exc
    finally:
        model.train(was_training)


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Dynamic-shape spec with a dynamic batch dim for every tensor input: by parameter name when kwargs are given."""

    def spec(v: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return (*(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()})
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        else:
            out[name] = spec(value)
    return out


def _export(model: nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    dynamic = _dynamic_batch(model, args, kwargs)
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - a model that specialises its batch size still exports statically
        ep = torch.export.export(model, args, kwargs, strict=False)
    return ep.run_decompositions({})


# ----------------------------------------------------------------------------------------------------------
# Union-find over atoms with composite definitions


@dataclass
class _Atoms:
    """Union-find over atoms (sets of channels), with two kinds of structure on a root atom.

    - ``definition``: the atom is a sequence of segments of other atoms (a concat, a channel-major repeat).
    - ``split``: the atom is ``H`` heads of ``d`` channels (a view (.., H * d) -> (.., H, d)). The split's head
      atom labels the head dim; its within atom labels the head-dim dim and stands for channel ``i`` of *every*
      head, which are different channels per head, so a within atom only ever joins another within atom (that
      joins the two headed atoms: queries with keys); joining it with anything else fixes it. A head atom may
      join head atoms of other splits (they share one head permutation) or plain per-head parameter axes.
    """

    parent: list[int] = field(default_factory=list)
    size: list[int | None] = field(default_factory=list)
    fixed: list[bool] = field(default_factory=list)
    definition: dict[int, Desc] = field(default_factory=dict)
    split: dict[int, tuple[int, int]] = field(default_factory=dict)  # root -> (head atom, within atom)
    owner: dict[int, int] = field(default_factory=dict)  # root of a within atom -> the atom it splits
    heads: set[int] = field(default_factory=set)  # roots of head atoms

    def new(self, size: int | None, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def expand(self, desc: Desc, depth: int = 0) -> Desc:
        """Resolve composite atoms into segments of plain (undefined) root atoms."""
        if depth > 64:
            raise PlanError("cyclic channel structure while tracing (please report this model)")
        out: list[Piece] = []
        for atom, repeat in desc:
            root = self.find(atom)
            if root in self.definition:
                out += [(a, r * repeat) for a, r in self.expand(self.definition[root], depth + 1)]
            else:
                out.append((root, repeat))
        return tuple(out)

    def width(self, desc: Desc) -> int | None:
        total = 0
        for atom, repeat in self.expand(desc):
            size = self.size[atom]
            if size is None:
                return None
            total += size * repeat
        return total

    def fix(self, desc: Desc) -> None:
        for atom, _ in self.expand(desc):
            self.fixed[atom] = True

    def is_fixed(self, desc: Desc) -> bool:
        return all(self.fixed[a] for a, _ in self.expand(desc))

    def _structured(self, root: int) -> bool:
        return root in self.split or root in self.owner or root in self.heads

    def _compatible(self, ra: int, rb: int) -> bool:
        if (ra in self.owner) != (rb in self.owner):
            return False  # a within-head dim is different channels in every head: only another one matches it
        for x, y in ((ra, rb), (rb, ra)):
            if x in self.heads and (y in self.split or y in self.definition):
                return False
            if x in self.split and y in self.definition:
                return False
        sa, sb = self.split.get(ra), self.split.get(rb)
        return not (sa and sb and self.size[self.find(sa[0])] != self.size[self.find(sb[0])])

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        mismatch = self.size[ra] is not None and self.size[rb] is not None and self.size[ra] != self.size[rb]
        if mismatch or not self._compatible(ra, rb):
            self.fixed[ra] = self.fixed[rb] = True
            for r in (ra, rb):
                if r in self.definition:
                    self.fix(self.definition[r])
            return
        self.parent[rb] = ra
        if self.size[ra] is None:
            self.size[ra] = self.size[rb]
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        da, db = self.definition.pop(ra, None), self.definition.pop(rb, None)
        if da is not None and db is not None:
            self.definition[ra] = da
            self.unify(da, db)
        elif da is not None or db is not None:
            self.definition[ra] = da if da is not None else db  # type: ignore[assignment]
        if rb in self.heads:
            self.heads.discard(rb)
            self.heads.add(ra)
        wa, wb = self.owner.pop(ra, None), self.owner.pop(rb, None)
        if wa is not None or wb is not None:
            self.owner[ra] = wa if wa is not None else wb  # type: ignore[assignment]
        sa, sb = self.split.pop(ra, None), self.split.pop(rb, None)
        if sa is not None or sb is not None:
            self.split[ra] = sa if sa is not None else sb  # type: ignore[assignment]
        if wa is not None and wb is not None:
            self.union(wa, wb)  # the same channels in every head: the same headed space (queries and keys)
        if sa is not None and sb is not None:
            self.union(sa[0], sb[0])
            self.union(sa[1], sb[1])
        if self.fixed[ra] and ra in self.definition:
            self.fix(self.definition[ra])

    def unify(self, d1: Desc, d2: Desc) -> None:
        """Make two dimensions the same channels; structures that cannot be matched are fixed."""
        e1, e2 = self.expand(d1), self.expand(d2)
        if e1 == e2:
            return
        for ea, eb in ((e1, e2), (e2, e1)):
            if len(ea) == 1 and ea[0][1] == 1 and len(eb) > 0:
                root = ea[0][0]
                if any(a == root for a, _ in eb):
                    break
                if len(eb) == 1 and eb[0][1] == 1:
                    self.union(root, eb[0][0])
                    return
                if self._structured(root):
                    break
                if self.size[root] is not None and self.width(eb) not in (None, self.size[root]):
                    break
                self.definition[root] = eb
                if self.fixed[root]:
                    self.fix(eb)
                return
        same_shape = len(e1) == len(e2) and all(
            r1 == r2 and self.size[a1] == self.size[a2] for (a1, r1), (a2, r2) in zip(e1, e2, strict=True)
        )
        if same_shape:
            for (a1, _), (a2, _) in zip(e1, e2, strict=True):
                self.union(a1, a2)
        else:
            self.fix(e1)
            self.fix(e2)

    # -- heads --------------------------------------------------------------------------------------------
    def head_split(self, desc: Desc, n_heads: int, head_dim: int) -> tuple[Desc, Desc] | None:
        """Labels of the (heads, head_dim) dims that a free plain channel dim splits into, or None."""
        pieces = self.expand(desc)
        if len(pieces) != 1 or pieces[0][1] != 1:
            return None
        x = pieces[0][0]
        if self.fixed[x] or x in self.owner or x in self.heads or self.size[x] != n_heads * head_dim:
            return None
        if x not in self.split:
            h, w = self.new(n_heads), self.new(head_dim)
            self.heads.add(h)
            self.owner[w] = x
            self.split[x] = (h, w)
        h, w = self.split[x]
        if self.size[self.find(h)] != n_heads:
            return None
        return ((h, 1),), ((w, 1),)

    def head_merge(self, head: Desc, within: Desc) -> Desc | None:
        """The headed atom whose (head, within) labels these are, or None."""
        eh, ew = self.expand(head), self.expand(within)
        if len(eh) != 1 or len(ew) != 1 or eh[0][1] != 1 or ew[0][1] != 1:
            return None
        h, w = eh[0][0], ew[0][0]
        x = self.owner.get(w)
        if x is None or h not in self.heads:
            return None
        rx = self.find(x)
        if self.find(self.split[rx][0]) != h:
            return None
        return ((rx, 1),)

    def chunks(self, desc: Desc, n: int) -> list[int] | None:
        """``n`` free plain atoms of equal size that make up a dimension (subdividing atoms as needed), or None."""
        width = self.width(desc)
        if width is None or width % n or self.is_fixed(desc):
            return None
        seg = width // n
        out: list[int] = []
        for atom, repeat in self.expand(desc):
            size = self.size[atom]
            if repeat != 1 or size is None or size % seg or self.fixed[atom]:
                return None
            if size == seg:
                out.append(atom)
                continue
            if self._structured(atom):
                return None
            parts = [self.new(seg) for _ in range(size // seg)]
            self.definition[atom] = tuple((p, 1) for p in parts)
            out += parts
        return out

    def cut(self, desc: Desc, position: int) -> None:
        """Divide the free plain atom of a dimension that ``position`` falls inside into two atoms."""
        offset = 0
        for atom, repeat in self.expand(desc):
            size = self.size[atom]
            if size is None:
                return
            if offset < position < offset + size * repeat:
                if repeat == 1 and not self.fixed[atom] and not self._structured(atom):
                    first = position - offset
                    self.definition[atom] = ((self.new(first), 1), (self.new(size - first), 1))
                return
            offset += size * repeat

    def close(self) -> None:
        """Propagate fixing through structure: a fixed composite fixes its segments, a fixed headed atom its heads."""
        changed = True
        while changed:
            changed = False
            for root, d in list(self.definition.items()):
                if self.fixed[self.find(root)] and not self.is_fixed(d):
                    self.fix(d)
                    changed = True
            for x, (h, w) in list(self.split.items()):
                if self.fixed[self.find(x)]:
                    for part in (self.find(h), self.find(w)):
                        if not self.fixed[part]:
                            self.fixed[part] = changed = True


# ----------------------------------------------------------------------------------------------------------
# The tracer


@dataclass
class _FakeNode:
    """One element of a tuple-valued node, so rules can read its shape like a node's."""

    val: Any

    @property
    def meta(self) -> dict[str, Any]:
        return {"val": self.val}


@dataclass
class _Stack:
    """A value whose dim ``dim`` selects between different labellings of its other dims.

    timm's fused ``qkv``: a (B, N, 3 * D) linear output viewed as (B, N, 3, H, d) holds the query, key and value
    heads at index 0, 1, 2 of dim 2, each with its own (head, within) labels. Each item is a full labelling
    (its ``dim`` entry is a fixed placeholder). Only ops that move dims (permute), pick an index of ``dim``
    (unbind, select) or copy values keep a stack; any other op fixes every label in it.
    """

    dim: int
    items: list[Labels]


STACK_COPY_OPS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy", "dropout"}


def _dim_size(s: Any) -> int | None:
    return s if isinstance(s, int) else None


def _shape(node: Any) -> list[int | None] | None:
    """Static sizes of a graph value (None for a symbolic size such as the batch), or None for a non-tensor."""
    val = node.meta.get("val") if isinstance(node, (Node, _FakeNode)) else None
    if isinstance(val, torch.Tensor):
        return [_dim_size(s) for s in val.shape]
    return None


class Tracer:
    """Walks an exported graph once, applying the rule of each op to the labels of its values."""

    def __init__(self, ep: ExportedProgram, state: dict[str, torch.Tensor], aliases: dict[str, str],
                 strict: bool = False):
        self.ep = ep
        self.aliases = aliases
        self.atoms = _Atoms()
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

    # -- labels -------------------------------------------------------------------------------------------
    def new(self, size: int | None, fixed: bool = True) -> Desc:
        return ((self.atoms.new(size, fixed), 1),)

    def fresh(self, node: Any, fixed: bool = True) -> Labels | None:
        shape = _shape(node)
        return None if shape is None else [self.new(s, fixed) for s in shape]

    def of(self, arg: Any) -> Labels | None:
        if isinstance(arg, Node):
            value = self.labels.get(arg.name)
            return value if isinstance(value, list) else None
        return None

    def fix_all(self, labels: Any) -> None:
        if isinstance(labels, list):
            for d in labels:
                self.atoms.fix(d)
        elif isinstance(labels, tuple):
            for item in labels:
                self.fix_all(item)
        elif isinstance(labels, _Stack):
            for item in labels.items:
                self.fix_all(item)

    def is_free(self, labels: Any) -> bool:
        if isinstance(labels, list):
            return any(not self.atoms.is_fixed(d) for d in labels)
        if isinstance(labels, tuple):
            return any(self.is_free(item) for item in labels)
        if isinstance(labels, _Stack):
            return any(self.is_free(item) for item in labels.items)
        return False

    def join(self, d1: Desc, d2: Desc) -> None:
        self.atoms.unify(d1, d2)

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
                    self.labels[node.name] = self.fresh(node, fixed=True)
            elif node.op == "call_function":
                self.index += 1
                self.node_name = node.name
                target = node.target
                self.op_name = (target._overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload)
                                else getattr(target, "__name__", str(target)))
                for arg in node.all_input_nodes:
                    if arg.name in self.param_of_node:
                        self.first_use.setdefault(self.param_of_node[arg.name], self.index)
                self.labels[node.name] = self.apply(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self.fix_all(self.labels.get(arg.name))

    def apply(self, node: Node) -> Any:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            if getattr(target, "__name__", "") == "getitem":
                return _getitem(self, node)
            name = getattr(target, "__name__", str(target))
        else:
            name = target._overloadpacket.__name__
        stacks = [a for a in node.all_input_nodes if isinstance(self.labels.get(a.name), _Stack)]
        if stacks:
            out = _stack_rule(self, node, name, stacks)
            if out is not None:
                return out
            for a in stacks:  # any other op: the stack's channels are fixed, its first labelling stands for it
                value = self.labels[a.name]
                self.fix_all(value)
                self.labels[a.name] = value.items[0]
        rule = RULES.get(name)
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

    def unknown(self, node: Node, name: str) -> Any:
        inputs = [self.labels.get(a.name) for a in node.all_input_nodes]
        if any(self.is_free(x) for x in inputs):
            if self.strict:
                raise PlanError(f"no tracer rule for op '{name}' (node {node.name}) which touches hidden "
                                "channels; register one with hf_otfusion.trace.register_rule")
            if name not in self.unhandled:
                self.unhandled.append(name)
            for x in inputs:
                self.fix_all(x)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(self.fresh(_FakeNode(v)) for v in val)
        return self.fresh(node)

    # -- result -------------------------------------------------------------------------------------------
    def plan(self, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> AlignmentPlan:
        atoms = self.atoms
        atoms.close()
        members: dict[int, list[AxisRef]] = {}
        for tensor, axes in self.param_axes.items():
            for axis, atom in enumerate(axes):
                for root, offset, repeat in self._segments(((atom, 1),)):
                    members.setdefault(root, []).append(AxisRef(tensor=tensor, axis=axis, offset=offset,
                                                                repeat=repeat))
        sites: dict[int, list[Site]] = {}
        for kind in (self.consumer_sites, self.producer_sites):
            found: dict[int, list[Site]] = {}
            for node, dim, desc in kind:
                for root, offset, repeat in self._segments(desc):
                    site = Site(node=node, dim=dim, offset=offset, repeat=repeat)
                    if site not in found.setdefault(root, []):
                        found[root].append(site)
            for root, s in found.items():
                sites.setdefault(root, s)
        order: dict[int, int] = {}
        n_producers: dict[int, int] = {}
        for index, desc in self.producers:
            for root in dict.fromkeys(root for root, _, _ in self._segments(desc)):
                order.setdefault(root, index)
                n_producers[root] = n_producers.get(root, 0) + 1
        spaces = []
        names: set[str] = set()
        for root, refs in members.items():
            if root not in sites and root not in atoms.heads:
                continue  # a parameter axis that never meets an activation is not a space (unused tensor)
            # (per-head parameters move with their heads even where no activation carries them)
            key = order.get(root, min(self.first_use.get(m.tensor, 1 << 30) for m in refs))
            first = min(refs, key=lambda m: (self.first_use.get(m.tensor, 1 << 30), m.axis != 0, m.offset))
            name = f"{first.tensor}:{first.axis}" + (f"@{first.offset}" if first.offset else "")
            while name in names:
                name += "'"
            names.add(name)
            heads, group = self._heads(root)
            kind = "residual" if n_producers.get(root, 0) > 1 and heads == 1 else "hidden"
            spaces.append((key, group, dict(name=name, size=atoms.size[root] or 0, kind=kind, members=tuple(refs),
                                            sites=tuple(sites.get(root, ())), heads=heads)))
        spaces.sort(key=lambda kv: kv[0])
        group_names: dict[int, str] = {}
        for _, group, fields in spaces:
            if group is not None:
                group_names.setdefault(group, fields["name"])
        return AlignmentPlan(
            spaces=tuple(Space(**fields, head_group=group_names.get(group)) for _, group, fields in spaces),
            tensors={k: tuple(v.shape) for k, v in state.items()},
            aliases=aliases,
            unhandled=tuple(self.unhandled),
        )

    def _resolve(self, root: int) -> tuple[int, int] | None:
        """The space a free root atom's channels belong to (a key atom) and the repeat of each channel there.

        A headed atom whose head-dim channels are fixed is its heads, each repeated head_dim times.
        """
        atoms = self.atoms
        if atoms.fixed[root]:
            return None
        if root in atoms.split:
            h, w = (atoms.find(a) for a in atoms.split[root])
            if atoms.fixed[w]:
                return None if atoms.fixed[h] else (h, atoms.size[w] or 1)
        return root, 1

    def _heads(self, key: int) -> tuple[int, int | None]:
        """(number of heads, head atom shared by its head group or None when heads stay in place) of a space."""
        atoms = self.atoms
        if key in atoms.heads:
            size = atoms.size[key] or 1
            return (size, key) if size > 1 else (1, None)
        if key in atoms.split:
            h = atoms.find(atoms.split[key][0])
            n = atoms.size[h] or 1
            return (n, None if atoms.fixed[h] or n == 1 else h) if n > 1 else (1, None)
        return 1, None

    def _segments(self, desc: Desc) -> list[tuple[int, int, int]]:
        """(space key, offset, repeat) of each free segment of a dimension."""
        out, offset = [], 0
        for atom, repeat in self.atoms.expand(desc):
            size = self.atoms.size[atom] or 0
            resolved = self._resolve(atom)
            if resolved is not None:
                out.append((resolved[0], offset, repeat * resolved[1]))
            offset += size * repeat
        return out


# ----------------------------------------------------------------------------------------------------------
# Rules


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _getitem(t: Tracer, node: Node) -> Any:
    src, i = node.args
    value = t.labels.get(src.name)
    if isinstance(value, tuple) and i < len(value):
        return value[i]
    return t.fresh(node)


def _pointwise_out(t: Tracer, node: Node, tensors: Sequence[Any]) -> Labels | None:
    """Broadcasting: aligned dims of equal size are the same channels."""
    out_shape = _shape(node)
    if out_shape is None:
        return t.fresh(node)
    out: Labels = []
    for pos in range(len(out_shape)):
        chosen: Desc | None = None
        for arg in tensors:
            labels, shape = t.of(arg), _shape(arg)
            if labels is None or shape is None:
                continue
            k = pos - (len(out_shape) - len(shape))
            if k < 0 or (shape[k] == 1 and out_shape[pos] != 1):
                continue
            if chosen is None:
                chosen = labels[k]
            else:
                t.join(chosen, labels[k])
        out.append(chosen if chosen is not None else t.new(out_shape[pos]))
    return out


@register_rule(
    "add", "sub", "mul", "div", "maximum", "minimum", "where", "masked_fill", "pow", "lerp", "addcmul",
    "addcdiv", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "clone", "contiguous", "alias", "detach",
    "_to_copy", "to", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "square", "reciprocal", "clamp",
    "clamp_min", "clamp_max", "dropout", "lift_fresh_copy", "type_as", "copy", "fill", "bitwise_not",
    "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "sign", "floor", "ceil", "round", "sin", "cos",
)
def _pointwise(t: Tracer, node: Node) -> Any:
    tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
    return _pointwise_out(t, node, tensors)


@register_rule("native_dropout")
def _native_dropout(t: Tracer, node: Node) -> Any:
    out = t.of(node.args[0])
    return (out, out)


@register_rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum")
def _along_dim(t: Tracer, node: Node) -> Any:
    return t.of(node.args[0]) or t.fresh(node)


def _producer(t: Tracer, node: Node, out: Labels, channel_dim: int) -> None:
    t.producers.append((t.index, out[channel_dim]))
    t.producer_sites.append((node.name, channel_dim % len(out), out[channel_dim]))


@register_rule("linear")
def _linear(t: Tracer, node: Node) -> Any:
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    xl, wl = t.of(x), t.of(w)
    out = t.fresh(node)
    if xl is None or wl is None or out is None:
        return t.unknown(node, "linear")
    out[:-1] = xl[:-1]
    out[-1] = wl[0]
    t.join(wl[1], xl[-1])
    if (bl := t.of(b)) is not None:
        t.join(bl[0], wl[0])
    t.consumer_sites.append((x.name, len(xl) - 1, xl[-1]))
    _producer(t, node, out, len(out) - 1)
    return out


@register_rule("addmm")
def _addmm(t: Tracer, node: Node) -> Any:
    """``bias + x @ W`` with W stored (in, out), as in GPT-2's Conv1D."""
    b, x, w = node.args[:3]
    xl, wl, bl = t.of(x), t.of(w), t.of(b)
    out = t.fresh(node)
    if xl is None or wl is None or out is None:
        return t.unknown(node, "addmm")
    out[0], out[1] = xl[0], wl[1]
    t.join(wl[0], xl[1])
    if bl is not None:
        t.join(bl[-1], wl[1])
    t.consumer_sites.append((x.name, 1, xl[1]))
    if w.name in t.param_of_node:
        _producer(t, node, out, 1)
    return out


@register_rule("mm", "bmm", "matmul")
def _matmul(t: Tracer, node: Node) -> Any:
    """Batched matrix product: the contracted dims are the same channels; batch dims broadcast."""
    a, b = node.args[:2]
    al, bl, out = t.of(a), t.of(b), t.fresh(node)
    if al is None or bl is None or out is None or len(al) < 2 or len(bl) < 2:
        return t.unknown(node, str(node.target))
    t.join(al[-1], bl[-2])
    out[-2], out[-1] = al[-2], bl[-1]
    sa, sb, so = _shape(a), _shape(b), _shape(node)
    for pos in range(len(out) - 2):
        chosen: Desc | None = None
        for labels, shape in ((al, sa), (bl, sb)):
            k = pos - (len(out) - len(labels))
            if k < 0 or k >= len(labels) - 2 or (shape[k] == 1 and so[pos] != 1):
                continue
            if chosen is None:
                chosen = labels[k]
            else:
                t.join(chosen, labels[k])
        if chosen is not None:
            out[pos] = chosen
    if b.name in t.param_of_node:
        t.consumer_sites.append((a.name, len(al) - 1, al[-1]))
        _producer(t, node, out, len(out) - 1)
    return out


@register_rule("conv1d", "conv2d", "conv3d", "convolution")
def _conv(t: Tracer, node: Node) -> Any:
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
    if node.target._overloadpacket.__name__ == "convolution":
        transposed, groups = bool(_arg(node, 6, "transposed", False)), int(_arg(node, 8, "groups", 1))
    else:
        transposed, groups = False, int(_arg(node, 6, "groups", 1))
    xl, wl, out = t.of(x), t.of(w), t.fresh(node)
    if xl is None or wl is None or out is None or transposed:
        return t.unknown(node, "conv_transpose" if transposed else "conv")
    out[0] = xl[0]
    out[1] = wl[0]
    if (bl := t.of(b)) is not None:
        t.join(bl[0], wl[0])
    in_ch, out_ch = _shape(x)[1], _shape(node)[1]
    if groups == 1:
        t.join(wl[1], xl[1])
    elif groups == in_ch and out_ch is not None and in_ch and out_ch % in_ch == 0:
        # depthwise: output channel g * m + k reads input channel g, so it is the input's space repeated
        mult = out_ch // in_ch
        t.join(wl[0], tuple((a, r * mult) for a, r in t.atoms.expand(xl[1])))
    else:  # other grouped convs keep channels inside their group: fix rather than mis-align
        t.atoms.fix(xl[1])
        t.atoms.fix(wl[0])
    t.consumer_sites.append((x.name, 1, xl[1]))
    _producer(t, node, out, 1)
    return out


@register_rule("embedding")
def _embedding(t: Tracer, node: Node) -> Any:
    w, idx = node.args[:2]
    wl, il, out = t.of(w), t.of(idx), t.fresh(node)
    if wl is None or out is None:
        return t.unknown(node, "embedding")
    t.atoms.fix(wl[0])  # the vocabulary
    if il is not None:
        out[:-1] = il
    out[-1] = wl[1]
    _producer(t, node, out, len(out) - 1)
    return out


def _norm_params(t: Tracer, channel: Desc, params: Sequence[Any]) -> None:
    for p in params:
        if (pl := t.of(p)) is not None:
            t.join(pl[0], channel)


@register_rule("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
               "batch_norm", "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "batch_norm")
    _norm_params(t, xl[1], node.args[1:5])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        rest = []
        for v in val[1:]:
            shape = list(v.shape) if isinstance(v, torch.Tensor) else None
            rest.append([xl[1]] if shape == [_shape(x)[1]] else t.fresh(_FakeNode(v)))
        return (xl, *rest)
    return xl


@register_rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(t: Tracer, node: Node) -> Any:
    x, normalized = node.args[0], node.args[1]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "layer_norm")
    k = len(normalized)
    for p in node.args[2:4]:
        if (pl := t.of(p)) is not None:
            for i in range(k):
                t.join(pl[i], xl[len(xl) - k + i])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (xl, *[t.fresh(_FakeNode(v)) for v in val[1:]])
    return xl


@register_rule("group_norm", "native_group_norm")
def _group_norm(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl = t.of(x)
    if xl is None:
        return t.unknown(node, "group_norm")
    if node.target._overloadpacket.__name__ == "group_norm":
        groups, params = int(node.args[1]), node.args[2:4]
    else:
        groups, params = int(node.args[6]), node.args[1:3]
    channels = _shape(x)[1]
    if groups not in (1, channels):
        t.atoms.fix(xl[1])  # statistics over contiguous channel groups: channels may not leave their group
    _norm_params(t, xl[1], params)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return (xl, *[t.fresh(_FakeNode(v)) for v in val[1:]])
    return xl


@register_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
               "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices",
               "max_pool3d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool2d",
               "pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d")
def _pool(t: Tracer, node: Node) -> Any:
    """Channels pass through; spatial outputs are new (fixed) positions."""
    x = node.args[0]
    xl = t.of(x)
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    name = node.target._overloadpacket.__name__
    spatial = 3 if "3d" in name else 1 if "1d" in name else 2
    if xl is None or not isinstance(first, torch.Tensor):
        return t.unknown(node, name)
    out = t.fresh(_FakeNode(first))
    if name in ("pad", "constant_pad_nd") and isinstance(node.args[1], (list, tuple)):
        # pad=[last_lo, last_hi, second_last_lo, ...]: only the dims with a non-zero pad get new positions
        pads = list(node.args[1])
        spatial = len(pads) // 2
        padded = {len(xl) - 1 - k for k in range(spatial) if pads[2 * k] != 0 or pads[2 * k + 1] != 0}
        for k in range(len(xl)):
            if k not in padded and len(out) == len(xl):
                out[k] = xl[k]
            else:
                t.atoms.fix(xl[k])  # padded channels would be new channels: fix them (positions are fixed anyway)
        return out
    out[: len(out) - spatial] = xl[: len(xl) - spatial]
    for d in xl[len(xl) - spatial :]:
        t.atoms.fix(d)  # the pooled dims must be positions; channels pooled here (channels-last) stay fixed
    if isinstance(val, (tuple, list)):
        return (out, out)
    return out


@register_rule("mean", "sum", "amax", "amin", "var", "std", "prod", "max", "min", "logsumexp", "norm",
               "linalg_vector_norm", "any", "all", "argmax", "argmin", "var_mean")
def _reduce(t: Tracer, node: Node) -> Any:
    """Reductions: kept dims pass through (a reduction over channels is invariant to their order)."""
    x = node.args[0]
    xl = t.of(x)
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    if xl is None or not isinstance(first, torch.Tensor):
        return t.fresh(node)
    dims = _arg(node, 1, "dim", None)
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) or not isinstance(dims, (list, tuple)):
        dims = list(range(len(xl)))
    dims = {d % len(xl) for d in dims if isinstance(d, int)}
    keep = len(first.shape) == len(xl)
    out = [xl[i] if i not in dims else t.new(1) for i in range(len(xl)) if keep or i not in dims]
    if isinstance(val, (tuple, list)):
        return tuple(out if isinstance(v, torch.Tensor) and len(v.shape) == len(out) else t.fresh(_FakeNode(v))
                     for v in val)
    return out


def _permute_order(node: Node, n: int, name: str) -> list[int]:
    order = list(range(n))
    if name == "permute":
        order = [d % n for d in node.args[1]]
    elif name == "t":
        order = order[::-1]
    elif name == "movedim":
        src, dst = node.args[1] % n, node.args[2] % n
        order.remove(src)
        order.insert(dst, src)
    else:
        a, b = node.args[1] % n, node.args[2] % n
        order[a], order[b] = order[b], order[a]
    return order


@register_rule("permute", "transpose", "t", "swapaxes", "movedim")
def _permute(t: Tracer, node: Node) -> Any:
    xl = t.of(node.args[0])
    if xl is None:
        return t.fresh(node)
    order = _permute_order(node, len(xl), node.target._overloadpacket.__name__)
    return [xl[i] for i in order]


def _stack_rule(t: Tracer, node: Node, name: str, stacks: list[Node]) -> Any:
    """The ops that keep a :class:`_Stack` (or resolve it); None for any other op."""
    if len(stacks) != 1 or not node.args or node.args[0] is not stacks[0]:
        return None
    st: _Stack = t.labels[stacks[0].name]
    n = len(st.items[0])
    tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
    if name in STACK_COPY_OPS and len(tensors) == 1:
        return st
    if name in ("permute", "transpose", "t", "swapaxes", "movedim"):
        order = _permute_order(node, n, name)
        return _Stack(order.index(st.dim), [[item[i] for i in order] for item in st.items])
    if name == "unbind" and _arg(node, 1, "dim", 0) % n == st.dim:
        return tuple([d for k, d in enumerate(item) if k != st.dim] for item in st.items)
    if name == "select" and node.args[1] % n == st.dim and isinstance(node.args[2], int):
        return [d for k, d in enumerate(st.items[node.args[2]]) if k != st.dim]
    return None


@register_rule("view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as")
def _reshape(t: Tracer, node: Node) -> Any:
    """Any reshape: match dims block by block (same element order, different shape).

    A channel dim split into (heads, head_dim) gets head labels; (3, heads, head_dim) is a stack of three
    headed dims (a fused qkv); the merge of a (heads, head_dim) pair is the headed dim again.
    """
    x = node.args[0]
    xl, src, dst = t.of(x), _shape(x), _shape(node)
    if xl is None or src is None or dst is None:
        return t.fresh(node)
    out: Labels = [t.new(s) for s in dst]
    stacks: list[tuple[int, list[dict[int, Desc]]]] = []
    i_dims = [i for i, s in enumerate(src) if s != 1]
    o_dims = [j for j, s in enumerate(dst) if s != 1]
    # equal static trailing dims are the same elements (the flat index modulo their size is kept): match them
    # first, so that symbolic leading dims (a batch times a number of windows) cannot misalign the channels
    while i_dims and o_dims and src[i_dims[-1]] is not None and src[i_dims[-1]] == dst[o_dims[-1]]:
        out[o_dims.pop()] = xl[i_dims.pop()]
    i = j = 0
    while i < len(i_dims) and j < len(o_dims):
        si, sj = src[i_dims[i]], dst[o_dims[j]]
        if si is None or sj is None:
            if si is None and sj is None:
                out[o_dims[j]] = xl[i_dims[i]]
                i, j = i + 1, j + 1
                continue
            for k in i_dims[i:]:
                t.atoms.fix(xl[k])
            return out
        ib, jb, pi, pj = [i_dims[i]], [o_dims[j]], si, sj
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(i_dims) and src[i_dims[i]] is not None:
                pi *= src[i_dims[i]]
                ib.append(i_dims[i])
                i += 1
            elif pj < pi and j < len(o_dims) and dst[o_dims[j]] is not None:
                pj *= dst[o_dims[j]]
                jb.append(o_dims[j])
                j += 1
            else:
                break
        stack = _reshape_block(t, xl, src, dst, ib, jb, out)
        if stack is not None:
            stacks.append(stack)
    for k in i_dims[i:]:
        t.atoms.fix(xl[k])
    if len(stacks) == 1:
        dim, per_item = stacks[0]
        items = []
        for labels in per_item:
            item = list(out)
            for k, d in labels.items():
                item[k] = d
            items.append(item)
        return _Stack(dim, items)
    for _, per_item in stacks:  # two stacked dims in one value: not expressible
        for labels in per_item:
            for d in labels.values():
                t.atoms.fix(d)
    return out


def _reshape_block(
    t: Tracer, xl: Labels, src: list, dst: list, ib: list[int], jb: list[int], out: Labels
) -> tuple[int, list[dict[int, Desc]]] | None:
    if len(ib) == 1 and len(jb) == 1:
        out[jb[0]] = xl[ib[0]]
        return None
    if len(jb) == 1:
        if len(ib) == 2 and (merged := t.atoms.head_merge(xl[ib[0]], xl[ib[1]])) is not None:
            out[jb[0]] = merged  # (heads, head_dim) -> the headed channels
            return None
        # merge: channel-major, inner dims must be fixed positions
        inner = math.prod(src[k] for k in ib[1:])
        if any(not t.atoms.is_fixed(xl[k]) for k in ib[1:]):
            t.structural(f"a flatten {[src[k] for k in ib]} -> {dst[jb[0]]} with hidden channels inside (channel-"
                         "minor, e.g. a patch merging); only channel-major flattens are expressible")
        for k in ib[1:]:
            t.atoms.fix(xl[k])
        out[jb[0]] = tuple((a, r * inner) for a, r in t.atoms.expand(xl[ib[0]]))
        return None
    if len(ib) == 1:  # split: the outer dim keeps the channels when every segment repeats the inner block
        inner = math.prod(dst[k] for k in jb[1:])
        pieces = t.atoms.expand(xl[ib[0]])
        if all(r % inner == 0 for _, r in pieces):
            out[jb[0]] = tuple((a, r // inner) for a, r in pieces)
            return None
        if len(jb) == 2 and (headed := t.atoms.head_split(xl[ib[0]], dst[jb[0]], dst[jb[1]])) is not None:
            out[jb[0]], out[jb[1]] = headed
            return None
        if len(jb) in (2, 3) and (parts := t.atoms.chunks(xl[ib[0]], dst[jb[0]])) is not None:
            per_item: list[dict[int, Desc]] = []
            for part in parts:
                if len(jb) == 2:
                    per_item.append({jb[1]: ((part, 1),)})
                elif (headed := t.atoms.head_split(((part, 1),), dst[jb[1]], dst[jb[2]])) is not None:
                    per_item.append({jb[1]: headed[0], jb[2]: headed[1]})
                else:
                    break
            else:
                return jb[0], per_item
    if any(not t.atoms.is_fixed(xl[k]) for k in ib):
        t.structural(f"a reshape {[src[k] for k in ib]} -> {[dst[k] for k in jb]} of hidden channels that is not "
                     "a head split, a head merge or a flatten")
    for k in ib:
        t.atoms.fix(xl[k])
    return None


@register_rule("expand", "expand_as", "repeat", "broadcast_to")
def _expand(t: Tracer, node: Node) -> Any:
    xl, src, dst = t.of(node.args[0]), _shape(node.args[0]), _shape(node)
    if xl is None or src is None or dst is None:
        return t.fresh(node)
    out = [t.new(s) for s in dst]
    lead = len(dst) - len(src)
    name = node.target._overloadpacket.__name__
    for k in range(len(src)):
        if src[k] == dst[lead + k] or (src[k] is None and dst[lead + k] is None):
            out[lead + k] = xl[k]
        elif name == "repeat" and src[k] != 1:
            t.atoms.fix(xl[k])  # tiling channels is not a channel-major repeat
    return out


@register_rule("cat", "concat", "concatenate")
def _cat(t: Tracer, node: Node) -> Any:
    tensors = [a for a in node.args[0] if isinstance(a, Node) and _shape(a) and any(s != 0 for s in _shape(a))]
    out = t.fresh(node)
    if out is None or not tensors:
        return out
    dim = _arg(node, 1, "dim", 0) % len(out)
    labels = [t.of(a) for a in tensors]
    if any(lab is None or len(lab) != len(out) for lab in labels):
        return t.unknown(node, "cat")
    for k in range(len(out)):
        if k == dim:
            out[k] = tuple(p for lab in labels for p in t.atoms.expand(lab[k]))
            continue
        out[k] = labels[0][k]
        for lab in labels[1:]:
            t.join(out[k], lab[k])
    return out


def _slice_desc(t: Tracer, desc: Desc, start: int, end: int) -> Desc | None:
    """The segments covering [start, end) exactly, or None when the slice cuts a segment it cannot divide.

    A free plain channel atom is divided where the slice cuts it (GPT-2's ``c_attn`` output split into q, k, v).
    """
    for cut in (start, end):
        t.atoms.cut(desc, cut)
    out, offset = [], 0
    for atom, repeat in t.atoms.expand(desc):
        size = (t.atoms.size[atom] or 0) * repeat
        if offset >= start and offset + size <= end:
            out.append((atom, repeat))
        elif offset < end and offset + size > start:
            return None
        offset += size
    return tuple(out)


@register_rule("slice", "narrow")
def _slice(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src, out = t.of(x), _shape(x), t.fresh(node)
    if xl is None or src is None or out is None:
        return out
    dim = _arg(node, 1, "dim", 0) % len(xl)
    name = node.target._overloadpacket.__name__
    size = src[dim]
    if name == "narrow":
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        start, end, step = _arg(node, 2, "start", 0), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)) or size is None:
        for k in range(len(xl)):
            if k != dim:
                out[k] = xl[k]
        return out
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    for k in range(len(xl)):
        if k != dim:
            out[k] = xl[k]
    if step == 1 and (piece := _slice_desc(t, xl[dim], start, end)) is not None and piece:
        out[dim] = piece
    elif not t.atoms.is_fixed(xl[dim]):
        t.atoms.fix(xl[dim])
    return out


@register_rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(t: Tracer, node: Node) -> Any:
    x = node.args[0]
    xl, src = t.of(x), _shape(x)
    val = node.meta.get("val")
    if xl is None or src is None or not isinstance(val, (tuple, list)):
        return t.unknown(node, str(node.target))
    name = node.target._overloadpacket.__name__
    dim = (_arg(node, 1, "dim", 0) if name == "unbind" else _arg(node, 2, "dim", 0)) % len(xl)
    outs, offset = [], 0
    for v in val:
        o = t.fresh(_FakeNode(v))
        if name == "unbind":
            t.atoms.fix(xl[dim])
            o = [xl[k] for k in range(len(xl)) if k != dim]
        else:
            width = v.shape[dim]
            piece = _slice_desc(t, xl[dim], offset, offset + width) if isinstance(width, int) else None
            for k in range(len(xl)):
                if k != dim:
                    o[k] = xl[k]
            if piece:
                o[dim] = piece
            else:
                t.atoms.fix(xl[dim])
            offset += width if isinstance(width, int) else 0
        outs.append(o)
    return tuple(outs)


@register_rule("select", "index_select", "gather", "index")
def _select(t: Tracer, node: Node) -> Any:
    """Picking entries along a dim makes that dim's channels special: fix it; other dims pass."""
    x = node.args[0]
    xl, out = t.of(x), t.fresh(node)
    if xl is None or out is None:
        return out
    name = node.target._overloadpacket.__name__
    if name == "index":
        return t.unknown(node, name)
    dim = node.args[1] % len(xl)
    t.atoms.fix(xl[dim])
    kept = [xl[k] for k in range(len(xl)) if k != dim] if name == "select" else list(xl)
    if len(kept) == len(out):
        for k, d in enumerate(kept):
            if k != dim or name == "select":
                out[k] = d
    return out


@register_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention")
def _sdpa(t: Tracer, node: Node) -> Any:
    q, k, v = node.args[:3]
    ql, kl, vl = t.of(q), t.of(k), t.of(v)
    out = t.fresh(node)
    if ql is None or kl is None or vl is None or out is None or isinstance(out, tuple):
        return t.unknown(node, "scaled_dot_product_attention")
    t.join(ql[-1], kl[-1])
    t.join(kl[-2], vl[-2])
    for i in range(len(ql) - 2):
        t.join(ql[i], kl[i])
        t.join(ql[i], vl[i])
    return [*ql[:-1], vl[-1]]


@register_rule("sym_size", "sym_numel", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
               "sym_constrain_range_for_size", "_assert_async", "scalar_tensor", "arange", "full", "zeros",
               "ones", "empty", "zeros_like", "ones_like", "full_like", "empty_like", "rand", "randn", "tensor",
               "new_zeros", "new_ones", "new_full", "new_empty", "_local_scalar_dense", "item")
def _no_channels(t: Tracer, node: Node) -> Any:
    """Ops that create values (or sizes) from nothing the plan tracks: all fixed."""
    return t.fresh(node)


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def tied_tensors(model: nn.Module) -> dict[str, str]:
    """Tied tensors (two state_dict names, one storage) -> the first name that holds it."""
    first: dict[tuple[int, tuple], str] = {}
    out: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        # meta tensors have no storage (every data_ptr is 0): there, tied means one and the same tensor object
        key = (id(tensor) if tensor.is_meta else tensor.data_ptr(), tuple(tensor.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def build_plan(
    model: nn.Module,
    example_input: Any,
    *,
    strict: bool = False,
    exported: ExportedProgram | None = None,
) -> AlignmentPlan:
    """Trace ``model`` on ``example_input`` and derive its alignment plan.

    Args:
        model: the network (any ``nn.Module`` that ``torch.export`` can trace).
        example_input: a batch of inputs: a tensor, a tuple of tensors, or a dict of keyword tensors.
        strict: raise :class:`PlanError` on an op without a tracer rule instead of fixing its spaces.
        exported: an already exported program of ``model`` (skips the export).

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
    tracer = Tracer(ep, state, aliases, strict=strict)
    tracer.run()
    return tracer.plan(state, aliases)
