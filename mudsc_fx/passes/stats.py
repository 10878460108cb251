"""Stage 3: activation statistics — per space, the Pearson correlation of the stacked
features of all N models, from one streaming pass over the calibration data.

Per-batch products run in float32 GEMMs (the model's dtype, at least float32), summed in
float64 around running means (:class:`mudsc_fx.numerics.MomentAccumulator`); the result is
float32. Spaces are processed in chunks when their accumulators exceed a memory budget.
Under ``torch.distributed`` each rank reads its own shard of the batches and the sums are
all-reduced (:mod:`mudsc_fx.distributed`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..ir.graph import PermutationGraph, Structured, Tap
from ..ir.layout import Plain, spaces_of, split_features
from ..ir.values import META_KEY, TensorValue
from ..ir.inputs import default_input_fn, eval_mode, graph_inputs
from ..numerics import MomentAccumulator, PackedSymmetric, Scratch, accumulator_bytes, mirror_lower_  # noqa: F401

log = logging.getLogger(__name__)

#: float64 accumulator memory of one pass over the data (vit_b_16: 2.3 GB, one pass); spaces
#: beyond it are collected in further passes
STATS_BUDGET_BYTES = 3 << 30


class Correlations(Mapping):
    """Space -> (N n, N n) float32 correlation, read-only. Kept as lower triangles (half the
    memory of the squares: vit_b_16's 12 MLP spaces of 6144^2 take 1.1 GB, not 2.2); reading
    a space builds its square, and the last one read is kept for the next read."""

    def __init__(self, packed: dict[int, PackedSymmetric]):
        self._packed = packed
        self._last: tuple = (None, None)

    def __getitem__(self, s: int) -> np.ndarray:
        if self._last[0] != s:
            square = self._packed[s].square()  # KeyError for a space without statistics
            square.flags.writeable = False     # one array serves every reader: copy to modify
            self._last = (s, square)
        return self._last[1]

    def __contains__(self, s) -> bool:
        return s in self._packed

    def rows(self, s: int, n: int) -> np.ndarray:
        """Rows ``[0, n)`` of space ``s``'s square (the anchor model's rows), without the square."""
        if self._last[0] == s:
            return self._last[1][:n]
        out = self._packed[s].rows(n)
        out.flags.writeable = False
        return out

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._packed.values())

    def __getstate__(self) -> dict:
        return {"_packed": self._packed, "_last": (None, None)}


@dataclass(frozen=True)
class Statistics:
    """``corr[s]``: (N n, N n) float32 correlation of space s (model i's units are rows
    i*n:(i+1)*n; read-only arrays, see :class:`Correlations`); ``samples[s]``: how many
    feature vectors went in (all ranks); ``dead[s]``: units with (near) zero variance
    (:func:`mudsc_fx.numerics.dead_units`), whose rows and columns are 0."""
    corr: Mapping[int, np.ndarray]
    samples: dict[int, int]
    dead: dict[int, np.ndarray]
    n_models: int


def _tapped(value: torch.Tensor, tap: Tap, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tapped axis moved last, through the tap's packed projection if it has one."""
    v = value.movedim(tap.axis, -1)
    if tap.proj is not None:
        wname, bname, start, stop, bstart = tap.proj
        w = params[wname][start:stop]
        b = None if bname is None else params[bname][bstart:bstart + (stop - start)]
        v = F.linear(v, w.to(v.dtype), None if b is None else b.to(v.dtype))
    return v


def tap_features(value: torch.Tensor, tap: Tap, params: dict[str, torch.Tensor], size) -> list[tuple[int, torch.Tensor]]:
    v = _tapped(value, tap, params)
    return split_features(v.reshape(-1, v.shape[-1]), tap.layout, size)


