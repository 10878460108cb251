"""The mutable half of inference: a union-find over channel spaces, and axis labels.

Every rule restricts the symmetry group of the model to a subgroup whose action on each
axis is described exactly by the axis label. When a rule cannot describe the action it
*fixes* the spaces involved: coverage drops, correctness does not.

Axis labels (only during inference; the frozen graph holds layouts only):

- ``None``: the axis is FIXED.
- a :mod:`~mudsc_fx.ir.layout` layout (Plain / Concat / Kron).
- ``Plain(head)`` where ``head`` is the head space of a blocked space: a block (head) index axis.
- ``Within(s)``: the within-block index of blocked space ``s``; meaningful only beside an axis
  carrying ``s``'s head in the same tensor.
- ``Parts(spaces)``: an axis enumerating parts of a fused projection (qkv), whose other axes
  are labelled by ``parts[0]``; indexing it at t substitutes ``parts[t]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

from ..ir.layout import Concat, Fixed, Kron, Layout, Plain, concat, kron, layout_size, map_spaces, spaces_of


@dataclass(frozen=True)
class Within:
    space: int


@dataclass(frozen=True)
class Parts:
    spaces: tuple[int, ...]


AxisLabel = Optional[Union[Layout, Within, Parts]]


class SpaceTable:
    """Union-find over spaces. A root may be *aliased* to a layout of other spaces (a space
    refined into parts, or identified with a kron / concat layout)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.reasons: list[set[str]] = []
        self.blocks: list[Optional[tuple[int, int]]] = []
        self.head: list[Optional[int]] = []
        self.within_identity: list[bool] = []
        self.alias: list[Optional[Layout]] = []
        self.is_head: list[bool] = []
        self.conflicts: list[str] = []
        self.events = 0  # grows whenever a space becomes fixed or a conflict is recorded

    # -- basic union-find -------------------------------------------------------------
    def new(self, size: int, *, is_head: bool = False) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(int(size))
        self.fixed.append(False)
        self.reasons.append(set())
        self.blocks.append(None)
        self.head.append(None)
        self.within_identity.append(False)
        self.alias.append(None)
        self.is_head.append(is_head)
        return s

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def space_size(self, s: int) -> int:
        return self.size[self.find(s)]

    def resolve(self, layout: Layout) -> Layout:
        """Layout with every space replaced by its root, aliases expanded."""
        def leaf(s: int) -> Layout:
            r = self.find(s)
            a = self.alias[r]
            return Plain(r) if a is None else self.resolve(a)
        return map_spaces(layout, leaf)

    def resolve_label(self, label: AxisLabel) -> AxisLabel:
        if label is None:
            return None
        if isinstance(label, Within):
            r = self.find(label.space)
            a = self.alias[r]
            if a is not None:  # blocks turned into copies of one layout (see _blocks_as_copies)
                return self.resolve_label(a.parts[0]) if isinstance(a, Concat) else None
            return Within(r)
        if isinstance(label, Parts):
            return Parts(tuple(self.find(s) for s in label.spaces))
        if isinstance(label, Fixed):
            return None
        out = self.resolve(label)
        return None if isinstance(out, Fixed) else out

    def head_of(self, s: int) -> Optional[int]:
        h = self.head[self.find(s)]
        return None if h is None else self.find(h)

    # -- fixing -----------------------------------------------------------------------
    def fix_space(self, s: int, reason: str) -> None:
        r = self.find(s)
        if self.alias[r] is not None:
            self.fix_layout(self.alias[r], reason)
            return
        self.reasons[r].add(reason)
        if not self.fixed[r]:
            self.fixed[r] = True
            self.events += 1
            if self.head[r] is not None:
                self.fix_space(self.head[r], reason)

    def fix_layout(self, layout: Layout, reason: str) -> None:
        for s in spaces_of(layout):
            self.fix_space(s, reason)

    def fix_label(self, label: AxisLabel, reason: str) -> None:
        label = self.resolve_label(label)
        if label is None:
            return
        if isinstance(label, Within):
            # an op that cannot track the units inside a head (a slice, a per-head reduction):
            # it acts alike on every head, so heads still move; the units inside do not
            self.identity_within(label.space)
        elif isinstance(label, Parts):
            for s in label.spaces:
                self.fix_space(s, reason)
        else:
            self.fix_layout(label, reason)

    def identity_within(self, s: int) -> None:
        self.within_identity[self.find(s)] = True

    # -- structure --------------------------------------------------------------------
    def set_blocks(self, s: int, groups: int, group_size: int) -> bool:
        """Give space ``s`` the structure blocks(groups, group_size); False if impossible."""
        r = self.find(s)
        if self.alias[r] is not None or self.is_head[r] or groups * group_size != self.size[r]:
            return False
        if self.blocks[r] is None:
            self.blocks[r] = (groups, group_size)
            h = self.new(groups, is_head=True)
            self.head[r] = h
            if self.fixed[r]:
                self.fix_space(h, "fixed block space")
            return True
        return self.blocks[r] == (groups, group_size)

    def tie(self, a: int, b: int) -> None:
        """Blocked spaces a and b share one block permutation."""
        ha, hb = self.head_of(a), self.head_of(b)
        assert ha is not None and hb is not None
        self.union(ha, hb)

    def split(self, s: int, sizes: list[int]) -> Optional[Layout]:
        """Refine unblocked root ``s`` into independent parts of the given sizes."""
        r = self.find(s)
        if self.alias[r] is not None:
            return None
        if len(sizes) == 1:
            return Plain(r)
        if self.blocks[r] is not None or self.is_head[r]:
            return None
        parts = [self.new(n) for n in sizes]
        self.alias[r] = Concat(tuple(Plain(p) for p in parts))
        if self.fixed[r]:
            for p in parts:
                self.fix_space(p, "refined from a fixed space")
        return self.alias[r]

    # -- unification ------------------------------------------------------------------
    def conflict(self, what: str, *layouts: AxisLabel) -> None:
        self.conflicts.append(what)
        self.events += 1
        for lay in layouts:
            self.fix_label(lay, f"conflict: {what}")

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.alias[ra] is not None or self.alias[rb] is not None:
            self.unify_layouts(self.resolve(Plain(ra)), self.resolve(Plain(rb)))
            return
        if self.size[ra] != self.size[rb]:
            self.conflict(f"spaces of size {self.size[ra]} and {self.size[rb]} must be one", Plain(ra), Plain(rb))
            return
        ba, bb = self.blocks[ra], self.blocks[rb]
        ha, hb = self.head[ra], self.head[rb]
        # a head axis may meet a blocked space (the heads of grouped-query attention move in
        # groups): the head space then has blocks of its own, flattened when the graph is frozen
        if (ba is None) != (bb is None) and self.find(hb if ba is None else ha) in (ra, rb):
            self.conflict("a space meets its own head", Plain(ra), Plain(rb))
            return
        self.parent[rb] = ra
        self.reasons[ra] |= self.reasons[rb]
        self.within_identity[ra] = self.within_identity[ra] or self.within_identity[rb]
        self.is_head[ra] = self.is_head[ra] or self.is_head[rb]
        if ba is None and bb is not None:
            self.blocks[ra], self.head[ra] = bb, hb
        elif ba is not None and bb is not None:
            if ba == bb:
                self.union(ha, hb)
            else:
                self.conflict(f"block structures {ba} and {bb} on one space", Plain(ra))
        if self.fixed[rb] and not self.fixed[ra]:
            self.fix_space(ra, "joined a fixed space")
        elif self.fixed[ra] and not self.fixed[rb] and self.head[ra] is not None:
            self.fix_space(self.head[ra], "joined a fixed space")

    def unify_layouts(self, a: Layout, b: Layout) -> Layout:
        a, b = self.resolve(a), self.resolve(b)
        na, nb = layout_size(a, self.space_size), layout_size(b, self.space_size)
        if na != nb:
            self.conflict(f"layouts of size {na} and {nb} must be one", a, b)
            return Fixed(na)
        if isinstance(a, Fixed) or isinstance(b, Fixed):
            self.fix_layout(a, "meets a fixed axis")
            self.fix_layout(b, "meets a fixed axis")
            return Fixed(na)
        if isinstance(a, Plain) and isinstance(b, Plain):
            self.union(a.space, b.space)
            return self.resolve(a)
        if isinstance(b, Plain):
            a, b = b, a
        if isinstance(a, Plain):  # identify a plain space with a structured layout
            r = self.find(a.space)
            if self.blocks[r] is not None or self.is_head[r] or r in set(map(self.find, spaces_of(b))):
                self.conflict("a blocked space meets a concat/kron layout", a, b)
                return Fixed(na)
            self.alias[r] = b
            if self.fixed[r]:
                self.fix_layout(b, "aliased to a fixed space")
            return b
        if isinstance(a, Kron) and isinstance(b, Kron):
            if (a.outer, a.inner_rep) == (b.outer, b.inner_rep):
                return kron(self.unify_layouts(a.inner, b.inner), a.outer, a.inner_rep)
            self.conflict("kron layouts with different strides", a, b)
            return Fixed(na)
        if isinstance(a, Concat) and isinstance(b, Concat):
            cuts = sorted(set(self._cuts(a)) | set(self._cuts(b)))
            ra, rb = self.refine(a, cuts), self.refine(b, cuts)
            if ra is None or rb is None:
                self.conflict("concat layouts that cannot be aligned", a, b)
                return Fixed(na)
            return concat([self.unify_layouts(x, y) for x, y in zip(ra, rb)])
        self.conflict("a concat layout meets a kron layout", a, b)
        return Fixed(na)

    def _cuts(self, layout: Layout) -> list[int]:
        parts = layout.parts if isinstance(layout, Concat) else (layout,)
        out, pos = [], 0
        for p in parts:
            pos += layout_size(p, self.space_size)
            out.append(pos)
        return out

    def refine(self, layout: Layout, cuts: Iterable[int]) -> Optional[list[Layout]]:
        """Split ``layout`` into consecutive pieces ending at ``cuts`` (the last cut is its
        size), refining plain spaces that straddle a cut. None if a kron part straddles."""
        layout = self.resolve(layout)
        parts = list(layout.parts) if isinstance(layout, Concat) else [layout]
        pieces: list[Layout] = []
        cur: list[Layout] = []
        pos, cuts = 0, sorted(set(cuts))
        ci = 0
        for p in parts:
            n = layout_size(p, self.space_size)
            inner = [c - pos for c in cuts if pos < c < pos + n]
            if inner:
                if isinstance(p, Fixed):
                    sub = [Fixed(k) for k in _diffs(inner, n)]
                elif isinstance(p, Plain):
                    sp = self.split(p.space, _diffs(inner, n))
                    if sp is None:
                        return None
                    sub = list(sp.parts)
                else:
                    return None
            else:
                sub = [p]
            for q in sub:
                cur.append(q)
                pos += layout_size(q, self.space_size)
                while ci < len(cuts) and cuts[ci] <= pos:
                    if cuts[ci] == pos:
                        pieces.append(concat(cur))
                        cur = []
                    ci += 1
        if cur:
            pieces.append(concat(cur))
        return pieces

    def _blocks_as_copies(self, s: int, other: AxisLabel) -> Optional[Layout]:
        """A blocked space whose block permutation is fixed is the direct sum of its blocks.
        When its within axis meets a layout of one block's size (every block lines up with
        the same units, as when per-path attention weights of size paths x C multiply a
        stack of paths over C channels), every block carries that layout: the space becomes
        concat(other, ..., other). None when that does not apply."""
        r = self.find(s)
        if other is None or isinstance(other, (Within, Parts)) or self.blocks[r] is None or self.fixed[r] \
                or self.alias[r] is not None or self.within_identity[r] or self.head[r] is None \
                or not self.fixed[self.find(self.head[r])]:
            return None
        G, g = self.blocks[r]
        other = self.resolve(other)
        if layout_size(other, self.space_size) != g or r in set(map(self.find, spaces_of(other))):
            return None
        self.alias[r] = Concat((other,) * G)
        return other

    def unify(self, a: AxisLabel, b: AxisLabel, why: str) -> AxisLabel:
        """Axis labels that must carry the same permutation (elementwise / contraction)."""
        a, b = self.resolve_label(a), self.resolve_label(b)
        if a is None and b is None:
            return None
        if isinstance(a, Parts) or isinstance(b, Parts):
            self.fix_label(a, why)
            self.fix_label(b, why)
            return None
        if isinstance(a, Within) and isinstance(b, Within):
            self.union(a.space, b.space)
            return Within(self.find(a.space))
        if isinstance(a, Within) or isinstance(b, Within):
            w, other = (a, b) if isinstance(a, Within) else (b, a)
            copies = self._blocks_as_copies(w.space, other)
            if copies is not None:
                return copies
            # the units inside each block stay in place; the axis is still the within axis of w
            # (so a later reshape can merge it with its head axis back into w's space)
            self.identity_within(w.space)
            self.fix_label(other, why)
            return Within(self.find(w.space))
        if a is None or b is None:
            self.fix_label(a if b is None else b, why)
            return None
        out = self.unify_layouts(a, b)
        return None if isinstance(out, Fixed) else out


def _diffs(inner_cuts: list[int], n: int) -> list[int]:
    edges = [0] + inner_cuts + [n]
    return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
