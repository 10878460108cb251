"""The result of matching: per space, which units of each model merge into which merged unit.

An :class:`Alignment` keeps what the solvers produce — a permutation per model (align) or a
cluster label per unit (zip) — plus the weight of every unit in its merged unit's average.
That is N n integers and floats per space, where the dense merge and unmerge matrices M_i
(n_merged x n) and U_i (n x n_merged) are N n^2 floats each: for a vit_b_16 MLP space
(n = 3072, N = 2) 0.3 MB against 300 MB. The rewrite applies the compact form directly (a
gather for a permutation, a segment sum for clusters: :class:`mudsc_fx.passes.apply.AlignmentOps`);
``Alignment.M`` and ``Alignment.U`` build the dense matrices of a space when it is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class SpaceMatching:
    """One space's matching. Unit j of model i goes to merged unit ``labels[i][j]`` with weight
    ``weights[i][j]`` (its share of that unit's average): M_i[labels[i][j], j] = weights[i][j]
    and U_i[j, labels[i][j]] = 1, zeros elsewhere. ``size``: merged units. ``perms``: for a
    permutation matching, perms[i][k] = the unit of model i in merged unit k."""
    labels: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    size: int
    perms: Optional[tuple[np.ndarray, ...]] = None

    @classmethod
    def from_perms(cls, perms: Sequence[np.ndarray], weights: Optional[np.ndarray] = None) -> "SpaceMatching":
        """A permutation matching; ``weights`` (one per stacked unit, model-major) replace the
        plain 1 / N (e.g. dead units left out of an average)."""
        perms = tuple(np.asarray(p, dtype=np.int64) for p in perms)
        N, n = len(perms), len(perms[0])
        labels = []
        for p in perms:
            lab = np.empty(n, dtype=np.int64)
            lab[p] = np.arange(n)
            labels.append(lab)
        w = _split(weights, N, n) if weights is not None else tuple(np.full(n, 1.0 / N) for _ in range(N))
        return cls(tuple(labels), w, n, perms)

    @classmethod
    def from_labels(cls, labels: np.ndarray, n_models: int, size: int,
                    weights: Optional[np.ndarray] = None) -> "SpaceMatching":
        """Clusters of the N n stacked units (model-major) into ``size`` merged units; weights
        default to 1 / cluster size (members of every model counted)."""
        labels = np.asarray(labels, dtype=np.int64)
        n = labels.size // n_models
        if weights is None:
            weights = 1.0 / np.maximum(np.bincount(labels, minlength=size).astype(np.float64), 1.0)[labels]
        return cls(_split(labels, n_models, n), _split(np.asarray(weights, dtype=np.float64), n_models, n), size)

    @property
    def n_models(self) -> int:
        return len(self.labels)

    @property
    def plain_permutation(self) -> bool:
        """A permutation whose merged units are plain means (M_i = P_i / N, U_i = P_i^T)."""
        N = self.n_models
        return self.perms is not None and all((w == 1.0 / N).all() for w in self.weights)

    def stacked_labels(self) -> np.ndarray:
        return np.concatenate(self.labels)

    def matrices(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense (M_i, U_i) of model i (float64)."""
        lab, w = self.labels[i], self.weights[i]
        n = lab.size
        rows = np.arange(n)
        M = np.zeros((self.size, n))
        M[lab, rows] = w
        U = np.zeros((n, self.size))
        U[rows, lab] = 1.0
        return M, U


def _split(a: np.ndarray, N: int, n: int) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(a[i * n:(i + 1) * n]) for i in range(N))


class _Dense(Mapping):
    """space -> tuple of the N dense matrices (M_i or U_i), built when a space is read."""

    def __init__(self, spaces: Mapping[int, SpaceMatching], which: int):
        self._spaces, self._which = spaces, which

    def __getitem__(self, s: int) -> tuple[np.ndarray, ...]:
        m = self._spaces[s]
        return tuple(m.matrices(i)[self._which] for i in range(m.n_models))

    def __iter__(self) -> Iterator[int]:
        return iter(self._spaces)

    def __len__(self) -> int:
        return len(self._spaces)

    def __contains__(self, s) -> bool:
        return s in self._spaces


@dataclass(frozen=True, eq=False)
class Alignment:
    """Per matched space s (in the order the solve first matched them), its
    :class:`SpaceMatching`. Spaces without an entry are merged by plain averaging (identity).

    ``M[s][i]`` (n_merged x n) and ``U[s][i]`` (n x n_merged) are model i's dense merge and
    unmerge matrices, built on each read; ``perms[s][i]`` the permutations of permutation
    matchings (perm[k] = unit of model i matched to anchor unit k)."""
    spaces: Mapping[int, SpaceMatching]
    n_models: int
    objective: tuple[float, ...] = ()
    sweeps: int = 0
    perms: Mapping[int, tuple[np.ndarray, ...]] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "perms", {s: m.perms for s, m in self.spaces.items() if m.perms is not None})

    @property
    def M(self) -> Mapping[int, tuple[np.ndarray, ...]]:
        return _Dense(self.spaces, 0)

    @property
    def U(self) -> Mapping[int, tuple[np.ndarray, ...]]:
        return _Dense(self.spaces, 1)
