"""Stage 4: match units across models, per space (docs/algorithms.md, "Matching").

``solve`` turns similarities into an :class:`Alignment`: per space and model a merge matrix
M_i and an unmerge matrix U_i. Plain spaces are matched alone; blocked spaces that share a
head permutation (q/k and v of one attention layer, a GroupNorm space) are matched together
by group alignment. MuDSC's iteration (Algorithm 1) and Git Re-Basin's coordinate descent
are the same loop with different similarities and patience.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..ir.graph import PermutationGraph
from ..solvers import match, zipit
from .apply import SpaceOp, named_tensors
from .stats import Statistics
from .weights import FeatureCache, weight_similarity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchConfig:
    """How to match. ``match``: None (plain average), "align" or "zip". ``alpha`` weighs the
    weight similarity: C = alpha C_W + (1 - alpha) C_A. ``iterate``: MuDSC / Re-Basin sweeps."""
    match: Optional[str] = "zip"
    alpha: float = 0.5
    iterate: bool = True
    zip_a: float = 0.5
    zip_b: float = 1.0
    zip_b_blocked: float = 0.0            # self-merge budget inside GroupNorm groups and heads
    weight_kind: str = "pearson"          # "pearson" (MuDSC) or "inner" (Git Re-Basin)
    weight_normalize: bool = False        # per-member normalisation of weight features
    patience: int = 5
    max_sweeps: int = 100

    @property
    def uses_activations(self) -> bool:
        return self.match is not None and self.alpha < 1.0

    @property
    def uses_weights(self) -> bool:
        return self.match is not None and self.alpha > 0.0


@dataclass(frozen=True)
class Alignment:
    """Per space s: ``M[s][i]`` (n_merged x n) and ``U[s][i]`` (n x n_merged) for model i;
    ``perms[s][i]`` for permutation matchings (perm[k] = unit of model i matched to anchor
    unit k). Spaces without an entry are merged by plain averaging (identity)."""
    M: Mapping[int, tuple[np.ndarray, ...]]
    U: Mapping[int, tuple[np.ndarray, ...]]
    perms: Mapping[int, tuple[np.ndarray, ...]]
    n_models: int
    objective: tuple[float, ...] = ()
    sweeps: int = 0


@dataclass(frozen=True)
class SolveUnit:
    """Spaces matched in one step: one plain space, or the blocked spaces of one head."""
    spaces: tuple[int, ...]
    head: Optional[int] = None

    @property
    def name(self) -> str:
        return "+".join(f"S{s}" for s in self.spaces)


def solve_units(pg: PermutationGraph) -> list[SolveUnit]:
    units: list[SolveUnit] = []
    by_head: dict[int, list[int]] = {}
    for s in pg.spaces:
        if s.kind != "unit" or not pg.is_free(s.id):
            continue
        if s.blocks is None:
            units.append(SolveUnit((s.id,)))
        else:
            by_head.setdefault(s.head, []).append(s.id)
    for h, spaces in by_head.items():
        units.append(SolveUnit(tuple(spaces), head=h))
    return units


def _cluster_form(M: np.ndarray, U: np.ndarray):
    """(labels, weights) when U is a 0/1 assignment of the n units to clusters (one 1 per row)
    and M = diag-scaled U^T (M[labels[j], j] = weights[j], zeros elsewhere), as zip produces;
    None for any other pair of matrices."""
    M, U = np.asarray(M), np.asarray(U)
    n, k = U.shape
    if M.shape != (k, n) or n == 0:
        return None
    labels = U.argmax(axis=1)
    rows = np.arange(n)
    if np.count_nonzero(U) != n or not (U[rows, labels] == 1.0).all():
        return None
    weights = M[labels, rows]
    expected = np.zeros_like(M)
    expected[labels, rows] = weights
    if not np.array_equal(M, expected):
        return None
    return labels, weights


def _plain_perm(M: np.ndarray, U: np.ndarray, perm: np.ndarray, N: int) -> bool:
    """Whether M = P / N and U = P^T for the permutation ``perm`` (P[k, perm[k]] = 1)."""
    M, U, perm = np.asarray(M), np.asarray(U), np.asarray(perm)
    n = perm.size
    if M.shape != (n, n) or U.shape != (n, n):
        return False
    k = np.arange(n)
    return (np.count_nonzero(M) == n and np.count_nonzero(U) == n and (M[k, perm] == 1.0 / N).all()
            and (U[perm, k] == 1.0).all())


class AlignmentOps:
    """Per-model space operations for the current matching: a gather for permutations, a
    segment sum for zip clusters (the product with M or U^T, without the zeros), a matrix
    product for any other M, U. ``op(i)`` is the SpaceOp of model i (see apply.py)."""

    def __init__(self, n_models: int, dtype: torch.dtype = torch.float64):
        self.N, self.dtype = n_models, dtype
        self.perm: list[dict[int, torch.Tensor]] = [{} for _ in range(n_models)]
        self.mat: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n_models)]
        self.cluster: list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = [{} for _ in range(n_models)]

    def set(self, s: int, M, U, perms=None) -> None:
        for i in range(self.N):
            self.perm[i].pop(s, None)
            self.mat[i].pop(s, None)
            self.cluster[i].pop(s, None)
            if perms is not None and _plain_perm(M[i], U[i], perms[i], self.N):
                # M_i = P_i / N, U_i = P_i^T: gather, then scale out-axes by the 1/N factor of M
                self.perm[i][s] = torch.as_tensor(np.asarray(perms[i]), dtype=torch.long)
                continue
            form = _cluster_form(M[i], U[i])
            if form is not None:
                labels, weights = form
                self.cluster[i][s] = (torch.as_tensor(labels, dtype=torch.long),
                                      torch.as_tensor(weights, dtype=self.dtype), np.asarray(M[i]).shape[0])
            else:
                self.mat[i][s] = (torch.as_tensor(M[i], dtype=self.dtype),
                                  torch.as_tensor(U[i], dtype=self.dtype).T.contiguous())

    def set_perms(self, s: int, perms) -> None:
        """Permutation matching of space s (M_i = P_i / N, U_i = P_i^T), without the matrices."""
        self.remove(s)
        for i in range(self.N):
            self.perm[i][s] = torch.as_tensor(np.asarray(perms[i]), dtype=torch.long)

    def set_labels(self, s: int, labels) -> None:
        """Zip matching of space s from the cluster labels of the N n stacked units (target n),
        the same operation as ``set`` with :func:`match.matrices_from_labels`."""
        self.remove(s)
        labels = np.asarray(labels)
        n = labels.size // self.N
        weights = 1.0 / np.maximum(np.bincount(labels, minlength=n).astype(np.float64), 1.0)
        for i in range(self.N):
            lab = labels[i * n:(i + 1) * n]
            self.cluster[i][s] = (torch.as_tensor(lab, dtype=torch.long),
                                  torch.as_tensor(weights[lab], dtype=self.dtype), n)

    def remove(self, s: int) -> None:
        for i in range(self.N):
            self.perm[i].pop(s, None)
            self.mat[i].pop(s, None)
            self.cluster[i].pop(s, None)

    def feature_op(self, i: int) -> SpaceOp:
        """Model i's space operations for weight features (MuDSC's Z, Git Re-Basin's cost):
        a neighbour's `in` axis by N M_i, its `out` axis by U_i^T, as the reference MuDSC code
        projects them. For a permutation both are the plain permutation (no 1/N); for a zip
        cluster an `in` axis gets N / size times the sum of model i's members, an `out` axis
        their sum."""
        perm, mat, cluster, N = self.perm[i], self.mat[i], self.cluster[i], self.N

        def apply(s: int, t: torch.Tensor, axis: int, role: str) -> torch.Tensor:
            idx = perm.get(s)
            if idx is not None:
                return t.index_select(axis, idx)
            cl = cluster.get(s)
            if cl is not None:
                labels, weights, k = cl
                if role == "in":
                    shape = [1] * t.dim()
                    shape[axis] = -1
                    t = t * (N * weights).to(t.dtype).view(shape)
                shape = list(t.shape)
                shape[axis] = k
                return t.new_zeros(shape).index_add_(axis, labels, t)
            pair = mat.get(s)
            if pair is None:
                return t
            A = N * pair[0] if role == "in" else pair[1]
            moved = t.movedim(axis, 0)
            res = (A.to(t.dtype) @ moved.reshape(moved.shape[0], -1)).reshape((A.shape[0],) + moved.shape[1:])
            return res.movedim(0, axis)
        return apply

    def op(self, i: int) -> SpaceOp:
        """Model i's space operations for merging: `out` axes by M_i, `in` axes by U_i^T."""
        perm, mat, cluster, N = self.perm[i], self.mat[i], self.cluster[i], self.N

        def apply(s: int, t: torch.Tensor, axis: int, role: str) -> torch.Tensor:
            idx = perm.get(s)
            if idx is not None:
                out = t.index_select(axis, idx)
                return out / N if role == "out" else out
            cl = cluster.get(s)
            if cl is not None:
                labels, weights, k = cl
                if role == "out":  # M t: weighted sum of each cluster's units
                    shape = [1] * t.dim()
                    shape[axis] = -1
                    t = t * weights.to(t.dtype).view(shape)
                shape = list(t.shape)
                shape[axis] = k
                return t.new_zeros(shape).index_add_(axis, labels, t)  # role "in": U^T t
            pair = mat.get(s)
            if pair is None:
                return t
            A = pair[0] if role == "out" else pair[1]
            moved = t.movedim(axis, 0)
            res = (A.to(t.dtype) @ moved.reshape(moved.shape[0], -1)).reshape((A.shape[0],) + moved.shape[1:])
            return res.movedim(0, axis)
        return apply


