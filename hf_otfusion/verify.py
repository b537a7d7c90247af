"""Plans that verify themselves: a plan is checked on the model before it is used, and repaired where it is wrong.

A tracer rule can be wrong in a way no test foresaw, and a wrong plan still passes ``fuse([m, perm(m)]) == m``
(the same wrong plan is used both ways). The check that can fail: on a copy of the model with every floating
parameter and persistent buffer randomised (norm gains around 1, BatchNorm statistics taken from the example batch
and moved at random, biases, tables and scalars too; integer buffers and non-persistent buffers kept, since no plan
moves them), a random permutation of the plan's spaces must keep the outputs on the example input (in float64
where the model runs in it and has at most 100 M parameters, else float32 with a looser tolerance).

Where it does not, group testing finds the responsible spaces: the *items* (each space's channels, and the head
order of each head group, which its spaces share) are permuted in growing prefixes, and a binary search finds the
first item that breaks the outputs when added to a set known to keep them; it is set aside and the search goes on
from there. ``k`` bad items among ``n`` cost about ``k * (log2(n) + 1)`` forward passes (a good plan: one).
A bad space is removed from the plan and recorded as a :class:`~hf_otfusion.plan.FixedAxes` entry with the
reason; a bad head order (or a head group that lost a space) keeps its heads in place (``head_group`` None). The
repaired plan is verified again with a fresh permutation. The verdict is :attr:`AlignmentPlan.verification`.

A plan traced on the ``meta`` device is checked on a copy whose meta parameters get memory (they are randomised
anyway); a model with a meta tensor that cannot be rebuilt (a non-persistent or integer buffer) cannot be checked,
and the plan says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .plan import AlignmentPlan, FixedAxes, Layout, Space, Verification
from .profile import timed
from .transport import ChannelMap, transport_axis

# relative output changes: float64 allows for the float32 arithmetic some models keep inside (Llama's RMSNorm); a
# wrong plan changes randomised outputs by far more (1e-2 and up)
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
_ROUNDS = 3  # searches on a plan whose repaired version still fails its fresh check
Item = tuple[str, str]  # ("space", space name) or ("heads", head group name)


# ----------------------------------------------------------------------------------------------------------
# The randomised copy


def _materialise(model: nn.Module) -> list[str]:
    """Give every meta tensor of ``model`` CPU memory (tied ones stay tied; the state dict's entries are randomised
    next); a non-persistent floating buffer (a rotary frequency table) gets random values in [0.5, 1.5), which a
    plan traced on meta never relied on. Returns those buffers' names; raises :class:`_Unverifiable` for a meta
    integer buffer that is not in the state dict (position ids: no value can be made up)."""
    persistent = set(model.state_dict(keep_vars=True))
    made: dict[int, torch.Tensor] = {}
    filled: list[str] = []
    gen = torch.Generator().manual_seed(0)
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None or not t.is_meta:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                if id(t) not in made:
                    if full in persistent or kind == "_parameters":
                        new = torch.empty(t.shape, dtype=t.dtype)  # randomised next
                    elif t.is_floating_point():
                        new = (0.5 + torch.rand(t.shape, generator=gen)).to(t.dtype)
                        filled.append(full)
                    else:
                        raise _Unverifiable(f"its buffer {full!r} is on the meta device and cannot be rebuilt")
                    made[id(t)] = nn.Parameter(new, requires_grad=False) if kind == "_parameters" else new
                getattr(module, kind)[name] = made[id(t)]
    return filled


FLOAT64_LIMIT = 100_000_000  # parameters: a larger model is checked in float32 (half the memory and time)


def _float64_fits(model: nn.Module) -> bool:
    """Whether the model is small enough to be checked in float64: at most :data:`FLOAT64_LIMIT` entries in its
    state, and (on the CPU) two float64 copies of it (the randomised copy and its base) in half the free RAM."""
    state = model.state_dict(keep_vars=True)
    entries = sum(t.numel() for t in {id(t): t for t in state.values()}.values())
    if entries > FLOAT64_LIMIT:
        return False
    if any(t.device.type not in ("cpu", "meta") for t in state.values()):
        return True
    need = 2 * 8 * entries
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need < free / 2


def _run(model: nn.Module, x: Any) -> Any:
    with torch.no_grad():
        if isinstance(x, Mapping):
            return model(**x)
        return model(*x) if isinstance(x, tuple) else model(x)


def randomise_state(model: nn.Module, x: Any, seed: int) -> int:
    """Every floating state-dict entry random: at the scale of its fan-in, norm gains around 1, running variances
    positive; BatchNorm statistics then those of the batch, moved at random (so the signal lives through deep nets
    and a wrong permutation of the statistics still shows). Returns the forward passes taken (0 or 1)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{n}.weight" for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if not value.is_floating_point():
                continue
            fan_in = value[0].numel() if value.dim() > 1 else max(1, value.numel())
            noise = torch.randn(value.shape, generator=gen)
            gain = key in norms or key.endswith("norm.weight")
            new = 1 + 0.3 * noise if gain else noise * fan_in**-0.5
            if key.endswith("running_var"):
                new = 0.5 + torch.rand(value.shape, generator=gen)
            value.copy_(new)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.running_mean is not None]
        if not bns:
            return 0
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # the statistics of this one batch
        try:
            _run(model.train(), x)
        finally:
            model.eval()
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
        for m in bns:
            std = m.running_var.sqrt()
            m.running_mean.add_(0.3 * std * torch.randn(m.running_mean.shape, generator=gen).to(std))
            m.running_var.mul_((0.5 + torch.rand(m.running_var.shape, generator=gen)).to(std))
    return 1


