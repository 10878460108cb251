"""Weight-space features per space (MuDSC's Z, Git Re-Basin's cost).

For space s and model i: every learned member tensor touching s (weights, biases, norm affine
parameters), with its other governed axes moved into the common basis by the current
alignment of their spaces, unfolded to [n_units, rest] and concatenated along ``rest``.
Norm running statistics and counters are left out (they are merged like every other tensor,
but say nothing about what a unit computes: in a BatchNorm network they made up 32-98 % of
the squared norm of Z and pushed the weight correlation towards a constant).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..ir.graph import Member, PermutationGraph
from ..ir.layout import spaces_of, split_features, transform_axis
from ..numerics import pearson_rows_
from .apply import SpaceOp, _expand_grouped


class FeatureCache:
    """Reuse of :func:`unit_weight_features` work across the calls of one solve.

    Keeps, per (model, space, tensor), the feature blocks of that tensor together with the
    versions of the spaces whose operations transformed it (``version(space)`` must change
    whenever the matching of that space changes). MuDSC sweeps rematch one unit at a time, so
    most of a space's member tensors were transformed by neighbours that did not change; those
    blocks are reused (the same tensors, so the features are bit-identical). Spaces read by
    reused blocks are added to ``read`` when it is a set. At most ``max_bytes`` are kept.
    """

    def __init__(self, version: Callable[[int], int], max_bytes: int = 1 << 30):
        self.version, self.max_bytes, self.bytes = version, max_bytes, 0
        self.read: Optional[set] = None
        self._store: dict[tuple, tuple] = {}
        self._plans: dict[int, list] = {}

    def plan(self, pg: PermutationGraph, s: int) -> list:
        p = self._plans.get(s)
        if p is None:
            p = self._plans[s] = _plan(pg, s)
        return p

    def get(self, key: tuple) -> Optional[list]:
        ent = self._store.get(key)
        if ent is None or any(self.version(d) != v for d, v in ent[0]):
            return None
        if self.read is not None:
            self.read.update(d for d, _ in ent[0])
        return ent[1]

    def put(self, key: tuple, read: set, blocks: list) -> None:
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        size = sum(b.numel() * b.element_size() for b in blocks)
        if self.bytes + size <= self.max_bytes:
            self._store[key] = (tuple((d, self.version(d)) for d in sorted(read)), blocks, size)
            self.bytes += size


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def running_statistics(pg: PermutationGraph) -> frozenset[str]:
    """Tensors of ``pg`` that norm layers estimate from data rather than learn: the running
    statistics and counters of BatchNorm / InstanceNorm modules (and, for functional norms,
    tensors named like them)."""
    out = set()
    for name, mod in pg.gm.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            out.update(f"{name}.{b}" if name else b for b in _RUNNING if getattr(mod, b, None) is not None)
    out.update(f for f in pg.params if f.rsplit(".", 1)[-1] in _RUNNING)
    return frozenset(out)


def _plan(pg: PermutationGraph, s: int) -> list:
    """(fqn, members sorted by axis, groups of a grouped member or 0, anchor member) per
    learned tensor touching space ``s``, in member order (running statistics left out)."""
    by_fqn: dict[str, list[Member]] = {}
    for m in pg.members:
        by_fqn.setdefault(m.fqn, []).append(m)
    skip = running_statistics(pg)
    out = []
    for fqn in dict.fromkeys(m.fqn for m in pg.spaces[s].members if m.fqn not in skip):
        members = sorted(by_fqn[fqn], key=lambda m: m.axis)
        grouped = [m for m in members if m.groups > 1]
        anchor = next(m for m in members if s in set(spaces_of(m.layout)))
        out.append((fqn, members, grouped[0].groups if grouped else 0, anchor))
    return out


def _member_blocks(pg: PermutationGraph, t: torch.Tensor, s: int, members, groups: int, anchor: Member,
                   op: SpaceOp, normalize: bool) -> list[torch.Tensor]:
    t = t.detach()
    if groups:
        t = _expand_grouped(t, groups)
    for m in members:
        if m is not anchor:
            t = transform_axis(t, m.axis, m.layout, lambda sp, x, ax, _r=m.role: op(sp, x, ax, _r), pg.size)
    x = t.movedim(anchor.axis, -1)
    x = x.reshape(-1, x.shape[-1])
    blocks = []
    for sp, feats in split_features(x, anchor.layout, pg.size):
        if sp == s:
            f = feats.T  # [n, samples]
            if normalize:
                f = f / f.norm().clamp_min(1e-12)
            blocks.append(f)
    return blocks


def unit_weight_features(pg: PermutationGraph, tensors: Mapping[str, torch.Tensor], s: int, op: SpaceOp,
                         normalize: bool = False, cache: Optional[FeatureCache] = None,
                         model: int = 0) -> torch.Tensor:
    """[n_units of s, D] features of space ``s`` for one model (in the tensors' dtype).
    With ``cache``, ``model`` names the model whose ``tensors`` and ``op`` these are."""
    blocks = []
    plan = cache.plan(pg, s) if cache is not None else _plan(pg, s)
    for fqn, members, groups, anchor in plan:
        if cache is None:
            blocks.extend(_member_blocks(pg, tensors[fqn], s, members, groups, anchor, op, normalize))
            continue
        key = (model, s, fqn, normalize)
        got = cache.get(key)
        if got is None:
            read: set = set()

            def recording(sp, x, ax, role, _read=read):
                _read.add(sp)
                return op(sp, x, ax, role)
            got = _member_blocks(pg, tensors[fqn], s, members, groups, anchor, recording, normalize)
            cache.put(key, read, got)
        blocks.extend(got)
    return torch.cat(blocks, dim=1) if blocks else torch.zeros(pg.size(s), 0)


def pearson_rows(Z: torch.Tensor) -> np.ndarray:
    """Correlation between the rows of Z (float64 result); constant rows give 0 (no NaN)."""
    return pearson_rows_(Z.clone())[0]


def weight_similarity(pg: PermutationGraph, tensors: list[Mapping[str, torch.Tensor]], s: int,
                      ops: list[SpaceOp], kind: str = "pearson", normalize: bool = False,
                      cache: Optional[FeatureCache] = None) -> np.ndarray:
    """(N n, N n) similarity of space ``s``: Pearson correlation of the stacked per-unit weight
    features (MuDSC), or raw inner products (``kind="inner"``, Git Re-Basin's cost)."""
    Z = torch.cat([unit_weight_features(pg, t, s, op, normalize, cache, i)
                   for i, (t, op) in enumerate(zip(tensors, ops))], dim=0)
    if kind == "inner":
        return (Z.double() @ Z.double().T).numpy()
    return pearson_rows_(Z)[0]  # Z is our own concatenation
