"""Why a space is or is not free, and where a parameter lives: the answers every view shares.

The text summary, the JSON, the picture and the HTML page all phrase a space's status and a
parameter's axes with these functions, so a user who looks a parameter up in any of them reads
the same space ids and the same reasons.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

from ..ir.graph import PermutationGraph
from ..ir.layout import describe, spaces_of


@dataclass(frozen=True)
class SpaceStatus:
    free: bool
    why: str          # one sentence, starts with "free" or "fixed"


@dataclass(frozen=True)
class ParamAxis:
    """One governed axis of a parameter: ``spaces`` are the spaces its layout mentions."""
    axis: int
    role: str
    layout: str
    spaces: tuple[int, ...]
    free: bool


@dataclass(frozen=True)
class ParamFacts:
    name: str                     # as asked
    canonical: str                # the tensor that holds it (tied parameters share one)
    shape: Optional[tuple[int, ...]]
    axes: tuple[ParamAxis, ...]
    free: bool
    why: str


def _reason(r: str) -> str:
    """The inference pass records terse reasons; say what they mean."""
    if r.startswith("output ("):
        return f"reaches a model output (node {r[len('output ('):-1]})"
    return r


def fixed_reasons(pg: PermutationGraph, s: int, limit: int = 3) -> str:
    reasons = sorted(pg.spaces[s].fixed_by)
    text = "; ".join(_reason(r) for r in reasons[:limit])
    if len(reasons) > limit:
        text += f" (+{len(reasons) - limit} more)"
    return text or "fixed by a rule without a recorded reason"


def structure(pg: PermutationGraph, s: int) -> str:
    """``768 units``, ``768 units = 12 blocks x 64 (block order: head space S2)``."""
    sp = pg.spaces[s]
    unit = "heads" if sp.kind == "head" else "units"
    text = f"{sp.size} {unit}"
    if sp.blocks is not None:
        G, g = sp.blocks
        text += f" = {G} blocks x {g}"
        if sp.head is not None:
            text += f" (block order: head space S{sp.head})"
        if sp.within != "free":
            text += ", order within a block kept"
    return text


def space_status(pg: PermutationGraph, s: int) -> SpaceStatus:
    sp = pg.spaces[s]
    if sp.fixed:
        return SpaceStatus(False, "fixed: " + fixed_reasons(pg, s))
    if sp.size <= 1:
        return SpaceStatus(False, "fixed: a single unit, nothing to permute")
    if sp.kind == "head":
        tied = pg.ties().get(s, ())
        spaces = ", ".join(f"S{t}" for t in tied) or "no unit space"
        return SpaceStatus(True, f"free: the {sp.size} blocks move together in {spaces}")
    if sp.blocks is None:
        n_tensors = len({m.fqn for m in sp.members})
        return SpaceStatus(True, f"free: one permutation of its {sp.size} units, shared by {n_tensors} tensors")
    G, g = sp.blocks
    head = pg.spaces[sp.head] if sp.head is not None else None
    head_free = head is not None and not head.fixed and G > 1
    within_free = sp.within == "free" and g > 1
    if not head_free and not within_free:
        why = "the blocks cannot move" + (f" (head space S{head.id} is {fixed_reasons(pg, head.id)})"
                                           if head is not None and head.fixed else "")
        return SpaceStatus(False, f"fixed: {why} and the order inside a block is kept")
    moves = f"its {G} blocks of {g} move as wholes (with head space S{head.id})" if head_free \
        else "its blocks stay in place"
    inside = "units permute inside each block" if within_free else "the order inside a block is kept"
    return SpaceStatus(True, f"free: {moves}, {inside}")


def resolve_param(pg: PermutationGraph, name: str) -> str:
    """The canonical fqn for ``name`` (tied aliases map to the tensor they share), or a
    ValueError naming close matches."""
    aliases = dict(pg.aliases)
    if name in aliases:
        return aliases[name]
    known = set(pg.params) | {m.fqn for m in pg.members}
    if name in known:
        return name
    names = sorted(known | set(aliases))
    hits = [n for n in names if name.lower() in n.lower()][:8] or difflib.get_close_matches(name, names, n=5)
    hint = f"; did you mean {', '.join(hits)}?" if hits else f"; the model has {len(names)} (e.g. {', '.join(names[:3])})"
    raise ValueError(f"no floating-point parameter or buffer {name!r} in this model{hint}")


def _shape(pg: PermutationGraph, fqn: str) -> Optional[tuple[int, ...]]:
    for get in (pg.gm.get_parameter, pg.gm.get_buffer):
        try:
            return tuple(get(fqn).shape)
        except (AttributeError, KeyError):
            continue
    return None


def param_facts(pg: PermutationGraph, name: str) -> ParamFacts:
    canonical = resolve_param(pg, name)
    axes = []
    for m in pg.members_of(canonical):
        ids = tuple(dict.fromkeys(spaces_of(m.layout)))
        axes.append(ParamAxis(m.axis, m.role, describe(m.layout), ids, any(pg.is_free(s) for s in ids)))
    axes.sort(key=lambda a: a.axis)
    free = any(a.free for a in axes)
    if not axes:
        why = "no axis of it carries units of a space (no rule gives it a layout): merged by plain averaging"
    elif free:
        why = "free along " + ", ".join(f"axis {a.axis} ({', '.join(f'S{s}' for s in a.spaces if pg.is_free(s))})"
                                         for a in axes if a.free)
    else:
        why = "not free: every governed axis lies in a fixed space"
    return ParamFacts(name, canonical, _shape(pg, canonical), tuple(axes), free, why)


def param_report(pg: PermutationGraph, name: str, label=None) -> str:
    """Text: the parameter, each governed axis with its space and why that space is or is
    not free. ``label(s)`` may name the space's place in the model."""
    f = param_facts(pg, name)
    head = f.name + (f" (tied: the tensor {f.canonical})" if f.canonical != f.name else "")
    if f.shape is not None:
        head += f"  shape {list(f.shape)}"
    lines = [head, f"  {f.why}"]
    for a in f.axes:
        lines.append(f"  axis {a.axis} ({a.role}, layout {a.layout}):")
        for s in a.spaces:
            st = space_status(pg, s)
            where = f"  [{label(s)}]" if label is not None else ""
            lines.append(f"    S{s}: {structure(pg, s)}{where}")
            lines.append(f"      {st.why}")
            others = sorted({m.fqn for m in pg.spaces[s].members} - {f.canonical})
            if others:
                more = f" (+{len(others) - 4})" if len(others) > 4 else ""
                lines.append(f"      shares the permutation with: {', '.join(others[:4])}{more}")
    fixed_axes = set(range(len(f.shape))) - {a.axis for a in f.axes} if f.shape is not None else set()
    if fixed_axes:
        lines.append(f"  axes {sorted(fixed_axes)}: fixed (not a unit axis of any space)")
    return "\n".join(lines)


def param_index(pg: PermutationGraph) -> dict[str, dict]:
    """Every floating parameter and buffer (and tied alias) -> its axes, spaces and why: the
    search index of the page and the ``params`` table of the JSON."""
    names = dict.fromkeys(list(pg.params) + [m.fqn for m in pg.members] + [a for a, _ in pg.aliases])
    out = {}
    for name in names:
        f = param_facts(pg, name)
        out[name] = {"canonical": f.canonical, "shape": list(f.shape) if f.shape is not None else None,
                     "free": f.free, "why": f.why,
                     "axes": [{"axis": a.axis, "role": a.role, "layout": a.layout, "spaces": list(a.spaces)}
                              for a in f.axes]}
    return out
