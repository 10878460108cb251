"""Transform parameters through the permutation graph.

:func:`transform_params` is the one place where per-space operations meet parameter
tensors; permuting a model (``apply_permutations``) and merging models (``rewrite``) are
both thin callers of it. :class:`AlignmentOps` turns a matching (permutations or zip
clusters, :mod:`.alignment`) into those per-space operations: gathers and segment sums, never
a product with a dense n x n matrix.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..ir.graph import Member, PermutationGraph
from ..ir.layout import transform_axis
from .alignment import SpaceMatching

# space_op(space id, tensor, axis, role) -> tensor with that axis transformed
SpaceOp = Callable[[int, torch.Tensor, int, str], torch.Tensor]


class AlignmentOps:
    """Per-model space operations for a matching: a gather for a permutation, a segment sum
    (``index_add``) for zip clusters: the product with M_i or U_i^T without the zeros.
    ``op(i)`` is the SpaceOp of model i for merging, ``feature_op(i)`` for weight features."""

    def __init__(self, n_models: int, dtype: torch.dtype = torch.float64):
        self.N, self.dtype = n_models, dtype
        self.perm: list[dict[int, torch.Tensor]] = [{} for _ in range(n_models)]
        self.cluster: list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = [{} for _ in range(n_models)]

    def set_matching(self, s: int, m: SpaceMatching) -> None:
        """Space s merged by ``m``: model i by a gather when its units are a permutation with
        plain 1/N weights, else by a weighted segment sum."""
        self.remove(s)
        for i in range(self.N):
            if m.perms is not None and (m.weights[i] == 1.0 / self.N).all():
                self.perm[i][s] = torch.as_tensor(m.perms[i], dtype=torch.long)
            else:
                self.cluster[i][s] = (torch.as_tensor(m.labels[i], dtype=torch.long),
                                      torch.as_tensor(m.weights[i], dtype=self.dtype), m.size)

    def set_perms(self, s: int, perms) -> None:
        """Permutation matching of space s (M_i = P_i / N, U_i = P_i^T)."""
        self.remove(s)
        for i in range(self.N):
            self.perm[i][s] = torch.as_tensor(np.asarray(perms[i]), dtype=torch.long)

    def set_labels(self, s: int, labels) -> None:
        """Zip matching of space s from the cluster labels of the N n stacked units (target n)."""
        labels = np.asarray(labels)
        self.set_matching(s, SpaceMatching.from_labels(labels, self.N, labels.size // self.N))

    def remove(self, s: int) -> None:
        for i in range(self.N):
            self.perm[i].pop(s, None)
            self.cluster[i].pop(s, None)

    def feature_op(self, i: int) -> "SpaceOp":
        """Model i's space operations for weight features (MuDSC's Z, Git Re-Basin's cost):
        a neighbour's `in` axis by N M_i, its `out` axis by U_i^T, as the reference MuDSC code
        projects them. For a permutation both are the plain permutation (no 1/N); for a zip
        cluster an `in` axis gets N / size times the sum of model i's members, an `out` axis
        their sum."""
        perm, cluster, N = self.perm[i], self.cluster[i], self.N

        def apply(s: int, t: torch.Tensor, axis: int, role: str) -> torch.Tensor:
            idx = perm.get(s)
            if idx is not None:
                return t.index_select(axis, idx)
            cl = cluster.get(s)
            if cl is None:
                return t
            labels, weights, k = cl
            if role == "in":
                t = t * _along(N * weights, t, axis)
            return _segment_sum(t, axis, labels, k)
        return apply

    def op(self, i: int) -> "SpaceOp":
        """Model i's space operations for merging: `out` axes by M_i, `in` axes by U_i^T."""
        perm, cluster, N = self.perm[i], self.cluster[i], self.N

        def apply(s: int, t: torch.Tensor, axis: int, role: str) -> torch.Tensor:
            idx = perm.get(s)
            if idx is not None:
                out = t.index_select(axis, idx)
                return out / N if role == "out" else out
            cl = cluster.get(s)
            if cl is None:
                return t
            labels, weights, k = cl
            if role == "out":  # M t: weighted sum of each cluster's units
                t = t * _along(weights, t, axis)
            return _segment_sum(t, axis, labels, k)  # role "in": U^T t
        return apply


