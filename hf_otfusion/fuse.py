"""The public API: ``fuse`` N models (via the engine, :mod:`hf_otfusion.engine`), the vanilla average and the
prediction ensemble baselines, and ``random_permutation`` (a model's function with shuffled hidden units)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .activations import activation_statistics, first_batch
from .checkpoint import StateSource
from .config import FusionParameters, resolve_options
from .distributed import is_main
from .engine import State, align_sources, check_compatible, check_finite, check_sweeps, plans_for
from .errors import FusionError, PlanError
from .evaluate import logits_of
from .folding import fold_state, report_rotatable, rotatable, without_gains
from .graph import Runner
from .head_maps import HeadMaps, find_head_maps, find_invertible, report_head_maps, tensors_of
from .learned import learn_maps
from .matching import AllMaps, InnerMaps
from .plan import AlignmentPlan, Space
from .profile import timed
from .registry import REPAIRS
from .scales import find_scales
from .signs import UnitSigns, find_signs, report_signs
from .trace import build_plan, export_model
from .transport import ChannelMap, transport_axis
from .verify import randomised_copy

# ----------------------------------------------------------------------------------------------------------
# Public API


def _state(model: nn.Module, device: torch.device) -> State:
    return {k: v.detach().to(device) for k, v in model.state_dict().items()}


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; None: ``model``'s device (the CPU without one)."""
    if device is None:
        return next((p.device for p in model.parameters()), torch.device("cpu")) if model is not None \
            else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionError("device='cuda' was asked for but no CUDA device is available (use 'auto' or 'cpu')")
    return dev


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One weight per model summing to one (equal by default); a ``FusionError`` for a bad list."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise FusionError(f"got {len(w)} weights for {n} models")
    if any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise FusionError(f"weights must be non-negative and sum to more than 0, got {w}")
    return [x / sum(w) for x in w]


