"""The torch.export front end and the input plumbing (dict inputs, ModelOutput-like outputs)."""
import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.ir.inputs import graph_inputs, model_call
from mudsc_fx.ir.inputs import flat_tensors

from topologies import by_name

# one topology per kind of rule: convs + BN, fused qkv attention, embeddings + sdpa + tied
# head, concat growth, an unknown op (barrier)
EXPORT_TOPOLOGIES = ["resnet_bn", "timm_attention", "gpt", "densenet", "unknown_op"]


@pytest.mark.parametrize("name", EXPORT_TOPOLOGIES)
def test_export_front_end_agrees_with_fx_and_is_proven(name):
    t = by_name(name)
    model = t.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg_fx = mf.infer(model, t.example(), frontend="fx")
        rep = mf.check(model, t.example(), frontend="export")
    assert rep.ok and rep.max_abs_err < 1e-10, (name, rep.max_abs_err)
    assert rep.coverage == pytest.approx(float(t.coverage), abs=1e-12)
    assert rep.coverage == pytest.approx(pg_fx.coverage(), abs=1e-12)
    assert sorted(s.size for s in pg_fx.spaces if pg_fx.is_free(s.id)) == \
        sorted(s.size for s in rep.graph.spaces if rep.graph.is_free(s.id))


def test_exported_graph_reads_the_models_own_tensors():
    t = by_name("gpt")
    model = t.build()
    before = copy.deepcopy(model.state_dict())
    gm = mf.trace(model, t.example(), frontend="export")
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert targets and all(tg in own for tg in targets)
    for tg in targets:  # shared, not copied
        assert gm.get_parameter(tg) is own[tg] if isinstance(own[tg], nn.Parameter) else True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(vars(model)) == set(vars(t.build()))  # nothing attached to the user's model


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[-1] == 4:
            h = h + torch.relu(self.b(h))
        return self.c(h)


def test_auto_falls_back_to_export_and_fx_alone_fails():
    model = ShapeBranch().eval()
    x = torch.randn(5, 4)
    with pytest.raises(mf.TraceError, match="torch.fx could not trace ShapeBranch"):
        mf.trace(model, x, frontend="fx")
    gm = mf.trace(model, x)
    assert any(n.op == "call_function" and "aten" in str(n.target) for n in gm.graph.nodes)
    rep = mf.check(model, x)
    assert rep.ok and rep.n_free == 1 and rep.coverage == 1.0  # a and b share the residual space


def test_when_both_front_ends_fail_the_error_shows_both_and_the_user_frame():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(mf.TraceError) as err:
        mf.trace(DataDependent(), torch.randn(2, 4))
    msg = str(err.value)
    assert "torch.fx:" in msg and "torch.export:" in msg and "if x.sum() > 0" in msg


def test_unknown_frontend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown frontend 'jit'"):
        mf.trace(nn.Linear(2, 2), torch.randn(1, 2), frontend="jit")


def test_dynamic_export_runs_other_batch_sizes_and_names_a_wrong_input():
    t = by_name("gpt")
    model = t.build()
    gm = mf.trace(model, torch.randint(0, 16, (2, 6)), frontend="export")
    for shape in ((3, 6), (5, 6)):
        ids = torch.randint(0, 16, shape)
        assert torch.allclose(gm(*graph_inputs(gm, ids))[0], model(ids), atol=1e-6)
    static = mf.trace(model, torch.randint(0, 16, (2, 6)), frontend="export", dynamic=False)
    with pytest.raises(ValueError, match=r"input 'idx' has shape \(3, 6\).*\(2, 6\)"):
        graph_inputs(static, torch.randint(0, 16, (3, 6)))
    with pytest.raises(ValueError, match=r"input 'idx' has shape \(2, 5\).*\(\*, 6\)"):
        graph_inputs(gm, torch.randint(0, 16, (2, 5)))


class KeywordNet(nn.Module):
    """Keyword inputs (one optional), an output dataclass with several tensors."""

    @dataclass
    class Out:
        logits: torch.Tensor
        hidden: torch.Tensor

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, input_ids, scale=None):
        h = self.emb(input_ids)
        if scale is not None:
            h = h * scale[..., None]
        z = torch.relu(self.fc(h))
        return KeywordNet.Out(self.head(z), h.mean(-1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dict_inputs_and_dataclass_outputs(frontend):
    torch.manual_seed(0)
    model = KeywordNet().eval()
    x = {"input_ids": torch.randint(0, 10, (2, 5)), "scale": torch.rand(2, 5)}
    rep = mf.check(model, x, frontend=frontend)
    assert rep.ok and rep.max_abs_err < 1e-10
    assert rep.n_free == 2  # the embedding width space and fc's hidden space
    gm = rep.graph.gm
    call = model_call(x, model)
    out = gm(*graph_inputs(gm, call))
    ref = model(**x)
    assert any(v.shape == ref.logits.shape and torch.allclose(v, ref.logits) for v in flat_tensors(out))


def test_merge_with_dict_batches_recovers_a_permuted_copy():
    torch.manual_seed(0)
    a = KeywordNet().eval()
    b = copy.deepcopy(a)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        b.fc.weight.copy_(a.fc.weight[p])
        b.fc.bias.copy_(a.fc.bias[p])
        b.head.weight.copy_(a.head.weight[:, p])
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 10, (4, 5), generator=g), "scale": torch.rand(4, 5, generator=g),
                "labels": torch.zeros(4)} for _ in range(3)]
    x = {k: v for k, v in batches[0].items() if k != "labels"}
    merged = mf.merge([a, b], batches, method="act_align", reset_bn=False, frontend="export")
    assert type(merged) is KeywordNet
    torch.testing.assert_close(merged(**x).logits, a(**x).logits)
