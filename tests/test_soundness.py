"""Soundness: no axis moves unless a rule claims it; merge proves before it merges; bad input
gets a clear error before any long work starts."""
import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import mudsc_fx as mf
from mudsc_fx.rules import RULES

torch.manual_seed(0)


# ------------------------------------------------------------------ weights reaching ops as values
class FConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3))
        self.w2 = nn.Parameter(torch.randn(4, 8, 3))

    def forward(self, x):
        return F.conv1d(F.relu(F.conv1d(x, self.w1, padding=1)), self.w2)


class DepthwiseF(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.o = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.o(F.relu(F.conv2d(self.c(x), self.dw, padding=1, groups=8)))


class TransposeF(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 6, 3, 3))
        self.o = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.o(F.relu(F.conv_transpose2d(self.c(x), self.w)))


class StdConv(nn.Conv2d):
    """Weight standardisation: the weight is computed in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StdConv(3, 8, 3, padding=1)
        self.b = StdConv(8, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class BlurNet(nn.Module):
    """A fixed blur filter kept as a buffer, applied depthwise (timm's BlurPool)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        f = torch.tensor([1.0, 2.0, 1.0])
        f = f[:, None] * f[None, :]
        self.register_buffer("filt", (f / f.sum())[None, None].repeat(8, 1, 1, 1))
        self.o = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.o(F.conv2d(F.relu(self.c(x)), self.filt, stride=2, groups=8))


FUNCTION_FORM = [(FConv1d, (2, 3, 10)), (DepthwiseF, (2, 3, 8, 8)), (TransposeF, (2, 3, 8, 8)),
                 (StdNet, (2, 3, 8, 8)), (BlurNet, (2, 3, 8, 8))]


@pytest.mark.parametrize("cls,shape", FUNCTION_FORM, ids=[c.__name__ for c, _ in FUNCTION_FORM])
def test_function_form_weights_prove_with_kernel_axes_fixed(cls, shape):
    model = cls().eval()
    x = torch.randn(shape)
    for seed in range(3):
        rep = mf.check(model, x, seed=seed)
        assert rep.ok, (seed, rep.max_abs_err)
    pg = rep.graph
    hidden = {TransposeF: 2}.get(cls, 1)  # the hidden channel spaces, nothing else
    assert rep.coverage == 1.0 and len(pg.free_spaces) == hidden
    for m in pg.members:  # no kernel (spatial) axis is governed
        assert m.axis in (0, 1), m


@pytest.mark.parametrize("cls,shape", FUNCTION_FORM, ids=[c.__name__ for c, _ in FUNCTION_FORM])
def test_function_form_align_and_zip_give_back_the_function(cls, shape):
    torch.manual_seed(1)
    a, b = cls().eval(), cls().eval()
    data = [torch.randn(shape) for _ in range(3)]
    x = torch.randn(shape)
    aligned = mf.align_models([a, b], data)
    with torch.no_grad():
        torch.testing.assert_close(aligned[1](x), b(x), rtol=1e-5, atol=1e-5)
        merged = mf.merge([a, a], data, method="zipit", reset_bn=False)
        torch.testing.assert_close(merged(x), a(x), rtol=1e-5, atol=1e-5)


def test_computed_weight_input_axis_is_unmerged_like_a_module_weight():
    """Roles follow the consumer: the input axis of a computed conv weight is an `in` axis."""
    pg = mf.infer(StdNet().eval(), torch.randn(1, 3, 8, 8))
    roles = {(m.fqn, m.axis): m.role for m in pg.members}
    assert roles[("b.weight", 1)] == "in" and roles[("a.weight", 0)] == "out"


class TensorAttr(nn.Module):
    """A plain tensor attribute (not a parameter or buffer) used in forward."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.scale = torch.rand(8)
        self.o = nn.Conv2d(8, 2, 1)
        self.p = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.o(self.c(x) * self.scale[None, :, None, None])
        return self.p(y * self.scale[:2, None, None])


def test_different_tensor_constants_are_an_error_naming_them():
    with pytest.raises(ValueError, match="model 1 holds a different tensor constant than model 0 at node 2"):
        mf.merge([TensorAttr(), TensorAttr()], [torch.randn(2, 3, 6, 6)])


def test_plain_tensor_attribute_is_a_constant_that_fixes_its_space():
    model = TensorAttr().eval()
    x = torch.randn(2, 3, 6, 6)
    pg = mf.infer(model, x)
    rep = mf.check(model, x)
    assert rep.ok and rep.coverage == 0.0
    merged = mf.merge([model, model], [x, x], method="zipit", reset_bn=False)
    torch.testing.assert_close(merged(x), model(x))


# ------------------------------------------------------------------ verification
@contextlib.contextmanager
def _rule(key, rule):
    old = RULES.get(key)
    mf.register_rule(key, rule)
    try:
        yield
    finally:
        if old is None:
            del RULES[key]
        else:
            RULES[key] = old


class Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)).flip(-1))))


def test_a_wrong_rule_is_caught_by_check_and_frozen_by_merge():
    """A deliberately wrong row (flip as elementwise) must never become a wrong merge."""
    model = Flipper().eval()
    x = torch.randn(8, 4)
    with _rule(torch.Tensor.flip, mf.rules.passthrough), _rule("flip", mf.rules.passthrough):
        rep = mf.check(model, x)
        assert not rep.ok
        a_space = next(s for s in rep.graph.spaces if any(m.fqn == "a.weight" for m in s.members))
        assert rep.failing_spaces == (a_space.id,)
        assert rep.coverage == pytest.approx(5 / 11)  # b's 5 units still free, a's 6 not counted
        with pytest.warns(UserWarning, match=r"failed the equivalence check on 1 space\(s\).*a.weight"):
            res = mf.Merger([model, model], [x]).merge("zipit", reset_bn=False)
        assert res.frozen_spaces == (a_space.id,) and not res.graph.is_free(a_space.id)
        assert "frozen" in res.summary()
        torch.testing.assert_close(res.model(x), model(x))
        torch.manual_seed(3)
        other = Flipper().eval()
        with pytest.warns(UserWarning):
            aligned = mf.align_models([model, other], [x, torch.randn(8, 4)])
        torch.testing.assert_close(aligned[1](x), other(x))


def test_a_failing_rule_becomes_a_barrier_naming_node_and_rule():
    def broken(ctx, node):
        raise RuntimeError("boom")
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with _rule(nn.Tanh, broken):
        with pytest.warns(UserWarning, match=r"rule .*broken failed on node .*1.*RuntimeError: boom"):
            pg = mf.infer(model, torch.randn(2, 4))
    assert pg.barriers and "boom" in pg.barriers[0].reason
    assert not pg.free_spaces


@torch.fx.wrap
def _swish(x):
    return x * torch.sigmoid(x)


class UsesSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(_swish(self.a(x)))


def test_register_rule_for_a_users_own_op():
    model = UsesSwish().eval()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="no permutation rule"):
        assert mf.infer(model, x).coverage() == 0.0
    with _rule(_swish, mf.rules.passthrough):
        rep = mf.check(model, x)
    assert rep.ok and rep.coverage == 1.0


def test_check_report_row_names_failing_spaces():
    model = Flipper().eval()
    with _rule(torch.Tensor.flip, mf.rules.passthrough), _rule("flip", mf.rules.passthrough):
        row = mf.check(model, torch.randn(8, 4)).row()
    assert row["status"] == "FAIL" and len(row["failing_spaces"]) == 1


# ------------------------------------------------------------------ one function family
def _seq(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))


DATA = [torch.randn(8, 4) for _ in range(2)]


def test_same_names_different_graph_is_an_error():
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 at module '1': Tanh\(\) where model 0 has ReLU\(\)"):
        mf.merge([_seq(nn.ReLU()), _seq(nn.Tanh())], DATA)


class Flagged(nn.Module):
    def __init__(self, square):
        super().__init__()
        self.square = square
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * h if self.square else torch.relu(h))


def test_same_class_different_forward_is_an_error_naming_the_node():
    with pytest.raises(ValueError, match=r"model 1 computes a different graph from model 0: node 2 is `%mul"):
        mf.merge([Flagged(False), Flagged(True)], DATA)


def test_graphmodules_merge():
    gms = [torch.fx.symbolic_trace(_seq(nn.ReLU())) for _ in range(2)]
    merged = mf.merge(gms, DATA, method="zipit")
    torch.testing.assert_close(merged(DATA[0]), gms[0](DATA[0]))


# ------------------------------------------------------------------ bad input, clear errors
BAD_OPTIONS = [
    (dict(method="average", alpha=0.7), "method 'average' does not use alpha"),
    (dict(method="rebasin", alpha=0.5), "method 'rebasin' is the weight-only row .*use method 'mudsc_align'"),
    (dict(method="zipit", alpha=0.3), "method 'zipit' is the activation-only row"),
    (dict(method="mudsc_zip", alpha=7), r"alpha must be in \[0.0, 1.0\], got 7"),
    (dict(method="mudsc_zip", alpha=float("nan")), "alpha must be a finite number"),
    (dict(method="mudsc_zip", zip_a=5), r"zip_a must be in \[-inf, 1.0\]"),
    (dict(method="mudsc_zip", zip_b=-1), r"zip_b must be in \[0.0, 1.0\]"),
    (dict(method="act_align", zip_b=0.5), "zip_b applies to the zip methods"),
    (dict(method="mudsc_zip", weight_kind="bogus"), "weight_kind must be 'pearson'"),
    (dict(method="act_align", match="zip"), "match='zip' contradicts method='act_align'"),
    (dict(method="mudsc_zip", colour="red"), "unknown merge option 'colour'"),
    (dict(method="zipit", fixed_params=["nope.weight"]), "fixed_params names 'nope.weight'"),
    (dict(method="zipit", stats_budget_bytes=-5), "stats_budget_bytes must be an integer >= 1"),
    (dict(method="zipit", reset_bn="no"), "reset_bn must be True or False"),
    (dict(method="zipit", seed="abc"), "seed must be an integer"),
    (dict(method="zipit", leaf_modules="MLP"), "leaf_modules must be nn.Module subclasses"),
    (dict(method="average", weight_normalize=True), "method 'average' matches nothing"),
]


@pytest.mark.parametrize("kwargs,message", BAD_OPTIONS, ids=[m[:30] for _, m in BAD_OPTIONS])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mf.merge([_seq(nn.ReLU()), _seq(nn.ReLU())], DATA, **kwargs)


def test_later_batch_of_wrong_shape_or_dtype_is_a_clear_error():
    models = [_seq(nn.ReLU()), _seq(nn.ReLU())]
    with pytest.raises(ValueError, match=r"calibration batch 2: input 0 is a 2-d float64 tensor of shape \[batch, 4\], "
                                         r"but the first batch's is a 2-d float32"):
        mf.merge(models, DATA + [torch.randn(8, 4, dtype=torch.float64)], method="zipit")
    with pytest.raises(ValueError, match=r"calibration batch 1: input 0 is a 2-d float32 tensor of shape \[batch, 5\]"):
        mf.merge(models, [DATA[0], torch.randn(8, 5)], method="zipit")


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="model 1 parameter '0.weight' is on the meta device"):
        mf.merge([_seq(nn.ReLU()), meta], DATA)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("mask", torch.arange(8) % 3 != 0)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * self.mask)


def test_boolean_mask_buffer_fixes_its_space_and_merges():
    models = [Masked().eval(), Masked().eval()]
    res = mf.Merger(models, DATA).merge("mudsc_zip")
    assert res.coverage == 0.0
    assert any("non-floating tensor mask" in r for s in res.graph.spaces for r in s.fixed_by)
    torch.testing.assert_close(mf.merge([models[0]] * 2, DATA, method="zipit")(DATA[0]), models[0](DATA[0]))


def test_batchnorm1d_batch_of_one_is_a_clear_error():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match="one value per channel.*batches of at least 2 samples"):
        mf.merge([net, net], [torch.randn(1, 4)], method="average")


def test_huge_calibration_values_are_a_clear_error_not_nan_buffers():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match=r"drives the statistics of BatchNorm '1' to inf/NaN"):
        mf.merge([net, net], [torch.randn(4, 4) * 1e30], method="average", verify=False)


def test_inputs_are_never_modified():
    models = [_seq(nn.ReLU()), _seq(nn.ReLU())]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    mf.Merger(models, DATA).merge("mudsc_zip")
    for m, sd in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])


def test_merge_result_reports_coverage():
    res = mf.Merger([Flipper(), Flipper()], [torch.randn(8, 4)]).merge("zipit")
    assert res.coverage == pytest.approx(5 / 11)  # flip pins a's 6 units
    text = res.summary()
    assert "coverage 0.455" in text and "0 spaces frozen" in text


def test_random_permutations_always_move_something():
    pg = mf.infer(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3)), torch.randn(1, 4))
    for seed in range(20):
        perms = mf.random_permutations(pg, np.random.default_rng(seed))
        assert all(not (p == np.arange(len(p))).all() for p in perms.values())
