"""Matching families: the one interface through which the solve stage matches a space.

A family turns similarities into a matching of one space (:meth:`Matcher.space`) or of the
blocked spaces that share one head (:meth:`Matcher.blocks`: attention heads, GroupNorm
groups). A matching is either permutations (one per model, :func:`align`'s convention) or
cluster labels of the N n stacked units (:func:`zip_match`'s convention); the solve stage
keeps, iterates and rewrites both kinds the same way whatever family produced them.

    align  linear assignment to the anchor model (act_align, mudsc_align, rebasin)
    zip    ZipIt greedy clustering, merges within a model allowed (zipit, mudsc_zip, weight_zip)

A new family subclasses :class:`Matcher` (``space`` at least: blocked spaces then match block
by block with the heads kept in place) and is registered with
:func:`mudsc_fx.methods.register_method` (or :func:`register_matcher`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .match import align, group_align, group_zip
from .zipit import zip_match

__all__ = ["Matching", "Matcher", "AlignMatcher", "ZipMatcher", "MATCHERS", "register_matcher", "matcher_for"]


@dataclass(frozen=True, eq=False)
class Matching:
    """``kind`` "perms": ``value`` is a tuple of N permutations (perm[k] = unit of model i
    matched to anchor unit k); ``kind`` "labels": ``value`` the labels of the N n stacked units
    (model-major), one merged unit per label."""
    kind: str
    value: Union[tuple, np.ndarray]

    @staticmethod
    def perms(perms: Sequence[np.ndarray]) -> "Matching":
        return Matching("perms", tuple(np.asarray(p, dtype=np.int64) for p in perms))

    @staticmethod
    def labels(labels: np.ndarray) -> "Matching":
        return Matching("labels", np.asarray(labels, dtype=np.int64))


def objective(C: np.ndarray, m: Matching) -> float:
    """Mean similarity of the units a matching puts together (a permutation's from the anchor
    rows of C, which may be all C holds)."""
    if m.kind == "perms":
        n = len(m.value[0])
        return float(np.mean([C[np.arange(n), i * n + p].mean() for i, p in enumerate(m.value) if i > 0]))
    same = m.value[:, None] == m.value[None, :]
    np.fill_diagonal(same, False)
    return float(C[same].mean()) if same.any() else 0.0


class Matcher:
    """Family-specific matching. ``cfg`` is the MatchConfig of the solve (its family options:
    zip_a, zip_b, zip_b_blocked, ...). A matcher with ``anchor_rows`` reads only the anchor
    model's rows of each similarity (C[:n, i n:(i+1) n], the cross blocks): it is given the
    (n, N n) rows instead of the (N n, N n) square, and the solve computes nothing else."""
    name = ""
    anchor_rows = False

    def space(self, C: np.ndarray, n_models: int, size: int, cfg: Any, blocked: bool = False) -> Matching:
        """Match one space of ``size`` units per model from its (N n, N n) similarity.
        ``blocked``: C is one block (head, group) of a blocked space."""
        raise NotImplementedError

    def blocks(self, Cs: Sequence[np.ndarray], n_models: int, G: int, gs: Sequence[int],
               within_fixed: Sequence[bool], head_free: bool, cfg: Any) -> tuple[list[Matching], Optional[Matching]]:
        """Match the blocked spaces of one head (G blocks of gs[k] units in space k; a
        ``within_fixed`` space keeps the order inside its blocks). Returns one matching per
        space and the head's own (None: the head stays put). By default blocks do not move:
        each block is matched on its own."""
        return [self._per_block(C, n_models, G, g, w, cfg) for C, g, w in zip(Cs, gs, within_fixed)], None

    def _per_block(self, C, N, G, g, within_fixed, cfg) -> Matching:
        n = G * g
        perms = [np.zeros(n, dtype=np.int64) for _ in range(N)]
        labels = np.zeros(N * n, dtype=np.int64)
        kind = None
        for b in range(G):
            idx = np.concatenate([i * n + b * g + np.arange(g) for i in range(N)])
            rows = idx[:g] if self.anchor_rows else idx  # an anchor-rows C has the anchor's rows only
            if within_fixed:
                m = Matching.perms([np.arange(g)] * N) if self._kind == "perms" else Matching.labels(np.tile(np.arange(g), N))
            else:
                m = self.space(C[np.ix_(rows, idx)], N, g, cfg, blocked=True)
            kind = m.kind
            if m.kind == "perms":
                for i in range(N):
                    perms[i][b * g:(b + 1) * g] = b * g + m.value[i]
            else:
                labels[idx] = b * g + m.value
        return Matching.perms(perms) if kind == "perms" else Matching.labels(labels)

    _kind = "labels"  # what an identity block is written as when a space keeps its block order


class AlignMatcher(Matcher):
    """Permutation matching to the anchor model (one linear assignment per model); heads by
    :func:`group_align`."""
    name = "align"
    _kind = "perms"
    anchor_rows = True

    def space(self, C, n_models, size, cfg, blocked=False):
        return Matching.perms(align(C, n_models))

    def blocks(self, Cs, n_models, G, gs, within_fixed, head_free, cfg):
        if not head_free:
            return super().blocks(Cs, n_models, G, gs, within_fixed, head_free, cfg)
        ga = group_align(Cs, n_models, G, gs, within_fixed)
        return [Matching.perms(p) for p in ga.perms], Matching.perms(ga.sigmas)


class ZipMatcher(Matcher):
    """ZipIt clustering (budget ``zip_b``; inside blocks ``zip_b_blocked``); heads by
    :func:`group_zip`. The head's labels follow the blocks of the first space."""
    name = "zip"

    def space(self, C, n_models, size, cfg, blocked=False):
        return Matching.labels(zip_match(C, n_models, size, a=cfg.zip_a, b=cfg.zip_b_blocked if blocked else cfg.zip_b))

    def blocks(self, Cs, n_models, G, gs, within_fixed, head_free, cfg):
        if head_free:
            spaces = [Matching.labels(lab) for lab in group_zip(Cs, n_models, G, gs, within_fixed,
                                                                 a=cfg.zip_a, b=cfg.zip_b_blocked)]
        else:
            spaces, _ = super().blocks(Cs, n_models, G, gs, within_fixed, head_free, cfg)
        n0, lab0 = G * gs[0], spaces[0].value
        heads = [np.array([lab0[i * n0 + k * gs[0]] // gs[0] for k in range(G)]) for i in range(n_models)]
        return spaces, Matching.labels(np.concatenate(heads))


MATCHERS: dict[str, Matcher] = {"align": AlignMatcher(), "zip": ZipMatcher()}


def register_matcher(family: str, matcher: Matcher) -> None:
    """Make ``MatchConfig(match=family)`` match with ``matcher``."""
    if not isinstance(family, str) or not family:
        raise ValueError(f"a matching family needs a non-empty name, got {family!r}")
    if not isinstance(matcher, Matcher):
        raise TypeError(f"matcher for family {family!r} must be a mudsc_fx.solvers.families.Matcher, "
                        f"got {type(matcher).__name__}")
    MATCHERS[family] = matcher


def matcher_for(family: str) -> Matcher:
    m = MATCHERS.get(family)
    if m is None:
        raise ValueError(f"unknown matching family {family!r}; registered: {', '.join(MATCHERS)}")
    return m
