"""Inference + proof on one tiny model per topology (tests/topologies.py)."""
import copy
import json
import warnings

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.ir.layout import spaces_of
from mudsc_fx.passes.apply import apply_permutations, random_permutations
from mudsc_fx.passes.check import perturb_

from topologies import TOPOLOGIES, by_name

NAMES = [t.name for t in TOPOLOGIES]


def _graph(name):
    t = by_name(name)
    model = t.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t, model, mf.infer(model, t.example())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_topology_is_proven_equivalent(name, seed):
    t = by_name(name)
    model = t.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = mf.check(model, t.example(), seed=seed)
    assert rep.ok, f"{name}: max abs err {rep.max_abs_err} > {rep.tolerance}"
    assert rep.max_abs_err < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_topology_coverage_matches_hand_derivation(name):
    t, _, pg = _graph(name)
    assert pg.coverage() == pytest.approx(float(t.coverage), abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_frozen_producers_are_fixed_and_others_free(name):
    t, model, pg = _graph(name)
    out_axis = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1, nn.Embedding: 1}
    producers = {n: out_axis.get(type(m), 0) for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                   nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding))}
    members = {(m.fqn, m.axis): m for m in pg.members}
    for p, axis in producers.items():
        m = members.get((f"{p}.weight", axis))
        free = m is not None and all(pg.is_free(s) for s in spaces_of(m.layout))
        if p in t.frozen:
            assert not free, f"{p} should be fixed"
        else:
            assert free, f"{p} should be free"


def test_check_does_not_modify_the_model():
    t = by_name("resnet_bn")
    model = t.build()
    before = copy.deepcopy(model.state_dict())
    model.train()
    mf.check(model, t.example())
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _permute_one_member(model, pg, fqn, axis, rng):
    perm = torch.as_tensor(rng.permutation(model.get_parameter(fqn).shape[axis]))
    out = copy.deepcopy(model)
    with torch.no_grad():
        p = out.get_parameter(fqn)
        p.copy_(p.index_select(axis, perm))
    return out


@pytest.mark.parametrize("name,fqn,axis", [("resnet_bn", "layer1.conv1.weight", 0), ("mlp", "fc1.weight", 0),
                                           ("convnext", "block.gamma", 0)])
def test_negative_control_one_member_alone_changes_outputs(name, fqn, axis):
    t = by_name(name)
    model = t.build().double().eval()
    perturb_(model, 0)
    x = tuple(a.double() for a in t.example()) if isinstance(t.example(), tuple) else t.example().double()
    x = x if isinstance(x, tuple) else (x,)
    bad = _permute_one_member(model, None, fqn, axis, np.random.default_rng(0))
    with torch.no_grad():
        assert (model(*x) - bad(*x)).abs().max() > 1e-6


def test_negative_control_heads_in_q_without_k_changes_outputs():
    """Permute the q heads of a fused qkv projection but not k: attention scores change."""
    t, model, pg = _graph("timm_attention")
    model = model.double().eval()
    perturb_(model, 0)
    x = t.example()
    x = tuple(a.double() for a in x) if isinstance(x, tuple) else (x.double(),)
    name = next(n for n, p in model.named_parameters() if "qkv.weight" in n)
    W = model.get_parameter(name)
    C = W.shape[1]
    heads = next(s for s in pg.spaces if s.kind == "head")
    G = heads.size
    d = C // G
    sigma = np.roll(np.arange(G), 1)
    q_rows = np.concatenate([np.arange(sigma[h] * d, sigma[h] * d + d) for h in range(G)])
    rows = np.concatenate([q_rows, np.arange(C, 3 * C)])
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.get_parameter(name).copy_(W[torch.as_tensor(rows)])
        bname = name.replace("weight", "bias")
        if dict(bad.named_parameters()).get(bname) is not None:
            bad.get_parameter(bname).copy_(model.get_parameter(bname)[torch.as_tensor(rows)])
        assert (model(*x) - bad(*x)).abs().max() > 1e-6
    # and the same head permutation applied through the graph (q, k and v together) is exact
    perms = random_permutations(pg, np.random.default_rng(3))
    good = apply_permutations(model, pg, perms)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), good(*x), rtol=1e-10, atol=1e-10)


def test_attention_heads_are_structured_and_tied():
    _, _, pg = _graph("vit_mha")
    ties = pg.ties()
    assert len(ties) == 1
    (head, spaces), = ties.items()
    assert len(spaces) == 2  # the q/k space and the v space share one head permutation
    assert all(pg.spaces[s].blocks == (2, 4) for s in spaces)


def test_groupnorm_gives_blocks():
    _, _, pg = _graph("resnet_gn")
    blocked = [s for s in pg.spaces if s.blocks is not None]
    assert blocked and all(s.blocks[0] * s.blocks[1] == s.size for s in blocked)


def test_tied_lm_head_is_one_space():
    _, model, pg = _graph("gpt")
    assert ("lm_head.weight", "tok_emb.weight") in pg.aliases or ("tok_emb.weight", "lm_head.weight") in pg.aliases
    canon = dict(pg.aliases).get("lm_head.weight", "lm_head.weight")
    emb_cols = [m for m in pg.members if m.fqn == canon and m.axis == 1]
    assert len(emb_cols) == 1 and pg.is_free(next(iter(spaces_of(emb_cols[0].layout))))


def test_unknown_op_is_a_barrier_with_warning():
    t = by_name("unknown_op")
    with pytest.warns(UserWarning, match="no permutation rule"):
        pg = mf.infer(t.build(), t.example())
    assert any("no rule" in b.reason for b in pg.barriers)


def test_views_show_spaces_members_and_barriers():
    _, _, pg = _graph("channel_shuffle")
    text = pg.summary()
    assert "coverage" in text and "barriers:" in text and "fixed by" in text
    data = json.loads(pg.to_json())
    assert len(data["spaces"]) == len(pg.spaces) and data["barriers"]
    assert {"param", "axis", "role", "layout"} <= set(data["spaces"][0]["members"][0])
    dot = pg.to_dot()
    assert dot.startswith("graph") and "barrier:" in dot and "S0" in dot
    g = pg.to_networkx()
    assert isinstance(g, nx.MultiGraph)
    assert sum(1 for _, d in g.nodes(data=True) if d["kind"] == "space") == len(pg.spaces)


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(mf.TraceError, match=r"(?s)DataDependent.*if x.sum.*leaf_modules"):
        mf.infer(DataDependent(), torch.randn(2, 4))


def test_leaf_module_becomes_a_barrier():
    class Weird(nn.Module):
        def forward(self, x):
            return x.flip(-1) if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 8), Weird(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="no permutation rule"):
        pg = mf.infer(model, torch.randn(2, 4), leaf_modules=[Weird])
    assert not pg.free_spaces
    assert mf.check(model, torch.randn(2, 4), pg=pg).ok


def test_fixed_params_option_pins_a_frozen_head():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    pg = mf.infer(model, torch.randn(2, 4), fixed_params=["0.weight"])
    assert not pg.free_spaces


def test_dict_outputs_and_several_inputs_are_barriers():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(3, 5)

        def forward(self, x, y):
            h = self.a(x)
            return {"logits": self.b(h.relu()), "feat": h, "other": self.c(y)}

    model = TwoHeads()
    pg = mf.infer(model, (torch.randn(2, 4), torch.randn(2, 3)))
    assert not pg.free_spaces  # every produced space is returned
    assert all(s.reaches_output for s in pg.spaces)
    assert set(pg.output_params()) >= {"a.weight", "b.weight", "c.weight"}
    assert mf.check(model, (torch.randn(2, 4), torch.randn(2, 3))).ok
