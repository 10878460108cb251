"""Merge engine: planted permutations are recovered, presets agree, bad input is refused."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes.apply import apply_permutations, random_permutations

from topologies import TOPOLOGIES, by_name

ALIGN = ["rebasin", "act_align", "mudsc_align"]
ZIP = ["zipit", "weight_zip", "mudsc_zip"]


def _inputs(t):
    x = t.example()
    return x if isinstance(x, tuple) else (x,)


def _calibration(t, batches=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        b = []
        for a in _inputs(t):
            if a.is_floating_point():
                b.append(torch.randn((size,) + tuple(a.shape[1:]), generator=g))
            else:
                b.append(torch.randint(0, int(a.max()) + 1, (size,) + tuple(a.shape[1:]), generator=g))
        out.append(tuple(b))
    return out


def _permuted_copies(model, x, k, seed=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, x)
    rng = np.random.default_rng(seed)
    return [apply_permutations(model, pg, random_permutations(pg, rng)) for _ in range(k)]


def _merge(models, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.merge(models, data, reset_bn=False, **kw)


@pytest.mark.parametrize("name", [t.name for t in TOPOLOGIES])
@pytest.mark.parametrize("method", ALIGN + ["zipit"])
def test_merging_a_model_with_its_permuted_copy_returns_the_model(name, method):
    t = by_name(name)
    model = t.build().eval()
    x = _inputs(t)
    merged = _merge([model] + _permuted_copies(model, x, 1), _calibration(t), method=method)
    with torch.no_grad():
        torch.testing.assert_close(merged(*x), model(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [t.name for t in TOPOLOGIES])
@pytest.mark.parametrize("method", ALIGN + ["zipit_a1"])
def test_three_permuted_copies_merge_back(name, method):
    """N = 3. ZipIt's greedy with a < 1 discounts a cluster's similarity once it holds two
    units, so a third copy can lose to a same-model pair; with a = 1 it must come back."""
    t = by_name(name)
    model = t.build().eval()
    x = _inputs(t)
    kw = {"method": "zipit", "zip_a": 1.0} if method == "zipit_a1" else {"method": method}
    merged = _merge([model] + _permuted_copies(model, x, 2), _calibration(t), **kw)
    with torch.no_grad():
        torch.testing.assert_close(merged(*x), model(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_bn", "timm_attention", "gpt"])
def test_zip_of_a_model_with_itself_returns_it(name):
    t = by_name(name)
    model = t.build().eval()
    merged = _merge([model, copy.deepcopy(model)], _calibration(t), method="mudsc_zip")
    x = _inputs(t)
    with torch.no_grad():
        torch.testing.assert_close(merged(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_average_of_identical_models_is_the_model():
    t = by_name("convnext")
    model = t.build().eval()
    merged = _merge([model, copy.deepcopy(model), copy.deepcopy(model)], None, method="average",
                    example_inputs=_inputs(t))
    for (k, a), b in zip(model.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def _two_models(name, seed_b=7):
    t = by_name(name)
    torch.manual_seed(0)
    a = t.build().eval()
    b = t.build(seed=seed_b).eval()
    return t, a, b


@pytest.mark.parametrize("family,low,high", [("align", "act_align", "rebasin"), ("zip", "zipit", "weight_zip")])
def test_alpha_endpoints_are_the_single_space_rows(family, low, high):
    t, a, b = _two_models("resnet_bn")
    data = _calibration(t)
    mid = "mudsc_align" if family == "align" else "mudsc_zip"
    for alpha, row in ((0.0, low), (1.0, high)):
        x = _merge([a, b], data, method=mid, alpha=alpha)
        y = _merge([a, b], data, method=row)
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k]), (alpha, row, k)


def test_same_seed_gives_bit_identical_state_dict_and_inputs_untouched():
    t, a, b = _two_models("vit_mha")
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    a.train()
    data = _calibration(t)
    x = mf.merge([a, b], data, method="mudsc_zip", seed=3)
    y = mf.merge([a, b], data, method="mudsc_zip", seed=3)
    for k, v in x.state_dict().items():
        assert torch.equal(v, y.state_dict()[k]), k
    for m, sd in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    assert a.training and not b.training
    assert type(x) is type(a)


def test_mudsc_iteration_records_its_sweeps_and_stage_times():
    t, a, b = _two_models("mlp")
    res = mf.Merger([a, b], _calibration(t)).merge("mudsc_align", reset_bn=False)
    hist = res.alignment.objective
    assert res.alignment.sweeps >= 1 and len(hist) == res.alignment.sweeps + 1
    assert res.seconds.keys() >= {"infer", "verify", "statistics", "solve", "rewrite", "reset_bn"}


def test_merge_of_different_models_keeps_shapes_and_finite_values():
    t, a, b = _two_models("resnet_bn")
    merged = mf.merge([a, b], _calibration(t), method="zipit")
    for k, v in merged.state_dict().items():
        assert v.shape == a.state_dict()[k].shape and torch.isfinite(v.float()).all()


def test_reset_bn_recomputes_statistics():
    t = by_name("resnet_bn")
    model = t.build().eval()
    data = _calibration(t)
    m2 = mf.reset_bn(copy.deepcopy(model), data)
    feats = []
    hook = m2.bn.register_forward_hook(lambda mod, i, o: feats.append(i[0]))
    m2.eval()
    with torch.no_grad():
        for (xb,) in data:
            m2(xb)
    hook.remove()
    allx = torch.cat(feats)
    torch.testing.assert_close(m2.bn.running_mean, allx.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- bad input
def _mlp(width=8):
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


DATA = [torch.randn(16, 4)]


def test_error_fewer_than_two_models():
    with pytest.raises(ValueError, match="at least 2 models"):
        mf.merge([_mlp()], DATA)


def test_error_shapes_differ_names_the_parameter():
    with pytest.raises(ValueError, match=r"model 1 parameter '0.weight' has shape \(16, 4\)"):
        mf.merge([_mlp(8), _mlp(16)], DATA)


def test_error_names_differ():
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Identity())
    other.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'extra.weight'"):
        mf.merge([_mlp(), other], DATA)


def test_error_empty_data():
    with pytest.raises(ValueError, match="empty"):
        mf.merge([_mlp(), _mlp()], [], method="zipit")


def test_error_data_free_needs_example():
    with pytest.raises(ValueError, match="example_inputs"):
        mf.merge([_mlp(), _mlp()], None, method="rebasin")


def test_data_free_methods_work_without_data():
    for method in ("average", "rebasin", "weight_zip"):
        merged = mf.merge([_mlp(), _mlp()], None, method=method, example_inputs=torch.randn(2, 4))
        assert merged(torch.randn(1, 4)).shape == (1, 3)


def test_error_activation_method_without_data():
    with pytest.raises(ValueError, match="calibration data"):
        mf.merge([_mlp(), _mlp()], None, method="zipit", example_inputs=torch.randn(2, 4))


def test_error_nan_weights():
    bad = _mlp()
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model 1 parameter '2.weight' contains NaN"):
        mf.merge([_mlp(), bad], DATA)


def test_error_nan_activations():
    with pytest.raises(ValueError, match="non-finite activations"):
        mf.merge([_mlp(), _mlp()], [torch.full((4, 4), float("inf"))], method="zipit")


def test_error_dtype_differs():
    with pytest.raises(ValueError, match="torch.float64"):
        mf.merge([_mlp(), _mlp().double()], DATA)


def test_error_unknown_method():
    with pytest.raises(ValueError, match="unknown merge method 'zipper'.*mudsc_zip"):
        mf.merge([_mlp(), _mlp()], DATA, method="zipper")


def test_error_different_classes():
    class Other(nn.Sequential):
        pass
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 at module '\(root\)': Other"):
        mf.merge([_mlp(), Other(*_mlp())], DATA)


def test_statistics_in_chunks_equal_one_pass():
    t, a, b = _two_models("resnet_bn")
    data = _calibration(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(a, _inputs(t))
    one = mf.collect_stats([a, b], pg, data)
    budget = 8 * (2 * 16) ** 2 + 1  # room for exactly one 16-unit space per pass
    many = mf.collect_stats([a, b], pg, data, budget_bytes=budget)
    assert one.corr.keys() == many.corr.keys() and len(one.corr) >= 4
    for s in one.corr:
        np.testing.assert_allclose(one.corr[s], many.corr[s], atol=1e-12)
        assert one.corr[s].shape == (2 * pg.size(s), 2 * pg.size(s))
        assert np.isfinite(one.corr[s]).all()


def test_statistics_match_a_slow_reference():
    """Pearson correlation of the stacked features, computed directly with numpy."""
    t, a, b = _two_models("mlp")
    data = _calibration(t)
    pg = mf.infer(a, _inputs(t))
    stats = mf.collect_stats([a, b], pg, data)
    s = next(iter(stats.corr))
    tap = next(tp for tp in pg.in_taps if tp.layout == mf.ir.layout.Plain(s))
    from mudsc_fx.passes.stats import tap_module
    feats = []
    for m in (a, b):
        vals = []
        runner = tap_module(pg.gm, m, [tap.node])
        with torch.no_grad():
            for (xb,) in data:
                vals.append(runner(xb)[0].double())
        feats.append(torch.cat(vals).numpy())
    ref = np.corrcoef(np.concatenate(feats, axis=1).T)
    np.testing.assert_allclose(stats.corr[s], ref, atol=1e-6)  # float32 products (tests/test_stats.py)


# ---------------------------------------------------------------- solve stage

def _graph_and_stats(name):
    t, a, b = _two_models(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(a, _inputs(t))
    return pg, mf.collect_stats([a, b], pg, _calibration(t)), a, b


def _same_alignment(x, y):
    assert list(x.M) == list(y.M) and x.sweeps == y.sweeps and x.objective == y.objective
    for s in x.M:
        for p, q in zip(x.M[s] + x.U[s], y.M[s] + y.U[s]):
            np.testing.assert_array_equal(p, q)


def test_solve_takes_models_or_their_named_tensors():
    from mudsc_fx.passes.apply import named_tensors
    pg, stats, a, b = _graph_and_stats("resnet_bn")
    cfg = mf.method_config("mudsc_zip")
    _same_alignment(mf.solve(pg, stats, [a, b], cfg), mf.solve(pg, stats, [named_tensors(a), named_tensors(b)], cfg))


def test_solve_errors_name_the_model():
    pg, stats, a, b = _graph_and_stats("mlp")
    cfg = mf.method_config("act_align")
    with pytest.raises(TypeError, match="model 1 is a list"):
        mf.solve(pg, stats, [a, [1, 2]], cfg)
    partial = dict(b.state_dict())
    gone = pg.params[0]
    del partial[gone]
    with pytest.raises(KeyError, match=f"model 1 has no tensor '{gone}'"):
        mf.solve(pg, stats, [a, partial], cfg)


@pytest.mark.parametrize("name,method,seed", [("resnet_bn", "mudsc_zip", 0), ("resnet_bn", "mudsc_align", 0),
                                              ("squeeze_excite", "mudsc_zip", 2), ("convtranspose_ae", "rebasin", 2)])
def test_solve_replay_caches_change_nothing(monkeypatch, name, method, seed):
    """The unit / feature caches (and the stamps restored with a snapshot) only skip work:
    the same solve with every cache emptied before each rematch gives the same alignment.
    These cases revert changed spaces to the best snapshot (counted), the risky path."""
    from mudsc_fx.passes import solve as solve_mod
    pg, stats, a, b = _graph_and_stats(name)
    cfg = mf.method_config(method)
    reverted = []
    restore = solve_mod._Solver.restore

    def counting_restore(self, snap):
        reverted.extend(s for s in set(snap[0]) | set(snap[1]) if self._state(s) is not snap[0].get(s, snap[1].get(s)))
        return restore(self, snap)
    monkeypatch.setattr(solve_mod._Solver, "restore", counting_restore)
    cached = mf.solve(pg, stats, [a, b], cfg, seed=seed)
    assert reverted, "this case no longer exercises reverting to a snapshot"
    match_unit = solve_mod._Solver.match_unit

    def uncached(self, unit, alpha):
        self._cache.clear()
        self.features._store.clear()
        self.features.bytes = 0
        return match_unit(self, unit, alpha)
    monkeypatch.setattr(solve_mod._Solver, "match_unit", uncached)
    _same_alignment(cached, mf.solve(pg, stats, [a, b], cfg, seed=seed))


def test_weight_pearson_matches_numpy():
    from mudsc_fx.passes.weights import pearson_rows
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        Z = torch.randn(300, 40, generator=g, dtype=dtype)
        Z[7] = 3.0  # a constant row: correlation 0, not NaN
        got = pearson_rows(Z)
        Zd = Z.double().numpy()
        Zc = Zd - Zd.mean(1, keepdims=True)
        nrm = np.linalg.norm(Zc, axis=1)
        nrm[7] = 1.0
        ref = (Zc / nrm[:, None]) @ (Zc / nrm[:, None]).T
        ref[7, :] = ref[:, 7] = 0.0
        np.testing.assert_allclose(got, ref, atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert np.array_equal(got, got.T) and got.dtype == np.float64


def test_recompute_input_bn_works_on_copies_and_recomputes_every_model():
    """recompute_input_bn (the reference MuDSC code's step): the Merger's models have their
    BatchNorm statistics recomputed on the calibration data; the caller's models keep theirs."""
    from mudsc_fx.passes.bn_reset import reset_bn
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))

    models = [net().eval() for _ in range(2)]
    for m in models:  # statistics unlike the calibration data's
        m[1].running_mean.fill_(3.0)
        m[1].running_var.fill_(0.25)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    merger = mf.Merger(models, data, recompute_input_bn=True)
    for m, sd in zip(models, before):  # inputs untouched
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    for m, own in zip(merger.models, models):
        ref = reset_bn(copy.deepcopy(own), data)
        assert torch.allclose(m[1].running_mean, ref[1].running_mean)
        assert torch.allclose(m[1].running_var, ref[1].running_var)
        assert not torch.allclose(m[1].running_mean, own[1].running_mean)
    merged = merger.merge("zipit", reset_bn=False).model
    x = torch.randn(2, 3, 8, 8)
    assert merged(x).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="recompute_input_bn must be"):
        mf.Merger(models, data, recompute_input_bn="yes")
