"""Activation-based ground metric: stream calibration batches and accumulate what the cost needs.

For each space and each (model, target) pair we keep the squared norm of every channel's activation vector
and the cross Gram matrix between the two models' channels, summed over samples, spatial positions and every
site where the space is read. Memory grows with channels, never with samples x positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import all_reduce_, is_main, shard, sum_numbers, world
from .errors import FusionError
from .graph import Runner, lockstep
from .plan import AlignmentPlan, Layout
from .transport import distance_from_gram, gather

CHUNK = 32  # inputs per forward pass: activations of one chunk are held at a time


def iter_batches(calibration: Any) -> Iterator[Any]:
    """Model inputs from a tensor (chunked), or an iterable of inputs or of (input, label) batches."""
    if calibration is None:
        return
    if isinstance(calibration, (torch.Tensor, dict)) or hasattr(calibration, "keys"):
        yield from pieces(calibration)
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


def pieces(batch: Any, chunk: int = CHUNK) -> Iterator[Any]:
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


def channel_matrix(value: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(rows, n) activations of the n channels a site's layout places on ``value`` (samples and positions as rows),
    in float32 or better: one chunk's products are exact enough in float32, and their running sums are kept in
    float64."""
    n = layout.size
    x = gather(value.movedim(layout.axis, 0), layout).movedim(0, -1)
    x = x.reshape(*x.shape[:-1], n, layout.per_channel).movedim(-2, -1)
    return x.reshape(-1, n).to(torch.promote_types(x.dtype, torch.float32))




