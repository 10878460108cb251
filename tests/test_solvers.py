"""Matching solvers (mudsc_fx.solvers.match, .zipit): planted recoveries and fast == reference zip."""
import doctest
import logging
import zlib

import numpy as np
import pytest

from mudsc_fx.solvers import match, zipit
from mudsc_fx.solvers.match import align, group_align, group_zip, matrices_from_labels, matrices_from_perms
from mudsc_fx.solvers.zipit import zip_match, zip_match_fast, zip_match_reference


def _corr(*feats):
    return np.corrcoef(np.vstack(feats))


def _planted_copies(rng, n, N, noise=0.1, d=64):
    """Features of N models, model i > 0 a permuted noisy copy of model 0; returns C, inv perms."""
    F0 = rng.standard_normal((n, d))
    feats, expected = [F0], [np.arange(n)]
    for _ in range(1, N):
        perm = rng.permutation(n)  # model i unit j holds anchor unit perm[j]
        feats.append(F0[perm] + noise * rng.standard_normal((n, d)))
        expected.append(np.argsort(perm))
    return _corr(*feats), expected, feats


def _random_sym(rng, m, kind):
    if kind == "normal":
        A = rng.standard_normal((m, m))
    elif kind == "ties":  # many exactly equal entries
        A = np.round(rng.standard_normal((m, m)), 1)
    elif kind == "int":
        A = rng.integers(0, 3, (m, m)).astype(float)
    else:  # "rank1": every row prefers the same few units, the fast solver's hard case
        u = rng.random(m)
        A = np.outer(u, u) + 0.01 * rng.standard_normal((m, m))
    return (A + A.T) / 2


def _same(C, N, target=None, a=0.5, b=1.0):
    ref = zip_match_reference(C, N, target, a, b)
    fast = zip_match_fast(C, N, target, a, b)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(zip_match(C, N, target, a, b), ref)
    return fast


# ---------------------------------------------------------------- align

@pytest.mark.parametrize("N", [2, 3])
def test_align_recovers_planted_permutation(N):
    C, expected, _ = _planted_copies(np.random.default_rng(0), 48, N)
    perms = align(C, N)
    for got, want in zip(perms, expected):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- zip

@pytest.mark.parametrize("kind", ["normal", "ties", "int", "rank1"])
@pytest.mark.parametrize("N", [2, 3])
@pytest.mark.parametrize("a,b", [(0.5, 1.0), (1e-4, 0.075), (1.0, 0.5), (0.0, 1.0),
                                 (0.5, 0.0)])
def test_zip_fast_equals_reference_random(kind, N, a, b):
    rng = np.random.default_rng(zlib.crc32(repr((kind, N, a, b)).encode()))
    n = 40 if N == 2 else 30
    C = _random_sym(rng, N * n, kind)
    if a <= 0 and N > 2:  # each cluster merges at most once: 3n units cannot reach n
        with pytest.raises(ValueError, match="no mergeable pair"):
            zip_match_fast(C, N, a=a, b=b)
        with pytest.raises(ValueError, match="no mergeable pair"):
            zip_match_reference(C, N, a=a, b=b)
        return
    labels = _same(C, N, a=a, b=b)
    assert sorted(set(labels.tolist())) == list(range(n))


@pytest.mark.parametrize("N", [2, 3])
@pytest.mark.parametrize("a,b", [(0.5, 1.0), (1e-4, 0.075), (0.0, 1.0), (0.3, 0.2)])
def test_zip_fast_equals_reference_planted_duplicates(N, a, b):
    rng = np.random.default_rng(N * 100 + int(b * 1000))
    n = 60
    _, _, feats = _planted_copies(rng, n, N, noise=0.3)
    feats[0][1::4] = feats[0][0::4]           # exact duplicates inside model 0: tied pairs
    feats[1][5] = feats[0][7]                 # and an exact duplicate across models
    C = _corr(*feats)
    if a <= 0 and N > 2:
        with pytest.raises(ValueError):
            zip_match_fast(C, N, a=a, b=b)
        return
    _same(C, N, a=a, b=b)
    _same(C, N, target=n + 7, a=a, b=b)


@pytest.mark.parametrize("chunks", [None, (1, 2, 3, None), (1, None)])
def test_zip_fast_equals_reference_larger_with_refills(chunks, monkeypatch):
    """n = 300: long runs exercise chunk refills, batched refills and pool compaction; tiny
    chunk sizes force every refill path (single row, batch, full row) to run often."""
    if chunks is not None:
        monkeypatch.setattr(zipit, "_CHUNKS", chunks)
        monkeypatch.setattr(zipit, "_BATCH_ELEMS", 4000)
    rng = np.random.default_rng(3)
    for kind in ("rank1", "normal"):
        _same(_random_sym(rng, 600, kind), 2)
        _same(_random_sym(rng, 600, kind), 2, a=1e-4, b=0.075)


