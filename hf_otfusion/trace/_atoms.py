"""The union-find of atoms behind the labels, private to the tracer core (:mod:`.core` holds one; the label
operations of :mod:`.ops` are the only way rules reach it).

A dimension's label (:data:`~.labels.Desc`) is a sequence of segments, each a channel-major repeated atom; the atoms
are classes of this union-find, with composite definitions (concats, repeats) and head splits.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from ..errors import PlanError
from .labels import Desc, Piece


@dataclass
class Atoms:
    """Union-find over atoms (sets of channels), with two kinds of structure on a root atom.

    - ``definition``: the atom is a sequence of segments of other atoms (a concat, a channel-major repeat).
    - ``split``: the atom is ``H`` heads of ``d`` channels (a view (.., H * d) -> (.., H, d)). The split's head
      atom labels the head dim; its within atom labels the head-dim dim and stands for channel ``i`` of *every*
      head, which are different channels per head, so a within atom only ever joins another within atom (that
      joins the two headed atoms: queries with keys). A free plain atom joined with it *shares* it instead
      (:attr:`shared`): a tensor axis that holds one head's channels and is read by every head (a grouped conv's
      input axis, a per-head q/k norm), so the channels inside every head move alike. A head atom may
      join head atoms of other splits (they share one head permutation) or plain per-head parameter axes.
    - A slice of the within dim cuts the within atom into *segments* (a ``definition`` of within atoms): each
      segment is the within atom of a headed atom of its own over the same head atom (the rotary and the
      non-rotary channels of partial rotary heads; the q, k and v channels of a qkv projection laid out per
      head), so each segment is a space of its own whose heads move with the others.
    """

    parent: list[int] = field(default_factory=list)
    size: list[int | None] = field(default_factory=list)
    fixed: list[bool] = field(default_factory=list)
    definition: dict[int, Desc] = field(default_factory=dict)
    split: dict[int, tuple[int, int]] = field(default_factory=dict)  # root -> (head atom, within atom)
    owner: dict[int, int] = field(default_factory=dict)  # root of a within atom -> the atom it splits
    heads: set[int] = field(default_factory=set)  # roots of head atoms
    # grouped-query attention: root of a headed atom -> (headed atom, g) whose every head it holds g times in a
    # row (the keys/values as each query head reads them), and the same for their head atoms
    tiles: dict[int, tuple[int, int]] = field(default_factory=dict)
    head_tiles: dict[int, tuple[int, int]] = field(default_factory=dict)
    _tiled: dict[tuple[int, int], int] = field(default_factory=dict)
    why: dict[int, str] = field(default_factory=dict)  # root of a fixed atom -> why it is fixed
    # dims of a tensor filled with one value (zeros, full): fixed alone, but any order of them is the same tensor,
    # so joining one with other channels makes it those channels (T5's zero position bias of cross-attention)
    uniform: set[int] = field(default_factory=set)
    # pairs of atoms that are the same channels but could not be joined (a within-head dim and a tensor shared by
    # every head): a reason that outranks the others (see mark) reaches both
    alike: list[tuple[int, int]] = field(default_factory=list)
    # plain atom -> the within atom whose channels it holds for every head at once (see the class docstring)
    shared: dict[int, int] = field(default_factory=dict)
    # the reasons that say the tracer could not follow the channels (an op without a rule, a structure the plan
    # cannot express), as opposed to what the model itself dictates
    failures: set[str] = field(default_factory=set)
    context: str = ""  # the op being traced, for the reasons

    def new(self, size: int | None, fixed: bool = False, why: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        if fixed:
            self.why[len(self.parent) - 1] = why or f"made by {self.context}"
        return len(self.parent) - 1

    def mark(self, atom: int, why: str | None = None, *, keep: AbstractSet[str] | None = None) -> bool:
        """Fix one atom, recording why (the op being traced when no reason is given); False if it was fixed.

        With ``keep``, a reason that outranks the others: an atom fixed already takes it, unless its own reason is
        one of ``keep``.
        """
        if self.fixed[atom]:
            if keep is not None and why is not None and self.why.get(atom) not in keep | {why}:
                self.why[atom] = why
                for a, b in self.alike:
                    for x, y in ((a, b), (b, a)):
                        if self.find(x) == self.find(atom):
                            self.mark(self.find(y), why, keep=keep)
            return False
        self.fixed[atom] = True
        self.why[atom] = why or f"at {self.context}"
        return True

    def release(self, atom: int) -> None:
        """A uniform atom joined with other channels: it becomes them (free unless they are fixed)."""
        if atom in self.uniform:
            self.uniform.discard(atom)
            self.fixed[atom] = False
            self.why.pop(atom, None)

    def is_uniform(self, desc: Desc) -> bool:
        return all(a in self.uniform for a, _ in self.expand(desc))

    def reason(self, atom: int) -> str:
        return self.why.get(self.find(atom), "fixed")

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

    def fix(self, desc: Desc, why: str | None = None, *, keep: AbstractSet[str] | None = None) -> None:
        for atom, _ in self.expand(desc):
            self.mark(atom, why, keep=keep)

    def failure(self, desc: Desc) -> str | None:
        """The reason of a fixed atom of ``desc`` that the tracer could not follow, if any."""
        return next((r for a, _ in self.expand(desc) if (r := self.why.get(self.find(a))) in self.failures), None)

    def is_fixed(self, desc: Desc) -> bool:
        return all(self.fixed[a] for a, _ in self.expand(desc))

    def structured(self, root: int) -> bool:
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
        if (ra in self.uniform) != (rb in self.uniform):
            self.release(ra if ra in self.uniform else rb)
        mismatch = self.size[ra] is not None and self.size[rb] is not None and self.size[ra] != self.size[rb]
        if not mismatch and (ra in self.owner) != (rb in self.owner):
            w, p = (ra, rb) if ra in self.owner else (rb, ra)
            if self._share(w, p):
                return
        if mismatch or not self._compatible(ra, rb):
            why = f"joined with channels of another size or structure at {self.context}"
            if (ra in self.owner) != (rb in self.owner):
                self.alike.append((ra, rb))
                why = ("one tensor indexes the channels inside every head alike (e.g. a q/k norm's weight, at "
                       f"{self.context}): a permutation inside heads shared by all heads is not expressible")
            self.mark(ra, self.why.get(rb, why))
            self.mark(rb, self.why.get(ra, why))
            for r in (ra, rb):
                if r in self.definition:
                    self.fix(self.definition[r])
            return
        self.parent[rb] = ra
        if self.size[ra] is None:
            self.size[ra] = self.size[rb]
        if self.fixed[rb]:
            self.mark(ra, self.why.get(rb))
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
        for tiles in (self.tiles, self.head_tiles):
            ta, tb = tiles.pop(ra, None), tiles.pop(rb, None)
            if ta is not None or tb is not None:
                tiles[ra] = ta if ta is not None else tb  # type: ignore[assignment]
            if ta is not None and tb is not None:
                if ta[1] == tb[1]:
                    self.union(ta[0], tb[0])  # two tiles of the same channels: keys and values of one group
                else:
                    for r in (ta[0], tb[0], ra):
                        self.mark(self.find(r), "grouped-query tiles of different group sizes")
        if wa is not None and wb is not None:
            self.union(wa, wb)  # the same channels in every head: the same headed space (queries and keys)
        if sa is not None and sb is not None:
            self.union(sa[0], sb[0])
            self.union(sa[1], sb[1])
        if self.fixed[ra] and ra in self.definition:
            self.fix(self.definition[ra])

    def _share(self, w: int, p: int) -> bool:
        """Let plain root ``p`` hold within root ``w``'s channels for every head at once; False if it cannot (a
        structured or composite atom, a within dim cut into segments, or one already holding another space's)."""
        if (self.structured(p) or p in self.definition or p in self.uniform or p in self.tiles
                or p in self.head_tiles or w in self.definition):
            return False
        if self.sharer_of(p) not in (None, w):
            return False
        self.shared[p] = w
        self.alike.append((w, p))
        return True

    def within_side(self, d1: Desc, d2: Desc) -> Desc:
        """Of two joined dims, ``d2`` when ``d1`` only holds one head's channels of ``d2``'s (a shared within
        dim), else ``d1``: the label a broadcasting op's output takes (a norm's weight times the heads)."""
        e1, e2 = self.expand(d1), self.expand(d2)
        one = len(e1) == len(e2) == 1 and e1[0][1] == e2[0][1] == 1
        return d2 if one and self.sharer_of(self.find(e1[0][0])) == self.find(e2[0][0]) else d1

    def sharer_of(self, root: int) -> int | None:
        """The within root whose channels plain root ``root`` holds for every head, or None."""
        found = {self.find(w) for p, w in self.shared.items() if self.find(p) == root}
        return found.pop() if len(found) == 1 else None

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
                if self.structured(root):
                    break
                if not self.is_uniform(eb):
                    self.release(root)
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
        if x in self.owner or x in self.heads or self.size[x] != n_heads * head_dim:
            return None
        self.release(x)  # a constant filled with one value (EVA's zero key bias) is split like the channels it is
        if self.fixed[x]:
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

    def stack(self, head: Desc, within: Desc) -> bool:
        """Declare two dims of one tensor its heads and each head's channels (stacked experts, ``[experts, out,
        in]``): ``within`` becomes the within atom of a headed atom over ``head``, so its channels move inside their
        head. False (nothing changed) where either is not one plain atom, or ``within`` is fixed."""
        eh, ew = self.expand(head), self.expand(within)
        if len(eh) != 1 or len(ew) != 1 or eh[0][1] != 1 or ew[0][1] != 1:
            return False
        h, w = eh[0][0], ew[0][0]
        if h == w or self.fixed[w] or w in self.uniform:
            return False
        if w in self.owner:  # already stacked: on the same heads, or not expressible
            return self.find(self.split[self.find(self.owner[w])][0]) == h
        if h in self.split or h in self.owner or h in self.definition or self.structured(w) or w in self.definition:
            return False
        sizes = self.size[h], self.size[w]
        x = self.new(None if None in sizes else sizes[0] * sizes[1])  # type: ignore[operator]
        self.heads.add(h)
        self.owner[w] = x
        self.split[x] = (h, w)
        return True

    def owners_of_heads(self, head: int) -> list[int]:
        """The headed atoms whose head atom is ``head`` (a root): the first split, then its segments."""
        return [x for x, (h, _) in self.split.items() if self.find(h) == head and self.find(x) == x]

    def tile(self, x: int, g: int) -> int:
        """The headed atom that holds every head of headed atom ``x`` ``g`` times in a row (grouped-query
        attention's ``repeat_kv``): its own (head, within) split, tied to ``x`` through :attr:`tiles`."""
        x = self.find(x)
        key = (x, g)
        if key in self._tiled:
            return self.find(self._tiled[key])
        h, w = (self.find(a) for a in self.split[x])
        size, n = self.size[x], self.size[h]
        out = self.new(None if size is None else size * g)
        h_t, w_t = self.new(None if n is None else n * g), self.new(self.size[w])
        self.heads.add(h_t)
        self.owner[w_t] = out
        self.split[out] = (h_t, w_t)
        self.tiles[out] = (x, g)
        self.head_tiles[h_t] = (h, g)
        self._tiled[key] = out
        segments = self.segments(x)
        if segments is not None:  # a cut within dim: the tile's is cut alike, each segment the tile of the source's
            cut = []
            for seg, _ in segments:
                t_seg = self.tile(seg, g)
                self.union(self.split[t_seg][0], h_t)
                cut.append((self.find(self.split[t_seg][1]), 1))
            self.definition[self.find(w_t)] = tuple(cut)
        return out

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
            if repeat != 1 or size is None or size % seg or (self.fixed[atom] and atom not in self.uniform):
                return None
            if size == seg:
                out.append(atom)
                continue
            if self.structured(atom):
                return None
            parts = [self.new(seg) for _ in range(size // seg)]
            self.definition[atom] = tuple((p, 1) for p in parts)
            out += parts
        return out

    def cut(self, desc: Desc, position: int) -> None:
        """Divide the free plain atom (or the free within atom) of a dimension that ``position`` falls inside into
        two atoms."""
        offset = 0
        for atom, repeat in self.expand(desc):
            size = self.size[atom]
            if size is None:
                return
            if offset < position < offset + size * repeat:
                if repeat == 1 and not self.fixed[atom] and not self.structured(atom):
                    first = position - offset
                    self.definition[atom] = ((self.new(first), 1), (self.new(size - first), 1))
                elif repeat == 1 and not self.fixed[atom] and atom in self.owner:
                    self._segment(atom, position - offset)
                return
            offset += size * repeat

    def _segment(self, w: int, first: int) -> None:
        """Cut within atom ``w`` after its first ``first`` channels: two within atoms of two new headed atoms over
        the same heads (left whole when the heads are tiled: the tiles would not follow the cut)."""
        x = self.find(self.owner[w])
        h = self.find(self.split[x][0])
        if x in self.tiles or any(self.find(k[0]) == x for k in self._tiled) or self.size[h] is None:
            return
        parts = []
        for size in (first, (self.size[w] or 0) - first):
            part = self.new(size)
            self._headed(h, part)
            parts.append((part, 1))
        self.definition[w] = tuple(parts)

    def _headed(self, h: int, w: int) -> int:
        """A new headed atom of heads ``h`` and within atom ``w``."""
        size = self.size[h]
        x = self.new(None if size is None or self.size[w] is None else size * self.size[w])
        self.owner[w] = x
        self.split[x] = (h, w)
        return x

    def segments(self, x: int) -> list[tuple[int, int]] | None:
        """(headed atom, offset inside each head) of each segment of a headed root atom whose within-head
        channels are cut into free segments (not all fixed), or None."""
        if x not in self.split:
            return None
        w = self.find(self.split[x][1])
        if w not in self.definition or self.fixed[w]:
            return None
        out, offset = [], 0
        for atom, _ in self.expand(((w, 1),)):
            if atom not in self.owner:
                return None
            out.append((self.find(self.owner[atom]), offset))
            offset += self.size[atom] or 0
        return out

    def parts(self, x: int) -> list[int]:
        """A root atom and, for a headed atom, its head and within atoms (each within segment's, when cut)."""
        out = [x]
        if x in self.split:
            h, w = (self.find(a) for a in self.split[x])
            out += [h, w]
            for seg, _ in self.segments(x) or ():
                seg = self.find(self.tiles.get(seg, (seg, 1))[0])  # a tile's segment: its source's channels
                out += [a for a in self.parts(seg) if a not in out]
        return out

    def close(self) -> None:
        """Propagate fixing through structure: a fixed composite fixes its segments, a fixed headed atom its heads."""
        changed = True
        while changed:
            changed = False
            for p, w in list(self.shared.items()):  # one head's channels and every head's: fixed together
                rp, rw = self.find(p), self.find(w)
                if self.sharer_of(rp) is None or rw in self.definition:
                    why = ("one tensor holds the channels inside the heads of two spaces, or of heads cut into "
                           "segments: a map inside heads shared by all heads is not expressible there")
                    self.failures.add(why)
                    changed = self.mark(rp, why) | self.mark(rw, why) | changed
                for a, b in ((rp, rw), (rw, rp)):
                    if self.fixed[a] and self.mark(b, self.reason(a)):
                        changed = True
            for root, d in list(self.definition.items()):
                if self.fixed[self.find(root)] and not self.is_fixed(d):
                    self.fix(d)
                    changed = True
            for x, (h, w) in list(self.split.items()):
                if self.fixed[self.find(x)]:
                    for part in (self.find(h), self.find(w)):
                        if self.mark(part, self.reason(x)):
                            changed = True
            # a tile is its source's channels: what fixes the tile (or its heads, or its within dim) fixes those
            for t, (x, _) in list(self.tiles.items()):
                rt, rx = self.find(t), self.find(x)
                pairs = [(rt, rx)]
                if rt in self.split and rx in self.split:
                    pairs += list(zip(self.split[rt], self.split[rx], strict=True))
                for a, b in pairs:
                    if self.fixed[self.find(a)] and self.mark(self.find(b), self.reason(a)):
                        changed = True
            for t, (h, _) in list(self.head_tiles.items()):
                if self.fixed[self.find(t)] and self.mark(self.find(h), self.reason(t)):
                    changed = True
            for w, d in list(self.definition.items()):  # a cut within dim whose every segment is fixed is fixed
                if w in self.owner and not self.fixed[w] and self.is_fixed(d):
                    self.mark(w, self.reason(self.expand(d)[0][0]))
                    changed = True
