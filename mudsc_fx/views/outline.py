"""The model-order outline of a permutation graph: what the picture and the page draw.

Spaces become *items* placed in the order of the traced graph (a space's position is its
first producer's node), each named by the modules that write, normalise and read it:

- ``space``: a hidden space local to one block (``layer2.0: conv1 -> bn1 -> conv2``);
- ``group``: a head space with the blocked spaces that share its block permutation
  (attention heads: q.k and v; GroupNorm groups; grouped convs);
- ``link``: a producer that writes a band without a local space of its own (a stem conv, a
  projection shortcut, a patch-merging layer);
- ``barrier``: a node the inference stopped at, with its reason;
- ``band``: a space that several producers write (a residual stream) or that items other than
  the next one read (feature reuse, fan-out): drawn as one band under the items that read
  and write it.

Items carry the *block* and *stage* they belong to (``layer2.0`` in ``layer2``,
``features.5.3`` in ``features.5``), found from the module paths alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch.fx as fx

from ..ir.graph import PermutationGraph
from ..ir.layout import spaces_of
from .names import assign_blocks, chain, common_prefix, module_classes, stack_path

@dataclass(frozen=True)
class Item:
    key: str
    kind: str                         # space | group | link | barrier | band
    spaces: tuple[int, ...]           # group: the head space first
    pos: int                          # node index in the traced graph
    modules: tuple[str, ...]          # module paths in data-flow order
    block: str = ""
    stage: str = ""
    reads: tuple[int, ...] = ()       # band spaces read
    writes: tuple[int, ...] = ()      # band spaces written
    feeds: tuple[int, ...] = ()       # local spaces of other items it feeds
    free: bool = True
    note: str = ""                    # barrier: op and reason
    copies: tuple[tuple[int, ...], ...] = ()   # folded: the spaces of every copy (this one first)
    blocks: tuple[str, ...] = ()               # folded: the block path of every copy

    @property
    def label(self) -> str:
        """The module chain relative to the item's block (``conv1 -> bn1 -> conv2``)."""
        return chain(self.modules, self.block)


@dataclass(frozen=True)
class Outline:
    pg: PermutationGraph = field(repr=False)
    items: tuple[Item, ...]
    bands: tuple[Item, ...]
    element: Mapping[int, str]        # space id -> key of the item or band that shows it

    def by_key(self) -> dict[str, Item]:
        return {it.key: it for it in self.items + self.bands}


# -- positions of nodes, modules and parameters ------------------------------------------------

@dataclass
class _Places:
    node: dict[str, int]
    node_module: dict[str, str]
    module: dict[str, int]
    param: dict[str, int]

    def of_param(self, fqn: str) -> int:
        if fqn in self.param:
            return self.param[fqn]
        mod = fqn.rpartition(".")[0]
        while mod:
            if mod in self.module:
                return self.module[mod]
            mod = mod.rpartition(".")[0]
        return 1 << 30


def _places(gm: fx.GraphModule) -> _Places:
    p = _Places({}, {}, {}, {})
    for i, n in enumerate(gm.graph.nodes):
        p.node[n.name] = i
        if n.op == "call_module":
            path = str(n.target)
        elif n.op == "get_attr":
            p.param.setdefault(str(n.target), i)
            path = stack_path(n) or str(n.target).rpartition(".")[0]
        else:
            path = stack_path(n)
        p.node_module[n.name] = path
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + 1):
            p.module.setdefault(".".join(parts[:k]), i)
    return p


def _depthwise_nodes(pg: PermutationGraph) -> set[str]:
    """Producer nodes that keep their input's space (depthwise convs): not writers of it."""
    out = set()
    for n in pg.gm.graph.nodes:
        if n.op != "call_module":
            continue
        try:
            m = pg.gm.get_submodule(str(n.target))
        except AttributeError:
            continue
        g = getattr(m, "groups", 1)
        if "Conv" in type(m).__name__ and g > 1 and g == getattr(m, "in_channels", 0) == getattr(m, "out_channels", 0):
            out.add(n.name)
    return out


# -- the outline -----------------------------------------------------------------------------

