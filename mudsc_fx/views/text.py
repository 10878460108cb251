"""Text, JSON, networkx and DOT views of a permutation graph.

Every view names spaces by the same ids (``S12``), places them by the same module chain as the
picture (``layer2.0.conv1 -> bn1 -> conv2``) and says why they are or are not free with the
same sentence (:mod:`.explain`).
"""
from __future__ import annotations

import json

from ..ir.graph import PermutationGraph
from ..ir.layout import describe, spaces_of
from .explain import param_index, param_report, space_status
from .names import chain
from .outline import outline


def _where(pg: PermutationGraph) -> dict[int, str]:
    ol = outline(pg)
    out = {}
    for it in ol.items + ol.bands:
        for s in it.spaces:
            out.setdefault(s, it.note if it.kind == "band" else chain(it.modules))
    return out


def summary(pg: PermutationGraph, width: int = 44) -> str:
    where = _where(pg)
    lines = [f"PermutationGraph: {len(pg.spaces)} spaces ({len(pg.free_spaces)} free), "
             f"{len(pg.members)} members, {len(pg.barriers)} barriers, coverage {pg.coverage():.3f}"]
    lines.append(f"{'space':>6} {'size':>6} {'kind':<5} {'structure':<18} {'status':<7} {'where':<{width}} members")
    for s in pg.spaces:
        struct = "-" if s.blocks is None else f"blocks{s.blocks} H{s.head}" + (" within=id" if s.within != "free" else "")
        status = "free" if pg.is_free(s.id) else "fixed"
        w = where.get(s.id, "")
        w = w if len(w) <= width else w[:width - 3] + "..."
        mem = ", ".join(f"{m.fqn}[{m.axis}]{'' if m.role == 'out' else '<in>'}" for m in s.members[:3])
        if len(s.members) > 3:
            mem += f", ... (+{len(s.members) - 3})"
        lines.append(f"{'S' + str(s.id):>6} {s.size:>6} {s.kind:<5} {struct:<18} {status:<7} {w:<{width}} {mem}")
        if s.fixed and s.fixed_by:
            lines.append(f"{'':>6} fixed by: {'; '.join(sorted(s.fixed_by)[:3])}")
        elif not pg.is_free(s.id):
            lines.append(f"{'':>6} {space_status(pg, s.id).why}")
    if pg.barriers:
        lines.append("barriers:")
        for b in pg.barriers:
            lines.append(f"  {b.node} ({b.op}): {b.reason}")
    lines.append("one parameter's spaces and why: PermutationGraph.explain(NAME), or mudsc-fx inspect MODEL --param NAME")
    return "\n".join(lines)


def explain(pg: PermutationGraph, name: str) -> str:
    where = _where(pg)
    return param_report(pg, name, label=lambda s: where.get(s, ""))


def to_dict(pg: PermutationGraph) -> dict:
    where = _where(pg)
    return {
        "coverage": pg.coverage(),
        "spaces": [{
            "id": s.id, "size": s.size, "kind": s.kind, "free": pg.is_free(s.id), "fixed": s.fixed,
            "why": space_status(pg, s.id).why, "where": where.get(s.id, ""),
            "fixed_by": list(s.fixed_by), "blocks": list(s.blocks) if s.blocks else None,
            "head": s.head, "within": s.within,
            "members": [{"param": m.fqn, "axis": m.axis, "role": m.role, "groups": m.groups,
                         "layout": describe(m.layout)} for m in s.members],
        } for s in pg.spaces],
        "params": param_index(pg),
        "barriers": [{"node": b.node, "op": b.op, "reason": b.reason} for b in pg.barriers],
        "tied_params": [list(a) for a in pg.aliases],
    }


def to_json(pg: PermutationGraph, indent: int = 1) -> str:
    return json.dumps(to_dict(pg), indent=indent)


def to_networkx(pg: PermutationGraph):
    """Bipartite graph: space nodes ("S3") and parameter nodes ("p:layer1.weight"), edges
    labelled with axis and role; barrier nodes ("b:node") carry their op and reason."""
    import networkx as nx
    where = _where(pg)
    g = nx.MultiGraph()
    for s in pg.spaces:
        g.add_node(f"S{s.id}", kind="space", size=s.size, free=pg.is_free(s.id), blocks=s.blocks, head=s.head,
                   where=where.get(s.id, ""), why=space_status(pg, s.id).why)
        if s.head is not None:
            g.add_edge(f"S{s.id}", f"S{s.head}", kind="head")
    for m in pg.members:
        g.add_node(f"p:{m.fqn}", kind="param")
        for sid in set(spaces_of(m.layout)):
            g.add_edge(f"p:{m.fqn}", f"S{sid}", axis=m.axis, role=m.role, layout=describe(m.layout))
    for b in pg.barriers:
        g.add_node(f"b:{b.node}", kind="barrier", op=b.op, reason=b.reason)
    return g


def _dot(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(pg: PermutationGraph) -> str:
    """Graphviz DOT: spaces as boxes (green free, grey fixed, with where and why), parameters
    as ellipses, barriers as octagons."""
    where = _where(pg)
    out = ["graph permutation_graph {", '  rankdir=LR; node [fontsize=10];']
    for s in pg.spaces:
        color = "palegreen" if pg.is_free(s.id) else "lightgrey"
        struct = "" if s.blocks is None else f"\\nblocks {s.blocks[0]}x{s.blocks[1]}"
        why = "" if pg.is_free(s.id) else "\\n" + _dot(space_status(pg, s.id).why[:60])
        out.append(f'  S{s.id} [shape=box, style=filled, fillcolor={color}, '
                   f'label="S{s.id} ({s.kind})\\nn={s.size}{struct}\\n{_dot(where.get(s.id, "")[:50])}{why}"];')
        if s.head is not None:
            out.append(f'  S{s.id} -- S{s.head} [style=dashed, label="heads"];')
    for fqn in dict.fromkeys(m.fqn for m in pg.members):
        out.append(f'  "{_dot(fqn)}" [shape=ellipse];')
    for m in pg.members:
        for sid in sorted(set(spaces_of(m.layout))):
            style = "solid" if m.role == "out" else "dotted"
            out.append(f'  "{_dot(m.fqn)}" -- S{sid} [style={style}, label="{m.axis}"];')
    for b in pg.barriers:
        out.append(f'  "barrier:{_dot(b.node)}" [shape=octagon, style=filled, fillcolor=salmon, '
                   f'label="{_dot(b.node)}\\n{_dot(b.op)}\\n{_dot(b.reason[:60])}"];')
    out.append("}")
    return "\n".join(out)