def taps_by_space(pg: PermutationGraph) -> dict[int, list[Tap]]:
    """Per free space, the taps that read it: inputs of `in` members, else producer outputs,
    else (a space that no rule tapped: units read only by an op without a tap, such as an
    einsum, or made inside a leaf module) the first activation in graph order that carries it
    (:func:`value_taps`). A free space no activation carries has no statistics."""
    free = set(pg.free_spaces)
    chosen: dict[int, list[Tap]] = {}
    for kind in (pg.in_taps, pg.out_taps):
        found: dict[int, list[Tap]] = {}
        for t in kind:
            for s in set(spaces_of(t.layout)):
                if s in free and s not in chosen:
                    found.setdefault(s, []).append(t)
        for s, ts in found.items():
            chosen[s] = list(dict.fromkeys(ts))
    missing = {s for s in free - set(chosen) if pg.spaces[s].kind == "unit"}  # a head's units are its blocks
    if missing:
        for s, t in value_taps(pg, missing).items():
            chosen[s] = [t]
    return chosen


def value_taps(pg: PermutationGraph, spaces: Iterable[int]) -> dict[int, Tap]:
    """For each of ``spaces``, a tap at the first floating activation (a value computed from
    the model's inputs, not a weight) whose layout on some axis mentions it."""
    want = set(spaces)
    active: set[str] = set()
    floating: set[str] = set()
    for node in pg.gm.graph.nodes:
        if node.op == "placeholder" or any(a.name in active for a in node.all_input_nodes):
            active.add(node.name)
        v = node.meta.get(META_KEY)  # (nodes added after tracing have none)
        if isinstance(v, TensorValue) and v.dtype.is_floating_point:
            floating.add(node.name)
    out: dict[int, Tap] = {}
    for name, axes in pg.values:
        if name not in active or name not in floating:
            continue
        for k, lay in enumerate(axes):
            if lay is None or isinstance(lay, Structured):
                continue
            for s in set(spaces_of(lay)) & want:
                out.setdefault(s, Tap(name, k, lay))
        if len(out) == len(want):
            break
    return out


