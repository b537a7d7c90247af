"""Plans of deep transformers models traced on a shallow copy and expanded by layer index.

Tracing costs time that grows with depth, and the layers of a decoder repeat: :func:`expanded_plan` builds the
same class with a few layers on the ``meta`` device, traces that, and copies each traced layer's spaces to the
real layers it stands for, renaming ``<prefix>.<i>.<rest>`` tensors (``model.layers.1.self_attn.q_proj.weight``).

The layer map: shallow layer 0 is real layer 0 (``layers - 2`` leading layers are traced as themselves), the
last shallow layer is the real last layer, and between them one shallow layer per distinct *signature* of the
real middle layers (the values of the config's per-layer lists at that index, e.g. ``layer_types``: one layer
for a uniform model, one sliding and one full attention layer for an interleaved one) stands for every middle
layer with that signature. A space inside one traced layer is copied once per real layer of that layer; a space
spanning layers (the residual stream) gets every traced layer's members, each copied to its real layers, in the
real model's parameter order. Names, head groups, the order of the spaces and the fixed-channel report are the
ones a full trace gives, except that a reason naming a graph node inside a copied layer names the traced node.

The expanded plan has no activation sites (``expanded=True``): graph node names cannot be renamed reliably, so it
serves weights-mode fusion only (``fuse`` traces again for activations alignment and repair). Whenever anything
does not fit (no single layer list, a per-layer config value that cannot be sliced, a real tensor the shallow copy
has no counterpart for, tied tensors that do not expand, a structure whose copies would be ambiguous) the result
is None and the caller traces the model in full: an expanded plan is never a guess.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..plan import AlignmentPlan, AxisRef, FixedAxes, Space
from . import core
from .export import tied_tensors

_TOKEN_LISTS = re.compile(r"(^architectures$|token_ids?$|_words_ids$|^tags$)")


@dataclass
class _Layout:
    prefix: str  # the layer list's module path, e.g. "model.layers"
    slots: list[int]  # real layer -> the shallow layer standing for it
    reals: list[list[int]]  # shallow layer -> the real layers it stands for

    def split(self, name: str) -> tuple[int, str] | None:
        head, dot, rest = name[len(self.prefix) + 1:].partition(".")
        if not name.startswith(self.prefix + ".") or not head.isdigit() or not dot:
            return None
        return int(head), rest

    def slot(self, name: str) -> int | None:
        return (self.split(name) or (None,))[0]

    def copy(self, name: str, real: int | None) -> str:
        """``name`` (a shallow tensor) in real layer ``real``; None: the first real layer of its slot."""
        found = self.split(name)
        if found is None:
            return name
        return f"{self.prefix}.{self.reals[found[0]][0] if real is None else real}.{found[1]}"

    def copies(self, name: str) -> list[str]:
        found = self.split(name)
        return [name] if found is None else [f"{self.prefix}.{r}.{found[1]}" for r in self.reals[found[0]]]

    def single(self, slot: int) -> bool:
        return len(self.reals[slot]) == 1


def expanded_plan(model: nn.Module, example: Any, *, layers: int = 3) -> AlignmentPlan | None:
    """The plan of a transformers model with a layer list, traced on a shallow copy (at least ``layers`` layers,
    built on the meta device) and expanded to the model's depth; None when the model does not fit the expansion
    (the caller then traces it in full). The plan has no activation sites and ``expanded=True``."""
    config = getattr(model, "config", None)
    try:
        from transformers import PretrainedConfig
    except ImportError:  # no transformers, so no transformers model
        return None
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(config, PretrainedConfig) or not isinstance(depth, int) or depth <= max(layers, 3):
        return None
    prefixes = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(prefixes) != 1 or not prefixes[0]:
        return None
    found = _shallow_config(config, depth, max(layers, 3), prefixes[0])
    if found is None:
        return None
    shallow_config, layout = found
    try:
        shallow = _build(model, shallow_config)
        if not _same_tensors(model, shallow, layout):
            return None
        meta = pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, example)
        plan = core.build_plan(shallow, meta)
    except Exception:  # noqa: BLE001 - a shallow copy that cannot be built or traced: the full trace says why
        return None
    return _expand(plan, model, shallow, layout)


def reproducible_part(plan: AlignmentPlan) -> dict[str, Any]:
    """A plan as data, less what an expansion cannot reproduce (activation sites, the ``expanded`` flag, graph node
    names in the reasons of fixed channels): equal for an expanded plan and a full trace of the same model.

    Example:
        >>> reproducible_part(expanded_plan(model, x)) == reproducible_part(build_plan(model, x))  # doctest: +SKIP
        True
    """
    d = plan.model_dump()
    d.pop("expanded")
    for space in d["spaces"]:
        space["sites"] = ()
    for fixed in d["fixed"]:
        fixed["reason"] = re.sub(r"\(node \w+\)", "(node)", fixed["reason"])
    return d


def _shallow_config(config: Any, depth: int, layers: int, prefix: str) -> tuple[Any, _Layout] | None:
    """A copy of ``config`` with fewer layers (per-layer lists sliced to match) and the layer map; None when a
    per-layer value cannot be sliced or the copy would not be shallower."""
    per_layer = {}
    for key, value in vars(config).items():
        if not isinstance(value, (list, tuple)) or _TOKEN_LISTS.search(key):
            continue
        if len(value) == depth:
            per_layer[key] = value
        elif value and "layer" in key.lower():  # layer indices (e.g. mlp_only_layers): not sliceable by position
            return None
    head = layers - 2
    signatures = [repr(tuple(v[r] for v in per_layer.values())) for r in range(depth)]
    middle = list(dict.fromkeys(signatures[head:depth - 1]))
    slots = list(range(head)) + [head + middle.index(s) for s in signatures[head:depth - 1]] + [head + len(middle)]
    n = head + len(middle) + 1
    if n >= depth:
        return None
    reals: list[list[int]] = [[] for _ in range(n)]
    for r, s in enumerate(slots):
        reals[s].append(r)
    shallow = copy.deepcopy(config)
    shallow.num_hidden_layers = n
    if getattr(shallow, "num_hidden_layers", None) != n:
        return None
    for key, value in per_layer.items():
        setattr(shallow, key, type(value)(value[rs[0]] for rs in reals))
    return shallow, _Layout(prefix=prefix, slots=slots, reals=reals)


def _build(model: nn.Module, config: Any) -> nn.Module:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kwargs = {}
    if getattr(model.config, "_attn_implementation", None) is not None:
        kwargs["attn_implementation"] = model.config._attn_implementation
    with torch.device("meta"):
        return type(model)._from_config(config, dtype=dtype, **kwargs).eval()


def _same_tensors(model: nn.Module, shallow: nn.Module, layout: _Layout) -> bool:
    """Every tensor outside the layers is the shallow copy's, and every real layer's tensors are those of the
    shallow layer standing for it (names, shapes, dtypes, in order)."""

    def grouped(m: nn.Module, depth: int) -> tuple[list, list[list]] | None:
        outside: list = []
        inside: list[list] = [[] for _ in range(depth)]
        for name, t in m.state_dict(keep_vars=True).items():
            entry = (tuple(t.shape), t.dtype)
            found = layout.split(name)
            if found is None:
                if name.startswith(layout.prefix + "."):
                    return None
                outside.append((name, *entry))
            elif found[0] >= depth:
                return None
            else:
                inside[found[0]].append((found[1], *entry))
        return outside, inside

    real, small = grouped(model, len(layout.slots)), grouped(shallow, len(layout.reals))
    if real is None or small is None or real[0] != small[0]:
        return False
    return all(real[1][r] == small[1][s] for r, s in enumerate(layout.slots))


def _param_order(model: nn.Module) -> dict[str, int]:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {n: i for i, n in enumerate(dict.fromkeys(names))}


def _arrange(slots: list[int | None], layout: _Layout) -> list[tuple[int, int | None]] | None:
    """Where each shallow item goes in the real sequence: (item, real layer) for an item inside one layer (once per
    real layer of its slot), (item, None) for one spanning layers; None when a spanning item's place is ambiguous."""
    local = [i for i, s in enumerate(slots) if s is not None]
    if any(slots[a] > slots[b] for a, b in zip(local, local[1:], strict=False)):  # type: ignore[operator]
        return None
    pre: list[int] = []
    post: list[int] = []
    after: dict[tuple[int, int], list[int]] = {}
    before: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(slots):
        if s is not None:
            continue
        a = max((j for j in local if j < i), default=None)
        b = min((j for j in local if j > i), default=None)
        if a is None or b is None:
            (pre if a is None else post).append(i)
            continue
        sa, sb = slots[a], slots[b]
        assert sa is not None and sb is not None
        if layout.single(sa):
            after.setdefault((a, layout.reals[sa][0]), []).append(i)
        elif sa != sb and layout.single(sb):
            before.setdefault((b, layout.reals[sb][0]), []).append(i)
        else:  # inside (or right after) a layer that stands for many: once in which of them?
            return None
    out: list[tuple[int, int | None]] = [(i, None) for i in pre]
    for r, s in enumerate(layout.slots):
        for i in (j for j in local if slots[j] == s):
            out += [(g, None) for g in before.get((i, r), [])]
            out.append((i, r))
            out += [(g, None) for g in after.get((i, r), [])]
    return out + [(i, None) for i in post]