def outline(pg: PermutationGraph) -> Outline:
    places = _places(pg.gm)
    nspace = len(pg.spaces)
    writer_nodes: list[dict[str, int]] = [dict() for _ in range(nspace)]
    producer_modules: set[str] = set()
    producer_params: set[str] = set()
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    passthrough = _depthwise_nodes(pg)
    for node, layout in pg.producers:
        n = nodes.get(node)
        if node in passthrough:
            continue
        if n is not None and n.op == "call_module":
            producer_modules.add(str(n.target))
        elif n is not None:  # a function call: its weights are get_attr arguments
            producer_params.update(str(a.target) for a in n.all_input_nodes if a.op == "get_attr")
        for s in spaces_of(layout):
            writer_nodes[s].setdefault(node, places.node.get(node, 1 << 30))

    # parameter-level data flow: a weight reads its `in` spaces and writes its `out` spaces
    ins: dict[str, set[int]] = {}
    outs: dict[str, set[int]] = {}
    for m in pg.members:
        (ins if m.role == "in" else outs).setdefault(m.fqn, set()).update(spaces_of(m.layout))

    def module(fqn: str) -> str:
        return fqn.rpartition(".")[0]

    def is_producer(fqn: str) -> bool:
        if fqn in producer_params:
            return True
        mod = module(fqn)
        while mod:
            if mod in producer_modules:
                return True
            mod = mod.rpartition(".")[0]
        return False

    writers: list[list[str]] = [[] for _ in range(nspace)]   # producer params writing s
    readers: list[list[str]] = [[] for _ in range(nspace)]   # params reading s
    passers: list[list[str]] = [[] for _ in range(nspace)]   # other params with units of s
    for fqn in dict.fromkeys(m.fqn for m in pg.members):
        for s in outs.get(fqn, ()):
            (writers if is_producer(fqn) and (fqn in ins or writer_nodes[s]) else passers)[s].append(fqn)
        for s in ins.get(fqn, ()):
            readers[s].append(fqn)

    def pos_of(s: int) -> int:
        if writer_nodes[s]:
            return min(writer_nodes[s].values())
        ps = [places.of_param(m.fqn) for m in pg.spaces[s].members]
        ps += [places.node.get(t.node, 1 << 30) for t in pg.in_taps + pg.out_taps if s in set(spaces_of(t.layout))]
        return min(ps, default=(1 << 30) + s)

    def modules_of(s: int) -> list[str]:
        order = lambda f: places.of_param(f)  # noqa: E731
        mods = [module(f) for f in sorted(writers[s], key=order)]
        mods += [module(f) for f in sorted(passers[s], key=order)]
        mods += [module(f) for f in sorted(readers[s], key=order)]
        if not mods:  # e.g. a functional head on a tied weight: name it by its node
            mods = [places.node_module.get(n) or n for n in writer_nodes[s]]
        return list(dict.fromkeys(m for m in mods))

    ties = pg.ties()
    # spaces tied with others under one head (q.k and v of attention, grouped convs) stay in
    # their group; a GroupNorm-blocked residual stream is still a band
    grouped = {t for ts in ties.values() if len(ts) > 1 for t in ts}
    bands = {s.id for s in pg.spaces if s.kind == "unit" and s.id not in grouped and len(writer_nodes[s.id]) >= 2}
    pos = [pos_of(s) for s in range(nspace)]

    while True:
        items = _items(pg, places, bands, ties, pos, writers, readers, ins, outs, modules_of,
                       writer_nodes)
        owner = {}
        for k, it in enumerate(items):
            for s in it.spaces:
                owner[s] = k
        grow = set()
        for k, it in enumerate(items):
            if it.kind not in ("space", "group"):
                continue
            for s in it.spaces:
                if pg.spaces[s].kind != "unit" or s in grouped:
                    continue
                users = {owner[t] for f in readers[s] for t in outs.get(f, ()) if t in owner and owner[t] != k}
                if len(users) > 1 or (users and users != {k + 1}):
                    grow.add(s)
        if not grow:
            break
        bands |= grow

    bundle = _bundles(pg, bands, pos)
    band_items = []
    for rep in sorted(set(bundle.values()), key=lambda s: (pos[s], s)):
        parts = sorted((b for b in bands if bundle[b] == rep), key=lambda s: (pos[s], s))
        heads = tuple(h for h, ts in ties.items() if set(ts) & set(parts) and not any(t not in bands for t in ts))
        wmods = list(dict.fromkeys(module(f) for b in parts for f in sorted(writers[b], key=places.of_param)))
        rmods = list(dict.fromkeys(module(f) for b in parts for f in readers[b]))
        kind = "stream" if any(len(writer_nodes[b]) >= 2 for b in parts) else "shared features"
        if len(parts) > 1:
            kind += f" (concatenation of {len(parts)} spaces)"
        note = f"{kind}: written by {_few(wmods)}, read by {len(rmods)} layer{'s' * (len(rmods) != 1)}"
        band_items.append(Item(f"b{rep}", "band", tuple(parts) + heads, pos[rep],
                               tuple(dict.fromkeys(m for b in parts for m in modules_of(b))),
                               free=any(pg.is_free(b) for b in parts), note=note))
    items = [replace(it, reads=tuple(dict.fromkeys(bundle[b] for b in it.reads)),
                     writes=tuple(dict.fromkeys(bundle[b] for b in it.writes))) for it in items]
    classes = module_classes(pg.gm)
    items = assign_blocks(items, classes)
    band_items = assign_blocks(band_items, classes, blocks=False)
    element = {}
    for it in items + band_items:
        for s in it.spaces:
            element.setdefault(s, it.key)
    for s in range(nspace):  # anything not placed yet (should not happen) still gets an item
        if s not in element:
            it = Item(f"s{s}", "space", (s,), pos[s], tuple(modules_of(s)), free=pg.is_free(s))
            items.append(it)
            element[s] = it.key
    items.sort(key=lambda it: (it.pos, it.key))
    return Outline(pg, tuple(items), tuple(band_items), element)