def tap_module(gm: fx.GraphModule, root: nn.Module, node_names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule running ``gm``'s graph with ``root``'s parameters and returning the
    listed nodes' values (a dead-code-eliminated copy: work after the last tap is skipped)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    want = set(node_names)
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in gm.graph.nodes if n.name in want and n.op != "output"))
    gm = fx.GraphModule(_owners(gm, root, graph), graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def collect_stats(models: Sequence[nn.Module], pg: PermutationGraph, data: Iterable, *,
                  input_fn: Optional[Callable[[Any], tuple]] = None, budget_bytes: int = STATS_BUDGET_BYTES,
                  spaces: Optional[Iterable[int]] = None, progress: bool = False,
                  sharding: distributed.ShardingArg = distributed.AUTO) -> Statistics:
    """One streaming pass over ``data`` per chunk of spaces (one pass when the float64
    accumulators of all spaces fit in ``budget_bytes``; cost per space: about 4 (N n)^2
    bytes, :func:`mudsc_fx.numerics.accumulator_bytes`).

    ``sharding``: under ``torch.distributed`` (``"auto"``: when a process group is
    initialised) each rank reads its shard of ``data`` and every rank returns the
    statistics of all of it; ``None`` ignores the process group
    (:class:`mudsc_fx.distributed.Sharding`).

    >>> # stats = collect_stats([m0, m1], mf.infer(m0, x), loader)
    """
    input_fn = input_fn or default_input_fn
    sharding = distributed.resolve(sharding)
    N = len(models)
    taps = taps_by_space(pg)
    wanted = sorted(taps if spaces is None else set(spaces) & set(taps))
    chunks: list[list[int]] = [[]]
    used = 0
    for s in wanted:
        cost = accumulator_bytes(N * pg.size(s))
        if chunks[-1] and used + cost > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(s)
        used += cost
    if len(chunks) > 1:
        log.info("activation statistics in %d passes (budget %.1f GiB)", len(chunks), budget_bytes / 2**30)
    corr, samples, dead = {}, {}, {}
    for chunk in chunks:
        c, n_s, d = _collect_chunk(models, pg, data, input_fn, chunk, taps, progress, sharding)
        corr.update(c)
        samples.update(n_s)
        dead.update(d)
    return Statistics(Correlations(corr), samples, dead, N)


def _tap_blocks(value: torch.Tensor, tap: Tap, params: dict[str, torch.Tensor], size) -> list[tuple[int, torch.Tensor]]:
    """Like :func:`tap_features`, but a plain tap stays a view [..., n] (no reshape copy)."""
    if not isinstance(tap.layout, Plain):
        return tap_features(value, tap, params, size)
    return [(tap.layout.space, _tapped(value, tap, params))]


def _has(obj: Any, target: str) -> bool:
    try:
        _fetch(obj, target)
        return True
    except AttributeError:
        return False


def _owners(gm: fx.GraphModule, root: nn.Module, graph: fx.Graph) -> dict[str, Any]:
    """Targets of the graph's modules and attributes: ``root``'s own, else ``gm``'s (tensor
    constants that fx keeps on the GraphModule, never on the user's model)."""
    out: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                out[node.target] = _fetch(root, node.target)
            except AttributeError:
                out[node.target] = _fetch(gm, node.target)
    return out


def _fetch(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def lockstep_tap_module(gm: fx.GraphModule, models: Sequence[nn.Module], node_names: Sequence[str],
                        on_tap: Callable[..., None]) -> fx.GraphModule:
    """One GraphModule running ``gm``'s graph for all ``models`` node by node on the same
    inputs, calling ``on_tap(name, value_0, ..., value_{N-1})`` as soon as the N values of a
    listed node exist. Every value is freed after its last use (fx's code generation), so only
    the live activations of one forward per model are held, not every tap of the batch."""
    single = tap_module(gm, models[0], node_names)  # dead code after the last tap removed
    root = nn.Module()
    for i, m in enumerate(models):
        root.add_module(f"m{i}", m)
    graph = fx.Graph()
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in models]
    want = set(node_names)
    constants: dict[str, Any] = {}
    for node in single.graph.nodes:
        if node.op == "output":
            break
        if node.op == "placeholder":
            new = graph.node_copy(node, lambda n: envs[0][n])
            for env in envs:
                env[node] = new
            continue
        if node.op == "get_attr" and not _has(models[0], node.target):  # a constant: shared
            name = f"const_{len(constants)}"
            constants[name] = _fetch(single, node.target)
            setattr(root, name, constants[name])
            new = graph.get_attr(name)
            for env in envs:
                env[node] = new
            continue
        for i, env in enumerate(envs):
            new = graph.node_copy(node, lambda n, _env=env: _env[n])
            if node.op in ("call_module", "get_attr"):
                new.target = f"m{i}.{node.target}"
            env[node] = new
        if node.name in want:
            graph.call_function(on_tap, (node.name,) + tuple(env[node] for env in envs))
    graph.output(None)
    return fx.GraphModule(root, graph)


def _sources(taps: Sequence[Tap], params: list[dict], N: int, device, scratch) -> dict[tuple, MomentAccumulator]:
    """Accumulators of the tapped values (per node and axis) that packed projections read:
    the moments of ``x W^T + b`` follow from those of ``x`` (mean ``W mu + b``, M2
    ``W M2 W^T``), so q, k and v of a leaf attention cost one product of ``x`` instead of a
    projection and a product each; plain taps of the same value share it."""
    out: dict[tuple, MomentAccumulator] = {}
    for t in taps:
        if t.proj is not None and isinstance(t.layout, Plain) and (t.node, t.axis) not in out:
            out[(t.node, t.axis)] = MomentAccumulator(N * params[0][t.proj[0]].shape[1], device, scratch)
    return out


def _derive_from_sources(sources: dict, taps: Sequence[Tap], params: list[dict], acc: dict) -> None:
    """Join the moments of every tap served by a source into its space's accumulator."""
    for t in taps:
        src = sources.get((t.node, t.axis)) if isinstance(t.layout, Plain) else None
        if src is None or src.count == 0 or t.layout.space not in acc:
            continue
        m2 = src.full_m2()
        if t.proj is None:
            acc[t.layout.space].add_moments(src.count, src.mean, m2)
            continue
        wname, bname, start, stop, bstart = t.proj
        W = [p[wname][start:stop].detach().to(m2) for p in params]
        d = W[0].shape[1]
        mean = torch.cat([
            W[i] @ src.mean[i * d:(i + 1) * d]
            + (0.0 if bname is None else params[i][bname][bstart:bstart + stop - start].detach().to(m2))
            for i in range(len(W))])
        k = stop - start
        out = torch.empty(len(W) * k, len(W) * k, dtype=m2.dtype, device=m2.device)
        for i in range(len(W)):
            for j in range(i + 1):
                blk = W[i] @ m2[i * d:(i + 1) * d, j * d:(j + 1) * d] @ W[j].T
                out[i * k:(i + 1) * k, j * k:(j + 1) * k] = blk
                out[j * k:(j + 1) * k, i * k:(i + 1) * k] = blk.T
        del m2
        acc[t.layout.space].add_moments(src.count, mean, out)


def _collect_chunk(models, pg, data, input_fn, chunk, taps, progress, sharding):
    N = len(models)
    wanted = set(chunk)
    chunk_taps = list(dict.fromkeys(t for s in chunk for t in taps[s]))
    at_node: dict[str, list[Tap]] = {}
    for t in chunk_taps:
        at_node.setdefault(t.node, []).append(t)
    params = [dict(list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)))
              for m in models]
    device = next((t.device for t in params[0].values()), torch.device("cpu"))
    scratch = Scratch()
    acc = {s: MomentAccumulator(N * pg.size(s), device, scratch) for s in chunk}
    sources = _sources(chunk_taps, params, N, device, scratch)

    def on_tap(name: str, *values: torch.Tensor) -> None:
        added = set()
        for t in at_node[name]:
            src = sources.get((t.node, t.axis)) if isinstance(t.layout, Plain) else None
            if src is not None:  # moments of the tapped value itself; taps derived after the pass
                if t.axis not in added:
                    src.add([v.movedim(t.axis, -1) for v in values])
                    added.add(t.axis)
                continue
            per_model = [_tap_blocks(values[i], t, params[i], pg.size) for i in range(N)]
            for k in range(len(per_model[0])):
                s = per_model[0][k][0]
                if s in wanted:
                    acc[s].add([per_model[i][k][1] for i in range(N)])

    runner = lockstep_tap_module(pg.gm, models, list(at_node), on_tap)
    it = distributed.shard(data, sharding)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"statistics ({len(chunk)} spaces)", leave=False)
    n_batches = 0
    with distributed.together(sharding, "the statistics pass"), torch.no_grad(), eval_mode(*models):
        for batch in it:
            n_batches += 1
            runner(*graph_inputs(pg.gm, input_fn(batch)))
    del scratch, runner
    _derive_from_sources(sources, chunk_taps, params, acc)
    n_batches = distributed.all_reduce_moments(acc, n_batches, sharding)
    if n_batches == 0:
        raise ValueError("the calibration data is empty")
    corr, dead, count = {}, {}, {}
    for s in chunk:
        if not acc[s].finite():
            nodes = sorted({t.node for t in taps[s]})
            raise ValueError(f"non-finite activations at {', '.join(nodes)} (space S{s}): check the models' "
                             "weights and the calibration data")
        corr[s], dead[s] = acc[s].correlation_packed()
        count[s] = acc[s].count
        acc[s] = None
    return corr, count, dead
