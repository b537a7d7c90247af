"""Activation-based ground metric: stream calibration batches and accumulate what the cost needs.

For each space and each (model, target) pair we keep the squared norm of every channel's activation vector
and the cross Gram matrix between the two models' channels, summed over samples, spatial positions and every
site where the space is read. Memory grows with channels, never with samples x positions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram
from torch.fx._pytree import tree_flatten_spec
from tqdm.auto import tqdm

from .distributed import all_reduce_, is_main, shard, sum_numbers
from .errors import FusionError
from .plan import AlignmentPlan, Site
from .trace import as_args
from .transport import distance_from_gram, gather

CHUNK = 32  # inputs per forward pass: activations of one chunk are held at a time


def iter_batches(calibration: Any) -> Iterator[Any]:
    """Model inputs from a tensor (chunked), or an iterable of inputs or of (input, label) batches."""
    if calibration is None:
        return
    if isinstance(calibration, (torch.Tensor, dict)) or hasattr(calibration, "keys"):
        yield from _pieces(calibration)
        return
    if not isinstance(calibration, Iterable):
        raise FusionError(f"calibration must be a tensor or an iterable of batches, not {type(calibration).__name__}")
    for batch in calibration:
        if isinstance(batch, (tuple, list)) and len(batch) > 0 and isinstance(batch[0], (torch.Tensor, Mapping)):
            yield batch[0]
        else:
            yield batch


def _split_dict(batch: dict[str, Any], chunk: int = CHUNK) -> Iterator[dict[str, Any]]:
    """A dict of keyword tensors in chunks of ``chunk`` rows (whole when its tensors differ in length)."""
    lengths = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(lengths) != 1:
        yield batch
        return
    n = lengths.pop()
    for start in range(0, n, chunk):
        yield {k: v[start : start + chunk] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
               for k, v in batch.items()}


def _pieces(batch: Any, chunk: int = CHUNK) -> Iterator[Any]:
    """A batch in pieces of at most ``chunk`` rows (a tensor or a dict of keyword tensors; anything else whole)."""
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        yield from batch.split(chunk)
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        yield from _split_dict(dict(batch), chunk)
    else:
        yield batch


def first_batch(calibration: Any) -> Any:
    for batch in iter_batches(calibration):
        return batch
    raise FusionError("the calibration data is empty")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: _to(v, device) for k, v in dict(value).items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str],
                 on_value: Callable[[str, torch.Tensor], None] | None = None):
        super().__init__(gm)
        self.wanted = wanted
        self.on_value = on_value
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            if self.on_value is not None:
                self.on_value(n.name, out)
            else:
                self.seen[n.name] = out
        return out


class _Interpreting(nn.Module):
    """Holds a graph module so that ``functional_call`` can run it, node by node, on tensors it does not own."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, flat: list[Any], wanted: set[str],
                on_value: Callable[[str, torch.Tensor], None] | None) -> dict[str, torch.Tensor]:
        cap = _Capture(self.gm, wanted, on_value)
        cap.run(*flat)
        return cap.seen