def _slot(tensors: list[str], layout: _Layout) -> int | None:
    """The shallow layer an item lies in; None when it spans layers (or none); -1 when its copies would be
    ambiguous (it spans some layers that stand for many, not all)."""
    slots = {layout.slot(t) for t in tensors}
    if len(slots) == 1 and None not in slots:
        return slots.pop()
    inside = {s for s in slots if s is not None}
    if inside and inside != set(range(len(layout.reals))) and not all(layout.single(s) for s in inside):
        return -1
    return None


def _names(spaces: list[dict], order: dict[str, int]) -> list[str]:
    """Unique names as the tracer gives them: a name already taken gets a quote, in the tracer's naming order (the
    order of each space's first member among the model's tensors)."""
    rank = sorted(range(len(spaces)), key=lambda i: (order[spaces[i]["members"][0].tensor],
                                                     spaces[i]["members"][0].axis, spaces[i]["members"][0].offset))
    taken: set[str] = set()
    names = [""] * len(spaces)
    for i in rank:
        name = spaces[i]["name"].rstrip("'")
        while name in taken:
            name += "'"
        taken.add(name)
        names[i] = name
    return names


def _rename(name: str, layout: _Layout, real: int | None) -> str:
    tensor, _, rest = name.rstrip("'").rpartition(":")
    return f"{layout.copy(tensor, real)}:{rest}"


