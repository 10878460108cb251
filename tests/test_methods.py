"""The matching-method registry: a method is a preset of a family, a new family is one Matcher;
a registered method merges like the built-in ones, and bad registrations are refused."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx import methods
from mudsc_fx.passes.apply import apply_permutations, random_permutations
from mudsc_fx.solvers import families
from mudsc_fx.solvers.families import Matcher, Matching


class GreedyPairs(Matcher):
    """Greedy bipartite matching to the anchor: repeatedly pair the most similar free anchor
    unit and unit of model i (a permutation, without the assignment solver). It reads only the
    anchor's rows, so the solve hands it (n, N n) rows."""
    anchor_rows = True

    def __init__(self):
        self.calls = 0

    def space(self, C, n_models, size, cfg, blocked=False):
        self.calls += 1
        n = size
        assert C.shape == (n, n_models * n)
        perms = [np.arange(n)]
        for i in range(1, n_models):
            X = np.array(C[:n, i * n:(i + 1) * n], dtype=np.float64)
            perm = np.empty(n, dtype=np.int64)
            for _ in range(n):
                k, j = np.unravel_index(np.argmax(X), X.shape)
                perm[k] = j
                X[k, :], X[:, j] = -np.inf, -np.inf
            perms.append(perm)
        return Matching.perms(perms)


@pytest.fixture
def registry():
    """Leave the registries as they were."""
    saved = dict(methods.PRESETS), dict(methods._FAMILY), dict(families.MATCHERS)
    yield
    for live, old in zip((methods.PRESETS, methods._FAMILY, families.MATCHERS), saved):
        live.clear()
        live.update(old)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def test_registered_method_merges_a_model_with_its_permuted_copy_back(registry):
    matcher = GreedyPairs()
    mf.register_method("greedy_pairs", mf.MatchConfig(match="greedy", alpha=0.5, iterate=True), matcher=matcher)
    assert "greedy_pairs" in mf.PRESETS and mf.method_config(match="greedy").match == "greedy"
    model = _mlp(0)
    x = torch.randn(64, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, x[:2])
    planted = random_permutations(pg, np.random.default_rng(3))
    copy_ = apply_permutations(model, pg, planted)
    res = mf.Merger([model, copy_], [x[:32], x[32:]]).merge("greedy_pairs", reset_bn=False)
    assert matcher.calls > 0 and res.config.match == "greedy"
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), rtol=1e-5, atol=1e-5)
    for s, p in planted.items():  # the planted permutation is found (copy unit k = model unit p[k])
        np.testing.assert_array_equal(res.alignment.perms[s][1], np.argsort(p))
    # alpha of a family without single-space rows: the dual row with that alpha
    assert mf.method_config("greedy_pairs", 0.0).alpha == 0.0
    assert mf.method_config("greedy_pairs", 0.25).match == "greedy"


def test_registered_single_space_row_joins_its_family(registry):
    mf.register_method("weight_zip_b", mf.MatchConfig(match="zip", alpha=1.0, zip_b=0.5), row="weight")
    assert methods.family_methods("zip") == ("zipit", "mudsc_zip", "weight_zip_b")
    assert mf.method_config("mudsc_zip", 1.0).zip_b == 0.5  # alpha 1 of the dual row: the weight row
    with pytest.raises(ValueError, match="weight-only row"):
        mf.method_config("weight_zip_b", 0.5)


def test_bad_registrations_are_refused(registry):
    cfg = mf.MatchConfig(match="align", alpha=0.5)
    with pytest.raises(ValueError, match="already registered"):
        mf.register_method("mudsc_zip", cfg)
    with pytest.raises(ValueError, match="no matcher for family 'unknown'"):
        mf.register_method("mine", mf.MatchConfig(match="unknown"))
    with pytest.raises(ValueError, match="activation-only row has alpha 0"):
        mf.register_method("mine", cfg, row="activation")
    with pytest.raises(TypeError, match="Matcher"):
        mf.register_method("mine", mf.MatchConfig(match="new"), matcher=object())
    with pytest.raises(ValueError, match="row must be one of"):
        mf.register_method("mine", cfg, row="both")
    assert "mine" not in mf.PRESETS


def test_unknown_family_in_a_config_is_named():
    model = _mlp(0)
    x = torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, x)
    with pytest.raises(ValueError, match="unknown matching family 'nope'"):
        mf.solve(pg, None, [model, _mlp(1)], mf.MatchConfig(match="nope", alpha=1.0))
