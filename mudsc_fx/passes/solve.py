"""Stage 4: match units across models, per space (docs/algorithms.md, "Matching").

``solve`` turns similarities into an :class:`Alignment`: per space the permutations (align) or
cluster labels (zip) of the N models' units, from which the merge and unmerge matrices M_i,
U_i follow. Plain spaces are matched alone; blocked spaces that share a
head permutation (q/k and v of one attention layer, a GroupNorm space) are matched together
by group alignment. MuDSC's iteration (Algorithm 1) and Git Re-Basin's coordinate descent
are the same loop with different similarities and patience.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..ir.graph import PermutationGraph
from ..numerics import pearson_anchor_rows_
from ..solvers import match
from ..solvers.families import Matching, matcher_for, objective
from .alignment import Alignment, SpaceMatching
from .apply import AlignmentOps, named_tensors
from .stats import Statistics
from .weights import FeatureCache, unit_weight_features, weight_similarity

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
    to one graph, one list of model tensors and one statistics object; other ones clear it.
    ``max_bytes`` bounds the weight features kept (vit_b_16 has 1.4 GB of them)."""

    def __init__(self, max_bytes: int = 512 << 20):
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
        self.matcher = matcher_for(cfg.match)
        # what a unit's matching depends on besides alpha and its inputs: the family (and its
        # matcher) and every option but the iteration's
        self._options = (self.matcher, replace(cfg, alpha=0.0, iterate=True, patience=1, max_sweeps=1))
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
        """C = alpha C_W + (1 - alpha) C_A of space s: the (N n, N n) square, or only its
        anchor rows (n, N n) when the family's matcher reads nothing else."""
        rows = self.pg.size(s) if self.matcher.anchor_rows else None
        ca = None if self.stats is None or s not in self.stats.corr else (
            self.stats.corr[s] if rows is None else self.stats.corr.rows(s, rows))
        dead = None if ca is None else self.stats.dead[s]
        if alpha <= 0.0 and ca is not None and not dead.any():
            return ca
        cw = self._weight_similarity(s, rows)
        if ca is None or alpha >= 1.0:
            return cw
        if dead.any():  # units that never varied on the data: only their weights can tell them apart
            ca = ca.copy()
            ca[dead[:ca.shape[0]], :] = cw[dead[:ca.shape[0]], :]
            ca[:, dead] = cw[:, dead]
        cw *= alpha  # cw is a fresh array: alpha * cw + (1 - alpha) * ca, by blocks of rows
        for i in range(0, cw.shape[0], 1024):  # (no (N n)^2 temporary: 150 MB for vit_b_16's MLP spaces)
            cw[i:i + 1024] += (1.0 - alpha) * ca[i:i + 1024]
        return cw

    def _weight_similarity(self, s: int, rows: Optional[int]) -> np.ndarray:
        ops = self._ops()
        self.features.read = self._read
        try:
            if rows is None:
                return weight_similarity(self.pg, self.f32, s, ops, self.cfg.weight_kind, self.cfg.weight_normalize,
                                         cache=self.features)
            Z = torch.cat([unit_weight_features(self.pg, t, s, op, self.cfg.weight_normalize, self.features, i)
                           for i, (t, op) in enumerate(zip(self.f32, ops))], dim=0)
        finally:
            self.features.read = None
        if self.cfg.weight_kind == "inner":
            Zd = Z.double()
            return (Zd[:rows] @ Zd.T).numpy()
        return pearson_anchor_rows_(Z, rows)[0]  # Z is our own concatenation

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
            if self._head_observed(unit):
                Cs.append(self.similarity(unit.head, alpha))
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

    def _head_observed(self, unit: SolveUnit) -> bool:
        """The head space of a blocked unit has units of its own (members, or activations such
        as a conv's output channels whose weight is a flat parameter viewed as [out, in]): they
        move with the block permutation, so they are evidence for it."""
        if unit.head is None:
            return False
        head = self.pg.spaces[unit.head]
        G = self.pg.spaces[unit.spaces[0]].blocks[0]
        if head.fixed or G < 2 or head.size != G:
            return False
        return bool(head.members) or (self.stats is not None and unit.head in self.stats.corr)

    def _match(self, unit: SolveUnit, Cs: list[np.ndarray], alpha: float) -> float:
        """Match a unit through its family's :class:`Matcher`; the score is the mean similarity
        of the units put together. A blocked unit whose head space is observed gets the head's
        similarity as one more space of G blocks of one unit (its matching is the head's)."""
        pg, N, cfg, matcher = self.pg, self.N, self.cfg, self.matcher
        if unit.head is None:
            s, C = unit.spaces[0], Cs[0]
            m = matcher.space(C, N, pg.size(s), cfg)
            self._set(s, m)
            return objective(C, m)
        sp = [pg.spaces[s] for s in unit.spaces]
        G = sp[0].blocks[0]
        head_free = not pg.spaces[unit.head].fixed and G > 1
        gs, within = [s.blocks[1] for s in sp], [s.within != "free" for s in sp]
        if len(Cs) > len(sp):  # the observed head: G blocks of 1
            gs, within = gs + [1], within + [True]
        ms, head = matcher.blocks(Cs, N, G, gs, within, head_free, cfg)
        ms, Cs = ms[:len(sp)], Cs[:len(sp)]
        if head is not None and head.kind == "perms":
            self._set(unit.head, head)  # a permuted head first, as its spaces' blocks follow it
        for s, m in zip(unit.spaces, ms):
            self._set(s, m)
        if head is not None and head.kind != "perms":
            self._set(unit.head, head)
        return float(np.mean([objective(C, m) for C, m in zip(Cs, ms)]))

    def _set(self, s: int, m: Matching) -> None:
        (self._set_perms if m.kind == "perms" else self._set_labels)(s, m.value)

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
        """The matching of every matched space, in the order they were first matched.
        Clusters (or matched pairs) average their members' weights, leaving out members that
        were dead on the calibration data when a live one is there (:func:`match.live_weights`)."""
        spaces = {}
        for s in self._order:
            dead = self._dead(s)
            if s in self.perms:
                perms = self.perms[s]
                weights = None if dead is None else match.live_weights(match.perms_to_labels(perms), dead)
                spaces[s] = SpaceMatching.from_perms(perms, weights)
            elif s in self.labels:
                labels = self.labels[s]
                n = len(labels) // self.N
                weights = None if dead is None else match.live_weights(labels, dead)
                spaces[s] = SpaceMatching.from_labels(labels, self.N, n, weights)
        return Alignment(spaces, self.N, tuple(objective), sweeps)


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
        return Alignment({}, N)
    solver = _Solver(pg, stats, tensors, cfg, cache)
    units = solve_units(pg)
    if cfg.uses_activations and stats is not None:
        unseen = [s for u in units for s in u.spaces if s not in stats.corr]
        if unseen:
            log.info("matching: no activation carries %s: matched on weights (blocks also on their head "
                     "space's similarity)", ", ".join(f"S{s}" for s in unseen))
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
