"""Weight features (MuDSC's Z, Git Re-Basin's cost) as the reference MuDSC code builds them:
learned tensors only, neighbours moved into the merged basis by N M_i on `in` axes and U_i^T
on `out` axes (for a permutation: the plain permutation)."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes.apply import named_tensors
from mudsc_fx.passes.solve import AlignmentOps
from mudsc_fx.passes.weights import running_statistics, unit_weight_features, weight_similarity
from mudsc_fx.solvers import matrices_from_labels


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _convbn(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m[1], m[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _infer(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.infer(model, x)


def _space_of(pg, fqn, axis):
    return next(m.layout.space for m in pg.members if m.fqn == fqn and m.axis == axis)


def test_running_statistics_are_left_out_of_the_features_but_still_merged():
    a, b = _convbn(0), _convbn(1)
    x = torch.randn(2, 3, 8, 8)
    pg = _infer(a, x)
    assert running_statistics(pg) >= {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    s = _space_of(pg, "0.weight", 0)
    ops = AlignmentOps(2, torch.float32)
    tensors = [named_tensors(a), named_tensors(b)]
    C = weight_similarity(pg, tensors, s, [ops.feature_op(i) for i in range(2)])
    shifted = dict(tensors[1])
    shifted["1.running_mean"] = shifted["1.running_mean"] + 100.0
    shifted["1.running_var"] = shifted["1.running_var"] * 50.0
    np.testing.assert_array_equal(C, weight_similarity(pg, [tensors[0], shifted], s,
                                                        [ops.feature_op(i) for i in range(2)]))
    # Z of the first space: conv weight (6 x 27), conv bias, BN weight and bias, next conv's input slices
    Z = unit_weight_features(pg, tensors[0], s, ops.feature_op(0))
    assert Z.shape == (6, 27 + 1 + 1 + 1 + 4 * 9)
    # ... while the merge still averages the (matched) running statistics
    merged = mf.merge([a, b], [x], method="mudsc_zip", reset_bn=False)
    res = mf.Merger([a, b], [x]).merge("mudsc_zip", reset_bn=False)
    U = res.alignment.U[s]
    M = res.alignment.M[s]
    want = M[0] @ a[1].running_var.double().numpy() + M[1] @ b[1].running_var.double().numpy()
    np.testing.assert_allclose(merged[1].running_var.double().numpy(), want, rtol=1e-6)
    assert U[0].shape == (6, 6)


def test_features_of_a_zipped_neighbour_match_the_reference_projection():
    """Z by hand, as the reference code computes it: a neighbour's in axis by N M_i, its
    out axis by U_i^T (both for a zip clustering of the neighbour)."""
    N = 2
    models = [_mlp(0), _mlp(1)]
    pg = _infer(models[0], torch.randn(2, 4))
    sa, sb = _space_of(pg, "0.weight", 0), _space_of(pg, "2.weight", 0)
    rng = np.random.default_rng(0)
    labels = {sa: np.concatenate([np.arange(5), rng.integers(0, 5, 5)]),
              sb: np.concatenate([rng.integers(0, 6, 6), np.arange(6)])}
    ops = AlignmentOps(N, torch.float64)
    for s, lab in labels.items():
        ops.set_labels(s, lab)
    mats = {s: matrices_from_labels(lab, N, len(lab) // N) for s, lab in labels.items()}
    for i, m in enumerate(models):
        t = {k: v.detach().double() for k, v in named_tensors(m).items()}
        Ma, _ = mats[sa][0][i], mats[sa][1][i]
        Ub = mats[sb][1][i]
        W1, b1, W2, b2, W3 = (t[k].numpy() for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight"))
        # space b: 2.weight's in axis (space a) by N M_a; 4.weight's in axis is space b itself
        want_b = np.concatenate([W2 @ (N * Ma).T, b2[:, None], W3.T], axis=1)
        # space a: 2.weight's out axis (space b) by U_b^T
        want_a = np.concatenate([W1, b1[:, None], (Ub.T @ W2).T], axis=1)
        for s, want in ((sb, want_b), (sa, want_a)):
            got = unit_weight_features(pg, t, s, ops.feature_op(i)).numpy()
            assert got.shape == want.shape
            np.testing.assert_allclose(got @ got.T, want @ want.T, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.sort(got, axis=None), np.sort(want, axis=None), rtol=1e-12)


def test_permuted_neighbours_carry_no_one_over_n():
    """For a permutation the projection is the plain permutation: the Re-Basin inner product
    of a model with its aligned copy equals the model's own Gram matrix, for every N."""
    base = _mlp(3)
    pg = _infer(base, torch.randn(2, 4))
    sa, sb = _space_of(pg, "0.weight", 0), _space_of(pg, "2.weight", 0)
    for N in (2, 3):
        tensors = [named_tensors(base)] * N
        ops = AlignmentOps(N, torch.float64)
        ops.set_perms(sa, [np.arange(5)] * N)
        C = weight_similarity(pg, tensors, sb, [ops.feature_op(i) for i in range(N)], kind="inner")
        n = 6
        for i in range(1, N):
            np.testing.assert_allclose(C[:n, i * n:(i + 1) * n], C[:n, :n], rtol=1e-12)