def _expand(plan: AlignmentPlan, model: nn.Module, shallow: nn.Module, layout: _Layout) -> AlignmentPlan | None:
    order, small_order = _param_order(model), _param_order(shallow)
    if _names([s.model_dump() | {"members": s.members} for s in plan.spaces], small_order) != \
            [s.name for s in plan.spaces]:
        return None  # the shallow plan's names do not follow the naming this expansion reproduces

    def members(refs: list[Any], tensor_of: Any, rename: Any, real: int | None) -> list | None:
        if any(tensor_of(m) not in small_order or any(t not in order for t in layout.copies(tensor_of(m)))
               for m in refs):
            return None
        if [small_order[tensor_of(m)] for m in refs] != sorted(small_order[tensor_of(m)] for m in refs):
            return None  # members not in parameter order: their expanded order would be a guess
        if real is not None:
            return [rename(m, layout.copy(tensor_of(m), real)) for m in refs]
        spread = [(order[t], i, rename(m, t)) for i, m in enumerate(refs) for t in layout.copies(tensor_of(m))]
        return [m for _, _, m in sorted(spread, key=lambda e: e[:2])]

    def ref(m: AxisRef, t: str) -> AxisRef:
        return m.model_copy(update={"tensor": t})

    # spaces
    slots = [_slot([m.tensor for m in s.members], layout) for s in plan.spaces]
    if -1 in slots or (placed := _arrange(slots, layout)) is None:
        return None
    index = {s.name: i for i, s in enumerate(plan.spaces)}
    fields: list[dict] = []
    where: dict[tuple[int, int | None], int] = {}
    for i, real in placed:
        s = plan.spaces[i]
        refs = members(list(s.members), lambda m: m.tensor, ref, real)
        if refs is None:
            return None
        where[(i, real)] = len(fields)
        fields.append(dict(name=_rename(s.name, layout, real), size=s.size, kind=s.kind, members=tuple(refs),
                           heads=s.heads, shared=s.shared, queries=s.queries, group=s.head_group))
    names = _names(fields, order)
    spaces = []
    for (i, real), f in zip(placed, fields, strict=True):
        group = f.pop("group")
        if group is not None:
            g = index[group]
            k = where.get((g, real if slots[g] is not None else None))
            if k is None:
                return None
            group = names[k]
        spaces.append(Space(**f | {"name": names[where[(i, real)]]}, head_group=group))
    # fixed channels
    fixed_slots = [_slot([m.rpartition(":")[0] for m in f.members], layout) for f in plan.fixed]
    if -1 in fixed_slots or (fixed_placed := _arrange(fixed_slots, layout)) is None:
        return None
    fixed = []
    for i, real in fixed_placed:
        f = plan.fixed[i]
        held = members(list(f.members), lambda m: m.rpartition(":")[0], lambda m, t: f"{t}:{m.rpartition(':')[2]}",
                       real)
        if held is None:
            return None
        fixed.append(FixedAxes(size=f.size, members=tuple(held), reason=f.reason, necessary=f.necessary))
    # tied tensors: the shallow copy's, expanded, must be the model's
    aliases = tied_tensors(model)
    expected: dict[str, str] = {}
    for alias, name in plan.aliases.items():
        a, b = layout.copies(alias), layout.copies(name)
        if len(b) == 1 or (layout.slot(alias) == layout.slot(name)):
            expected.update(zip(a, b * len(a) if len(b) == 1 else b, strict=True))
        else:
            return None
    tensors = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    known = {m.tensor for s in spaces for m in s.members} | {m.rpartition(":")[0] for f in fixed for m in f.members}
    if expected != aliases or not known <= set(tensors) or len(set(names)) != len(names):
        return None
    return AlignmentPlan(spaces=tuple(spaces), tensors=tensors, aliases=aliases, unhandled=plan.unhandled,
                         fixed=tuple(fixed), expanded=True)
