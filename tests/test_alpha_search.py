"""alpha="auto": every grid point scored, the best one merged in full, one statistics pass;
the solve cache shared by a Merger's merges changes no result."""
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.alpha_search import (DEFAULT_GRID, PROXIES, best_agreement, check_grid, ensemble_accuracy, ensemble_ce,
                                   model_outputs)


def _models(bn=True, seed=0):
    out = []
    for k in range(2):
        torch.manual_seed(seed + k)
        layers = [nn.Conv2d(2, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.ReLU()]
        layers += [nn.Conv2d(8, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
        m = nn.Sequential(*layers)
        if bn:  # trained-looking statistics, so that a BatchNorm reset changes something
            m.train()
            with torch.no_grad():
                for _ in range(3):
                    m(torch.randn(16, 2, 6, 6) * (1 + k))
        out.append(m.eval())
    return out


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 6, 6, generator=g) for _ in range(n)]


def _merger(models, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.Merger(models, data)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", ["mudsc_zip", "mudsc_align"])
def test_label_free_search_returns_the_merge_of_the_best_scored_alpha(method):
    models, data = _models(), _data()
    merger = _merger(models, data)
    res = merger.merge(method, "auto")
    assert list(res.alpha_scores) == list(DEFAULT_GRID)
    best = max(res.alpha_scores, key=res.alpha_scores.get)
    assert res.alpha == best and res.seconds["alpha_search"] > 0
    _same_state(res.model, _merger(models, data).merge(method, best).model)  # BatchNorm reset on all the data
    for m, ref in zip(models, _models()):
        _same_state(m, ref)  # inputs untouched


def test_labelled_search_takes_the_argmax_of_the_score_and_reuses_one_statistics_pass(monkeypatch):
    models, data = _models(bn=False), _data()
    merger = _merger(models, data)
    calls = []
    merge_mod = sys.modules["mudsc_fx.merge"]  # (mf.merge, the function, shadows the module name)
    collect = merge_mod.collect_stats

    def counting(*a, **k):
        calls.append(1)
        return collect(*a, **k)
    monkeypatch.setattr(merge_mod, "collect_stats", counting)
    wanted = [0.1, 0.5, 0.2, 0.9, 0.3]
    seen = []

    def score_fn(model):
        seen.append(model)
        return wanted[len(seen) - 1]
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    res = merger.merge("mudsc_zip", "auto", alpha_grid=grid, score_fn=score_fn)
    assert res.alpha == 0.75 and res.alpha_scores == dict(zip(grid, wanted))
    assert len(calls) == 1
    _same_state(res.model, seen[3])


def test_labelled_search_with_val_data_scores_accuracy():
    models, data = _models(bn=False), _data()
    g = torch.Generator().manual_seed(3)
    val = [(torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    res = _merger(models, data).merge("mudsc_align", "auto", alpha_grid=[0.3, 0.6], val_data=val)
    for a, score in res.alpha_scores.items():
        m = _merger(models, data).merge("mudsc_align", a).model
        with torch.no_grad():
            acc = sum(int((m(x).argmax(-1) == y).sum()) for x, y in val) / 32
        assert score == pytest.approx(acc)


def test_merge_and_align_models_take_auto():
    models, data = _models(), _data()
    merged = mf.merge(models, data, alpha="auto", alpha_grid=[0.2, 0.8])
    res = _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=[0.2, 0.8])
    _same_state(merged, res.model)
    aligned = mf.align_models(models, data, "mudsc_align", alpha="auto", alpha_grid=[0.4])
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(aligned[1](x), models[1](x), rtol=1e-5, atol=1e-5)


def test_auto_errors_name_the_problem():
    models, data = _models(), _data()
    merger = _merger(models, data)
    with pytest.raises(ValueError, match="dual-space"):
        merger.merge("zipit", "auto")
    with pytest.raises(ValueError, match="apply to alpha='auto' only|applies to alpha='auto' only"):
        merger.merge("mudsc_zip", 0.5, alpha_grid=[0.1])
    with pytest.raises(ValueError, match="'auto'"):
        merger.merge("mudsc_zip", "best")
    with pytest.raises(ValueError, match="alpha_grid"):
        check_grid([0.5, 1.5])
    with pytest.raises(ValueError, match="empty"):
        check_grid([])
    with pytest.raises(ValueError, match="alpha_proxy"):
        merger.merge("mudsc_zip", "auto", alpha_proxy="nope")
    with pytest.raises(ValueError, match="not both"):
        merger.merge("mudsc_zip", "auto", score_fn=lambda m: 0.0, val_data=[(data[0], torch.zeros(16))])
    assert check_grid([1, 0.5, 0.5, 0]) == (0.0, 0.5, 1.0)


def test_proxies_prefer_outputs_that_agree_with_the_sources():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    for name, proxy in PROXIES.items():
        assert proxy(a.clone(), [a, b]) > proxy(torch.randn(50, 8, generator=g), [a, b]), name
    # best agreement: each sample may side with the model it matches
    mixed = torch.cat([a[:25], b[25:]])
    assert best_agreement(mixed, [a, b]) == pytest.approx(1.0)


def test_ensemble_proxies_score_against_the_source_models_mean_softmax():
    """Slow reference: per sample, the ensemble's class is the argmax of the mean of the
    sources' softmax; ensemble_ce is the mean of sum_c p_ens[c] * log_softmax(merged)[c]."""
    g = torch.Generator().manual_seed(1)
    a, b, m = (torch.randn(40, 5, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    hits, ce = 0, 0.0
    for i in range(40):
        pa, pb = np.exp(a[i].numpy()) / np.exp(a[i].numpy()).sum(), np.exp(b[i].numpy()) / np.exp(b[i].numpy()).sum()
        p = (pa + pb) / 2
        logq = m[i].numpy() - np.log(np.exp(m[i].numpy()).sum())
        hits += int(np.argmax(m[i].numpy()) == np.argmax(p))
        ce += float((p * logq).sum())
    assert ensemble_accuracy(m, [a, b]) == pytest.approx(hits / 40)
    assert ensemble_ce(m, [a, b]) == pytest.approx(ce / 40)
    # a model that answers like the ensemble scores higher than one that answers like a single source
    ens_logits = torch.log((a.softmax(1) + b.softmax(1)) / 2)
    assert ensemble_ce(ens_logits, [a, b]) > ensemble_ce(a, [a, b])


def test_alpha_output_fn_maps_outputs_before_the_proxy():
    """The proxy reads head(outputs): the scores equal those computed by hand on every grid
    point's merged model, and differ from the scores on the raw outputs."""
    models, data = _models(bn=False), _data()
    torch.manual_seed(5)
    head = nn.Linear(4, 6)
    grid = [0.0, 0.5, 1.0]
    res = _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=grid, alpha_output_fn=head)
    raw = _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=grid)
    with torch.no_grad():
        ref = [head(model_outputs(m, data, lambda x: x).float()).double() for m in models]
        for a in grid:
            merged = _merger(models, data).merge("mudsc_zip", a).model
            out = head(model_outputs(merged, data, lambda x: x).float()).double()
            assert res.alpha_scores[a] == pytest.approx(ensemble_ce(out, ref), rel=1e-6)
    assert res.alpha_scores != raw.alpha_scores
    with pytest.raises(ValueError, match="alpha_output_fn must be callable"):
        _merger(models, data).merge("mudsc_zip", "auto", alpha_output_fn="head")
    with pytest.raises(ValueError, match="alpha_output_fn failed on the model outputs of shape"):
        _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=[0.5], alpha_output_fn=nn.Linear(7, 2))
    with pytest.raises(ValueError, match="alpha_output_fn must return one row per sample"):
        _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=[0.5], alpha_output_fn=lambda y: y.sum())
    with pytest.raises(ValueError, match="alpha_output_fn applies to the label-free proxy"):
        _merger(models, data).merge("mudsc_zip", "auto", alpha_grid=[0.5], alpha_output_fn=head,
                                    score_fn=lambda m: 0.0)


def test_the_solve_cache_shared_by_merges_changes_no_result():
    """Merges of one Merger (several methods and alphas, in any order) equal fresh merges."""
    models, data = _models(), _data()
    shared = _merger(models, data)
    order = [("mudsc_zip", 0.3), ("zipit", None), ("mudsc_zip", 0.7), ("mudsc_align", 0.3), ("mudsc_zip", 0.3),
             ("weight_zip", None), ("rebasin", None), ("mudsc_align", 0.6)]
    for method, alpha in order:
        a = shared.merge(method, alpha)
        b = _merger(models, data).merge(method, alpha)
        _same_state(a.model, b.model)
        assert a.alignment.objective == b.alignment.objective
        for s in b.alignment.M:
            for Ma, Mb in zip(a.alignment.M[s], b.alignment.M[s]):
                np.testing.assert_array_equal(Ma, Mb)