@pytest.mark.parametrize("N", [2, 3])
def test_zip_model_with_itself_pairs_copies(N):
    F = np.random.default_rng(1).standard_normal((50, 256))
    labels = _same(_corr(*[F] * N), N)
    for i in range(1, N):
        np.testing.assert_array_equal(labels[i * 50:(i + 1) * 50], labels[:50])
    np.testing.assert_array_equal(labels[:50], np.arange(50))


def test_zip_ties_take_lowest_flat_index():
    assert _same(np.ones((4, 4)), 2).tolist() == [0, 0, 1, 1]
    assert _same(np.ones((6, 6)), 3, target=3).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("b,same_model_merges", [(0.5, 2), (1.0, 4)])
def test_zip_same_model_budget(b, same_model_merges):
    """Model 0 holds 4 duplicated pairs; budget int(b * 8 / 2) limits how many get zipped."""
    rng = np.random.default_rng(4)
    F0 = np.repeat(rng.standard_normal((4, 32)), 2, axis=0)
    F1 = rng.standard_normal((8, 32))
    labels = _same(_corr(F0, F1), 2, b=b)
    counts = np.bincount(labels[:8], minlength=8)
    assert (counts == 2).sum() == same_model_merges and counts.max() == 2
    assert sum(labels[2 * k] == labels[2 * k + 1] for k in range(4)) == same_model_merges


def test_zip_nonpositive_a_forbids_remerging():
    C = _random_sym(np.random.default_rng(14), 80, "normal")
    for a in (0.0, -1.0):
        assert np.bincount(_same(C, 2, a=a)).max() == 2


def test_zip_zero_budget_gives_cross_model_matching():
    C, _, _ = _planted_copies(np.random.default_rng(5), 40, 2, noise=1.0)
    labels = _same(C, 2, b=0.0)
    np.testing.assert_array_equal(np.sort(labels[:40]), np.arange(40))
    np.testing.assert_array_equal(np.sort(labels[40:]), np.arange(40))


def test_zip_lifts_budgets_when_masks_block_every_pair(caplog):
    C = _random_sym(np.random.default_rng(6), 90, "normal")
    with caplog.at_level(logging.WARNING, logger="mudsc_fx.solvers.zipit"):
        labels = _same(C, 3, b=0.0)
    assert "finishing without budgets" in caplog.text
    assert labels.max() == 29 and np.bincount(labels).min() >= 1


@pytest.mark.parametrize("zip_match", [zip_match_fast, zip_match_reference])
def test_zip_rejects_bad_input(zip_match):
    with pytest.raises(ValueError):
        zip_match(np.ones((5, 5)), 2)
    with pytest.raises(ValueError):
        zip_match(np.full((4, 4), np.nan), 2)
    with pytest.raises(ValueError):
        zip_match(np.ones((4, 4)), 2, target=0)


# ---------------------------------------------------------------- merge / unmerge matrices

def test_matrices_from_perms_average_matched_features():
    rng = np.random.default_rng(7)
    C, _, feats = _planted_copies(rng, 16, 3)
    perms = align(C, 3)
    M, U = matrices_from_perms(perms)
    z = sum(Mi @ f for Mi, f in zip(M, feats))
    want = np.mean([f[p] for f, p in zip(feats, perms)], axis=0)
    np.testing.assert_allclose(z, want)
    for Ui, f, p in zip(U, feats, perms):
        assert Ui.shape == (16, 16)
        np.testing.assert_allclose(Ui @ z[:, :1], np.asarray(want)[np.argsort(p), :1])


def test_matrices_from_labels_give_cluster_means():
    rng = np.random.default_rng(8)
    C, _, feats = _planted_copies(rng, 20, 3, noise=0.5)
    labels = zip_match(C, 3, target=20)
    M, U = matrices_from_labels(labels, 3, 20)
    assert M[0].shape == (20, 20) and U[0].shape == (20, 20)
    z = sum(Mi @ f for Mi, f in zip(M, feats))
    stacked = np.vstack(feats)
    for c in range(20):
        np.testing.assert_allclose(z[c], stacked[labels == c].mean(axis=0))
    for i, Ui in enumerate(U):
        np.testing.assert_array_equal(Ui.argmax(1), labels[i * 20:(i + 1) * 20])
    M, U = matrices_from_labels(labels, 3, 25)  # wider target: empty clusters stay zero
    assert M[0].shape == (25, 20) and not M[0][20:].any()


# ---------------------------------------------------------------- group alignment