def average_tensor(values: Sequence[torch.Tensor], weights: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    """The weighted mean of one tensor's aligned values, in ``ref``'s dtype (non-float tensors: ``ref``'s copy)."""
    if not ref.is_floating_point():
        return ref.clone()
    with timed("average"):
        total = None
        for w, v in zip(weights, values, strict=True):  # in place: one result tensor, the same sums as a + b + ...
            term = w * v.to(ref.dtype)
            total = term if total is None else total.add_(term)
        return total


def _with_state(model: nn.Module, state: State) -> nn.Module:
    out = copy.deepcopy(model)
    device = next((p.device for p in out.parameters()), torch.device("cpu"))
    loaded = OrderedDict((k, v.to(device)) for k, v in state.items())
    # the state dict's metadata holds each module's version, which some modules' loading reads (MNASNet's)
    loaded._metadata = getattr(out.state_dict(keep_vars=True), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    out.load_state_dict(loaded)
    # a module that caches what it derives from its weights while in eval mode (timm LeViT's attention biases)
    # drops it when switched to training: the copy must not keep tables of the model it was copied from
    return out.train(True).train(model.training)


def vanilla_average(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """Average the parameters of identically shaped models, with no alignment (the baseline).

    Example:
        >>> from torch import nn
        >>> avg = vanilla_average([nn.Linear(2, 2), nn.Linear(2, 2)])
    """
    if len(models) < 1:
        raise FusionError("vanilla_average needs at least one model")
    w = normalized_weights(weights, len(models))
    states = [_state(m, torch.device("cpu")) for m in models]
    for i, s in enumerate(states[1:], 1):
        for name, t in states[0].items():
            if name not in s or s[name].shape != t.shape:
                raise FusionError(f"vanilla averaging needs identical shapes: model {i} differs at {name!r}")
    for i, s in enumerate(states):
        for name, t in s.items():
            check_finite(t, i, name)
    return _with_state(models[0], {name: average_tensor([s[name] for s in states], w, ref)
                                   for name, ref in states[0].items()})


class Ensemble(nn.Module):
    """Prediction ensemble: the log of the (weighted) average of the members' softmax probabilities."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", torch.tensor(normalized_weights(weights, len(models))), persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        probs = 0
        for w, model in zip(self.weights, self.members, strict=True):
            out = model(*args, **kwargs)
            probs = probs + w * logits_of(out).float().softmax(-1)
        return torch.log(probs.clamp_min(1e-30))


def ensemble(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> Ensemble:
    """A module that averages the members' predicted probabilities (N times the cost of one model)."""
    return Ensemble(models, weights)


def _random_order(space: Space, gen: torch.Generator, head_orders: dict[str, torch.Tensor],
                  permute_heads: bool) -> torch.Tensor:
    """A random channel order for one space: within each head (one order for all heads of a shared space), and of
    whole heads (one order per head group; a queries space's heads are moved by its group's other spaces)."""
    n, d = space.heads, space.head_dim
    if space.head_group is not None and permute_heads and n > 1 and not space.queries:
        if space.head_group not in head_orders:
            order = torch.randperm(n, generator=gen)
            head_orders[space.head_group] = order.roll(1) if bool((order == torch.arange(n)).all()) else order
        heads = head_orders[space.head_group]
    else:
        heads = torch.arange(n)
    within = [torch.randperm(d, generator=gen)] * n if space.shared else [torch.randperm(d, generator=gen)
                                                                           for _ in range(n)]
    order = torch.cat([heads[h] * d + within[h] for h in range(n)])
    if bool((order == torch.arange(space.size)).all()) and d > 1:
        order = torch.cat([heads[h] * d + within[h].roll(1 if h == 0 or space.shared else 0) for h in range(n)])
    return order


def random_permutation(
    model: nn.Module,
    plan: AlignmentPlan | None = None,
    seed: int = 0,
    *,
    example_input: Any = None,
    permute_heads: bool = True,
) -> nn.Module:
    """A copy of ``model`` with every space's channels randomly permuted: the same function, other weights.

    Spaces with attention heads are permuted inside each head and, with ``permute_heads``, by whole heads (one
    head order per head group, so queries, keys, values and outputs stay together).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = random_permutation(m, example_input=torch.randn(2, 4))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(m(x), p(x), atol=1e-6)
        True
    """
    if plan is None:
        if example_input is None:
            raise PlanError("random_permutation needs a plan or an example_input to trace the model")
        plan = build_plan(model, example_input)
    gen = torch.Generator().manual_seed(seed)
    state = _state(model, torch.device("cpu"))
    head_orders: dict[str, torch.Tensor] = {}
    for space in plan.spaces:
        order = _random_order(space, gen, head_orders, permute_heads)
        perm = ChannelMap.permutation(order)
        for m in space.members:
            state[m.tensor] = transport_axis(state[m.tensor], perm, space.layout(m))
    for alias, name in plan.aliases.items():
        state[alias] = state[name]
    return _with_state(model, state)


def fuse(
    models: Sequence[nn.Module],
    options: FusionParameters | None = None,
    *,
    target: int = 0,
    weights: Sequence[float] | None = None,
    calibration: Any = None,
    example_input: Any = None,
    plan: AlignmentPlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Fuse N models into one with the target's architecture and widths, by optimal transport.

    Each model other than the target is aligned to it space by space (topological order): a cost between
    its channels and the target's (``alignment="weights"``: distances between aligned weight rows;
    ``"activations"``: distances between activations on ``calibration``), an OT coupling (``solver``), then
    every tensor axis of the space is transported. The aligned models are averaged with ``weights``.

    The options come in one object, ``options`` (a :class:`~hf_otfusion.config.FusionParameters`: the
    ``parameters:`` section of a merge config), and by name as keyword ``overrides`` over it; both are validated
    once, together (a ``FusionError`` names a bad option).

    Transformers: a space with attention heads (queries/keys of one attention op; values/output projection) is
    solved head by head, so its map is block-diagonal and attention stays exact. With ``match_heads`` the heads
    are first matched to each other (one assignment per attention op over the head-to-head transport costs of
    its query/key and value/output spaces together); without it head ``h`` goes to head ``h``. LayerNorm
    parameters, class/position/token embeddings and the classifier's input move with the residual stream.

    Residual streams (every tensor that writes into or reads from a chain of residual adds: one space, one map,
    which exactness requires) follow the ``residual`` policy:

    - ``"shared"`` (default): the stream is solved once, when the walk reaches it, from everything aligned by
      then: in weights mode the concatenated rows of its first writers (patch/token embeddings or the stem),
      norm parameters, biases and the classifier's input columns; in activations mode the statistics of every
      site where the stream is read, summed (sites with larger activations weigh more).
    - ``"mean"``: every writer and reader of the stream contributes its own cost matrix, scaled to a mean of
      one, and the map is solved from their average, as Imfeld et al. (ICLR 2024) average the maps of a
      residual connection's branches. In weights mode these are the stream's matrix members (1-D norm
      parameters and biases left out) after a first pass has solved every block, so deep writers' rows are
      aligned; every other space is then solved again against the stream's new map. In activations mode these
      are the stream's sites (each place a layer reads it), each weighing the same.

    Args:
        models: two or more models of one architecture (widths of hidden spaces may differ; head counts not).
        options: the fusion options (default: every field's default); ``overrides`` replace single fields.
        target: index of the model whose architecture and widths the result keeps.
        weights: one non-negative weight per model (default equal).
        calibration: a tensor of inputs, a dict of keyword tensors, or an iterable of input batches (tensors,
            dicts) or of (input, label) batches.
        example_input: a batch to trace the models with; defaults to the first calibration batch.
        plan: the target's alignment plan (traced when omitted).
        device: where costs, solves and transports run: ``"cpu"``, ``"cuda"``, ``"auto"`` (default: the
            target's device). Exact EMD always solves on the CPU.
        progress: show progress bars (on the main process only, in a distributed run).
        **overrides: fields of ``FusionParameters`` by name (below), applied over ``options``.

    Options (fields of ``FusionParameters``; an unknown name is a ``FusionError``):
        alignment: ``"weights"`` (data-free), ``"activations"`` (needs ``calibration``) or ``"learned"``: weights
            alignment, then the maps beyond permutations (below) trained for ``learn_steps`` Adam steps
            (``learn_lr``) on ``calibration`` against the parents' ensemble, every weight frozen
            (:mod:`hf_otfusion.learned`); ``learn_from="activations"`` starts them from the activations' single
            pass and weight matching with the activations' similarity (as ``alignment="activations"``).
        solver: a registered solver (``hf_otfusion.registry.SOLVERS``): ``"emd"`` (exact; a linear assignment when
            the optimum is a permutation) or ``"sinkhorn"``.
        reg: entropic regularisation for Sinkhorn, relative to the cost's largest entry.
        marginals: ``"uniform"`` or ``"importance"`` (channel mass proportional to its weights' norm).
        match_heads: match attention heads to heads before the channels inside them (default True).
        residual: ``"shared"`` or ``"mean"``: how the cost of a residual stream is made (see above);
            ``"orthogonal"``: any orthogonal map where the stream allows it, norm gains folded into the layers that
            read them, solved by weight matching (``sweeps >= 1``, with the stream's activations in activations
            mode; :mod:`hf_otfusion.folding`).
        head_maps: ``"permutation"`` (default) or ``"orthogonal"``: inside each attention head an orthogonal map (a
            rotation per channel pair where rotary embeddings allow only that), fitted to the target
            (:mod:`hf_otfusion.head_maps`). Every such map is checked on a randomised copy of the model first; a
            space that fails keeps permutations, with a warning saying why.
        hidden_maps: ``"permutation"`` (default) or ``"signed"``: a hidden unit may also change the sign of the layers
            that take one (a gated MLP's ``up`` row and ``down`` column: SwiGLU, GeGLU), so weight matching pairs
            units up to that sign (``sweeps >= 1``; :mod:`hf_otfusion.signs`), checked like the maps above.
        standardize: activations mode: compare activations centred and scaled to unit variance per channel
            (a correlation distance) instead of raw values.
        repair: after averaging, a registered repair run on ``calibration`` (``hf_otfusion.registry.REPAIRS``;
            ``REPAIRS.help()`` says what each does): ``"none"`` (default), ``"reset_bn"``, ``"repair"`` (REPAIR),
            ``"refit"`` (the closed-form layer refit).
        repair_parameters: the repair's own options, a mapping or an instance of its parameters model (e.g.
            ``{"alpha": 0.01}`` for refit); unset: its defaults.
        sweeps: weight matching by coordinate descent (Git Re-Basin, Ainsworth et al. ICLR 2023, Algorithm 1, on
            the plan), data-free: after the single pass, every space (a head group as one) is revisited in a
            seeded random order, with all other maps held, and re-solved by an assignment that maximises the
            inner products between the target's and the model's tensors along every member axis (incoming and
            outgoing weights, norms, biases, heads); a step is kept only if the total weight similarity rises.
            At most ``sweeps`` passes, fewer when one changes nothing; 0 (default): the single pass alone. Needs
            ``solver="emd"``, uniform marginals and the target's widths; each model is matched to the target.
            In activations mode, the single pass is the activations' and every space without heads (MLP units,
            residual streams, including an orthogonal stream) scores a map by the sum of its weights' similarity
            and its activations' (``E[a_i b_j]`` on ``calibration``, scaled to the same Frobenius norm).
            ``hf_otfusion.matching.recording`` collects the objective per sweep.
        strict: the merge command's check of the plan (``hf_otfusion.merge``); ``fuse`` uses the plan it is given.

    Returns:
        A new module (a copy of the target with fused weights); the inputs are not modified. Tied tensors (an
        LM head tied to the embeddings) stay tied.

    Inside a distributed run (``accelerate launch``, ``torchrun``: a ``torch.distributed`` process group), every
    process passes the same models and calibration; each runs its share of the batches (see
    ``hf_otfusion.distributed``), statistics are summed over the processes, couplings solved once and broadcast,
    and every process returns the same fused model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_otfusion import fuse
        >>> a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> b = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> fused = fuse([a, b], example_input=torch.randn(2, 4), progress=False)
        >>> from hf_otfusion.config import FusionParameters
        >>> soft = fuse([a, b], FusionParameters(solver="sinkhorn"), reg=0.1, example_input=torch.randn(2, 4),
        ...             progress=False)
    """
    models = list(models)
    progress = progress and is_main()  # a distributed run: one set of bars
    if len(models) < 2:
        raise FusionError(f"fusion needs at least two models, got {len(models)}")
    if not -len(models) <= target < len(models):
        raise FusionError(f"target={target} is out of range for {len(models)} models")
    target %= len(models)
    opts = resolve_options(options, overrides)
    alignment, repair = opts.alignment, REPAIRS.get(opts.repair)
    learned = alignment == "learned"
    if alignment != "weights" and calibration is None:
        raise FusionError(f"alignment={alignment!r} needs calibration data (calibration=...)")
    check_sweeps(opts.sweeps, opts.learn_from if learned else alignment, opts.solver, opts.marginals)
    if repair.needs_data and calibration is None:
        raise FusionError(f"repair={repair.name!r} needs calibration data (calibration=...)")
    if example_input is None and calibration is not None:
        example_input = first_batch(calibration)
    if plan is None and example_input is None:
        raise FusionError("pass example_input (or calibration) so the models can be traced, or a plan")
    w = normalized_weights(weights, len(models))
    for i, model in enumerate(models):  # before the (slow) tracing; file sources are checked as they are read
        for name, tensor in model.state_dict().items():
            check_finite(tensor, i, name)
    dev = resolve_device(device, models[target])

    with timed("trace"):
        target_model = models[target]
        if plan is not None and plan.expanded and (opts.on_activations or repair.fn is not None):
            plan = None  # an expanded plan has no activation sites: trace the target's graph
        ep_t = export_model(target_model, example_input) if plan is None or opts.on_activations else None
        plan_t = plan if plan is not None else build_plan(target_model, example_input, exported=ep_t)
        if plan_t.verification is None and example_input is not None:  # every plan is checked before it is used
            from .verify import verify_plan

            plan_t = verify_plan(target_model, plan_t, example_input)
        exported: dict[int, Any] = {}

        def trace(i: int) -> AlignmentPlan:
            exported[i] = export_model(models[i], example_input)
            return build_plan(models[i], example_input, exported=exported[i])

        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        plans = plans_for(plan_t, shapes, target, trace if example_input is not None else None)
        for i, plan_i in enumerate(plans):
            check_compatible(plan_t, plan_i, i)

    states = [m.state_dict() for m in models]
    dense: frozenset[str] = frozenset()
    centred: frozenset[str] = frozenset()  # streams read through LayerNorm: maps keep the all-ones vector
    checker = None  # one randomised copy of the target checks every kind of map beyond permutations
    if opts.residual == "orthogonal" or opts.head_maps == "orthogonal" or opts.hidden_maps == "signed":
        if example_input is None:
            raise FusionError("residual/head_maps 'orthogonal' and hidden_maps 'signed' check each kind of map on the "
                              "model: pass example_input")
        with timed("trace"):
            checker = randomised_copy(target_model, plan_t, example_input)
    if opts.residual == "orthogonal":
        with timed("trace"):
            rot = rotatable(target_model, plan_t, ep_t or export_model(target_model, example_input), example_input,
                            checker=checker)
        report_rotatable(rot)
        dense, centred = rot.spaces, rot.centred
        if dense:
            states = [fold_state(s, rot.all_folds()) for s in states]
            plan_t, plans = without_gains(plan_t, rot), [without_gains(p, rot) for p in plans]

    inner: HeadMaps | None = None
    if opts.head_maps == "orthogonal":
        with timed("trace"):
            inner = find_head_maps(target_model, plan_t, example_input, checker=checker)
        report_head_maps(inner)
    signs: UnitSigns | None = None
    if opts.hidden_maps == "signed":
        with timed("trace"):
            signs = find_signs(target_model, plan_t, example_input, skip=dense, checker=checker)
        report_signs(signs)
    beyond: list[InnerMaps] = [inner] if inner is not None and inner.maps else []
    beyond += [signs] if signs is not None and signs.spaces else []
    fitted = AllMaps(tuple(beyond)) if beyond else None  # fitted during weight matching and after the alignment

    costs: list[dict[str, torch.Tensor] | None] = [None] * len(models)
    evidence = None  # weight matching in activations mode: the activations' similarities count too
    if opts.on_activations:
        runners = [Runner(exported.get(i, ep_t), m, dev) for i, m in enumerate(models)]
        streams = {s.name for s in plan_t.spaces if s.kind == "residual"} if opts.residual == "mean" else set()
        with timed("activations"):
            costs, similar = activation_statistics(runners, plans, target, calibration, per_site=streams,
                                                   standardize=opts.standardize, progress=progress,
                                                   similarity=opts.sweeps > 0)
        evidence = similar if opts.sweeps else None
        del runners

    fused: State = {}
    # an orthogonal map has no coupling: a repair then gets the parents as aligned (folded, carried), not couplings
    dense_maps = bool(dense) or fitted is not None
    keep = learned or (dense_maps and repair.fn is not None)
    aligned: list[State] | None = [{} for _ in models] if keep else None
    held = (tensors_of(inner) if inner is not None else set()) | (signs.tensors() if signs is not None else set())
    pending: dict[str, list[torch.Tensor]] = {}  # tensors that inner maps move: fitted once every one is aligned

    def average(name: str, values: list[torch.Tensor]) -> None:
        if name in held:
            pending[name] = values
            return
        if aligned is not None:
            for k, v in enumerate(values):
                aligned[k][name] = v
        if not learned:  # learned alignment averages once its maps are trained
            fused[name] = average_tensor(values, w, values[target])

    sources = [StateSource(s) for s in states]
    couplings = align_sources(sources, plans, average, target=target, costs=costs, options=opts, device=dev,
                              progress=progress, couplings="couplings" in repair.needs and aligned is None,
                              dense=dense, inner=fitted, centred=centred, evidence=evidence)
    if pending and fitted is not None:
        per_model = [{name: values[k] for name, values in pending.items()} for k in range(len(models))]
        with timed("inner maps"):
            per_model = [s if k == target else fitted.fit(s, per_model[target]) for k, s in enumerate(per_model)]
        held.clear()
        for name in pending:
            average(name, [s[name] for s in per_model])
    for alias, name in plan_t.aliases.items():
        for state in aligned or []:
            state[alias] = state[name]
    if learned and aligned is not None:
        with timed("learn"):
            scales = find_scales(target_model, plan_t, example_input, skip=dense, checker=checker)
            invertible = find_invertible(inner, checker) if inner is not None and checker is not None else {}
            aligned, _ = learn_maps(target_model, models, aligned, target, plan_t, dense, inner, calibration,
                                    weights=w, steps=opts.learn_steps, lr=opts.learn_lr, device=dev, progress=progress,
                                    scales=scales, invertible=invertible, centred=centred)
        fused = {name: average_tensor([s[name] for s in aligned], w, value)
                 for name, value in aligned[target].items() if name not in plan_t.aliases}
    for alias, name in plan_t.aliases.items():
        fused[alias] = fused[name]
    if repair.fn is None:
        return _with_state(target_model, fused)
    parents: Sequence[nn.Module] = models
    if aligned is not None:
        parents, couplings = [_with_state(target_model, s) for s in aligned], [None] * len(models)
    with timed("repair"):
        return repair.fn(_with_state(target_model, fused), parents, calibration, weights=w, couplings=couplings,
                         device=dev, plan=plan_t, example_input=example_input, exported=ep_t,
                         params=opts.repair_params)