def _objective_align(C: np.ndarray, perms: list[np.ndarray]) -> float:
    n = len(perms[0])
    return float(np.mean([C[np.arange(n), i * n + p].mean() for i, p in enumerate(perms) if i > 0]))


def _objective_zip(C: np.ndarray, labels: np.ndarray) -> float:
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    return float(C[same].mean()) if same.any() else 0.0


def _content_key(kind: bytes, arrays) -> bytes:
    """A name for a matching that only equal matchings share (128-bit digest of its arrays)."""
    h = hashlib.blake2b(kind, digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(a.shape[0].to_bytes(8, "little"))
        h.update(a.view(np.uint8))
    return h.digest()


class SolveCache:
    """Work that the solves of one model set share: weight features and unit matchings,
    keyed by the content of the matchings they read, so a solve with another alpha or method
    (an alpha search, a benchmark's rows) replays what an earlier solve computed. It binds
    to one graph, one list of model tensors and one statistics object; other ones clear it."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.features = FeatureCache(lambda d: b"", max_bytes)
        self.units: dict[tuple, tuple] = {}
        self._owner: Optional[tuple] = None

    def bind(self, pg: PermutationGraph, tensors: Sequence[Mapping], stats: Optional[Statistics]) -> None:
        owner = (pg, stats) + tuple(tensors)  # held, so that no other object can take their ids
        if self._owner is None or len(owner) != len(self._owner) or any(a is not b for a, b in zip(owner, self._owner)):
            self._owner, self.units = owner, {}
            self.features = FeatureCache(lambda d: b"", self.features.max_bytes)


class _Solver:
    def __init__(self, pg: PermutationGraph, stats: Optional[Statistics], tensors, cfg: MatchConfig,
                 cache: Optional[SolveCache] = None):
        self.pg, self.stats, self.tensors, self.cfg = pg, stats, tensors, cfg
        self.N = len(tensors)
        # the matching of each space, compact: permutations (align) or cluster labels (zip);
        # the dense M_i, U_i are only built for the result (n x n per model and space)
        self.perms: dict[int, tuple[np.ndarray, ...]] = {}
        self.labels: dict[int, np.ndarray] = {}
        self._order: dict[int, None] = {}
        self.ops = AlignmentOps(self.N, torch.float32)  # similarity only: float32 is plenty
        self.f32 = [{k: v.detach().float() for k, v in t.items() if v.is_floating_point()} for t in tensors]
        # Matching a unit is a pure function of its similarities, which depend only on the
        # matching options, alpha and the current matching of the spaces its weight features
        # read (recorded as they are read). version[s] names the current matching of space s by
        # its content (b"" before it is matched); a unit whose inputs have the versions they had
        # when it was matched with the same options and alpha replays that result instead of
        # recomputing it, in this solve or in another one sharing the cache.
        self.version: dict[int, bytes] = {}
        cache = cache or SolveCache()
        cache.bind(pg, tensors, stats)
        self._cache = cache.units
        self._options = (cfg.match, cfg.zip_a, cfg.zip_b, cfg.zip_b_blocked, cfg.weight_kind, cfg.weight_normalize)
        self._read: Optional[set] = None
        self._calls: Optional[list] = None
        self.features = cache.features
        self.features.version = lambda d: self.version.get(d, b"")

    def _ops(self) -> list:
        ops = [self.ops.feature_op(i) for i in range(self.N)]
        read = self._read
        if read is None:
            return ops

        def recording(op):
            def apply(s, t, axis, role):
                read.add(s)
                return op(s, t, axis, role)
            return apply
        return [recording(op) for op in ops]

    def similarity(self, s: int, alpha: float) -> np.ndarray:
        ca = None if self.stats is None else self.stats.corr.get(s)
        dead = None if ca is None else self.stats.dead[s]
        if alpha <= 0.0 and ca is not None and not dead.any():
            return ca
        ops = self._ops()
        self.features.read = self._read
        try:
            cw = weight_similarity(self.pg, self.f32, s, ops, self.cfg.weight_kind, self.cfg.weight_normalize,
                                   cache=self.features)
        finally:
            self.features.read = None
        if ca is None or alpha >= 1.0:
            return cw
        if dead.any():  # units that never varied on the data: only their weights can tell them apart
            ca = ca.copy()
            ca[dead, :] = cw[dead, :]
            ca[:, dead] = cw[:, dead]
        cw *= alpha  # cw is a fresh array: alpha * cw + (1 - alpha) * ca, with one temporary
        cw += (1.0 - alpha) * ca
        return cw

    def match_unit(self, unit: SolveUnit, alpha: float) -> float:
        key = (unit.name, self._options, alpha)
        hit = self._cache.get(key)
        if hit is not None and all(self.version.get(d, b"") == v for d, v in hit[0]):
            for kind, s, value in hit[1]:
                (self._set_perms if kind == "perms" else self._set_labels)(s, value)
            return hit[2]
        self._read = set()
        try:
            Cs = [self.similarity(s, alpha) for s in unit.spaces]
        finally:
            read, self._read = self._read, None
        deps = tuple((d, self.version.get(d, b"")) for d in sorted(read))
        self._calls = []
        try:
            score = self._match(unit, Cs, alpha)
        finally:
            calls, self._calls = self._calls, None
        self._cache[key] = (deps, tuple(calls), score)
        return score

    def _match(self, unit: SolveUnit, Cs: list[np.ndarray], alpha: float) -> float:
        N, cfg = self.N, self.cfg
        if unit.head is None:
            s, C = unit.spaces[0], Cs[0]
            if cfg.match == "align":
                perms = match.align(C, N)
                self._set_perms(s, perms)
                return _objective_align(C, perms)
            labels = zipit.zip_match(C, N, self.pg.size(s), a=cfg.zip_a, b=cfg.zip_b)
            self._set_labels(s, labels)
            return _objective_zip(C, labels)
        return self._match_blocks(unit, Cs)

    def _match_blocks(self, unit: SolveUnit, Cs: list[np.ndarray]) -> float:
        pg, N, cfg = self.pg, self.N, self.cfg
        sp = [pg.spaces[s] for s in unit.spaces]
        G = sp[0].blocks[0]
        gs = [s.blocks[1] for s in sp]
        wid = [s.within != "free" for s in sp]
        head_free = not pg.spaces[unit.head].fixed and G > 1
        score = []
        if cfg.match == "align":
            if head_free:
                ga = match.group_align(Cs, N, G, gs, wid)
                perms_by_space = [list(p) for p in ga.perms]
                self._set_perms(unit.head, list(ga.sigmas))
            else:
                perms_by_space = [self._per_block(C, N, G, g, w, "align") for C, g, w in zip(Cs, gs, wid)]
            for s, C, perms in zip(unit.spaces, Cs, perms_by_space):
                self._set_perms(s, perms)
                score.append(_objective_align(C, perms))
            return float(np.mean(score))
        if head_free:
            labels_by_space = match.group_zip(Cs, N, G, gs, wid, a=cfg.zip_a, b=cfg.zip_b_blocked)
        else:
            labels_by_space = [self._per_block(C, N, G, g, w, "zip") for C, g, w in zip(Cs, gs, wid)]
        for s, C, labels, g in zip(unit.spaces, Cs, labels_by_space, gs):
            self._set_labels(s, labels)
            score.append(_objective_zip(C, labels))
        n0 = G * gs[0]
        lab0 = labels_by_space[0]
        heads = [np.array([lab0[i * n0 + k * gs[0]] // gs[0] for k in range(G)]) for i in range(N)]
        self._set_labels(unit.head, np.concatenate(heads))
        return float(np.mean(score))

    def _per_block(self, C, N, G, g, within_identity, how):
        """Blocks cannot move (fixed head): match inside each block on its own."""
        n = G * g
        if how == "align":
            perms = [np.zeros(n, dtype=np.int64) for _ in range(N)]
        else:
            labels = np.zeros(N * n, dtype=np.int64)
        for b in range(G):
            idx = np.concatenate([i * n + b * g + np.arange(g) for i in range(N)])
            sub = C[np.ix_(idx, idx)]
            if how == "align":
                bp = [np.arange(g)] * N if within_identity else match.align(sub, N)
                for i in range(N):
                    perms[i][b * g:(b + 1) * g] = b * g + bp[i]
            else:
                bl = np.tile(np.arange(g), N) if within_identity else zipit.zip_match(sub, N, g, a=self.cfg.zip_a,
                                                                                 b=self.cfg.zip_b_blocked)
                labels[idx] = b * g + bl
        return perms if how == "align" else labels

    def _set_perms(self, s: int, perms) -> None:
        perms = tuple(np.asarray(p) for p in perms)
        if self._calls is not None:
            self._calls.append(("perms", s, perms))
        old = self.perms.get(s)
        if old is not None and len(old) == len(perms) and all(np.array_equal(a, b) for a, b in zip(old, perms)):
            return  # unchanged: keep the ops and the version
        self.perms[s] = perms
        self._order.setdefault(s)
        self.labels.pop(s, None)
        self.ops.set_perms(s, perms)
        self.version[s] = _content_key(b"perms", perms)

    def _set_labels(self, s: int, labels) -> None:
        labels = np.asarray(labels)
        if self._calls is not None:
            self._calls.append(("labels", s, labels))
        old = self.labels.get(s)
        if old is not None and np.array_equal(old, labels):
            return
        self.labels[s] = labels
        self._order.setdefault(s)
        self.perms.pop(s, None)
        self.ops.set_labels(s, labels)
        self.version[s] = _content_key(b"labels", [labels])

    def _state(self, s: int):
        return self.perms.get(s, self.labels.get(s))

    def snapshot(self):
        return dict(self.perms), dict(self.labels), dict(self.version)

    def restore(self, snap) -> None:
        perms, labels, version = snap
        spaces = set(self.perms) | set(self.labels) | set(perms) | set(labels)
        changed = [s for s in spaces if self._state(s) is not perms.get(s, labels.get(s))]
        self.perms, self.labels = dict(perms), dict(labels)
        for s in changed:
            self.version[s] = version.get(s, b"")  # the same matching as then: the same name
            if s in self.perms:
                self.ops.set_perms(s, self.perms[s])
            elif s in self.labels:
                self.ops.set_labels(s, self.labels[s])
            else:
                self.ops.remove(s)

    def _dead(self, s: int) -> Optional[np.ndarray]:
        dead = None if self.stats is None else self.stats.dead.get(s)
        return dead if dead is not None and dead.any() else None

    def alignment(self, objective=(), sweeps: int = 0) -> Alignment:
        """M_i, U_i of every matched space. Clusters (or matched pairs) average their members'
        weights, leaving out members that were dead on the calibration data when a live one
        is there (:func:`match.live_weights`)."""
        M, U = {}, {}
        for s, perms in self.perms.items():
            dead = self._dead(s)
            if dead is None:
                Ms, Us = match.matrices_from_perms(perms)
            else:
                labels = match.perms_to_labels(perms)
                Ms, Us = match.matrices_from_labels(labels, self.N, len(perms[0]), match.live_weights(labels, dead))
            M[s], U[s] = tuple(Ms), tuple(Us)
        for s, labels in self.labels.items():
            n = len(labels) // self.N
            dead = self._dead(s)
            weights = None if dead is None else match.live_weights(labels, dead)
            Ms, Us = match.matrices_from_labels(labels, self.N, n, weights)
            M[s], U[s] = tuple(Ms), tuple(Us)
        order = [s for s in self._order if s in M]  # the order in which spaces were first matched
        return Alignment({s: M[s] for s in order}, {s: U[s] for s in order},
                         {s: self.perms[s] for s in order if s in self.perms}, self.N, tuple(objective), sweeps)


def _named_tensors(pg: PermutationGraph, models) -> list[Mapping[str, torch.Tensor]]:
    out = []
    for i, m in enumerate(models):
        if isinstance(m, nn.Module):
            m = named_tensors(m)
        elif not isinstance(m, Mapping):
            raise TypeError(f"solve: model {i} is a {type(m).__name__}, expected an nn.Module or a "
                            "mapping from tensor names to tensors")
        missing = [fqn for fqn in pg.params if fqn not in m]
        if missing:
            raise KeyError(f"solve: model {i} has no tensor {missing[0]!r} (of {len(missing)} missing) "
                           "that the permutation graph's members need")
        out.append(m)
    return out


def solve(pg: PermutationGraph, stats: Optional[Statistics],
          tensors: Sequence[Union[nn.Module, Mapping[str, torch.Tensor]]], cfg: MatchConfig,
          seed: int = 0, *, cache: Optional[SolveCache] = None) -> Alignment:
    """Match every free space of ``pg`` across the N models given (or their named tensors:
    parameters and buffers by qualified name). Solves of one model set that pass the same
    ``cache`` share their work (the result is the same with or without it)."""
    tensors = _named_tensors(pg, tensors)
    N = len(tensors)
    if cfg.match is None:
        return Alignment({}, {}, {}, N)
    solver = _Solver(pg, stats, tensors, cfg, cache)
    units = solve_units(pg)
    rng = np.random.default_rng(seed)
    # initialisation: activations alone when the method uses them, else weights with
    # identity neighbours (Re-Basin starts from the identity and sweeps)
    init_alpha = 0.0 if cfg.uses_activations else 1.0
    scores = {u.name: solver.match_unit(u, init_alpha) for u in units}
    history = [float(np.mean(list(scores.values()))) if scores else 0.0]
    sweeps = 0
    if cfg.iterate and cfg.uses_weights and units:
        best, best_snap, stale = -np.inf, solver.snapshot(), 0
        while sweeps < cfg.max_sweeps and stale < cfg.patience:
            for k in rng.permutation(len(units)):
                u = units[k]
                scores[u.name] = solver.match_unit(u, cfg.alpha)
            sweeps += 1
            obj = float(np.mean(list(scores.values())))
            history.append(obj)
            if obj > best + 1e-12:
                best, best_snap, stale = obj, solver.snapshot(), 0
            else:
                stale += 1
                solver.restore(best_snap)
        solver.restore(best_snap)
        log.info("matching: %d sweeps, objective %.4f", sweeps, best)
    return solver.alignment(history, sweeps)
