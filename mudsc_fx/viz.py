"""Pictures of the permutation graph (kept for callers of the first API; the views live in
:mod:`mudsc_fx.views`)."""
from __future__ import annotations

from pathlib import Path

from .ir.graph import PermutationGraph
from .ir.layout import spaces_of


def space_graph(pg: PermutationGraph):
    """Spaces as nodes; an edge a -> b when one parameter consumes a (`in`) and produces b
    (`out`), i.e. the data flow between permutation spaces; heads link to their spaces."""
    import networkx as nx
    g = nx.DiGraph()
    for s in pg.spaces:
        g.add_node(s.id, size=s.size, free=pg.is_free(s.id), kind=s.kind, blocks=s.blocks)
    by_fqn: dict[str, list] = {}
    for m in pg.members:
        by_fqn.setdefault(m.fqn, []).append(m)
    for fqn, ms in by_fqn.items():
        ins = {s for m in ms if m.role == "in" for s in spaces_of(m.layout)}
        outs = {s for m in ms if m.role == "out" for s in spaces_of(m.layout)}
        for a in ins:
            for b in outs:
                if a != b:
                    g.add_edge(a, b, param=fqn)
    for s in pg.spaces:
        if s.head is not None:
            g.add_edge(s.head, s.id, param="heads")
    return g


def render_graph(pg, path: str | Path, title: str = "", fold: str = "auto") -> Path:
    """Draw the permutation graph (or a merge result) to ``path`` (.png, .svg, .pdf): spaces
    in model order under their module paths, residual streams as bands, heads and groups as
    blocks, fixed spaces and barriers with their reasons (see :func:`mudsc_fx.views.render`)."""
    from .views.picture import render
    return render(pg, path, title=title, fold=fold)
