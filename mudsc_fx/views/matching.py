"""Per-space facts about a finished merge, read from its alignment and statistics.

For every space: how it was merged (a permutation, zip clusters, another matrix, plain
averaging, kept separate after the cut of a partial merge, or left fixed), the mean activation correlation of the units it merged together
(the matching quality the solver saw on the calibration data; units that never varied on the
data have no correlation and are left out, and counted as ``dead``), and how many units were
zipped with another unit of their *own* model (ZipIt's within-model merges).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..ir.graph import PermutationGraph
from ..ir.layout import spaces_of


@dataclass(frozen=True)
class SpaceMatch:
    space: int
    method: str                    # permutation | zip | matrix | average | separate | fixed
    similarity: Optional[float]    # mean correlation of matched live units; None without statistics
    within: int                    # units zipped with another unit of the same model
    merged: int                    # units of the merged space
    dead: int                      # units of any model that never varied on the data

    def short(self) -> str:
        parts = [self.method]
        if self.similarity is not None:
            parts.append(f"sim {self.similarity:.2f}")
        if self.method == "zip":
            parts.append(f"{self.within} within")
        return " \u00b7 ".join(parts)


def _labels(U: np.ndarray) -> Optional[np.ndarray]:
    """Cluster label of each unit when U is a 0/1 assignment (one 1 per row), else None."""
    U = np.asarray(U)
    if U.ndim != 2 or not np.all((U == 0) | (U == 1)) or not np.all(U.sum(axis=1) == 1):
        return None
    return U.argmax(axis=1)


def _perm_similarity(C: np.ndarray, perms, n: int, alive: np.ndarray) -> Optional[float]:
    vals = []
    for i, j in itertools.combinations(range(len(perms)), 2):
        a, b = i * n + np.asarray(perms[i]), j * n + np.asarray(perms[j])
        keep = alive[a] & alive[b]
        vals.append(C[a[keep], b[keep]])
    vals = np.concatenate(vals) if vals else np.zeros(0)
    return float(vals.mean(dtype=np.float64)) if vals.size else None


def _cluster_similarity(C: np.ndarray, stacked: np.ndarray, alive: np.ndarray) -> Optional[float]:
    same = (stacked[:, None] == stacked[None, :]) & alive[:, None] & alive[None, :]
    np.fill_diagonal(same, False)
    return float(C[same].mean(dtype=np.float64)) if same.any() else None


def _within(labels: list[np.ndarray]) -> int:
    count = 0
    for lab in labels:
        _, counts = np.unique(lab, return_counts=True)
        count += int(counts[counts > 1].sum())
    return count


def space_matches(result: Any) -> dict[int, SpaceMatch]:
    """``result``: a merge result with ``graph``, ``alignment`` and ``stats`` (None for a
    data-free merge)."""
    pg: PermutationGraph = result.graph
    al = result.alignment
    stats = getattr(result, "stats", None)
    cut = getattr(result, "cut", None)
    trunk = None if cut is None else set(cut.trunk)
    writers: dict[int, set[str]] = {}
    for node, layout in pg.producers:
        for t in spaces_of(layout):
            writers.setdefault(t, set()).add(node)
    out: dict[int, SpaceMatch] = {}
    for sp in pg.spaces:
        s, n = sp.id, sp.size
        corr = None if stats is None else stats.corr.get(s)
        dead_mask = None if stats is None else stats.dead.get(s)
        dead = 0 if dead_mask is None else int(np.count_nonzero(dead_mask))
        # a dead unit (no variance on the data) has no activation similarity: leave it out
        alive = np.ones(al.n_models * n, dtype=bool) if dead_mask is None else ~np.asarray(dead_mask, dtype=bool)
        if s in al.perms:
            sim = None if corr is None else _perm_similarity(corr, al.perms[s], n, alive)
            out[s] = SpaceMatch(s, "permutation", sim, 0, n, dead)
        elif s in al.M:
            labels = [_labels(U) for U in al.U[s]]
            merged = int(np.asarray(al.M[s][0]).shape[0])
            if any(lab is None for lab in labels):
                out[s] = SpaceMatch(s, "matrix", None, 0, merged, dead)
                continue
            sim = None if corr is None else _cluster_similarity(corr, np.concatenate(labels), alive)
            out[s] = SpaceMatch(s, "zip", sim, _within(labels), merged, dead)
        elif not pg.is_free(s):
            out[s] = SpaceMatch(s, "fixed", None, 0, n, dead)
        elif trunk is not None and writers.get(s) and not writers[s] & trunk:
            out[s] = SpaceMatch(s, "separate", None, 0, n, dead)  # after a partial merge's cut
        else:
            out[s] = SpaceMatch(s, "average", None, 0, n, dead)
    return out


def describe_config(result: Any) -> str:
    """``zipit (match zip, alpha 0)``: the method of a merge result and how it matched."""
    cfg = getattr(result, "config", None)
    method = getattr(result, "method", "") or ""
    if cfg is None:
        return method
    match = getattr(cfg, "match", None) or "average"
    alpha = getattr(cfg, "alpha", None)
    how = f"match {match}" + (f", alpha {alpha:g}" if match != "average" and alpha is not None else "")
    return f"{method} ({how})" if method else how