def _cast(x: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, Mapping):
        return {k: _cast(v, dtype, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype, device) for v in x)
    return x


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model's output (a tensor, a tuple, a dict or a ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _change(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """The largest relative change (max abs difference over max abs reference) over the output tensors."""
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for r, o in zip(ref, out, strict=True):
        if r.shape != o.shape:
            return float("inf")
        if not r.numel():
            continue
        scale, diff = float(r.abs().max()), float((o - r).abs().max())
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _has_meta(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_meta
    if isinstance(x, Mapping):
        return any(_has_meta(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_meta(v) for v in x)
    return False


class RandomisedCopy:
    """A randomised copy of the model and its reference outputs; ``change(orders)`` permutes and compares,
    ``change_of(state)`` compares with any tensors swapped in (made by :func:`randomised_copy`)."""

    def __init__(self, model: nn.Module, plan: AlignmentPlan, x: Any, seed: int, dtype: torch.dtype):
        self.plan, self.dtype, self.passes = plan, dtype, 0
        work = copy.deepcopy(model)
        filled = _materialise(work)
        device = next((t.device for t in work.state_dict().values()), torch.device("cpu"))
        work = work.to(dtype).eval()
        self.x = _cast(x, dtype, device)
        self.passes += randomise_state(work, self.x, seed)
        self.work = work
        self.base = work.state_dict()  # the randomised tensors themselves: a check swaps in permuted ones
        self.ref = self._outputs()
        if not self.ref:
            raise _Unverifiable("the model's output holds no floating tensor to compare")
        if not all(bool(t.isfinite().all()) for t in self.ref):
            raise ValueError("the randomised model's outputs are not finite")
        r = self.ref[0]
        spread = float((r - r[:1]).abs().max()) / max(float(r.abs().max()), 1e-300) if r.dim() and len(r) > 1 else 1
        notes = [] if spread > 1e-6 else ["the randomised model's first output does not depend on the example "
                                          "input, so the check is weak"]
        if filled:
            notes.append(f"{len(filled)} non-persistent buffers on the meta device filled at random ({filled[0]}, ...)")
        self.note = "; ".join(notes)

    def _outputs(self, state: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The output tensors, with the tensors in ``state`` in place of the model's own (no copy of the model)."""
        self.passes += 1
        if not state:
            return [t.detach().clone() for t in _tensors(_run(self.work, self.x))]
        args, kwargs = ((), dict(self.x)) if isinstance(self.x, Mapping) else \
            (self.x if isinstance(self.x, tuple) else (self.x,), {})
        with torch.no_grad():
            return _tensors(torch.func.functional_call(self.work, dict(state), args, kwargs))

    def change(self, orders: Mapping[str, torch.Tensor], plan: AlignmentPlan | None = None) -> float:
        """The relative output change with each named space permuted by its order (channel ``order[j]`` to ``j``)."""
        plan = plan or self.plan
        state: dict[str, torch.Tensor] = {}
        for space in plan.spaces:
            order = orders.get(space.name)
            if order is None:
                continue
            for m in space.members:
                state[m.tensor] = permute_axis(state.get(m.tensor, self.base[m.tensor]), order, space.layout(m),
                                               m.tensor)
        for alias, name in plan.aliases.items():
            if name in state:
                state[alias] = state[name]
        return self.change_of(state)

    def change_of(self, state: Mapping[str, torch.Tensor]) -> float:
        """The relative output change with the tensors in ``state`` in place of the copy's (:attr:`base`); a tied
        tensor follows the one it shares."""
        state = dict(state)
        for alias, name in self.plan.aliases.items():
            if name in state:
                state[alias] = state[name]
        self.work.train(True).train(False)  # modules that cache what they derive from weights drop it
        return _change(self.ref, self._outputs(state))


def permute_axis(tensor: torch.Tensor, order: torch.Tensor, layout: Layout, name: str = "a tensor") -> torch.Tensor:
    """``tensor`` with the channels ``layout`` places on its axis put in ``order`` (channel ``order[j]`` to ``j``):
    what :func:`~hf_otfusion.transport.transport_axis` does with ``ChannelMap.permutation(order)``, as one
    ``index_select`` along the axis (no copies of the axis moved to the front, no concatenation). ``name``: the
    tensor's, for the error."""
    if layout.head_axis is not None:  # experts' heads on another axis: the general transport
        return transport_axis(tensor, ChannelMap.permutation(order), layout)
    n = len(order)
    pos = layout.positions().view(n, -1)
    length = tensor.shape[layout.axis]
    if int(pos.max()) >= length:
        raise PlanError(f"axis {layout.axis} of {name!r} ({length} entries) is shorter than its plan")
    index = torch.arange(length)
    index[pos.reshape(-1)] = pos[order].reshape(-1)
    return tensor.index_select(layout.axis, index.to(tensor.device))


class _Unverifiable(Exception):
    """The plan cannot be checked on this model (the reason is the message)."""


# ----------------------------------------------------------------------------------------------------------
# Items and their orders


def _items(plan: AlignmentPlan) -> list[Item]:
    """Each space's channels, then each head group's head order (last: a group that loses a space keeps it)."""
    spaces: list[Item] = [("space", s.name) for s in plan.spaces]
    return spaces + [("heads", g) for g, group in plan.head_groups().items()
                     if any(s.heads > 1 and not s.queries for s in group)]


def _draws(plan: AlignmentPlan, seed: int) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """A random order inside each head of each space (one for all heads of a shared space), and one random order
    of the heads per head group; none of them the identity where another exists."""
    gen = torch.Generator().manual_seed(seed)
    within: dict[str, list[torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for space in plan.spaces:
        d, n = space.head_dim, space.heads
        draws = [torch.randperm(d, generator=gen)] * n if space.shared else [torch.randperm(d, generator=gen)
                                                                              for _ in range(n)]
        if d > 1 and all(bool((o == torch.arange(d)).all()) for o in draws):
            draws = [o.roll(1) for o in draws]
        within[space.name] = draws
        group = space.head_group
        if group is not None and group not in heads:
            order = torch.randperm(n, generator=gen)
            heads[group] = order.roll(1) if bool((order == torch.arange(n)).all()) else order
    return within, heads


def _orders(plan: AlignmentPlan, chosen: Sequence[Item], seed: int) -> dict[str, torch.Tensor]:
    """The channel order of every space that ``chosen`` moves."""
    within, heads = _draws(plan, seed)
    picked = set(chosen)
    out = {}
    for space in plan.spaces:
        d, n = space.head_dim, space.heads
        move_heads = space.head_group is not None and not space.queries and ("heads", space.head_group) in picked
        if ("space", space.name) not in picked and not move_heads:
            continue
        inner = within[space.name] if ("space", space.name) in picked else [torch.arange(d)] * n
        order = heads[space.head_group] if move_heads else torch.arange(n)
        out[space.name] = torch.cat([order[h] * d + inner[h] for h in range(n)])
    return out


def _search(items: list[Item], change: Callable[[list[Item]], float], tol: float, first: float,
            group_of: Mapping[str, str | None]) -> list[tuple[Item, float]]:
    """The items that break the outputs, found by binary search on prefixes: each one breaks them when added to a
    set of items known to keep them. ``first``: the change with every item permuted (already measured);
    ``group_of``: each space's head group (a group that loses a space keeps its heads in place, so its head order
    is no longer tested)."""
    good: list[Item] = []
    rest = list(items)
    bad: list[tuple[Item, float]] = []
    total = first
    while rest and total > tol:
        lo, hi, worst = 0, len(rest), total  # good + rest[:lo] keeps the outputs, good + rest[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = change(good + rest[:mid])
            if c > tol:
                hi, worst = mid, c
            else:
                lo = mid
        culprit = rest[hi - 1]
        bad.append((culprit, worst))
        good += rest[: hi - 1]
        rest = rest[hi:]
        if culprit[0] == "space" and group_of.get(culprit[1]) is not None:
            rest = [i for i in rest if i != ("heads", group_of[culprit[1]])]
        if rest:
            total = change(good + rest)
    return bad


# ----------------------------------------------------------------------------------------------------------
# Repairs


def _members(spaces: Sequence[Space]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f"{m.tensor}:{m.axis}" for s in spaces for m in s.members))


def _repair(plan: AlignmentPlan, removed: Mapping[str, str], heads: Mapping[str, str]) -> AlignmentPlan:
    """``plan`` without the ``removed`` spaces (name -> reason), the ``heads`` groups' heads (group -> reason) and
    those of any group that lost a space kept in place; each recorded in ``plan.fixed``."""
    fixed = list(plan.fixed)
    for space in plan.spaces:
        if space.name in removed:
            fixed.append(FixedAxes(size=space.size, members=_members([space]), reason=removed[space.name]))
    lost = {s.head_group: s.name for s in plan.spaces if s.name in removed and s.head_group is not None}
    for group, spaces in plan.head_groups().items():
        kept = [s for s in spaces if s.name not in removed]
        if group in heads and kept:
            why = heads[group]
        elif group in lost and kept:
            why = f"failed verification of space {lost[group]!r}, which moved with these heads"
        else:
            continue
        fixed.append(FixedAxes(size=kept[0].heads, members=_members(kept), reason=f"the order of the heads: {why}"))
    spaces = tuple(s.model_copy(update={"head_group": None}) if s.head_group in heads or s.head_group in lost else s
                   for s in plan.spaces if s.name not in removed)
    return plan.model_copy(update={"spaces": spaces, "fixed": tuple(fixed)})


def _failed(change: float, what: str) -> str:
    return f"failed verification: permuting {what} changes the output by {change:.1e} (relative)"


def conform(plan: AlignmentPlan, verified: AlignmentPlan) -> AlignmentPlan:
    """``plan`` (of another model of ``verified``'s architecture, e.g. other widths) with ``verified``'s repairs."""
    v = verified.verification
    if plan is verified or v is None or not (v.repaired or v.heads_fixed):
        return plan
    why = "failed verification on the target model"
    groups = plan.head_groups()
    return _repair(plan, {n: why for n in v.repaired if any(s.name == n for s in plan.spaces)},
                   {g: why for g in v.heads_fixed if g in groups})


# ----------------------------------------------------------------------------------------------------------
# The public check


def verify_plan(model: nn.Module, plan: AlignmentPlan, example_input: Any, *, seed: int = 0) -> AlignmentPlan:
    """``plan``, checked on ``model`` and repaired where a random permutation by it changes the outputs.

    The result's :attr:`~AlignmentPlan.verification` says what was found: ``verified``, the final change, the
    forward passes taken, the spaces removed and head orders fixed (each also in ``plan.fixed`` with its reason), or
    why the plan could not be checked (a meta tensor that cannot be rebuilt, an input on the meta device).
    """
    with timed("verify"):
        return _verify(model, plan, example_input, seed)


def _verify(model: nn.Module, plan: AlignmentPlan, x: Any, seed: int) -> AlignmentPlan:
    if _has_meta(x):
        return _unverified(plan, "the example input is on the meta device (pass a real one to verify the plan)")
    checker = None
    for dtype in (torch.float64, torch.float32) if _float64_fits(model) else (torch.float32,):
        try:
            checker = RandomisedCopy(model, plan, x, seed, dtype)
            break
        except _Unverifiable as err:
            return _unverified(plan, str(err))
        except Exception as err:  # noqa: BLE001 - a model that does not run in float64 is checked in float32
            failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            checker = None
    if checker is None:
        return _unverified(plan, f"the randomised model does not run ({failure[:160]})")
    tol = TOLERANCE[checker.dtype]
    current, removed, heads_fixed = plan, [], []
    for round_ in range(_ROUNDS + 1):  # each repaired plan is checked again, with a fresh permutation
        draw = seed + 1 + round_
        items = _items(current)
        final = checker.change(_orders(current, items, draw), current)
        if not final > tol or round_ == _ROUNDS:
            break
        group_of = {s.name: s.head_group for s in current.spaces}
        bad = _search(items, lambda chosen, c=current, d=draw: checker.change(_orders(c, chosen, d), c), tol, final,
                      group_of)
        spaces = {name: _failed(c, "it") for (kind, name), c in bad if kind == "space"}
        heads = {name: _failed(c, "them") for (kind, name), c in bad if kind == "heads"}
        removed += list(spaces)
        heads_fixed += [*heads, *(group_of[n] for n in spaces if group_of[n] is not None)]
        current = _repair(current, spaces, heads)
    ok = not final > tol
    verification = Verification(
        verified=ok, change=final, dtype=str(checker.dtype).removeprefix("torch."), passes=checker.passes,
        repaired=tuple(removed), heads_fixed=tuple(dict.fromkeys(heads_fixed)),
        note=checker.note if ok else f"a random permutation by the repaired plan still changes the outputs by "
                                     f"{final:.1e}")
    return current.model_copy(update={"verification": verification})


def randomised_copy(model: nn.Module, plan: AlignmentPlan, example_input: Any, *, seed: int = 0,
                    ) -> RandomisedCopy | str:
    """The randomised copy the check runs on (float64 where it fits and runs, else float32), for checks of other maps
    than permutations (:mod:`hf_otfusion.folding`); a string saying why the model cannot be checked otherwise."""
    if _has_meta(example_input):
        return "the example input is on the meta device"
    failure = ""
    for dtype in (torch.float64, torch.float32) if _float64_fits(model) else (torch.float32,):
        try:
            return RandomisedCopy(model, plan, example_input, seed, dtype)
        except _Unverifiable as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - a model that does not run in float64 is checked in float32
            failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return f"the randomised model does not run ({failure[:160]})"


def _unverified(plan: AlignmentPlan, why: str) -> AlignmentPlan:
    return plan.model_copy(update={"verification": Verification(verified=False, note=why)})
