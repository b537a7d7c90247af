"""The operations a tracer rule performs on labels, as methods of the :class:`~hf_otfusion.trace.core.Tracer` that
every rule receives (this class is its base). They read and change the tracer's private union-find of atoms, which
no rule touches directly; :mod:`hf_otfusion.trace.api` documents them for rule authors.

A label (:data:`~hf_otfusion.trace.labels.Desc`) is a tuple of segments ``(atom, repeat)``; :meth:`expand` resolves
one into segments of plain atoms (concats and repeats flattened), which is what the queries below look at.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from torch.fx import Node

from ._atoms import Atoms
from .labels import Desc, Labels


class RuleOps:
    """Queries and structure on labels (fixing, widths, uniform dims, heads, slices), and what the plan records of
    an op (its producers and consumers)."""

    _atoms: Atoms  # the tracer's union-find, set by the Tracer
    index: int
    producers: list[tuple[int, Desc]]
    producer_sites: list[tuple[str, int, Desc]]
    consumer_sites: list[tuple[str, int, Desc]]

    # -- what the plan records ----------------------------------------------------------------------------
    def producer(self, node: Node, out: Labels, channel_dim: int, *, site: bool = True) -> None:
        """``node`` (a weight layer) writes the channels of ``out[channel_dim]``: a space is solved in the order of
        its first producer, and (``site``) its activations are read at this output."""
        self.producers.append((self.index, out[channel_dim]))
        if site:
            self.producer_sites.append((node.name, channel_dim % len(out), out[channel_dim]))

    def consumer(self, value: Node, dim: int, desc: Desc) -> None:
        """A weight layer reads the channels ``desc`` on dim ``dim`` of graph value ``value`` (an activation site
        for spaces that no producer writes)."""
        self.consumer_sites.append((value.name, dim, desc))

    @property
    def context(self) -> str:
        """The op being traced, ``"op 'name' (node n)"``: for the reasons a rule gives."""
        return self._atoms.context

    # -- one label ----------------------------------------------------------------------------------------
    def expand(self, desc: Desc) -> Desc:
        """The label as segments of plain atoms (concats and channel-major repeats resolved)."""
        return self._atoms.expand(desc)

    def width(self, desc: Desc) -> int | None:
        """Entries the label spans (None where a size is symbolic)."""
        return self._atoms.width(desc)

    def fix(self, desc: Desc, why: str | None = None, *, keep: AbstractSet[str] | None = None) -> None:
        """Fix every channel of the label, with the reason (the op being traced when None). ``keep``: ``why``
        outranks every other reason but these (a reason that says no permutation can move the channels)."""
        self._atoms.fix(desc, why, keep=keep)

    def is_fixed(self, desc: Desc) -> bool:
        """Whether every channel of the label is fixed."""
        return self._atoms.is_fixed(desc)

    def failure(self, desc: Desc) -> str | None:
        """The reason of a fixed channel of the label that the tracer could not follow (an op without a rule, a
        structure the plan cannot express), or None."""
        return self._atoms.failure(desc)

    def is_uniform(self, desc: Desc) -> bool:
        """Whether the label is a dim filled with one value (any order of its entries is the same tensor)."""
        return self._atoms.is_uniform(desc)

    def make_uniform(self, desc: Desc) -> None:
        """Declare the label's atoms a dim filled with one value: fixed alone, but joining them with channels makes
        them those channels (zeros, a broadcast copy)."""
        self._atoms.uniform.update(a for a, _ in desc)

    def is_structured(self, desc: Desc) -> bool:
        """Whether a segment of the label holds heads, a head split or the channels inside heads (such labels are
        merged and split only by the head operations below)."""
        atoms = self._atoms
        return any(atoms.structured(a) for a, _ in atoms.expand(desc))

    def inside_heads(self, desc: Desc) -> tuple[bool, ...]:
        """For each segment of :meth:`expand`, whether it holds the channels inside heads (a within-head dim)."""
        atoms = self._atoms
        return tuple(a in atoms.owner for a, _ in atoms.expand(desc))

    def slice_desc(self, desc: Desc, start: int, end: int) -> Desc | None:
        """The segments covering [start, end) exactly, or None when the slice cuts a segment it cannot divide.

        A free plain channel atom is divided where the slice cuts it (GPT-2's ``c_attn`` output split into q, k, v).
        """
        atoms = self._atoms
        for cut in (start, end):
            atoms.cut(desc, cut)
        out, offset = [], 0
        for atom, repeat in atoms.expand(desc):
            size = (atoms.size[atom] or 0) * repeat
            if offset >= start and offset + size <= end:
                out.append((atom, repeat))
            elif offset < end and offset + size > start:
                return None
            offset += size
        return tuple(out)

    def chunks(self, desc: Desc, n: int) -> list[int] | None:
        """``n`` free plain atoms of equal size that make up the label (subdividing atoms as needed), or None."""
        return self._atoms.chunks(desc, n)

    # -- heads --------------------------------------------------------------------------------------------
    def head_split(self, desc: Desc, heads: int, head_dim: int) -> tuple[Desc, Desc] | None:
        """The (heads, head_dim) labels that a free plain channel label splits into (the same for every split of
        it), or None where it cannot be split so."""
        return self._atoms.head_split(desc, heads, head_dim)

    def head_merge(self, head: Desc, within: Desc) -> Desc | None:
        """The channel label whose head split gave these (head, within) labels, or None."""
        return self._atoms.head_merge(head, within)

    def within_side(self, d1: Desc, d2: Desc) -> Desc:
        """Of two joined labels, ``d2`` when ``d1`` holds one head's channels of ``d2``'s (a shared within dim),
        else ``d1``: the label a broadcasting op's output takes (a norm's weight times the heads)."""
        return self._atoms.within_side(d1, d2)

    def stack_heads(self, head: Desc, within: Desc) -> bool:
        """Declare two dims of one tensor its heads and each head's channels (stacked experts, ``[experts, out,
        in]``); False (nothing changed) where that cannot be expressed."""
        return self._atoms.stack(head, within)

    def is_head_label(self, desc: Desc) -> bool:
        """Whether the label is the (free) heads dim of a head split."""
        atoms = self._atoms
        e = atoms.expand(desc)
        return len(e) == 1 and e[0][0] in atoms.heads and not atoms.fixed[e[0][0]]

    def repeat_heads(self, head: Desc, g: int, others: list[tuple[Desc, int | None]]) -> tuple[Desc, int, int] | None:
        """Heads repeated ``g`` times each (grouped-query attention's ``repeat_kv``, or sdpa's ``enable_gqa``):
        the tile's head label, and (the within atom of the repeated heads, the tile's own within atom); or None.

        ``others``: (label, size) of the value's other dims, one of which must be the heads' within-head dim (its
        own label, or any label when those channels are fixed anyway); else the merge is of the heads with their
        own channels, a plain flatten."""
        atoms = self._atoms
        pieces = atoms.expand(head)
        if g < 2 or len(pieces) != 1 or pieces[0][1] != 1 or pieces[0][0] not in atoms.heads:
            return None
        x = next((x for x in atoms.owners_of_heads(pieces[0][0]) if self._reads_within(x, others)), None)
        if x is None:
            return None
        tile = atoms.tile(x, g)
        h_t, w_t = atoms.split[tile]
        return ((h_t, 1),), atoms.find(atoms.split[x][1]), w_t

    def _reads_within(self, x: int, others: list[tuple[Desc, int | None]]) -> bool:
        """One of ``others`` is headed atom ``x``'s within dim (or its segments, where a slice cut it), or any dim of
        its size when those channels are fixed."""
        atoms = self._atoms
        within = atoms.find(atoms.split[x][1])
        whole = atoms.expand(((within, 1),))
        return any(atoms.expand(d) == whole or (atoms.fixed[within] and size == atoms.size[within])
                   for d, size in others)
