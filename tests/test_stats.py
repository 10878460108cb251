"""Statistics numerics: float32 products summed in float64 around running means agree with a
float64 reference; what happens on ill-conditioned features; the one dead-unit rule.

Bounds stated here (also in docs/scale.md):
- well-conditioned features (unit spread, means up to 1e5 spreads, drifting means): the
  correlation is within 1e-6 of np.corrcoef in float64 on the same float32 features
  (measured about 1e-7; what remains is the float32 accumulation inside the GEMM kernel);
- ill-conditioned features: a unit whose spread is within 16 float32 roundings of its mean
  (std <= 1.9e-6 |mean|) or whose variance is <= 1e-10 of the largest variance of its space
  is dead: its rows and columns are 0 (diagonal too), never NaN. The float32 raw sums the
  shift avoids lose everything already at mean/std = 1e3 (checked below, as the reason).
"""
import numpy as np
import pytest
import torch

from mudsc_fx import numerics
from mudsc_fx.numerics import MomentAccumulator, dead_units, pearson_rows_


def _features(rows=12000, m=96, seed=0):
    """Correlated features (rank-8 signal plus noise), unit spread."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 8, generator=g) @ torch.randn(8, m, generator=g) + 0.5 * torch.randn(rows, m, generator=g)
    return z / z.std(0)


def _streamed(x, chunk, parts=1):
    """Correlation of the rows of x fed in chunks of ``chunk`` rows, split in ``parts`` column blocks."""
    acc = MomentAccumulator(x.shape[1])
    cols = np.array_split(np.arange(x.shape[1]), parts)
    for a in range(0, x.shape[0], chunk):
        acc.add([x[a:a + chunk, c[0]:c[-1] + 1] for c in cols])
    return acc


def _reference(x):
    return np.corrcoef(x.double().numpy().T)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "mean_1e5", "drifting_mean"])
def test_float32_products_match_a_float64_reference_within_1e6(kind):
    x = _features()
    if kind == "relu":
        x = torch.relu(x + 0.3)
    elif kind == "mean_1e5":
        x = x + 1e5
    elif kind == "drifting_mean":  # the mean moves by 100 spreads over the stream
        x = x + torch.linspace(0, 100, x.shape[0])[:, None]
    x = x.float()
    corr, dead = _streamed(x, 2500, parts=2).correlation()
    assert corr.dtype == np.float32 and not dead.any()
    err = np.abs(corr - _reference(x)).max()
    assert err <= 1e-6, f"{kind}: max correlation error {err:.2e}"


def test_chunking_and_column_blocks_change_nothing_but_rounding():
    x = _features(rows=5000, m=40).float()
    one, _ = _streamed(x, 5000).correlation()
    many, _ = _streamed(x, 333, parts=3).correlation()
    np.testing.assert_allclose(one, many, atol=1e-6)


def test_items_with_several_rows_each_are_flattened():
    """Parts [items, positions, n] (a conv tap moved channels-last) are rows item by item."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 5, 7, 6, generator=g), torch.randn(30, 5, 7, 4, generator=g)
    acc = MomentAccumulator(10)
    acc.add([a, b])
    ref = _reference(torch.cat([a.reshape(-1, 6), b.reshape(-1, 4)], dim=1))
    corr, _ = acc.correlation()
    np.testing.assert_allclose(corr, ref, atol=1e-6)
    assert acc.count == 30 * 5 * 7


