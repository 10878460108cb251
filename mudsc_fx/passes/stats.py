"""Stage 3: activation statistics — per space, the Pearson correlation of the stacked
features of all N models, from float64 sums over one streaming pass (DESIGN.md,
"Statistics"). Spaces are processed in chunks when their accumulators exceed a memory budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from scipy.linalg.blas import dsyrk as _dsyrk
from torch import nn

from ..ir.graph import PermutationGraph, Tap
from ..ir.layout import Concat, Fixed, Kron, Layout, Plain, layout_size
from ..ir.trace import as_input_tuple, eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Statistics:
    """``corr[s]``: (N n, N n) float64 correlation of space s (model i's units are rows
    i*n:(i+1)*n); ``samples[s]``: how many feature vectors went in; ``dead[s]``: units with
    (near) zero variance, whose rows/columns are 0."""
    corr: dict[int, np.ndarray]
    samples: dict[int, int]
    dead: dict[int, np.ndarray]
    n_models: int


def default_input_fn(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, dict) and "input" in batch:
        return (batch["input"],)
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}: pass input_fn=")


def space_features(x: torch.Tensor, layout: Layout, size: Callable[[int], int]) -> list[tuple[int, torch.Tensor]]:
    """Split ``x`` [samples, size(layout)] into (space, [samples', n]) feature blocks."""
    if isinstance(layout, Plain):
        return [(layout.space, x)]
    if isinstance(layout, Fixed):
        return []
    if isinstance(layout, Concat):
        sizes = [layout_size(p, size) for p in layout.parts]
        return [f for piece, p in zip(torch.split(x, sizes, dim=1), layout.parts) for f in space_features(piece, p, size)]
    assert isinstance(layout, Kron)
    m = layout_size(layout.inner, size)
    y = x.reshape(x.shape[0], layout.outer, m, layout.inner_rep).permute(0, 1, 3, 2).reshape(-1, m)
    return space_features(y, layout.inner, size)


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
    return space_features(v.reshape(-1, v.shape[-1]), tap.layout, size)


def taps_by_space(pg: PermutationGraph) -> dict[int, list[Tap]]:
    """Per free space, the taps that read it: inputs of `in` members, else producer outputs."""
    from ..ir.layout import spaces_of
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
    return chosen


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


def _accumulator_bytes(n_models: int, n: int) -> int:
    return 8 * (n_models * n) ** 2


def collect_stats(models: Sequence[nn.Module], pg: PermutationGraph, data: Iterable, *,
                  input_fn: Optional[Callable[[Any], tuple]] = None, budget_bytes: int = 2 << 30,
                  spaces: Optional[Iterable[int]] = None, progress: bool = False) -> Statistics:
    """One streaming pass over ``data`` per chunk of spaces (one pass when the float64
    accumulators of all spaces fit in ``budget_bytes``; cost per space: 8 (N n)^2 bytes).

    >>> # stats = collect_stats([m0, m1], mf.infer(m0, x), loader)
    """
    input_fn = input_fn or default_input_fn
    N = len(models)
    taps = taps_by_space(pg)
    wanted = sorted(taps if spaces is None else set(spaces) & set(taps))
    chunks: list[list[int]] = [[]]
    used = 0
    for s in wanted:
        cost = _accumulator_bytes(N, pg.size(s))
        if chunks[-1] and used + cost > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(s)
        used += cost
    if len(chunks) > 1:
        log.info("activation statistics in %d passes (budget %.1f GiB)", len(chunks), budget_bytes / 2**30)
    corr, samples, dead = {}, {}, {}
    for chunk in chunks:
        c, n_s, d = _collect_chunk(models, pg, data, input_fn, chunk, taps, progress)
        corr.update(c)
        samples.update(n_s)
        dead.update(d)
    return Statistics(corr, samples, dead, N)


def mirror_lower_(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Copy the strict lower triangle of the square C-order array ``a`` onto its upper one, in
    place and by blocks (no m x m temporaries). The upper part must hold zeros (as BLAS syrk
    leaves it): the diagonal blocks add their transpose's strict lower part, exactly."""
    m = a.shape[0]
    for i in range(0, m, block):
        j = min(i + block, m)
        d = a[i:j, i:j]
        d += np.tril(d, -1).T
        if j < m:
            a[i:j, j:] = a[j:, i:j].T
    return a


class _Gram:
    """Float64 sums and sums of outer products of the rows of feature matrices.

    The N models' feature blocks of one tap are copied once into a float64 buffer
    [samples, N n + 1] whose last column is 1, and BLAS ``dsyrk`` adds the lower triangle of
    buffer^T buffer in place: one call gives the products (half the work of a full matmul),
    the column sums (last row) and the sample count (corner), with no temporaries."""

    def __init__(self):
        self.flat = torch.empty(0, dtype=torch.float64)

    def buffer(self, rows: int, cols: int) -> torch.Tensor:
        if self.flat.numel() < rows * cols:
            self.flat = torch.empty(rows * cols, dtype=torch.float64)
        buf = self.flat[:rows * cols].view(rows, cols)
        buf[:, -1] = 1.0
        return buf

    @staticmethod
    def accumulate(acc: np.ndarray, buf: torch.Tensor) -> None:
        # acc (C order) seen as acc.T is Fortran-ordered, as is buf.T: BLAS works in place
        out = _dsyrk(1.0, buf.numpy().T, beta=1.0, c=acc.T, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, acc):  # pragma: no cover - f2py copied after all
            acc[...] = out.T

    @staticmethod
    def correlation(acc: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(Pearson correlation, dead units) from the lower triangle filled above, computed in
        the accumulator's own memory (no (N n)^2 temporaries; the same arithmetic as
        ``cov = prods / n - outer(mean, mean)``, ``cov / outer(std, std)``, clamp)."""
        m = acc.shape[0] - 1
        B = 256
        mirror_lower_(acc)
        n = max(count, 1)
        mean = torch.from_numpy(acc[m, :m].copy()) / n
        cov = torch.from_numpy(acc)[:m, :m]
        cov.div_(n)
        for a in range(0, m, B):
            cov[a:a + B] -= torch.outer(mean[a:a + B], mean)
        var = cov.diagonal().clone()
        is_dead = var <= 1e-10 * max(var.abs().max().item(), 1e-30)
        std = var.clamp_min(1e-30).sqrt()
        for a in range(0, m, B):
            cov[a:a + B] /= torch.outer(std[a:a + B], std)
        cov[is_dead, :] = 0.0
        cov[:, is_dead] = 0.0
        cov.clamp_(-1.0, 1.0)
        flat = acc.reshape(-1)
        for i in range(1, m):  # make rows contiguous: row i moves from i (m + 1) to i m
            flat[i * m:(i + 1) * m] = flat[i * (m + 1):i * (m + 1) + m]
        return flat[:m * m].reshape(m, m), is_dead.numpy()


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


_GRAM_BUFFER_BYTES = 16 << 20  # rows of one dsyrk call: about this much float64 buffer ...
_GRAM_MIN_ROWS = 1024          # ... but never fewer rows (the update of acc must stay amortised)


def _collect_chunk(models, pg, data, input_fn, chunk, taps, progress):
    N = len(models)
    wanted = set(chunk)
    chunk_taps = list(dict.fromkeys(t for s in chunk for t in taps[s]))
    at_node: dict[str, list[Tap]] = {}
    for t in chunk_taps:
        at_node.setdefault(t.node, []).append(t)
    params = [dict(list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)))
              for m in models]
    gram = _Gram()
    acc = {s: np.zeros((N * pg.size(s) + 1, N * pg.size(s) + 1)) for s in chunk}
    count = {s: 0 for s in chunk}

    def add(s: int, blocks: list[torch.Tensor]) -> None:
        n = pg.size(s)
        cols = N * n + 1
        blocks = [f.unsqueeze(0) if f.dim() == 1 else f for f in blocks]
        per_item = blocks[0].numel() // max(n * blocks[0].shape[0], 1)
        rows_max = max(_GRAM_MIN_ROWS, _GRAM_BUFFER_BYTES // (8 * cols))
        step = max(1, rows_max // max(per_item, 1))
        for a in range(0, blocks[0].shape[0], step):
            parts = [f[a:a + step] for f in blocks]
            rows = parts[0].numel() // n
            buf = gram.buffer(rows, cols)
            for i, f in enumerate(parts):
                buf[:, i * n:(i + 1) * n].view(f.shape).copy_(f)
            gram.accumulate(acc[s], buf)
            count[s] += rows

    def on_tap(name: str, *values: torch.Tensor) -> None:
        for t in at_node[name]:
            per_model = [_tap_blocks(values[i], t, params[i], pg.size) for i in range(N)]
            for k in range(len(per_model[0])):
                s = per_model[0][k][0]
                if s in wanted:
                    add(s, [per_model[i][k][1] for i in range(N)])

    runner = lockstep_tap_module(pg.gm, models, list(at_node), on_tap)
    it = data
    if progress:
        from tqdm import tqdm
        it = tqdm(data, desc=f"statistics ({len(chunk)} spaces)", leave=False)
    n_batches = 0
    with torch.no_grad(), eval_mode(*models):
        for batch in it:
            n_batches += 1
            runner(*as_input_tuple(input_fn(batch)))
    del gram, runner
    if n_batches == 0:
        raise ValueError("the calibration data is empty")
    corr, dead = {}, {}
    for s in chunk:
        if not np.isfinite(acc[s]).all():
            nodes = sorted({t.node for t in taps[s]})
            raise ValueError(f"non-finite activations at {', '.join(nodes)} (space S{s}): check the models' "
                             "weights and the calibration data")
        corr[s], dead[s] = _Gram.correlation(acc[s], count[s])
        acc[s] = None
    return corr, count, dead