def _bundles(pg: PermutationGraph, bands: set[int], pos: list[int]) -> dict[int, int]:
    """band -> the band that represents it: bands concatenated together (dense blocks,
    inception branches) are drawn as one."""
    from ..ir.layout import Concat, Kron
    parent = {b: b for b in bands}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    layouts = [m.layout for m in pg.members] + [t.layout for t in pg.in_taps + pg.out_taps]
    layouts += [lay for _, lay in pg.producers]
    for lay in layouts:
        while isinstance(lay, Kron):
            lay = lay.inner
        if not isinstance(lay, Concat):
            continue
        parts = [s for s in spaces_of(lay) if s in bands]
        for a, b in zip(parts, parts[1:]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb, key=lambda r: (pos[r], r))] = min(ra, rb, key=lambda r: (pos[r], r))
    return {b: find(b) for b in bands}


def _few(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names) or "nothing"
    return f"{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)})"


def _items(pg, places, bands, ties, pos, writers, readers, ins, outs, modules_of, writer_nodes):
    items: list[Item] = []
    placed: set[int] = set(bands)

    def flow(spaces):
        sp = set(spaces)
        src = {f for s in spaces for f in writers[s]}
        dst = {f for s in spaces for f in readers[s]}
        reads = sorted({t for f in src for t in ins.get(f, ()) if t in bands and t not in sp})
        writes = sorted({t for f in dst for t in outs.get(f, ()) if t in bands and t not in sp})
        feeds = sorted({t for f in dst for t in outs.get(f, ()) if t not in bands and t not in sp})
        return tuple(reads), tuple(writes), tuple(feeds)

    for h, tied in ties.items():
        local = [t for t in tied if t not in bands]
        if not local:
            continue
        spaces = (h, *local)
        mods = list(dict.fromkeys(m for s in spaces for m in modules_of(s)))
        r, w, f = flow(local)
        items.append(Item(f"g{h}", "group", spaces, min(pos[t] for t in local), tuple(mods),
                          reads=r, writes=w, feeds=f, free=pg.is_free(h) or any(pg.is_free(t) for t in local)))
        placed.update(spaces)
    for sp in pg.spaces:
        s = sp.id
        if s in placed or (sp.kind == "head" and any(t in bands for t in ties.get(s, ()))):
            continue
        r, w, f = flow((s,))
        items.append(Item(f"s{s}", "space", (s,), pos[s], tuple(modules_of(s)), reads=r, writes=w, feeds=f,
                          free=pg.is_free(s)))
        placed.add(s)
    # producers that only connect bands (stem convs, projection shortcuts, patch merging)
    local_readers = {f for s in range(len(pg.spaces)) if s not in bands for f in readers[s]}
    passthrough = _depthwise_nodes(pg)
    for node, layout in pg.producers:
        written = set(spaces_of(layout))
        if node in passthrough:
            continue
        if not written or not written <= bands:
            continue
        mod = places.node_module.get(node, node)
        params = [f for s in written for f in writers[s] if f.rpartition(".")[0] == mod
                  or f.rpartition(".")[0].startswith(mod + ".")]
        if any(f in local_readers for f in params):
            continue  # drawn as the last module of the local space it reads
        reads = tuple(sorted({t for f in params for t in ins.get(f, ()) if t in bands}))
        key = f"l{places.node.get(node, 0)}"
        if any(it.key == key for it in items):
            continue
        items.append(Item(key, "link", (), places.node.get(node, 1 << 30), (mod,), reads=reads,
                          writes=tuple(sorted(written)), free=any(pg.is_free(s) for s in written)))
    for b in pg.barriers:
        items.append(Item(f"x{places.node.get(b.node, 0)}_{b.node}", "barrier", (), places.node.get(b.node, 1 << 30),
                          (places.node_module.get(b.node, ""),), free=False, note=f"{b.node} ({b.op}): {b.reason}"))
    items.sort(key=lambda it: (it.pos, it.key))
    return items


def item_title(ol: Outline, it: Item) -> str:
    """A one-line name for an item in full module paths."""
    pg = ol.pg
    if it.kind == "barrier":
        return "barrier " + it.note
    if it.kind == "link":
        src = ", ".join(f"S{s}" for s in it.reads) or "(fixed)"
        return f"{it.modules[0]}: {src} -> " + ", ".join(f"S{s}" for s in it.writes)
    if it.kind == "group":
        return f"{common_prefix(it.modules) or chain(it.modules)} {group_word(pg, it)} x{pg.spaces[it.spaces[0]].size}"
    return chain(it.modules)


def group_word(pg: PermutationGraph, it: Item) -> str:
    """What the blocks of a group are: GroupNorm groups, conv groups, attention heads."""
    subs = []
    for mod in it.modules:
        try:
            subs.append(pg.gm.get_submodule(mod))
        except AttributeError:
            continue
    if any(type(m).__name__ == "GroupNorm" for m in subs):
        return "GroupNorm groups"
    if any("Conv" in type(m).__name__ and getattr(m, "groups", 1) > 1 for m in subs):
        return "conv groups"
    if len(it.spaces) > 2 or pg.spaces[it.spaces[0]].members:
        return "heads"
    return "blocks"