def _planted_heads(rng, N, G, gs, identity, noise=0.1, d=64):
    """Features per tied space; model i's heads are a shared permutation of model 0's, with a
    within-head permutation per space (identity where asked). Returns Cs, sigmas, perms."""
    anchors = [rng.standard_normal((G * g, d)) for g in gs]
    feats = [[F] for F in anchors]
    sigmas, perms = [np.arange(G)], [[np.arange(G * g)] for g in gs]
    for _ in range(1, N):
        sigma = rng.permutation(G)  # anchor head j -> head sigma[j] of model i
        sigmas.append(sigma)
        for k, (g, ident, F0) in enumerate(zip(gs, identity, anchors)):
            within = [np.arange(g) if ident else rng.permutation(g) for _ in range(G)]
            full = np.concatenate([sigma[j] * g + within[j] for j in range(G)])
            F = np.empty_like(F0)
            F[full] = F0 + noise * rng.standard_normal(F0.shape)
            feats[k].append(F)
            perms[k].append(full)
    return [_corr(*f) for f in feats], sigmas, perms


@pytest.mark.parametrize("N", [2, 3])
def test_group_align_recovers_planted_heads_two_tied_spaces(N):
    G, gs, ident = 6, [4, 3], [False, False]
    Cs, sigmas, perms = _planted_heads(np.random.default_rng(9), N, G, gs, ident)
    ga = group_align(Cs, N, G, gs, ident)
    for got, want in zip(ga.sigmas, sigmas):
        np.testing.assert_array_equal(got, want)
    for k in range(2):
        for got, want in zip(ga.perms[k], perms[k]):
            np.testing.assert_array_equal(got, want)


def test_group_align_tie_lets_an_informative_space_drive_sigma():
    rng = np.random.default_rng(10)
    G, gs = 8, [4, 5]
    Cs, sigmas, perms = _planted_heads(rng, 2, G, gs, [False, True])
    n1 = G * gs[1]
    F = rng.standard_normal((2 * n1, 64))  # second space: pure noise, no planted structure
    noise_C = _corr(F)
    ga = group_align([Cs[0], noise_C], 2, G, gs, [False, True])
    np.testing.assert_array_equal(ga.sigmas[1], sigmas[1])
    np.testing.assert_array_equal(ga.perms[0][1], perms[0][1])
    np.testing.assert_array_equal(ga.perms[1][1].reshape(G, -1),
                                  sigmas[1][:, None] * gs[1] + np.arange(gs[1]))
    # within-identity space on planted data: head permutation only
    ga = group_align(Cs, 2, G, gs, [False, True])
    np.testing.assert_array_equal(ga.perms[1][1], perms[1][1])


def test_group_align_perms_respect_blocks():
    rng = np.random.default_rng(11)
    G, gs = 5, [3, 4]
    Cs = [_random_sym(rng, 3 * G * g, "normal") for g in gs]
    ga = group_align(Cs, 3, G, gs, [False, False])
    for k, g in enumerate(gs):
        for i in range(3):
            blocks = ga.perms[k][i].reshape(G, g)
            np.testing.assert_array_equal(blocks // g, np.repeat(ga.sigmas[i][:, None], g, 1))
            np.testing.assert_array_equal(np.sort(blocks % g, axis=1),
                                          np.tile(np.arange(g), (G, 1)))


@pytest.mark.parametrize("N", [2, 3])
def test_group_zip_keeps_blocks_contiguous(N):
    G, gs, ident = 5, [4, 3], [False, True]
    Cs, sigmas, perms = _planted_heads(np.random.default_rng(12), N, G, gs, ident, noise=0.2)
    labels = group_zip(Cs, N, G, gs, ident)
    for k, g in enumerate(gs):
        n = G * g
        lab = labels[k].reshape(N, G, g)
        for i in range(N):
            # every block of every model lands inside one merged block's label range
            assert (lab[i] // g == (lab[i] // g)[:, :1]).all()
            np.testing.assert_array_equal(lab[i, sigmas[i]] // g,
                                          np.repeat(np.arange(G)[:, None], g, 1))
        assert sorted(set(labels[k].tolist())) == list(range(n))
        for i in range(1, N):  # planted matches share a cluster
            np.testing.assert_array_equal(labels[k][i * n + perms[k][i]], labels[k][:n])
    np.testing.assert_array_equal(labels[1][:G * gs[1]], np.arange(G * gs[1]))


def test_group_zip_with_budgets_still_contiguous():
    rng = np.random.default_rng(13)
    G, g = 4, 6
    C = _random_sym(rng, 2 * G * g, "normal")
    lab = group_zip([C], 2, G, [g], [False], a=1e-4, b=0.075)[0].reshape(2, G, g)
    assert (lab // g == (lab // g)[:, :, :1]).all()


# ---------------------------------------------------------------- docs

@pytest.mark.parametrize("module", [match, zipit], ids=["match", "zipit"])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
