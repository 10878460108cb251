"""Partial zipping: a merged trunk and per-model tails, emitted as one module.

The proof: merging a model with a permuted copy of itself, cut anywhere clean, gives a module
whose every tail computes the model's function exactly."""
import warnings

import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes.partial import find_cut, _compute_nodes

from test_merge import _calibration, _inputs, _permuted_copies
from topologies import TOPOLOGIES, by_name


def _stop_points(pg):
    """Every clean cut: after each compute node (node names)."""
    order = _compute_nodes(pg.gm)
    out = []
    for i in range(len(order)):
        try:
            find_cut(pg, order[i].name)
        except ValueError:  # cuts through heads: not a stop point
            continue
        out.append(order[i].name)
    return out


@pytest.mark.parametrize("name", [t.name for t in TOPOLOGIES])
def test_partial_zip_of_a_model_and_its_permuted_copy_is_the_model_at_every_stop_point(name):
    t = by_name(name)
    model = t.build().eval()
    x = _inputs(t)
    models = [model] + _permuted_copies(model, x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = mf.Merger(models, _calibration(t))
    stops = _stop_points(merger.graph)
    assert stops, "no clean stop point"
    with torch.no_grad():
        ref = model(*x)
        for stop in stops:
            for method in ("mudsc_align", "zipit") if stop in stops[::3] else ("mudsc_align",):
                res = merger.merge(method, stop_at=stop, reset_bn=False)
                outs = res.model(*x)
                assert len(outs) == 2
                for out in outs:
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{stop} {method}")


@pytest.mark.parametrize("method", ["act_align", "mudsc_align", "zipit", "weight_zip", "mudsc_zip"])
def test_every_method_and_three_models(method):
    t = by_name("resnet_bn")
    model = t.build().eval()
    x = _inputs(t)
    models = [model] + _permuted_copies(model, x, 2)
    kw = {"zip_a": 1.0} if "zip" in method else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.Merger(models, _calibration(t)).merge(method, stop_at=0.5, reset_bn=False, **kw)
    with torch.no_grad():
        for out in res.model(*x):
            torch.testing.assert_close(out, model(*x), rtol=1e-5, atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)  # a residual stream crossing every cut
        return self.head(h.mean((2, 3)))


def _data(n=3, b=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n)]


def test_cut_by_module_name_node_name_and_fraction():
    torch.manual_seed(0)
    merger = mf.Merger([Net().eval(), Net().eval()], _data())
    assert merger.merge("zipit", stop_at="stem").cut.stop == "stem_2"
    assert merger.merge("zipit", stop_at="block_0").cut.stop == "block_0"
    res = merger.merge("zipit", stop_at=1.0)
    assert res.cut.edges == ("head",)  # everything merged: the tails only return
    with pytest.raises(ValueError, match="names no node or module"):
        merger.merge("zipit", stop_at="nowhere")
    with pytest.raises(ValueError, match=r"fraction of the FLOPs must be in \(0, 1\]"):
        merger.merge("zipit", stop_at=1.5)


def test_combine_and_cost_and_bn_reset_everywhere():
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    merger = mf.Merger([a, b], _data())
    res = merger.merge("zipit", stop_at="stem", combine="sum_softmax")
    x = _data(1, 4)[0]
    with torch.no_grad():
        probs = res.model(x)
        tails = mf.Merger([a, b], _data()).merge("zipit", stop_at="stem").model
        tails.combine = None
        outs = tails(x)
    torch.testing.assert_close(probs, sum(torch.softmax(o, -1) for o in outs))
    torch.testing.assert_close(probs.sum(-1), torch.full((4,), 2.0))
    # every BatchNorm is recomputed on the data (the tails read the merged trunk's features) ...
    tail_bn = res.model.tails[1].get_submodule("block.1")
    assert not torch.equal(tail_bn.running_mean, b.block[1].running_mean)
    assert not torch.equal(res.model.trunk.get_submodule("stem.1").running_mean, a.stem[1].running_mean)
    # ... and the input models keep theirs
    assert b.block[1].running_mean is not tail_bn.running_mean
    c = res.cost
    assert 1.0 < c["flops_vs_one"] < 2.0 and c["flops_vs_ensemble"] == pytest.approx(c["flops_vs_one"] / 2)
    assert c["params_vs_one"] == pytest.approx((2 * sum(p.numel() for p in a.parameters())
                                                - sum(p.numel() for p in a.stem.parameters()))
                                               / sum(p.numel() for p in a.parameters()))


def test_partial_merge_through_mf_merge_and_inputs_untouched():
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    out = mf.merge([a, b], _data(), method="mudsc_zip", stop_at="stem", combine="concat")
    assert out(_data(1, 2)[0]).shape == (2, 10)
    for m, sd in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
    with pytest.raises(ValueError, match="combine= applies to partial merges"):
        mf.merge([a, b], _data(), method="zipit", combine="concat")