def _along(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[axis] = -1
    return v.to(t.dtype).view(shape)


def _segment_sum(t: torch.Tensor, axis: int, labels: torch.Tensor, k: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = k
    return t.new_zeros(shape).index_add_(axis, labels, t)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def _expand_grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[A, a, ...] holding g diagonal blocks -> dense [A, a*g, ...] (zeros off the blocks)."""
    A, a = t.shape[0], t.shape[1]
    per = A // groups
    dense = t.new_zeros((A, a * groups) + tuple(t.shape[2:]))
    for h in range(groups):
        dense[h * per:(h + 1) * per, h * a:(h + 1) * a] = t[h * per:(h + 1) * per]
    return dense


def compress_grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense [A, a*g, ...] -> its g diagonal blocks stacked as [A, a, ...] (the inverse of
    :func:`_expand_grouped`)."""
    A, a = dense.shape[0], dense.shape[1] // groups
    per = A // groups
    return torch.cat([dense[h * per:(h + 1) * per, h * a:(h + 1) * a] for h in range(groups)], dim=0)


def transform_tensor(t: torch.Tensor, members: tuple[Member, ...], op: SpaceOp,
                     space_size: Callable[[int], int]) -> torch.Tensor:
    grouped = [m for m in members if m.groups > 1]
    if grouped:
        if len(grouped) > 1 or grouped[0].axis != 1:
            raise ValueError(f"unsupported grouped layout on {grouped[0].fqn}")
        t = _expand_grouped(t, grouped[0].groups)
    for m in members:
        t = transform_axis(t, m.axis, m.layout, lambda s, x, ax, _r=m.role: op(s, x, ax, _r), space_size)
    if grouped:
        t = compress_grouped(t, grouped[0].groups)
    return t


def transform_params(pg: PermutationGraph, tensors: Mapping[str, torch.Tensor], op: SpaceOp) -> dict[str, torch.Tensor]:
    """New tensors for every parameter/buffer with members (others are not returned)."""
    return {fqn: transform_tensor(tensors[fqn], members, op, pg.size) for fqn, members in members_by_fqn(pg).items()}


def members_by_fqn(pg: PermutationGraph) -> dict[str, tuple[Member, ...]]:
    by_fqn: dict[str, list[Member]] = {}
    for m in pg.members:
        by_fqn.setdefault(m.fqn, []).append(m)
    return {fqn: tuple(sorted(ms, key=lambda m: m.axis)) for fqn, ms in by_fqn.items()}


def load_tensors(model: nn.Module, new: Mapping[str, torch.Tensor]) -> None:
    """Write tensors into ``model`` in place (shapes may change, e.g. after a zip merge)."""
    own = named_tensors(model)
    with torch.no_grad():
        for fqn, t in new.items():
            tgt = own[fqn]
            if tgt.shape == t.shape:
                tgt.copy_(t.to(tgt.dtype))
            else:
                tgt.data = t.to(tgt.dtype).clone()


def permutation_op(perms: Mapping[int, np.ndarray]) -> SpaceOp:
    """perm[new index] = old index, per space; spaces without an entry stay put."""
    cache = {s: torch.as_tensor(np.asarray(p), dtype=torch.long) for s, p in perms.items()}

    def op(s: int, t: torch.Tensor, axis: int, role: str) -> torch.Tensor:
        idx = cache.get(s)
        return t if idx is None else t.index_select(axis, idx.to(t.device))
    return op


def apply_permutations(model: nn.Module, pg: PermutationGraph, perms: Mapping[int, np.ndarray]) -> nn.Module:
    """A permuted copy of ``model`` (the input is not modified)."""
    out = copy.deepcopy(model)
    permute_in_place(out, pg, perms)
    return out


def permute_in_place(model: nn.Module, pg: PermutationGraph, perms: Mapping[int, np.ndarray]) -> None:
    """Permute ``model``'s own tensors (only for a model the caller owns, e.g. a proof copy);
    ``inverse_permutations(perms)`` undoes it exactly."""
    tensors, op = named_tensors(model), permutation_op(perms)
    with torch.no_grad():
        for fqn, members in members_by_fqn(pg).items():
            _permute_in_place(tensors[fqn], members, op, pg.size)


def inverse_permutations(perms: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {s: np.argsort(np.asarray(p)) for s, p in perms.items()}


_SLICE_BYTES = 64 << 20


def _permute_in_place(t: torch.Tensor, members: tuple[Member, ...], op: SpaceOp,
                      space_size: Callable[[int], int]) -> None:
    """Permute ``t`` axis by axis through slices of at most ~64 MB along another axis: a
    permuted copy of a model then costs one model, not one model plus a few copies of its
    largest tensor (VGG's first classifier layer is 0.8 GB in float64). A grouped weight is
    expanded to its dense block-diagonal form to be transformed; a big one (with kernel axes
    no member touches) goes one kernel position at a time: regnet_y_32gf's [3712, 232, 3, 3]
    with 16 groups is 1 GB dense in float64, and its proof peaked at 4.2 GB, now 2.6 GB."""
    groups = max(m.groups for m in members)
    small = t.numel() * t.element_size() * groups <= _SLICE_BYTES   # dense size when grouped
    if groups > 1:
        if small or t.dim() <= 2 or not t.is_contiguous() or any(m.axis > 1 for m in members):
            t.copy_(transform_tensor(t, members, op, space_size))
            return
        flat = t.view(t.shape[0], t.shape[1], -1)
        for k in range(flat.shape[2]):
            part = flat[:, :, k]
            part.copy_(transform_tensor(part, members, op, space_size))
        return
    if t.dim() < 2 or small:
        t.copy_(transform_tensor(t, members, op, space_size))
        return
    for m in members:
        other = max((d for d in range(t.dim()) if d != m.axis), key=lambda d: t.shape[d])
        step = max(1, t.shape[other] * _SLICE_BYTES // (t.numel() * t.element_size()))
        for start in range(0, t.shape[other], step):
            part = t.narrow(other, start, min(step, t.shape[other] - start))
            part.copy_(transform_axis(part, m.axis, m.layout, lambda s, x, ax, _r=m.role: op(s, x, ax, _r),
                                      space_size))


def _non_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of n >= 2 items that moves something (an identity draw would let a
    wrong symmetry pass a check unnoticed: for n = 2 that is every other draw)."""
    p = rng.permutation(n)
    if n >= 2 and (p == np.arange(n)).all():
        i, j = rng.choice(n, size=2, replace=False)
        p[[i, j]] = p[[j, i]]
    return p


def random_permutations(pg: PermutationGraph, rng: np.random.Generator,
                        spaces: Optional[Iterable[int]] = None) -> dict[int, np.ndarray]:
    """A random valid permutation of every free space (of ``spaces`` only, when given),
    respecting blocks and ties; every drawn permutation moves something."""
    allowed = None if spaces is None else set(spaces)
    perms: dict[int, np.ndarray] = {}
    for s in pg.spaces:
        if s.kind == "head" and pg.is_free(s.id) and s.size > 1 and (allowed is None or s.id in allowed):
            perms[s.id] = _non_identity(rng, s.size)
    for s in pg.spaces:
        if s.kind == "head" or not pg.is_free(s.id) or s.size <= 1:
            continue
        if allowed is not None and s.id not in allowed:
            continue
        if s.blocks is None:
            perms[s.id] = _non_identity(rng, s.size)
            continue
        G, g = s.blocks
        sigma = perms.get(s.head, np.arange(G))
        within = [np.arange(g) if s.within != "free" else rng.permutation(g) for _ in range(G)]
        perm = np.concatenate([sigma[b] * g + within[b] for b in range(G)])
        if s.within == "free" and g > 1 and s.head not in perms and (perm == np.arange(G * g)).all():
            perm[:g] = _non_identity(rng, g)
        perms[s.id] = perm
    return perms
