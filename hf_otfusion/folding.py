"""Orthogonal maps of residual streams: norm gains folded into their readers, and which streams allow the map.

A pre-norm transformer's residual stream is read only through norms and written only by linear layers (embeddings,
attention and MLP output projections). RMSNorm without its gain commutes with any orthogonal map ``Q`` of the stream:
``rms(x Q) = rms(x) Q``. So once each gain is folded into the layers that read the norm (``W <- W diag(g)``,
``g <- 1``), the stream admits any orthogonal map, not only permutations (Theus et al., "Generalized Linear Mode
Connectivity for Transformers", NeurIPS 2025, arXiv 2506.22712). ``fuse(..., residual="orthogonal")`` uses this.

The folds are found on the exported graph, with no per-architecture rule: a 1-D tensor of a residual space is a
*gain* when its every use multiplies a value that only linear layers read (``mul(g, x)``, or ``rms_norm``'s weight);
those layers' input axes are its *readers*. A stream qualifies when every gain on it folds; it is then checked like
a plan: on a randomised copy of the model, folded, a random orthogonal map of the stream (gains left at one) must
keep the outputs. A stream that does not qualify keeps permutations, and the reason is reported. Through LayerNorm,
the stream takes only the orthogonal maps that keep the all-ones vector (its centring commutes with exactly those:
``mean(Q x) = mean(x)`` when ``Q^T 1 = 1``), its gain folded like RMSNorm's (its bias divided by the gain) and its
bias moving with the stream. A gain whose readers are tied to another tensor (folding would untie them) does not
fold.

The fused model keeps the target's architecture and state-dict keys: its folded gains are one, its readers hold the
gains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram

from .errors import FusionError
from .graph import LAYER_OPS, op_name, tensor_names
from .log import Recorder, get_logger
from .matching import keeping_ones
from .plan import AlignmentPlan, Space
from .transport import ChannelMap, transport_axis
from .verify import TOLERANCE, RandomisedCopy, randomised_copy

log = get_logger(__name__)
_PASS = frozenset({"_to_copy", "to", "type_as", "alias", "clone", "contiguous", "detach", "lift_fresh_copy"})
_SHAPE = frozenset({"slice", "select", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten"})
_READERS = ("linear", "addmm")


@dataclass(frozen=True)
class Fold:
    """A norm gain and the (tensor, input axis) of each linear layer reading the normalised stream; ``centred``: a
    LayerNorm's, whose stream then takes only the orthogonal maps that keep the all-ones vector."""

    gain: str
    readers: tuple[tuple[str, int], ...]
    centred: bool = False
    bias: str | None = None  # a LayerNorm's bias, added after the gain: divided by it when the gain is folded


@dataclass(frozen=True)
class Rotatable:
    """Which residual streams admit an orthogonal map (with their folds), and why the others do not."""

    folds: dict[str, tuple[Fold, ...]]
    refused: dict[str, str]

    @property
    def spaces(self) -> frozenset[str]:
        return frozenset(self.folds)

    @property
    def centred(self) -> frozenset[str]:
        """The streams read through a LayerNorm: their maps keep the all-ones vector (``Q 1 = 1``)."""
        return frozenset(name for name, folds in self.folds.items() if any(f.centred for f in folds))

    def all_folds(self) -> list[Fold]:
        return [f for folds in self.folds.values() for f in folds]

    def summary(self) -> list[str]:
        """One line per residual stream: the map it takes, and why."""
        kept = " keeping the all-ones vector (LayerNorm centring)"
        lines = [f"{name}: orthogonal{kept if name in self.centred else ''} ({len(folds)} norm gains folded into "
                 "their readers)" for name, folds in self.folds.items()]
        return lines + [f"{name}: permutation only ({why})" for name, why in self.refused.items()]


