"""The frozen result of inference: spaces, members, barriers, and views of them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Optional, Union

import torch.fx as fx

from .layout import Layout, leaf_units, spaces_of


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of parameter/buffer ``fqn`` is governed by ``layout``.

    role ``out``: the entries along the axis belong to units (merge with M);
    role ``in``: the axis consumes units (unmerge with U). ``groups > 1`` marks the short
    input axis of a grouped conv: it holds within-group indices whose group is given by
    the tensor's other governed axis."""
    fqn: str
    axis: int
    layout: Layout
    role: str
    groups: int = 1


@dataclass(frozen=True)
class Tap:
    """Where the activations of a space can be read: axis ``axis`` of node ``node``'s
    output, laid out by ``layout``. ``proj`` = (weight fqn, bias fqn or None, row start,
    row stop, bias start) means the features are ``F.linear(value, W[start:stop], b[bias
    start:...])`` (packed projections inside leaf modules such as nn.MultiheadAttention)."""
    node: str
    axis: int
    layout: Layout
    proj: Optional[tuple[str, Optional[str], int, int, int]] = None


@dataclass(frozen=True)
class Barrier:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Structured:
    """An activation axis that is not a layout of units: ``kind`` "within" (the within-block
    index of blocked space ``spaces[0]``, beside its head axis) or "parts" (an axis that
    enumerates the parts of a fused projection, one space per part)."""
    kind: str
    spaces: tuple[int, ...]


AxisLayout = Optional[Union[Layout, Structured]]


@dataclass(frozen=True)
class Space:
    """A set of units that share one permutation (per model).

    ``blocks = (G, g)``: the units form G blocks of g; valid permutations move whole blocks
    by the permutation of head space ``head`` (shared by every space tied to it) and permute
    within each block freely, or not at all when ``within == "identity"``."""
    id: int
    size: int
    kind: str                       # "unit" or "head"
    fixed: bool
    fixed_by: tuple[str, ...]
    blocks: Optional[tuple[int, int]] = None
    head: Optional[int] = None
    within: str = "free"
    members: tuple[Member, ...] = ()

    @property
    def reaches_output(self) -> bool:
        return any(r.startswith("output") for r in self.fixed_by)


@dataclass(frozen=True)
class PermutationGraph:
    """What ``infer`` found: the permutation symmetry of one traced model.

    ``spaces[i].id == i``. ``members`` lists every governed parameter axis once.
    ``producers`` are the output layouts of weight-carrying ops (for coverage)."""
    spaces: tuple[Space, ...]
    members: tuple[Member, ...]
    barriers: tuple[Barrier, ...]
    in_taps: tuple[Tap, ...]
    out_taps: tuple[Tap, ...]
    producers: tuple[tuple[str, Layout], ...]
    params: tuple[str, ...]                       # canonical fqns of all floating params/buffers
    aliases: tuple[tuple[str, str], ...]          # (tied fqn, canonical fqn)
    gm: fx.GraphModule = field(repr=False, compare=False)
    # per tensor-valued node of ``gm``: the layout of each axis of its value (None = fixed)
    values: tuple[tuple[str, tuple[AxisLayout, ...]], ...] = field(default=(), repr=False, compare=False)

    @cached_property
    def _value_index(self) -> dict[str, tuple[AxisLayout, ...]]:
        return dict(self.values)

    def value_layout(self, node: str) -> Optional[tuple[AxisLayout, ...]]:
        """The axis layouts of node ``node``'s value (None for a non-tensor node)."""
        return self._value_index.get(node)

    # -- queries ----------------------------------------------------------------------
    def size(self, s: int) -> int:
        return self.spaces[s].size

    def is_free(self, s: int) -> bool:
        sp = self.spaces[s]
        if sp.fixed or sp.size <= 1:
            return False
        if sp.blocks is None:
            return True
        G, g = sp.blocks
        head_free = sp.head is not None and not self.spaces[sp.head].fixed and G > 1
        return head_free or (sp.within == "free" and g > 1)

    @property
    def free_spaces(self) -> tuple[int, ...]:
        return tuple(s.id for s in self.spaces if self.is_free(s.id))

    def members_of(self, fqn: str) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.fqn == fqn)

    def output_params(self) -> tuple[str, ...]:
        """Parameters that produce model outputs (classifier / task heads): those with an
        `out` axis in a space fixed because it reaches a returned tensor."""
        out = []
        for m in self.members:
            if m.role == "out" and any(self.spaces[s].reaches_output for s in spaces_of(m.layout)):
                out.append(m.fqn)
        names = set(out)
        out += [alias for alias, canon in self.aliases if canon in names]
        return tuple(dict.fromkeys(out))

    def ties(self) -> dict[int, tuple[int, ...]]:
        """head space -> the blocked unit spaces that share its block permutation."""
        out: dict[int, list[int]] = {}
        for s in self.spaces:
            if s.head is not None:
                out.setdefault(s.head, []).append(s.id)
        return {h: tuple(v) for h, v in out.items()}

    def motion_groups(self) -> tuple[tuple[int, ...], ...]:
        """The free spaces grouped by what must move together: a plain space alone; a head
        space with every blocked space tied to it (their block permutation is one)."""
        groups: list[tuple[int, ...]] = []
        ties = self.ties()
        for s in self.spaces:
            if not self.is_free(s.id):
                continue
            if s.kind == "head":
                groups.append((s.id,) + tuple(t for t in ties.get(s.id, ()) if self.is_free(t)))
            elif s.blocks is None or s.head is None or not self.is_free(s.head):
                groups.append((s.id,))
        return tuple(groups)

    def freeze(self, spaces: Iterable[int], reason: str) -> "PermutationGraph":
        """A copy with ``spaces`` fixed (blocked spaces' heads included), ``reason`` recorded."""
        todo = set(spaces)
        for s in list(todo):
            sp = self.spaces[s]
            if sp.head is not None:
                todo.add(sp.head)
            if sp.kind == "head":
                todo.update(self.ties().get(s, ()))
        new = tuple(replace(sp, fixed=True, fixed_by=tuple(sorted(set(sp.fixed_by) | {reason})))
                    if sp.id in todo else sp for sp in self.spaces)
        return replace(self, spaces=new)

    def coverage(self) -> float:
        """Fraction of hidden producer output units (not reaching a model output) that lie
        in free spaces."""
        free = total = 0
        for _, layout in self.producers:
            for unit_space, n in leaf_units(layout, self.size):
                if unit_space is not None and self.spaces[unit_space].reaches_output:
                    continue
                total += n
                if unit_space is not None and self.is_free(unit_space):
                    free += n
        return free / total if total else 1.0

    # -- views (mudsc_fx/views/) -------------------------------------------------------
    def summary(self) -> str:
        """One line per space: size, structure, status, where in the model, members."""
        from ..views.text import summary
        return summary(self)

    def explain(self, param: str) -> str:
        """Where parameter ``param`` lives: each governed axis, its space, and why that space
        is or is not free."""
        from ..views.text import explain
        return explain(self, param)

    def to_dict(self) -> dict:
        from ..views.text import to_dict
        return to_dict(self)

    def to_json(self, indent: int = 1) -> str:
        from ..views.text import to_json
        return to_json(self, indent)

    def to_networkx(self):
        """Bipartite graph: space nodes ("S3") and parameter nodes ("p:layer1.weight"),
        edges labelled with axis and role; barrier nodes ("b:node") carry their reason."""
        from ..views.text import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        """Graphviz DOT text (no graphviz needed to produce it)."""
        from ..views.text import to_dot
        return to_dot(self)