class Runner:
    """Runs one model through its exported graph and returns the values of the requested nodes.

    The graph may come from another model of the same shapes; it runs on this model's own tensors (moved to
    ``device``), substituted for the graph's for each call: no copy of either model is made, and neither is changed.
    """

    def __init__(self, ep: ExportedProgram, model: nn.Module, device: torch.device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            gm = ep.module()  # shares the exported model's tensors; used read-only, never moved
        self.module = _Interpreting(gm)
        own = model.state_dict()
        graph = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        self.state = {f"gm.{k}": own.get(k, v).detach().to(device) for k, v in graph.items()}  # tied: every name
        self.in_spec = gm._in_spec
        self.device = device
        self.static_batch = _static_batch(ep)

    @torch.no_grad()
    def capture(self, batch: Any, wanted: set[str],
                on_value: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """The values of the ``wanted`` nodes on ``batch`` (or, ``on_value``, each handed on as it is computed and
        not kept)."""
        args, kwargs = as_args(_to(batch, self.device))
        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        sizes = {t.shape[0] for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
        if self.static_batch is not None and sizes and sizes != {self.static_batch}:
            raise FusionError(f"the model was traced with a fixed batch size of {self.static_batch} (torch.export "
                              f"could not keep the batch dimension dynamic), but a calibration batch has "
                              f"{sorted(sizes)} rows: pass calibration batches of exactly {self.static_batch}")
        return torch.func.functional_call(self.module, self.state, (flat, wanted, on_value), strict=False,
                                          tie_weights=False)


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


def channel_matrix(value: torch.Tensor, site: Site, n: int, heads: int = 1) -> torch.Tensor:
    """(rows, n) activations of the n channels a site carries (samples and positions as rows), in float32 or
    better: one chunk's products are exact enough in float32, and their running sums are kept in float64."""
    x = gather(value.movedim(site.dim, 0), n, heads, site.repeat, site.tile, site.block, site.offset).movedim(0, -1)
    x = x.reshape(*x.shape[:-1], n, site.repeat * site.tile).movedim(-2, -1)
    return x.reshape(-1, n).to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class _PairStats:
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor
    count: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[0] != b.shape[0]:
            raise FusionError("two models produced activations of different sizes for one space; the "
                              "models do not share an architecture")
        f64 = torch.float64
        self.extra["sum_a"] = self.extra.get("sum_a", 0) + a.sum(0, dtype=f64)  # for standardised distances
        self.extra["sum_b"] = self.extra.get("sum_b", 0) + b.sum(0, dtype=f64)
        self.sq_a += (a * a).sum(0, dtype=f64)
        self.sq_b += (b * b).sum(0, dtype=f64)
        self.cross += (a.T @ b).to(f64)
        self.count += a.shape[0]

    def reduce(self) -> None:
        """Sum the statistics over the processes of a distributed run (nothing in a single process)."""
        for key, like in (("sum_a", self.sq_a), ("sum_b", self.sq_b)):  # a process given no batch has none
            self.extra.setdefault(key, torch.zeros_like(like))
        all_reduce_([self.sq_a, self.sq_b, self.cross, self.extra["sum_a"], self.extra["sum_b"]])
        self.count = int(sum_numbers(self.count)[0])


def _accumulator(per_space: dict[tuple[str, int], _PairStats], by_node: dict[str, list], ref: dict[str, torch.Tensor],
                 ) -> Callable[[str, torch.Tensor], None]:
    """Adds one of this model's activations, as it is computed, to the statistics against the target's ``ref``."""

    def add(node: str, value: torch.Tensor) -> None:
        for key, site_a, n_a, site_b, n_b, heads in by_node[node]:
            per_space[key].add(channel_matrix(value, site_a, n_a, heads),
                               channel_matrix(ref[site_b.node], site_b, n_b, heads))

    return add


def activation_costs(
    runners: list[Runner],
    plans: list[AlignmentPlan],
    target: int,
    calibration: Any,
    *,
    per_site: set[str] | frozenset[str] = frozenset(),
    standardize: bool = False,
    progress: bool = True,
) -> list[dict[str, torch.Tensor] | None]:
    """Per model (None for the target): space name -> (n_model, n_target) Euclidean activation distances.

    A space's statistics are summed over all its sites; for the spaces named in ``per_site`` each site gets its
    own distance matrix instead, scaled to a mean of one, and the space's cost is their mean (every site counts
    the same, whatever the scale of its activations). ``standardize``: distances between activations centred and
    scaled to unit variance per channel (a correlation distance), as Imfeld et al. do for transformers.
    """
    plan_t = plans[target]
    stats: list[dict[tuple[str, int], _PairStats] | None] = [None] * len(runners)
    for k, plan_k in enumerate(plans):
        if k == target:
            continue
        stats[k] = {}
        for space in plan_t.spaces:
            n_a, n_b = plan_k.space(space.name).size, space.size
            dev = runners[k].device
            for i in range(max(1, len(space.sites)) if space.name in per_site else 1):
                stats[k][(space.name, i)] = _PairStats(
                    torch.zeros(n_a, dtype=torch.float64, device=dev),
                    torch.zeros(n_b, dtype=torch.float64, device=dev),
                    torch.zeros(n_a, n_b, dtype=torch.float64, device=dev),
                )
    # model k's node -> every (stats key, its site, the target's site) it feeds
    by_node: list[dict[str, list[tuple[tuple[str, int], Site, int, Site, int]]]] = []
    for k, plan_k in enumerate(plans):
        found: dict[str, list[tuple[tuple[str, int], Site, int, Site, int]]] = {}
        for space in plan_t.spaces if k != target else ():
            space_k = plan_k.space(space.name)
            for i, (site_b, site_a) in enumerate(zip(space.sites, space_k.sites, strict=False)):
                key = (space.name, i if space.name in per_site else 0)
                found.setdefault(site_a.node, []).append((key, site_a, space_k.size, site_b, space.size,
                                                          space.heads))
        by_node.append(found)
    wanted_t = {s.node for sp in plan_t.spaces for s in sp.sites}
    splittable = all(r.static_batch is None for r in runners)
    n_batches = 0
    for batch in tqdm(shard(iter_batches(calibration)), desc="calibration", disable=not (progress and is_main()),
                      leave=False):
        n_batches += 1
        # at most CHUNK rows at a time, and each other model's activations used as they come and let go: memory
        # holds the target's activations of one chunk, whatever the batch size
        for chunk in _pieces(batch) if splittable else [batch]:
            ref = runners[target].capture(chunk, wanted_t)
            for k, per_space in enumerate(stats):
                if per_space is not None:
                    runners[k].capture(chunk, set(by_node[k]), _accumulator(per_space, by_node[k], ref))
            del ref
    if sum_numbers(n_batches)[0] == 0:
        raise FusionError("the calibration data is empty")
    for per_space in stats:  # a distributed run: every process's sums, in one order
        for key in sorted(per_space or ()):
            per_space[key].reduce()
    out: list[dict[str, torch.Tensor] | None] = []
    for per_space in stats:
        if per_space is None:
            out.append(None)
            continue
        costs: dict[str, list[torch.Tensor]] = {}
        for key in list(per_space):  # each space's statistics let go as soon as its distances exist
            costs.setdefault(key[0], []).append(_distance(per_space.pop(key), standardize))
        out.append({name: _mean_of_scaled(parts) if name in per_site else parts[0] for name, parts in costs.items()})
    return out


def _distance(s: _PairStats, standardize: bool) -> torch.Tensor:
    """Euclidean distances between the channels' activation vectors, or (``standardize``) between the vectors
    centred and scaled to unit variance per channel: ``sqrt(2 (1 - correlation))``."""
    if not standardize:
        return distance_from_gram(s.sq_a, s.sq_b, s.cross)
    n = max(s.count, 1)
    mu_a, mu_b = s.extra["sum_a"] / n, s.extra["sum_b"] / n
    sd_a = (s.sq_a / n - mu_a**2).clamp_min(0).sqrt()
    sd_b = (s.sq_b / n - mu_b**2).clamp_min(0).sqrt()
    cov = s.cross / n - mu_a[:, None] * mu_b[None, :]
    denom = sd_a[:, None] * sd_b[None, :]
    corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))  # dead channels: 0
    return (2 * (1 - corr)).clamp_min(0).sqrt()


def _mean_of_scaled(parts: list[torch.Tensor]) -> torch.Tensor:
    scaled = [p / p.mean() for p in parts if p.numel() and p.mean() > 0]
    return sum(scaled) / len(scaled) if scaled else parts[0]