def test_joined_streams_equal_one_stream():
    """What distributed ranks do: recentre each part on the joint mean, sum the M2."""
    x = (_features(rows=6000, m=30) * 3 + 7).float()
    whole = _streamed(x, 1000)
    parts = [_streamed(x[:2000], 700), _streamed(x[2000:], 1500)]
    n = sum(p.count for p in parts)
    mean = sum(p.mean * p.count for p in parts) / n
    for p in parts:
        p.recenter_(mean)
    joined = MomentAccumulator(30)
    joined.flat.copy_(parts[0].flat + parts[1].flat)
    joined.mean.copy_(mean)
    joined.count = n
    torch.testing.assert_close(joined.mean, whole.mean, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(joined.correlation()[0], whole.correlation()[0], atol=1e-6)


@pytest.mark.parametrize("mean_over_std", [1e2, 1e3, 1e4, 1e5])
def test_huge_means_stay_accurate_where_raw_float32_sums_fail(mean_over_std):
    x = (_features(rows=8000, m=32) + mean_over_std).float()
    ref = _reference(x)
    corr, dead = _streamed(x, 3000).correlation()
    assert not dead.any()
    assert np.abs(corr - ref).max() <= 1e-6
    if mean_over_std >= 1e3:  # the cancellation the running-mean shift avoids
        s1, s2 = x.double().sum(0), (x.T @ x).double()
        cov = s2 / len(x) - torch.outer(s1, s1) / len(x) ** 2
        d = cov.diagonal().clamp_min(1e-300).sqrt()
        assert np.nanmax(np.abs((cov / torch.outer(d, d)).numpy() - ref)) > 1e-2


def test_constant_near_constant_and_zero_units_are_dead_never_nan():
    x = _features(rows=4000, m=12).float()
    x[:, 0] = 0.0                                # a dead ReLU
    x[:, 1] = 3.5                                # a constant
    x[:, 2] = 1e4 + 1e-3 * x[:, 2]               # spread within a few roundings of the mean
    x[:, 3] = 1e-7 * x[:, 3]                     # variance 1e-14 of the others
    x[:, 4] = 1e-4 * x[:, 4]                     # small but alive (variance 1e-8 of the others)
    corr, dead = _streamed(x, 1500).correlation()
    assert dead.tolist() == [True] * 4 + [False] * 8
    assert np.isfinite(corr).all()
    assert (corr[:4] == 0).all() and (corr[:, :4] == 0).all()
    np.testing.assert_array_equal(np.diag(corr)[4:], 1.0)
    ref = _reference(x[:, 4:])
    assert np.abs(corr[4:, 4:] - ref).max() <= 1e-6


def test_dead_rule_thresholds():
    eps = torch.finfo(torch.float32).eps
    var = torch.tensor([1.0, 1.01e-10, 0.99e-10, 0.0, float("inf")])
    assert dead_units(var).tolist() == [False, False, True, True, True]
    std = numerics.DEAD_ROUNDINGS * eps * 1000.0
    near = dead_units(torch.tensor([1.0, (0.99 * std) ** 2, (1.01 * std) ** 2]), torch.tensor([0.0, 1000.0, 1000.0]))
    assert near.tolist() == [False, True, False]
    assert dead_units(torch.zeros(3)).all()


def test_pearson_rows_uses_the_same_rule_and_matches_numpy():
    g = torch.Generator().manual_seed(2)
    Z = torch.randn(20, 50, generator=g)
    Z[3] = 2.0
    Z[7] *= 1e-6
    C, dead = pearson_rows_(Z.clone())
    assert dead.tolist() == [i in (3, 7) for i in range(20)]
    alive = ~dead
    ref = np.corrcoef(Z[torch.from_numpy(alive)].double().numpy())
    np.testing.assert_allclose(C[np.ix_(alive, alive)], ref, atol=1e-6)
    assert (C[dead] == 0).all() and np.isfinite(C).all()


def test_accumulator_memory_is_the_lower_triangle_by_blocks():
    for m in (64, 500, 2048, 6144):
        acc = MomentAccumulator(m)
        B = numerics.block_rows(m)
        assert acc.flat.numel() * 8 + acc.mean.numel() * 8 == numerics.accumulator_bytes(m)
        assert numerics.accumulator_bytes(m) <= 8 * (m * (m + B) / 2 + m)


@pytest.mark.parametrize("name", ["vit_mha", "resnet_bn"])
def test_collect_stats_matches_features_read_directly(name):
    """Every space, every tap (packed q/k/v projections of nn.MultiheadAttention are derived
    from the moments of the attention's input): np.corrcoef of the features computed in
    float64 from the tapped values, all taps of a space stacked."""
    import warnings

    import mudsc_fx as mf
    from mudsc_fx.passes.stats import tap_features, tap_module, taps_by_space
    from topologies import by_name
    t = by_name(name)
    torch.manual_seed(0)
    models = [t.build().eval(), t.build(seed=7).eval()]
    g = torch.Generator().manual_seed(0)
    x = t.example()
    x = x[0] if isinstance(x, tuple) else x
    data = [torch.randn((24,) + tuple(x.shape[1:]), generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(models[0], (data[0],))
    stats = mf.collect_stats(models, pg, data)
    taps = taps_by_space(pg)
    assert stats.corr.keys() == taps.keys()
    if name == "vit_mha":
        assert any(tp.proj is not None for ts in taps.values() for tp in ts)
    nodes = sorted({tp.node for ts in taps.values() for tp in ts})
    values = []  # per model: {node: [batch values]}
    for m in models:
        runner = tap_module(pg.gm, m, nodes)
        params = dict(list(m.named_parameters()) + list(m.named_buffers()))
        params = {k: v.detach().double() for k, v in params.items()}
        out = {n: [] for n in nodes}
        with torch.no_grad():
            for xb in data:
                got = runner(xb)
                for n, v in zip([nd.name for nd in pg.gm.graph.nodes if nd.name in set(nodes)], got):
                    out[n].append(v.double())
        values.append((out, params))
    for s, ts in taps.items():
        rows = []
        for tp in ts:
            for b in range(len(data)):
                per_model = [dict(tap_features(out[tp.node][b], tp, params, pg.size)) for out, params in values]
                if s in per_model[0]:
                    rows.append(torch.cat([pm[s] for pm in per_model], dim=1))
        with np.errstate(invalid="ignore", divide="ignore"):  # dead units: NaN rows, left out below
            ref = np.corrcoef(torch.cat(rows).numpy().T)
        dead = stats.dead[s]
        np.testing.assert_allclose(stats.corr[s][np.ix_(~dead, ~dead)], ref[np.ix_(~dead, ~dead)], atol=1e-6,
                                   err_msg=f"space S{s}")