def _last_dim(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _keeps_channels(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """A cast or copy of ``node``, or a slice, selection or reshape of it that keeps its last (channel) dim whole."""
    name = op_name(user)
    if not user.args or user.args[0] is not node:
        return False
    if name in _PASS:
        return True
    if name not in _SHAPE:
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.dim() or _last_dim(user) != int(val.shape[-1]):
        return False
    if name in ("slice", "select"):
        dim = user.args[1] if len(user.args) > 1 else 0
        return int(dim) % val.dim() != val.dim() - 1
    return True


def _uses(node: torch.fx.Node) -> list[torch.fx.Node]:
    """A value's users past casts, copies and reshapes that keep its channel dim (assertions left out)."""
    out: list[torch.fx.Node] = []
    for user in node.users:
        name = op_name(user)
        if name.startswith("_assert"):
            continue
        if _keeps_channels(user, node):
            out += _uses(user)
        else:
            out.append(user)
    return out


def _source(value: Any) -> Any:
    """The value a chain of casts, copies and channel-keeping reshapes starts from."""
    while (isinstance(value, torch.fx.Node) and value.args and isinstance(value.args[0], torch.fx.Node)
           and _keeps_channels(value, value.args[0])):
        value = value.args[0]
    return value


def _readers(value: torch.fx.Node, names: Mapping[str, str]) -> list[tuple[str, int]] | str:
    """(weight, input axis) of every linear layer reading ``value``, or why something else reads it."""
    out = []
    for user in _uses(value):
        op = op_name(user)
        if op not in _READERS:
            return f"the normalised stream is also read by {op!r}, not only by linear layers"
        spec = LAYER_OPS[op]
        weight = _source(user.args[spec.weight])
        if _source(user.args[spec.x]) is not value or not isinstance(weight, torch.fx.Node) or weight.name not in names:
            return f"a {op} reads the normalised stream other than as its input"
        out.append((names[weight.name], 1 - spec.weight_out))
    return out or "nothing reads the normalised stream"


def _fold_of(gain: str, node: torch.fx.Node, names: Mapping[str, str]) -> Fold | str:
    readers: list[tuple[str, int]] = []
    centred, bias = False, None
    for use in _uses(node):
        op = op_name(use)
        scales = op == "mul" and len(use.args) == 2 and any(_source(a) is node for a in use.args)
        if scales or (op in ("rms_norm", "_fused_rms_norm") and len(use.args) > 2 and _source(use.args[2]) is node):
            found = _readers(use, names)
        elif op == "layer_norm" and len(use.args) > 2 and _source(use.args[2]) is node:
            found, centred = _readers(use, names), True
            b = _source(use.args[3]) if len(use.args) > 3 else None
            if isinstance(b, torch.fx.Node):
                if b.name not in names or (bias is not None and names[b.name] != bias):
                    return f"{gain!r}: its LayerNorm's bias is not a model tensor"
                bias = names[b.name]
        elif op == "native_layer_norm":
            return f"{gain!r} is a LayerNorm's whose output is read through its statistics too"
        else:
            return f"{gain!r} is used by {op!r}, not as a norm gain read by linear layers"
        if isinstance(found, str):
            return f"{gain!r}: {found}"
        readers += found
    return Fold(gain, tuple(dict.fromkeys(readers)), centred, bias)


def _only_added(node: torch.fx.Node) -> bool:
    """Every use of ``node`` adds it to the stream: ``add``/``sub``, a linear layer's bias (a writer's), or a
    LayerNorm's bias; it moves with the stream like any writer (``Q (z + b) = Q z + Q b``)."""
    def added(use: torch.fx.Node) -> bool:
        op = op_name(use)
        if op in ("add", "sub"):
            return True
        at = LAYER_OPS[op].bias if op in LAYER_OPS else 3 if op == "layer_norm" else None
        return (at is not None and len(use.args) > at and _source(use.args[at]) is node
                and not any(_source(a) is node for i, a in enumerate(use.args) if i != at))
    uses = _uses(node)
    return bool(uses) and all(added(u) for u in uses)


def find_folds(exported: ExportedProgram, plan: AlignmentPlan) -> Rotatable:
    """The folds of every residual space of ``plan`` whose 1-D tensors are norm gains or additive vectors (biases);
    not yet checked (see :func:`rotatable`)."""
    names = tensor_names(exported)
    nodes = {names[n.name]: n for n in exported.graph.nodes if n.op == "placeholder" and n.name in names}
    tied = set(plan.aliases) | set(plan.aliases.values())
    folds: dict[str, tuple[Fold, ...]] = {}
    refused: dict[str, str] = {}
    for space in plan.spaces:
        if space.kind != "residual":
            continue
        found: list[Fold] = []
        members = {(m.tensor, m.axis) for m in space.members}
        if not any(len(plan.tensors[m.tensor]) == 1 for m in space.members):
            continue  # no gain or bias: not a stream through norms (a gated MLP's hidden units)
        why = None if space.heads == 1 else "a stream with heads"
        for m in space.members:
            if why is not None:
                break
            if len(plan.tensors[m.tensor]) != 1 or m.tensor not in nodes:
                continue
            if _only_added(nodes[m.tensor]):  # moves with the stream like a writer
                continue
            fold = _fold_of(m.tensor, nodes[m.tensor], names)
            if isinstance(fold, str):
                why = fold
            elif bad := [t for t, _ in fold.readers if t in tied]:
                why = f"{m.tensor!r} is read by {bad[0]!r}, which is tied to another tensor (folding would untie it)"
            elif outside := [f"{t}:{a}" for t, a in fold.readers if (t, a) not in members]:
                why = f"{m.tensor!r} is read by {outside[0]}, which the plan does not put on this stream"
            else:
                found.append(fold)
        if why is None and not found:
            why = "no norm gain on it (nothing to fold; a permutation is as good)"
        if why is None:
            folds[space.name] = tuple(found)
        else:
            refused[space.name] = why
    return Rotatable(folds, refused)


def fold_state(state: Mapping[str, torch.Tensor], folds: Sequence[Fold]) -> dict[str, torch.Tensor]:
    """``state`` with each gain multiplied into its readers' input axes (in float64, stored in their dtypes) and set
    to one (a LayerNorm's bias divided by it); the function is unchanged. A gain with a zero entry next to a bias
    does not fold (:class:`FusionError`)."""
    out = dict(state)
    for fold in folds:
        gain = state[fold.gain].double()
        if fold.bias is not None:
            if bool((gain == 0).any()):
                raise FusionError(f"residual='orthogonal': the LayerNorm gain {fold.gain!r} has a zero entry, so its "
                                  "bias cannot be divided by it (use residual='shared')")
            b = state[fold.bias]
            out[fold.bias] = (b.double() / gain.to(b.device)).to(b.dtype)
        for reader, axis in fold.readers:
            w = out[reader]
            shape = [1] * w.dim()
            shape[axis] = -1
            out[reader] = (w.double() * gain.to(w.device).view(shape)).to(w.dtype)
        out[fold.gain] = torch.ones_like(state[fold.gain])
    return out


def without_gains(plan: AlignmentPlan, rotatable: Rotatable) -> AlignmentPlan:
    """``plan`` with the folded gains out of their streams (fixed at one in every model, they are not moved)."""
    gains = {f.gain for f in rotatable.all_folds()}
    spaces = tuple(s.model_copy(update={"members": tuple(m for m in s.members if m.tensor not in gains)})
                   if s.name in rotatable.folds else s for s in plan.spaces)
    return plan.model_copy(update={"spaces": spaces})


def random_orthogonal(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64,
                      centred: bool = False) -> torch.Tensor:
    """A random orthogonal (n, n) matrix (Haar: QR of a Gaussian with the signs of R's diagonal fixed); ``centred``:
    one that keeps the all-ones vector (Haar on its orthogonal complement)."""
    if centred:
        return keeping_ones(random_orthogonal(n - 1, gen)).to(dtype)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def mapped(state: Mapping[str, torch.Tensor], space: Space, matrix: torch.Tensor,
           transposed: frozenset[str] = frozenset(), inverse_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``state`` with ``space``'s channels mapped by ``matrix`` on every member, except the members whose tensors are
    in ``transposed``, which take ``inverse_t`` (the inverse transpose of ``matrix``: for an invertible map, one of
    the two layers around the channels undoes what the other does); differentiable."""
    out = dict(state)
    make = ChannelMap.dense if matrix.requires_grad else ChannelMap  # a gather or sparse product where one is exact
    m_map = make(matrix)
    r_map = make(inverse_t) if inverse_t is not None else m_map
    for m in space.members:
        out[m.tensor] = transport_axis(out[m.tensor], r_map if m.tensor in transposed else m_map, space.layout(m))
    return out


def rotate(state: Mapping[str, torch.Tensor], space: Space, matrix: torch.Tensor,
           aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with ``space``'s channels mapped by ``matrix`` (new channel ``j`` = sum_i ``matrix[j, i]`` old
    channel ``i``) on every member axis (:func:`mapped`), in each tensor's dtype; tied tensors follow the tensor they
    share."""
    out = mapped(state, space, matrix)
    for m in space.members:
        out[m.tensor] = out[m.tensor].to(state[m.tensor].dtype)
    for alias, name in (aliases or {}).items():
        out[alias] = out[name]
    return out


def rotatable(model: nn.Module, plan: AlignmentPlan, exported: ExportedProgram, example_input: Any, *,
              seed: int = 0,
        checker: RandomisedCopy | str | None = None) -> Rotatable:
    """The residual streams of ``plan`` that admit an orthogonal map, checked: on a randomised copy of ``model``
    (norm gains around one, every parameter random), folded, a random orthogonal map of each such stream must keep
    the outputs on ``example_input``; one that does not keeps permutations, with the change it made as the reason.
    ``checker``: the randomised copy to check on (:func:`~hf_otfusion.verify.randomised_copy`; made when
    omitted)."""
    found = find_folds(exported, plan)
    if not found.folds:
        return found
    copy_ = checker if checker is not None else randomised_copy(model, plan, example_input, seed=seed)
    if isinstance(copy_, str):
        return Rotatable({}, {**found.refused, **{n: f"cannot be checked: {copy_}" for n in found.folds}})
    tol = TOLERANCE[copy_.dtype]
    folded = fold_state(copy_.base, found.all_folds())
    reduced = without_gains(plan, found)
    gen = torch.Generator().manual_seed(seed + 1)
    folds, refused = {}, dict(found.refused)
    base_change = copy_.change_of({**folded, **{a: folded[n] for a, n in plan.aliases.items()}})
    if base_change > tol:
        why = f"folding the norm gains changes the outputs by {base_change:.1e} (relative)"
        return Rotatable({}, {**refused, **{n: why for n in found.folds}})
    for name, space_folds in found.folds.items():
        space = reduced.space(name)
        moved = rotate(folded, space, random_orthogonal(space.size, gen, centred=name in found.centred),
                       plan.aliases)
        change = copy_.change_of(moved)
        if change > tol:
            refused[name] = f"a random orthogonal map of it (norm gains folded) changes the outputs by {change:.1e}"
        else:
            folds[name] = space_folds
    return Rotatable(folds, refused)


_recorder: Recorder[Rotatable] = Recorder("hf_otfusion_rotatable")


def recording() -> contextlib.AbstractContextManager[list[Rotatable]]:
    """Collect the :class:`Rotatable` verdict of every ``fuse(..., residual="orthogonal")`` inside the block (the
    merge command's card states it)."""
    return _recorder.recording()


def report_rotatable(rot: Rotatable) -> None:
    """Tell the user which streams take orthogonal maps: a warning for each that keeps permutations (and why)."""
    _recorder.record(rot)
    for name, why in rot.refused.items():
        log.warning("residual='orthogonal': stream %s keeps permutations: %s", name, why)
    if not rot.folds:
        log.warning("residual='orthogonal': no residual stream admits an orthogonal map; weight matching with "
                    "permutations only")
    for line in rot.summary()[: len(rot.folds)]:
        log.info("residual='orthogonal': %s", line)
