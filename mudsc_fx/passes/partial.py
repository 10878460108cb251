"""Partial zipping: a merged trunk run once, then each model's own tail.

The traced graph is cut after a stop node (graph order is a topological order): the trunk
(every node up to the stop node) runs with the merged parameters; each model's tail (the
rest) runs with that model's own parameters. Every trunk value a tail reads (a *cut edge*,
residual streams included) is mapped from the merged basis into model i's basis with its
unmerge matrix, ``f_i = U_i z`` (a gather for permutations and zip clusters), along every
axis whose layout carries a matched space. Parameters read on both sides of the cut are used
merged in the trunk and as model i's own in tail i.

    find_cut(graph, stop_at) -> Cut
    build_partial(models, graph, alignment, merged, cut) -> PartialMerge (one nn.Module)
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir.graph import PermutationGraph, Structured
from ..ir.layout import spaces_of, transform_axis
from ..ir.values import TensorValue, value_of
from ..ir.inputs import graph_inputs


@dataclass(frozen=True)
class Cut:
    """``trunk``: names of the nodes run once with merged parameters (placeholders included);
    ``edges``: trunk values the tails read, in graph order; ``stop``: the last trunk node."""
    stop: str
    trunk: tuple[str, ...]
    edges: tuple[str, ...]


# ------------------------------------------------------------------------------ the cut
def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def node_flops(gm: fx.GraphModule, example: tuple) -> dict[str, int]:
    """FLOPs of every node of ``gm`` on ``example`` (torch's FLOP counter, one forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, int] = {}

    class Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            with FlopCounterMode(display=False) as fc:
                res = super().run_node(n)
            out[n.name] = int(fc.get_total_flops())
            return res

    with torch.no_grad():
        Counting(gm).run(*example)
    return out


def _edges(gm: fx.GraphModule, trunk: set[str]) -> list[str]:
    edges = []
    for n in gm.graph.nodes:
        if n.name in trunk and n.op != "get_attr" and any(u.name not in trunk for u in n.users):
            edges.append(n.name)
    return edges


def _clean(pg: PermutationGraph, edges: Sequence[str]) -> Optional[str]:
    """None when every cut edge can be unmerged, else the first edge that cannot (it cuts
    through attention heads, or is a container that a tail node reads whole)."""
    by_name = {n.name: n for n in pg.gm.graph.nodes}
    for e in edges:
        if pg.value_layout(e) is None and by_name[e].op != "placeholder" and _has_tensor(value_of(by_name[e])):
            return e
        for lay in pg.value_layout(e) or ():
            if isinstance(lay, Structured) and any(pg.is_free(s) for s in lay.spaces):
                return e
    return None


def _cut_after(pg: PermutationGraph, order: list[fx.Node], k: int) -> Cut:
    gm = pg.gm
    trunk = {n.name for n in gm.graph.nodes if n.op == "placeholder"} | {n.name for n in order[:k + 1]}
    for n in order[:k + 1]:  # a tuple crosses the cut as its items: unpack it in the trunk
        if not isinstance(value_of(n), TensorValue):
            trunk.update(u.name for u in n.users if u.op == "call_function" and u.target is operator.getitem)
    return Cut(order[k].name, tuple(n.name for n in gm.graph.nodes if n.name in trunk), tuple(_edges(gm, trunk)))


def trunk_params(pg: PermutationGraph, cut: Cut) -> set[str]:
    """Canonical names of the parameters and buffers that trunk nodes read."""
    canon = dict(pg.aliases)
    trunk = set(cut.trunk)
    read: set[str] = set()
    for n in pg.gm.graph.nodes:
        if n.name in trunk and n.op == "call_module":
            read.update(f for f in pg.params if f.startswith(n.target + "."))
            read.update(c for a, c in pg.aliases if a.startswith(n.target + "."))
        elif n.op == "get_attr" and any(u.name in trunk for u in n.users):
            read.add(canon.get(n.target, n.target))
    return read


def find_cut(pg: PermutationGraph, stop_at: Union[str, float], example: Optional[tuple] = None) -> Cut:
    """The cut after ``stop_at``: a node name, a module name (after the last node inside that
    module), or a fraction in (0, 1] of the model's FLOPs (the shortest trunk reaching it).
    A cut must not separate attention heads from their within-head axes: a fraction moves
    forward to the next clean cut; a named stop point that is not clean is an error."""
    order = _compute_nodes(pg.gm)
    names = [n.name for n in order]
    if isinstance(stop_at, bool) or not isinstance(stop_at, (str, int, float)):
        raise ValueError(f"stop_at must be a node name, a module name or a fraction of the FLOPs, got {stop_at!r}")
    if isinstance(stop_at, str):
        if stop_at in names:
            k = names.index(stop_at)
        else:
            inside = [i for i, n in enumerate(order) if n.op == "call_module" and
                      (n.target == stop_at or n.target.startswith(stop_at + "."))
                      or any(path == stop_at or path.startswith(stop_at + ".")
                             for path, _ in (n.meta.get("nn_module_stack") or {}).values())]
            if not inside:
                raise ValueError(f"stop_at={stop_at!r} names no node or module of the traced model; "
                                 f"modules are e.g. {', '.join(_top_modules(order)[:8])}")
            k = max(inside)
        cut = _cut_after(pg, order, k)
        bad = _clean(pg, cut.edges)
        if bad is not None:
            raise ValueError(f"stop_at={stop_at!r} cuts through attention heads at node {bad!r}: "
                             "choose the end of a block")
        return cut
    frac = float(stop_at)
    if not 0.0 < frac <= 1.0 or math.isnan(frac):
        raise ValueError(f"stop_at as a fraction of the FLOPs must be in (0, 1], got {stop_at!r}")
    if example is None:
        raise ValueError("stop_at as a fraction needs example inputs to count FLOPs")
    flops = node_flops(pg.gm, graph_inputs(pg.gm, example))
    total = sum(flops.values()) or 1
    acc, k = 0, len(order) - 1
    for i, n in enumerate(order):
        acc += flops.get(n.name, 0)
        if acc >= frac * total:
            k = i
            break
    while True:
        cut = _cut_after(pg, order, k)
        if _clean(pg, cut.edges) is None or k == len(order) - 1:
            return cut
        k += 1


def _has_tensor(v: Any) -> bool:
    if isinstance(v, TensorValue):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _top_modules(order: list[fx.Node]) -> list[str]:
    out: dict[str, None] = {}
    for n in order:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            out.setdefault(path)
    return list(out)


# ------------------------------------------------------------------------------ the module
def _subgraph(gm: fx.GraphModule, keep: set[str], inputs: Sequence[str], outputs: Optional[Sequence[str]]) -> fx.Graph:
    """A graph of ``gm``'s nodes in ``keep`` whose external inputs are placeholders named
    ``inputs``; it returns ``outputs`` (a tuple) or, when None, what ``gm`` returns."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in inputs:
        env[by_name[name]] = graph.placeholder(name)
    for n in gm.graph.nodes:
        if n in env or n.name not in keep:
            continue
        if n.op == "output":
            graph.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs is not None:
        graph.output(tuple(env[by_name[o]] for o in outputs))
    return graph


def _owners(graph: fx.Graph, root: nn.Module, fallback: nn.Module) -> dict[str, Any]:
    """Targets of the graph's modules and attributes: ``root``'s, else ``fallback``'s (tensor
    constants fx keeps on the traced GraphModule)."""
    out: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            for owner in (root, fallback):
                try:
                    obj = owner
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                    out[n.target] = obj
                    break
                except AttributeError:
                    continue
    return out


class Unmerge(nn.Module):
    """Maps the cut values from the merged basis into one model's basis: per value and axis,
    a gather per matched space through the axis layout (``f_i = U_i z``)."""

    def __init__(self, plans: list[list[tuple[int, Any]]], index: dict[int, torch.Tensor], sizes: dict[int, int]):
        super().__init__()
        self.plans = plans
        self.sizes = sizes
        for s, idx in index.items():
            self.register_buffer(f"index_{s}", idx, persistent=False)

    def _gather(self, s: int, t: torch.Tensor, axis: int) -> torch.Tensor:
        idx = getattr(self, f"index_{s}", None)
        return t if idx is None else t.index_select(axis, idx)

    def forward(self, values: tuple) -> tuple:
        out = []
        for v, plan in zip(values, self.plans):
            for axis, layout in plan:
                v = transform_axis(v, axis, layout, self._gather, self.sizes.__getitem__)
            out.append(v)
        return tuple(out)


COMBINE = ("sum_softmax", "mean_logits", "concat")


def combine_outputs(outs: Sequence[torch.Tensor], how: Union[str, Callable, None]) -> Any:
    if how is None:
        return tuple(outs)
    if callable(how):
        return how(outs)
    if how == "sum_softmax":
        return sum(torch.softmax(o, dim=-1) for o in outs)
    if how == "mean_logits":
        return sum(outs) / len(outs)
    return torch.cat(list(outs), dim=-1)


class PartialMerge(nn.Module):
    """One module: the merged trunk once, then each model's tail on its own view of the trunk's
    values. ``forward`` returns the N tails' outputs (a tuple), or ``combine`` of them."""

    def __init__(self, trunk: fx.GraphModule, unmerge: Sequence[Unmerge], tails: Sequence[fx.GraphModule],
                 cut: Cut, combine: Union[str, Callable, None] = None):
        super().__init__()
        self.trunk = trunk
        self.unmerge = nn.ModuleList(unmerge)
        self.tails = nn.ModuleList(tails)
        self.cut = cut
        self.combine = combine

    def forward(self, *args: Any) -> Any:
        cut = self.trunk(*args)
        outs = [tail(*um(cut)) for um, tail in zip(self.unmerge, self.tails)]
        return combine_outputs(outs, self.combine)


