"""Compact alignments: an Alignment keeps permutations / cluster labels and their weights; the
dense M_i, U_i it derives are the solvers' matrices, and the rewrite (gathers and segment sums)
agrees with the dense merge math sum_i M_i W_i U_i^T."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes.alignment import Alignment, SpaceMatching
from mudsc_fx.passes.apply import named_tensors
from mudsc_fx.solvers import live_weights, matrices_from_labels, matrices_from_perms, perms_to_labels


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _spaces(pg):
    """Free unit spaces of the MLP: the outputs of layers 0 and 2."""
    return [next(m.layout.space for m in pg.members if m.fqn == f"{k}.weight" and m.axis == 0) for k in (0, 2)]


@pytest.mark.parametrize("N", [2, 3])
def test_dense_matrices_are_the_solvers_matrices(N):
    rng = np.random.default_rng(N)
    n = 7
    perms = [np.arange(n)] + [rng.permutation(n) for _ in range(N - 1)]
    got = SpaceMatching.from_perms(perms)
    Ms, Us = matrices_from_perms(perms)
    for i in range(N):
        M, U = got.matrices(i)
        np.testing.assert_array_equal(M, Ms[i])
        np.testing.assert_array_equal(U, Us[i])
    assert got.plain_permutation
    dead = rng.random(N * n) < 0.3
    weights = live_weights(perms_to_labels(perms), dead)
    got = SpaceMatching.from_perms(perms, weights)
    Ms, Us = matrices_from_labels(perms_to_labels(perms), N, n, weights)
    assert not got.plain_permutation
    for i in range(N):
        np.testing.assert_array_equal(got.matrices(i)[0], Ms[i])
        np.testing.assert_array_equal(got.matrices(i)[1], Us[i])
    labels = rng.integers(0, n, N * n)
    got = SpaceMatching.from_labels(labels, N, n + 2)  # wider target: empty clusters stay zero
    Ms, Us = matrices_from_labels(labels, N, n + 2)
    for i in range(N):
        np.testing.assert_array_equal(got.matrices(i)[0], Ms[i])
        np.testing.assert_array_equal(got.matrices(i)[1], Us[i])


def _dense_merge(models, spaces, matchings):
    """sum_i M_i W_i U_i^T for the three linear layers of _mlp (slow reference, float64)."""
    N = len(models)
    t = [{k: v.detach().double().numpy() for k, v in named_tensors(m).items()} for m in models]
    sa, sb = spaces
    out = {}
    for name, (o, inn) in {"0": (sa, None), "2": (sb, sa), "4": (None, sb)}.items():
        W = sum((matchings[o].matrices(i)[0] if o is not None else np.eye(t[i][f"{name}.weight"].shape[0]) / N)
                @ t[i][f"{name}.weight"] @ (matchings[inn].matrices(i)[1] if inn is not None else np.eye(4)) for i in range(N))
        b = sum((matchings[o].matrices(i)[0] if o is not None else np.eye(len(t[i][f"{name}.bias"])) / N) @ t[i][f"{name}.bias"]
                for i in range(N))
        out[f"{name}.weight"], out[f"{name}.bias"] = W, b
    return out


@pytest.mark.parametrize("N", [2, 3])
def test_rewrite_of_compact_alignment_is_the_dense_merge(N):
    models = [_mlp(s) for s in range(N)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(models[0], torch.randn(2, 4))
    sa, sb = _spaces(pg)
    rng = np.random.default_rng(0)
    dead = rng.random(N * 5) < 0.3
    perms = [np.arange(5)] + [rng.permutation(5) for _ in range(N - 1)]
    matchings = {sa: SpaceMatching.from_perms(perms, live_weights(perms_to_labels(perms), dead)),
                 sb: SpaceMatching.from_labels(rng.integers(0, 4, N * 6), N, 4)}
    al = Alignment(matchings, N)
    merged = mf.rewrite(models, pg, al)
    want = _dense_merge(models, (sa, sb), matchings)
    for k, v in named_tensors(merged).items():
        np.testing.assert_allclose(v.detach().double().numpy(), want[k], rtol=1e-6, atol=1e-7)
    assert merged[2].weight.shape == (4, 5)
    # the derived dense matrices are the ones the reference used
    assert list(al.M) == [sa, sb] and sb in al.U and al.perms.keys() == {sa}
    np.testing.assert_array_equal(al.U[sb][N - 1], matchings[sb].matrices(N - 1)[1])


def test_alignment_of_a_merge_is_compact():
    """A solved alignment holds O(N n) numbers per space, not N n^2 (pickled size bounded)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 400), nn.ReLU(), nn.Linear(400, 3)).eval() for _ in range(2)]
    data = [torch.randn(64, 8) for _ in range(2)]
    for method in ("mudsc_zip", "act_align"):
        res = mf.Merger(models, data).merge(method)
        al = res.alignment
        (s,) = list(al.spaces)
        assert al.M[s][0].shape == (al.spaces[s].size, 400)
        assert len(pickle.dumps(al)) < 40 * 2 * 400  # dense M and U would be 2 * 2 * 400^2 * 8 bytes


def test_anchor_rows_are_the_rows_of_the_square():
    from mudsc_fx.numerics import PackedSymmetric, pearson_anchor_rows_, pearson_rows_
    rng = np.random.default_rng(1)
    m = 23
    A = rng.standard_normal((m, m)).astype(np.float32)
    S = A + A.T
    bounds = ((0, 5), (5, 11), (11, 23))
    packed = PackedSymmetric(m, bounds, tuple(np.ascontiguousarray(S[a:b, :b]) for a, b in bounds))
    for r in (1, 5, 8, 11, 23):
        np.testing.assert_array_equal(packed.rows(r), packed.square()[:r])
    Z = torch.randn(3 * 7, 40)
    Z[9] = 3.0  # a dead row (constant)
    full, dead = pearson_rows_(Z.clone())
    rows, dead_r = pearson_anchor_rows_(Z.clone(), 7)
    np.testing.assert_array_equal(dead, dead_r)
    np.testing.assert_allclose(rows, full[:7], atol=1e-6)


def test_align_reads_only_the_anchor_rows_of_the_statistics(monkeypatch):
    """A permutation matching never builds a space's (N n)^2 correlation square."""
    from mudsc_fx.passes.stats import Correlations
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 3)).eval() for _ in range(2)]
    data = [torch.randn(64, 8) for _ in range(2)]
    merger = mf.Merger(models, data)
    want = merger.merge("mudsc_align").alignment.perms
    stats = merger.statistics()

    def square(self, s):
        raise AssertionError("align built a square")
    monkeypatch.setattr(Correlations, "__getitem__", square)
    object.__setattr__(stats.corr, "_last", (None, None))
    for method in ("act_align", "mudsc_align"):
        got = mf.solve(merger.graph, stats, models, mf.method_config(method)).perms
        if method == "mudsc_align":
            assert got.keys() == want.keys() and all(np.array_equal(got[s][1], want[s][1]) for s in got)
