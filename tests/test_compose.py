"""The compositional fallback on a small fake "detector": a per-image Python loop around a
traceable backbone and head, a submodule that traces only in parts, and a root parameter."""
import warnings

import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes import compose as C
from mudsc_fx.passes.calls import record_calls, same_signature, wrap_call


class Head(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(2 * c, k, 1)
        self.box = nn.Conv2d(2 * c, 4, 1)

    def forward(self, feats):
        hidden = [self.conv(f) for f in feats]
        return [self.cls(h) for h in hidden], [self.box(h) for h in hidden]


class Loopy(nn.Module):
    """Does not trace (a loop over a tensor's length); its child does."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(c, 3 * c), nn.GELU(), nn.Linear(3 * c, c))

    def forward(self, x):
        return torch.stack([self.proj(x[i]) for i in range(x.shape[0])])


class TinyDetector(nn.Module):
    def __init__(self, c=6, k=3, peek=False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = Head(c, k)
        self.post = Loopy(c)
        self.temperature = nn.Parameter(torch.linspace(0.5, 1.5, k))
        self.peek = peek

    def forward(self, images):
        x = self.backbone(torch.stack(images))
        cls, box = self.head([x, nn.functional.max_pool2d(x, 2)])
        out = []
        for i in range(x.shape[0]):  # the per-image loop that fx cannot trace
            scores = torch.cat([c[i].flatten(1) for c in cls], 1).T / self.temperature
            if self.peek:  # untraced code that reads a unit's weights directly
                scores = scores + self.head.cls.weight.flatten(1).sum(1)[:1] * self.head.conv[0].weight[0].sum()
            out.append({"scores": scores, "boxes": torch.cat([b[i].flatten(1) for b in box], 1).T,
                        "embedding": self.post(x[i].mean((1, 2))[None])})
        return out


def _images(seed, n=2, size=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


def _net(seed, **kw):
    torch.manual_seed(seed)
    net = TinyDetector(**kw).eval()
    C.reset_batchnorm(net, [_images(seed + 100)], lambda b: (b,))  # non-trivial BN statistics
    return net


def _outputs(model, images):
    with torch.no_grad():
        return [t for d in model(images) for t in d.values()]


def _plan(net):
    with pytest.raises(mf.TraceError):  # torch.export unrolls the per-image loop; torch.fx cannot
        mf.trace(net, (_images(0),), frontend="fx")
    return C.plan_composition(net, (_images(0),), whole_error="per-image loop")


def test_plan_takes_the_largest_traced_submodules():
    comp = _plan(_net(0))
    rep = comp.report
    assert [u.path for u in rep.units] == ["backbone", "head", "post.proj"]
    assert rep.units[2].calls == 2  # called once per image
    assert all(u.free >= 1 for u in rep.units)
    assert [(a.path, a.names) for a in rep.averaged] == [("<model>", ("temperature",))]
    assert {t.path for t in rep.untraced} == {"<model>", "post"}
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-12
    assert rep.merged_params + rep.averaged_params == rep.total_params
    assert "only averaged" in rep.summary() and rep.to_dict()["merged_fraction"] == rep.merged_fraction


def test_permuted_copy_differs_but_computes_the_same():
    net = _net(1)
    comp = _plan(net)
    perm = C.permuted_copy(net, comp, seed=5)
    changed = [n for (n, a), b in zip(net.state_dict().items(), perm.state_dict().values()) if not torch.equal(a, b)]
    assert any(n.startswith("backbone") for n in changed) and any(n.startswith("post.proj") for n in changed)
    for a, b in zip(_outputs(net, _images(7)), _outputs(perm, _images(7))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merging_a_permuted_copy_recovers_the_model():
    net = _net(2)
    comp = _plan(net)
    perm = C.permuted_copy(net, comp, seed=3)
    data = [_images(s, n=4) for s in range(3)]
    with pytest.warns(UserWarning, match="does not trace as a whole"):
        res = C.merge_compositional([net, perm], data, method="act_align", reset_bn=False,
                                    unit_merger=mf.Merger, input_fn=lambda b: (b,), return_result=True,
                                    composition=comp)
    assert type(res.model) is TinyDetector
    for name, t in net.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[name], t, rtol=1e-6, atol=1e-6)
    assert set(res.units) == {"backbone", "head", "post.proj"}


def test_independent_models_merge_and_report_what_was_averaged():
    a, b = _net(3), _net(4)
    before = {n: t.clone() for n, t in a.state_dict().items()}
    data = [_images(s, n=4) for s in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = C.merge_compositional([a, b], data, method="mudsc_zip", input_fn=lambda x: (x,), return_result=True,
                                    unit_merger=mf.Merger,
                                    whole_error="per-image loop")
    assert any("only averaged" in str(w.message) for w in caught)
    assert all(torch.equal(before[n], t) for n, t in a.state_dict().items())  # inputs untouched
    torch.testing.assert_close(res.model.temperature, (a.temperature + b.temperature) / 2)
    assert all(torch.isfinite(t).all() for t in _outputs(res.model, _images(9)))
    # BatchNorm statistics were recomputed on the merged model (not the average of the inputs')
    avg = (a.backbone[1].running_mean + b.backbone[1].running_mean) / 2
    assert not torch.allclose(res.model.backbone[1].running_mean, avg)


def test_unit_whose_weights_the_parent_reads_is_demoted():
    net = _net(5, peek=True)
    comp = _plan(net)
    paths = [u.path for u in comp.units]
    assert "head" not in paths and "backbone" in paths
    demoted = [a for a in comp.report.averaged if a.path == "head"]
    assert demoted and "changes the whole model" in demoted[0].reason
    assert comp.report.max_abs_err < 1e-12


def test_recorded_calls_and_wrapped_call():
    net = _net(6)
    calls = record_calls(net, (_images(0),))
    assert len(calls["post.proj"]) == 2 and same_signature(calls["post.proj"])
    assert calls["post.proj"][1].tensors[0].numel() == 0  # later calls keep their structure only
    head_call = calls["head"][0]
    assert len(head_call.tensors) == 2 and head_call.unsupported is None
    wrapped = wrap_call(net.head, head_call)
    with torch.no_grad():
        got = wrapped(*head_call.tensors)
        want = net.head(list(head_call.tensors))
    assert len(got) == 4 and all(torch.equal(x, y) for x, y in zip(got, want[0] + want[1]))
    assert type(wrap_call(net.backbone, calls["backbone"][0])) is not type(wrapped)  # one class per arity
    gm = mf.trace(wrapped, head_call.tensors)
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 2


def test_merge_falls_back_to_the_composition_with_a_warning():
    a, b = _net(7), _net(8)
    data = (_images(s, n=4) for s in range(2))  # a generator: read by the failed whole trace and again
    with pytest.warns(UserWarning, match="does not trace as a whole.*only averaged"):
        merged = mf.merge([a, b], data, method="zipit", input_fn=lambda x: (x,), frontend="fx")
    assert type(merged) is TinyDetector
    torch.testing.assert_close(merged.temperature, (a.temperature + b.temperature) / 2)
    assert not torch.allclose(merged.head.cls.weight, (a.head.cls.weight + b.head.cls.weight) / 2)