def _unmerge_index(U: np.ndarray) -> torch.Tensor:
    U = np.asarray(U)
    idx = U.argmax(axis=1)
    if not (np.count_nonzero(U) == U.shape[0] and (U[np.arange(U.shape[0]), idx] == 1.0).all()):
        raise ValueError("partial merging needs unmerge matrices that are assignments (permutations or zip "
                         "clusters)")
    return torch.as_tensor(idx, dtype=torch.long)


def build_partial(models: Sequence[nn.Module], pg: PermutationGraph, alignment, merged: nn.Module, cut: Cut,
                  combine: Union[str, Callable, None] = None) -> PartialMerge:
    """The partially merged module for ``cut`` (``merged``: the full rewrite, whose trunk
    parameters are used)."""
    if combine is not None and not callable(combine) and combine not in COMBINE:
        raise ValueError(f"combine must be None, a callable or one of {', '.join(COMBINE)}, got {combine!r}")
    gm = pg.gm
    trunk_names = set(cut.trunk)
    tail_names = {n.name for n in gm.graph.nodes if n.name not in trunk_names and n.op != "get_attr"}
    for n in gm.graph.nodes:  # a parameter is read merged in the trunk, as model i's own in tail i
        if n.op == "get_attr":
            if any(u.name in trunk_names for u in n.users):
                trunk_names.add(n.name)
            if any(u.name in tail_names for u in n.users):
                tail_names.add(n.name)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    trunk_graph = _subgraph(gm, trunk_names, placeholders, cut.edges)
    trunk = fx.GraphModule(_owners(trunk_graph, merged, gm), trunk_graph, "MergedTrunk")
    plans = []
    for e in cut.edges:
        layouts = pg.value_layout(e) or ()
        plans.append([(a, lay) for a, lay in enumerate(layouts)
                      if lay is not None and not isinstance(lay, Structured)
                      and any(s in alignment.U for s in spaces_of(lay))])
    spaces = {s for plan in plans for _, lay in plan for s in spaces_of(lay)}
    sizes = {s.id: s.size for s in pg.spaces}
    tails, unmerges = [], []
    tail_graph = _subgraph(gm, tail_names, cut.edges, None)
    for i, model in enumerate(models):
        own = copy.deepcopy(model)
        tails.append(fx.GraphModule(_owners(tail_graph, own, gm), copy.deepcopy(tail_graph), f"Tail{i}"))
        index = {s: _unmerge_index(alignment.U[s][i]) for s in spaces if s in alignment.U}
        unmerges.append(Unmerge(plans, index, sizes))
    return PartialMerge(trunk, unmerges, tails, cut, combine)


# ------------------------------------------------------------------------------ cost
def cost_report(pg: PermutationGraph, partial: PartialMerge, example: tuple) -> dict[str, float]:
    """Parameters and FLOPs of the result, relative to one model and to the ensemble."""
    def params(m: nn.Module) -> int:
        return sum(t.numel() for t in {id(p): p for p in m.parameters()}.values())

    n_models = len(partial.tails)
    example = graph_inputs(pg.gm, example)  # the graph's placeholders (keyword inputs flattened)
    f1 = sum(node_flops(pg.gm, example).values())
    with torch.no_grad():
        cut = partial.trunk(*example)
    fp = sum(node_flops(partial.trunk, example).values())
    for um, tail in zip(partial.unmerge, partial.tails):
        with torch.no_grad():
            fp += sum(node_flops(tail, um(cut)).values())
    p1, pp = params(pg.gm), params(partial)
    return {"flops": fp, "params": pp, "flops_vs_one": fp / max(f1, 1), "params_vs_one": pp / max(p1, 1),
            "flops_vs_ensemble": fp / max(n_models * f1, 1), "params_vs_ensemble": pp / max(n_models * p1, 1)}