class SpilledCosts(MutableMapping[str, torch.Tensor]):
    """Cost matrices kept in files in ``folder`` instead of memory (as float32, the dtype the walk reads them in
    for float32 weights), each read back when it is asked for: the costs of an LLM's wide spaces (n x n each)
    need not all be held until the walk solves them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, tuple[Path, tuple[int, ...]]] = {}
        self._made = 0

    def __setitem__(self, name: str, cost: torch.Tensor) -> None:
        if name in self.files:
            del self[name]
        self._made += 1
        path = self.folder / f"{self._made}.f32"
        cost.detach().to("cpu", torch.float32).contiguous().numpy().tofile(path)
        self.files[name] = (path, tuple(cost.shape))

    def __getitem__(self, name: str) -> torch.Tensor:
        path, shape = self.files[name]
        return torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape)

    def __delitem__(self, name: str) -> None:
        path, _ = self.files.pop(name)
        path.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class _PairStats:
    """Sums over samples for one (model, target) pair of a space: allocated at the first activations they see."""

    n_a: int
    n_b: int
    device: torch.device
    count: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def _zeros(self) -> None:
        f64 = torch.float64
        for key, shape in (("sq_a", (self.n_a,)), ("sq_b", (self.n_b,)), ("sum_a", (self.n_a,)),
                           ("sum_b", (self.n_b,)), ("cross", (self.n_a, self.n_b))):
            self.sums.setdefault(key, torch.zeros(shape, dtype=f64, device=self.device))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[0] != b.shape[0]:
            raise FusionError("two models produced activations of different sizes for one space; the "
                              "models do not share an architecture")
        self._zeros()
        f64, s = torch.float64, self.sums
        s["sum_a"] += a.sum(0, dtype=f64)  # for standardised distances
        s["sum_b"] += b.sum(0, dtype=f64)
        s["sq_a"] += (a * a).sum(0, dtype=f64)
        s["sq_b"] += (b * b).sum(0, dtype=f64)
        s["cross"] += (a.T @ b).to(f64)
        self.count += a.shape[0]

    def reduce(self) -> None:
        """Sum the statistics over the processes of a distributed run (nothing in a single process)."""
        self._zeros()  # a process given no batch has none
        all_reduce_([self.sums[k] for k in ("sq_a", "sq_b", "cross", "sum_a", "sum_b")])
        self.count = int(sum_numbers(self.count)[0])

    def distance(self, standardize: bool) -> torch.Tensor:
        """Euclidean distances between the channels' activation vectors, or (``standardize``) between the vectors
        centred and scaled to unit variance per channel: ``sqrt(2 (1 - correlation))``."""
        self._zeros()  # a space no site reads: zero distances
        s = self.sums
        if not standardize:
            return distance_from_gram(s["sq_a"], s["sq_b"], s["cross"])
        n = max(self.count, 1)
        mu_a, mu_b = s["sum_a"] / n, s["sum_b"] / n
        sd_a = (s["sq_a"] / n - mu_a**2).clamp_min(0).sqrt()
        sd_b = (s["sq_b"] / n - mu_b**2).clamp_min(0).sqrt()
        cov = s["cross"] / n - mu_a[:, None] * mu_b[None, :]
        denom = sd_a[:, None] * sd_b[None, :]
        corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))  # dead channels: 0
        return (2 * (1 - corr)).clamp_min(0).sqrt()

    def similarity(self) -> torch.Tensor:
        """The mean product of the channels' activations, ``E[a_i b_j]``: how weight matching scores a map by the
        activations (:func:`hf_otfusion.matching.weight_matching`'s ``evidence``)."""
        self._zeros()
        return self.sums["cross"] / max(self.count, 1)


@dataclass(frozen=True)
class _Pair:
    """One site of a space in a model (``node`` in its graph) and the target's same site (``ref``)."""

    key: tuple[int, str, int]  # (model, space, site index; 0 when the space's sites are summed)
    node: str
    layout: Layout
    ref: str
    ref_layout: Layout


class _Costs:
    """The statistics of every (model, space) pair, fed site by site, and the distances they end in.

    A key is finished (its distances computed and its sums let go) as soon as its last site is seen in the last
    group of chunks, so when the calibration runs layer by layer, only the spaces being read hold statistics.
    """

    def __init__(self, runners: Sequence[Runner], plans: Sequence[AlignmentPlan], target: int,
                 per_site: set[str] | frozenset[str], standardize: bool, spill: str | Path | None = None,
                 similarity: bool = False):
        self.target, self.standardize, self.per_site = target, standardize, per_site
        self.similar: list[dict[str, torch.Tensor] | None] = [
            None if k == target or not similarity else {} for k in range(len(plans))]
        plan_t = plans[target]
        self.stats: dict[tuple[int, str, int], _PairStats] = {}
        self.pairs: list[_Pair] = []
        for k, plan_k in enumerate(plans):
            if k == target:
                continue
            for space in plan_t.spaces:
                space_k = plan_k.space(space.name)
                summed = space.name not in per_site
                for i in range(1 if summed else max(1, len(space.sites))):
                    self.stats[(k, space.name, i)] = _PairStats(space_k.size, space.size, runners[k].device)
                for i, (site_b, site_a) in enumerate(zip(space.sites, space_k.sites, strict=False)):
                    self.pairs.append(_Pair((k, space.name, 0 if summed else i), site_a.node,
                                            space_k.layout(site_a).replace(heads=space.heads), site_b.node,
                                            space.layout(site_b)))
        self.wanted = [set() for _ in plans]
        self.by_value: dict[tuple[int, str], list[_Pair]] = {}
        for p in self.pairs:
            k = p.key[0]
            self.wanted[k].add(p.node)
            self.wanted[target].add(p.ref)
            self.by_value.setdefault((k, p.node), []).append(p)
            self.by_value.setdefault((target, p.ref), []).append(p)
        self.n_keys = {}
        for k, name, _ in self.stats:
            self.n_keys[(k, name)] = self.n_keys.get((k, name), 0) + 1
        self.parts: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.costs: list[MutableMapping[str, torch.Tensor] | None] = [
            None if k == target else SpilledCosts(Path(spill) / f"model-{k}") if spill is not None else {}
            for k in range(len(plans))]

    def start_group(self, n_chunks: int, last: bool) -> None:
        """A new group of chunks; in the ``last`` one, a key is finished when its last site is seen."""
        self.held: dict[tuple[int, str, int], torch.Tensor] = {}
        self.uses = {(m, node, c): len(ps) for (m, node), ps in self.by_value.items() for c in range(n_chunks)}
        self.left: dict[tuple[int, str, int], int] | None = None
        if last:
            self.left = {}
            for p in self.pairs:
                self.left[p.key] = self.left.get(p.key, 0) + n_chunks

    def value(self, m: int, node: str, c: int, value: torch.Tensor) -> None:
        """Model ``m``'s value of ``node`` on chunk ``c``: added against each partner value already computed."""
        self.held[(m, node, c)] = value
        for p in self.by_value[(m, node)]:
            other = (self.target, p.ref) if m != self.target else (p.key[0], p.node)
            partner = self.held.get((*other, c))
            if partner is None:
                continue
            a, b = (value, partner) if m != self.target else (partner, value)
            self.stats[p.key].add(channel_matrix(a, p.layout), channel_matrix(b, p.ref_layout))
            for used in ((m, node, c), (*other, c)):
                self.uses[used] -= 1
                if not self.uses[used]:
                    del self.held[used]
            if self.left is not None:
                self.left[p.key] -= 1
                if not self.left[p.key]:
                    self.finish(p.key)

    def finish(self, key: tuple[int, str, int]) -> None:
        k, name, _ = key
        parts = self.parts.setdefault((k, name), [])
        stats = self.stats.pop(key)
        parts.append(stats.distance(self.standardize))
        if (similar := self.similar[k]) is not None:  # a space's sites summed
            similar[name] = similar[name] + stats.similarity() if name in similar else stats.similarity()
        if len(parts) == self.n_keys[(k, name)]:
            del self.parts[(k, name)]
            self.costs[k][name] = _mean_of_scaled(parts) if name in self.per_site else parts[0]


def _groups(calibration: Any, splittable: bool, layerwise: bool) -> Iterator[tuple[list[Any], bool]]:
    """This process's chunks of the calibration data, one at a time or (``layerwise``) all in one group, each
    group with whether it is the last."""
    chunks = (c for batch in shard(iter_batches(calibration)) for c in (pieces(batch) if splittable else [batch]))
    if layerwise:
        group = list(chunks)
        if group:
            yield group, True
        return
    ahead = next(chunks, None)
    while ahead is not None:
        chunk, ahead = ahead, next(chunks, None)
        yield [chunk], ahead is None


def activation_statistics(
    runners: list[Runner],
    plans: list[AlignmentPlan],
    target: int,
    calibration: Any,
    *,
    per_site: set[str] | frozenset[str] = frozenset(),
    standardize: bool = False,
    progress: bool = True,
    layerwise: bool = False,
    spill: str | Path | None = None,
    similarity: bool = False,
) -> tuple[list[MutableMapping[str, torch.Tensor] | None], list[dict[str, torch.Tensor] | None]]:
    """Per model (None for the target): space name -> (n_model, n_target) Euclidean activation distances; and,
    with ``similarity``, per model the space's (n_model, n_target) mean activation products ``E[a_i b_j]`` summed
    over its sites (weight matching's activation evidence), else Nones. One run of the calibration gives both.

    A space's statistics are summed over all its sites; for the spaces named in ``per_site`` each site gets its
    own distance matrix instead, scaled to a mean of one, and the space's cost is their mean (every site counts
    the same, whatever the scale of its activations). ``standardize``: distances between activations centred and
    scaled to unit variance per channel (a correlation distance), as Imfeld et al. do for transformers.

    The models run in lockstep, node by node, and each pair of site values is added to its sums as soon as both
    exist. By default the calibration runs one chunk of at most ``CHUNK`` inputs at a time, so memory holds the
    statistics of every space and the activations of one chunk. ``layerwise``: all chunks run together, layer by
    layer, so memory holds every chunk's activations at one layer but only the statistics of the spaces in flight
    (each space's distances are computed, and its sums let go, at its last site): for models with many wide
    spaces, such as an LLM read from disk. ``spill``: a folder where each finished cost matrix is written, and read
    back from when asked for (:class:`SpilledCosts`), instead of all being held in memory.
    """
    acc = _Costs(runners, plans, target, per_site, standardize, spill, similarity)
    single = world()[1] == 1  # a distributed run sums every process's statistics at the end, in one order
    splittable = all(r.static_batch is None for r in runners)
    n_chunks = 0
    groups = _groups(calibration, splittable, layerwise)
    for group, last in tqdm(groups, desc="calibration", disable=not (progress and is_main()) or layerwise,
                            leave=False):
        n_chunks += len(group)
        acc.start_group(len(group), last and single)
        lockstep(runners, group, acc.wanted, acc.value, progress=progress and is_main() and layerwise)
    if sum_numbers(n_chunks)[0] == 0:
        raise FusionError("the calibration data is empty")
    for key in sorted(acc.stats):  # in one order on every process
        acc.stats[key].reduce()
    for key in list(acc.stats):
        acc.finish(key)
    return acc.costs, acc.similar


def _mean_of_scaled(parts: list[torch.Tensor]) -> torch.Tensor:
    scaled = [p / p.mean() for p in parts if p.numel() and p.mean() > 0]
    return sum(scaled) / len(scaled) if scaled else parts[0]
