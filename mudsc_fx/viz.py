"""Pictures of the permutation graph (matplotlib + networkx; no graphviz binary needed)."""
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


def render_graph(pg: PermutationGraph, path: str | Path, title: str = "") -> Path:
    """Draw the space graph to ``path`` (.png, .svg, .pdf): green free, grey fixed,
    squares for head spaces; node area grows with the number of units."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx
    g = space_graph(pg)
    # space ids follow graph order: lay them out left to right, heads above their spaces,
    # and draw edges as arcs so that skip connections stay visible
    pos = {}
    for s in pg.spaces:
        pos[s.id] = (float(s.id), 1.0 if s.kind == "head" else 0.25 * ((s.id % 3) - 1))
    fig, ax = plt.subplots(figsize=(min(60, max(8, len(g) * 0.45)), 5))
    for kind, shape in (("unit", "o"), ("head", "s")):
        nodes = [n for n, d in g.nodes(data=True) if d["kind"] == kind]
        nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_shape=shape, ax=ax,
                               node_color=["#7ccf7c" if g.nodes[n]["free"] else "#c8c8c8" for n in nodes],
                               node_size=[80 + 4 * min(g.nodes[n]["size"], 300) for n in nodes])
    nx.draw_networkx_edges(g, pos, ax=ax, arrowsize=8, alpha=0.5, connectionstyle="arc3,rad=0.35")
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=7,
                            labels={n: f"S{n}\n{g.nodes[n]['size']}" for n in g.nodes})
    ax.set_title(title or f"permutation graph: {len(pg.free_spaces)}/{len(pg.spaces)} spaces free, "
                          f"coverage {pg.coverage():.2f}, {len(pg.barriers)} barriers")
    ax.axis("off")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
