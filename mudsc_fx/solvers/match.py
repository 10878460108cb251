"""Matching solvers Psi (docs/algorithms.md, "Matching"): permutation alignment, block (head,
group) alignment, and the merge / unmerge matrices of a matching. Pure numpy/scipy, no torch;
the zip greedy lives in :mod:`.zipit`.

Units of N models are stacked: in an (N n, N n) similarity C, model i owns rows i*n:(i+1)*n.
Permutation conventions: ``perms[i][k]`` is the unit of model i matched to anchor unit k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .zipit import units_per_model, zip_match

__all__ = [
    "align", "matrices_from_perms", "matrices_from_labels", "perms_to_labels", "live_weights",
    "GroupAlignment", "group_align", "group_zip",
]


def anchor_units(C: np.ndarray, n_models: int) -> int:
    """Units per model n of a similarity given whole, (N n, N n), or as the anchor model's rows
    (n, N n): the only blocks a matching to the anchor reads."""
    if C.ndim == 2 and n_models > 1 and C.shape[1] == n_models * C.shape[0]:
        return C.shape[0]
    return units_per_model(C, n_models)


def align(C: np.ndarray, n_models: int) -> list[np.ndarray]:
    """Permutation matching to the anchor (model 0), one linear assignment per model. ``C``:
    the (N n, N n) similarity or its anchor rows (n, N n); only C[:n, i n:(i+1) n] is read.

    >>> C = np.array([[1., 0., 0., 1.], [0., 1., 1., 0.], [0., 1., 1., 0.], [1., 0., 0., 1.]])
    >>> [p.tolist() for p in align(C, 2)]
    [[0, 1], [1, 0]]
    """
    C = np.asarray(C)
    n = anchor_units(C, n_models)
    perms = [np.arange(n)]
    for i in range(1, n_models):
        _, cols = linear_sum_assignment(np.asarray(C[:n, i * n:(i + 1) * n], dtype=np.float64), maximize=True)
        perms.append(cols.astype(np.int64))
    return perms


# ---------------------------------------------------------------- merge / unmerge matrices

def matrices_from_perms(perms: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """M_i = P_i / N, U_i = P_i^T with P_i[k, perms[i][k]] = 1, so sum_i M_i f_i is the mean.

    >>> M, U = matrices_from_perms([np.arange(2), np.array([1, 0])])
    >>> (M[1] @ np.array([10., 20.])).tolist(), U[1].tolist()
    ([10.0, 5.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    N, n = len(perms), len(perms[0])
    Ms, Us = [], []
    for perm in perms:
        P = np.zeros((n, n))
        P[np.arange(n), np.asarray(perm)] = 1.0
        Ms.append(P / N)
        Us.append(P.T.copy())
    return Ms, Us


def matrices_from_labels(labels: np.ndarray, n_models: int, target: int,
                         weights: np.ndarray | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """U_i (n, target): model i's units -> clusters; M_i (target, n) = U_i^T / cluster size.

    Sizes count members over all models, so sum_i M_i f_i is each cluster's mean feature.
    ``weights`` (one per stacked unit, e.g. :func:`live_weights`) replace 1 / cluster size.

    >>> M, U = matrices_from_labels(np.array([0, 1, 0, 0]), 2, 2)
    >>> (M[0] @ [3., 6.] + M[1] @ [0., 3.]).tolist()
    [2.0, 6.0]
    """
    labels = np.asarray(labels)
    n = labels.size // n_models
    if weights is None:
        sizes = np.bincount(labels, minlength=target).astype(np.float64)
        weights = 1.0 / np.maximum(sizes, 1.0)[labels]
    Ms, Us = [], []
    for i in range(n_models):
        U = np.zeros((n, target))
        U[np.arange(n), labels[i * n:(i + 1) * n]] = 1.0
        Us.append(U)
        Ms.append(U.T * weights[i * n:(i + 1) * n][None, :])
    return Ms, Us


def perms_to_labels(perms: Sequence[np.ndarray]) -> np.ndarray:
    """A permutation matching as cluster labels of the N n stacked units (cluster k: anchor
    unit k and the unit of every model matched to it).

    >>> perms_to_labels([np.arange(2), np.array([1, 0])]).tolist()
    [0, 1, 1, 0]
    """
    n = len(perms[0])
    labels = np.empty(len(perms) * n, dtype=np.int64)
    for i, p in enumerate(perms):
        labels[i * n + np.asarray(p)] = np.arange(n)
    return labels


def live_weights(labels: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """Merge weight of every stacked unit: a cluster averages its live members only (units
    that varied on the calibration data); a cluster without one averages all of them.

    A unit that never varies adds nothing its model computes, but averaged into a live unit
    its weights pull the merged unit towards its own constant (a dead ReLU unit: below zero,
    so the merged unit fires less or not at all).

    >>> live_weights(np.array([0, 1, 0, 1]), np.array([True, False, False, False])).tolist()
    [0.0, 0.5, 1.0, 0.5]
    """
    labels, dead = np.asarray(labels), np.asarray(dead, dtype=bool)
    k = int(labels.max()) + 1 if labels.size else 0
    size = np.bincount(labels, minlength=k).astype(np.float64)
    live = np.bincount(labels[~dead], minlength=k).astype(np.float64)
    w = np.where(dead, 0.0, 1.0 / np.maximum(live, 1.0)[labels])
    empty = live[labels] == 0
    w[empty] = 1.0 / size[labels][empty]
    return w


# ---------------------------------------------------------------- block-structured spaces

@dataclass(frozen=True)
class GroupAlignment:
    """Block permutation shared by tied spaces and the full unit permutations it induces.

    ``sigmas[i][j]``: block of model i matched to anchor block j (``sigmas[0]`` = identity).
    ``perms[k][i]``: full permutation of space k for model i, in :func:`align`'s convention.
    """
    sigmas: tuple[np.ndarray, ...]
    perms: tuple[tuple[np.ndarray, ...], ...]


def _block_scores(X, G, g, identity):
    """Mean matched similarity (G, G) and within-block assignments (G, G, g) of a cross block."""
    blocks = X.reshape(G, g, G, g).transpose(0, 2, 1, 3)
    if identity:
        within = np.broadcast_to(np.arange(g), (G, G, g))
        return np.einsum("jlaa->jl", blocks) / g, within
    scores = np.empty((G, G))
    within = np.empty((G, G, g), dtype=np.int64)
    for j in range(G):
        for l in range(G):
            rows, cols = linear_sum_assignment(blocks[j, l], maximize=True)
            within[j, l] = cols
            scores[j, l] = blocks[j, l][rows, cols].mean()
    return scores, within


def group_align(Cs: Sequence[np.ndarray], n_models: int, G: int, gs: Sequence[int],
                within_identity: Sequence[bool]) -> GroupAlignment:
    """Align G blocks (heads, groups) shared by tied spaces k with block sizes gs[k].

    Unit index inside space k is block * gs[k] + j. Block scores of tied spaces are summed
    before the block assignment, so every space gets the same sigma.

    >>> C = np.kron([[1., 0., 0., 1.], [0., 1., 1., 0.], [0., 1., 1., 0.], [1., 0., 0., 1.]],
    ...             np.eye(2))   # 2 blocks of 2 units per model, blocks swapped in model 1
    >>> ga = group_align([C], 2, G=2, gs=[2], within_identity=[False])
    >>> ga.sigmas[1].tolist(), ga.perms[0][1].tolist()
    ([1, 0], [2, 3, 0, 1])
    """
    Cs = [np.asarray(C) for C in Cs]
    if not len(Cs) == len(gs) == len(within_identity):
        raise ValueError("group_align: Cs, gs and within_identity differ in length")
    for C, g in zip(Cs, gs):
        if anchor_units(C, n_models) != G * g:
            raise ValueError(f"group_align: similarity {C.shape} is not N * {G} blocks of {g}")
    sigmas = [np.arange(G)]
    perms = [[np.arange(G * g)] for g in gs]
    for i in range(1, n_models):
        total = np.zeros((G, G))
        withins = []
        for C, g, ident in zip(Cs, gs, within_identity):
            n = G * g
            scores, within = _block_scores(np.asarray(C[:n, i * n:(i + 1) * n], dtype=np.float64), G, g, ident)
            total += scores
            withins.append(within)
        _, sigma = linear_sum_assignment(total, maximize=True)
        sigmas.append(sigma.astype(np.int64))
        for k, (g, within) in enumerate(zip(gs, withins)):
            full = sigma[:, None] * g + within[np.arange(G), sigma]
            perms[k].append(full.reshape(-1).astype(np.int64))
    return GroupAlignment(tuple(sigmas), tuple(tuple(p) for p in perms))


def group_zip(Cs: Sequence[np.ndarray], n_models: int, G: int, gs: Sequence[int],
              within_identity: Sequence[bool], a: float = 0.5,
              b: float = 1.0) -> list[np.ndarray]:
    """Zip inside block clusters from :func:`group_align`; merged block j owns labels j*g..

    Each block cluster (anchor block j and block sigma_i(j) of every model i) is zipped on its
    own with target g and its own budget; ``within_identity`` spaces pair unit u of the blocks.

    >>> C = np.kron([[1., 0., 0., 1.], [0., 1., 1., 0.], [0., 1., 1., 0.], [1., 0., 0., 1.]],
    ...             np.eye(2))
    >>> group_zip([C], 2, G=2, gs=[2], within_identity=[False])[0].tolist()
    [0, 1, 2, 3, 2, 3, 0, 1]
    """
    sigmas = group_align(Cs, n_models, G, gs, within_identity).sigmas
    out = []
    for C, g, ident in zip(Cs, gs, within_identity):
        C = np.asarray(C, dtype=np.float64)
        n = G * g
        labels = np.empty(n_models * n, dtype=np.int64)
        for j in range(G):
            units = np.concatenate([i * n + sigmas[i][j] * g + np.arange(g)
                                    for i in range(n_models)])
            if ident:
                local = np.tile(np.arange(g), n_models)
            else:
                local = zip_match(C[np.ix_(units, units)], n_models, target=g, a=a, b=b)
            labels[units] = j * g + local
        out.append(labels)
    return out
