"""Library conventions in tracing, and the structures the reach rows added (each proven by
check on a small model and asserted as the structure it must infer)."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mudsc_fx as mf
from mudsc_fx.ir import conventions


def _proven(model, x, seed=0):
    torch.manual_seed(seed)
    rep = mf.check(model.eval(), x, seed=seed)
    assert rep.ok, (rep.max_abs_err, rep.graph.summary())
    return rep


# ---------------------------------------------------------------------------------- conventions
class Shapey(nn.Module):
    """Python control flow on a shape: fx cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return self.lin(x) if x.shape[-1] > 1 else x


def shapey_helper(x):
    return x * 2 if x.shape[0] > 0 else x


class UsesThem(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.fc_in, self.odd, self.fine, self.fc_out = nn.Linear(4, c), Shapey(c), Shapey(c), nn.Linear(c, 3)
        self.helped = True

    def forward(self, x):
        h = self.fc_in(x)
        h = shapey_helper(self.odd(h))
        return self.fc_out(h)


@pytest.fixture
def fake_library(monkeypatch):
    """A library 'fakelib' registering Shapey as a notrace module and shapey_helper as a
    notrace function, the way timm does."""
    monkeypatch.setitem(sys.modules, "fakelib", types.ModuleType("fakelib"))
    monkeypatch.setitem(conventions.CONVENTIONS, "fakelib", conventions.Convention(
        "fakelib", lambda: frozenset({Shapey}), lambda: frozenset({shapey_helper})))


def test_conventions_adopt_only_what_tracing_needs(fake_library):
    model = UsesThem().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    gm = mf.trace(model, torch.randn(2, 4))
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert ("call_module", "odd") in calls  # the registered class became a leaf
    assert ("call_function", shapey_helper) in calls  # the registered helper is one call
    assert ("call_module", "odd.lin") not in calls
    # without a row they are barriers: the spaces they touch are fixed, never passed through
    rep = _proven(model, torch.randn(2, 4))
    assert {b.op for b in rep.barriers} >= {"module odd"}
    assert rep.coverage == 0.0


def test_conventions_do_not_apply_without_the_library():
    model = UsesThem().eval()
    with pytest.raises(mf.TraceError, match="torch.fx could not trace"):
        mf.trace(model, torch.randn(2, 4), frontend="fx")


# ---------------------------------------------------------------------------------- structures
class SelectiveKernel(nn.Module):
    """Two paths stacked, per-path attention over channels (paths x C viewed from 2C units)."""

    def __init__(self, c=6):
        super().__init__()
        self.fc_in = nn.Linear(4, c)
        self.p0, self.p1 = nn.Linear(c, c), nn.Linear(c, c)
        self.reduce, self.select = nn.Linear(c, 3), nn.Linear(3, 2 * c)
        self.fc_out = nn.Linear(c, 3)

    def forward(self, x):
        h = self.fc_in(x)
        paths = torch.stack([self.p0(h), self.p1(h)], 1)               # [B, 2, C]
        attn = self.select(F.relu(self.reduce(paths.sum(1))))          # [B, 2C]
        attn = attn.view(x.shape[0], 2, -1).softmax(1)                 # [B, 2, C]
        return self.fc_out((paths * attn).sum(1))


def test_selective_kernel_channels_stay_free():
    model = SelectiveKernel()
    rep = _proven(model, torch.randn(5, 4))
    pg = rep.graph
    (p0,) = [m for m in pg.members if m.fqn == "p0.weight" and m.axis == 0]
    (sel,) = [m for m in pg.members if m.fqn == "select.weight" and m.axis == 0]
    assert pg.is_free(p0.layout.space)
    # the attention's 2C outputs are the paths' C channels, twice
    assert [p.space for p in sel.layout.parts] == [p0.layout.space, p0.layout.space]
    assert rep.coverage == 1.0


class GroupStd(nn.Module):
    """EvoNorm-style: divide by the std of each channel group, expanded back over the group."""

    def __init__(self, c=8, groups=2):
        super().__init__()
        self.fc_in, self.fc_out, self.groups = nn.Conv2d(3, c, 1), nn.Conv2d(c, 3, 1), groups

    def forward(self, x):
        h = self.fc_in(x)
        B, C, H, W = h.shape
        std = h.reshape(B, self.groups, C // self.groups, H, W).var(dim=(2, 3, 4), keepdim=True).add(1e-5).sqrt()
        std = std.expand(B, self.groups, C // self.groups, H, W).reshape(B, C, H, W)
        return self.fc_out(h / std)


def test_group_statistic_expanded_over_its_group_keeps_the_channels():
    rep = _proven(GroupStd(), torch.randn(2, 3, 5, 5))
    pg = rep.graph
    (m,) = [m for m in pg.members if m.fqn == "fc_in.weight" and m.axis == 0]
    space = pg.spaces[m.layout.space]
    assert pg.is_free(space.id) and space.blocks == (2, 4) and not pg.spaces[space.head].fixed
    assert rep.coverage == 1.0


class HeadsShareFilters(nn.Module):
    """q [B, heads, N, d] -> heads folded into the batch -> one depthwise conv over d for every
    head, then a half-rotary slice of the within-head units (both pin the units inside heads)."""

    def __init__(self, c=16, heads=4):
        super().__init__()
        self.q, self.out, self.heads = nn.Linear(4, c), nn.Linear(c, 3), heads
        self.pool = nn.Conv1d(c // heads, c // heads, 3, padding=1, groups=c // heads)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).transpose(1, 2)          # [B, h, N, d]
        d = q.shape[-1]
        p = self.pool(q.reshape(B * self.heads, N, d).transpose(1, 2))       # [B h, d, N]
        q = q + p.transpose(1, 2).reshape(B, self.heads, N, d)
        q = torch.cat([q[..., : d // 2] * 2.0, q[..., d // 2:]], -1)
        return self.out(q.transpose(1, 2).reshape(B, N, -1))


def test_filters_and_slices_shared_by_heads_keep_heads_free():
    model, x = HeadsShareFilters(), torch.randn(1, 5, 4)
    rep = _proven(model, x)
    for seed in (1, 2):
        assert _proven(model, x, seed).ok
    assert rep.max_abs_err > 0  # a non-trivial permutation was applied
    pg = rep.graph
    (m,) = [m for m in pg.members if m.fqn == "q.weight" and m.axis == 0]
    space = pg.spaces[m.layout.space]
    assert space.blocks == (4, 4) and space.within == "identity"
    assert pg.is_free(space.id) and not pg.spaces[space.head].fixed
    assert math.isclose(rep.coverage, 16 / 20)  # q's 16 units move (as heads); the shared filters' 4 stay


def test_repeat_interleave_and_type_as():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.repeat_interleave(self.a(x), 2, dim=-1).type_as(self.b(x))
            return self.out(h)

    rep = _proven(M(), torch.randn(2, 4))
    pg = rep.graph
    (m,) = [m for m in pg.members if m.fqn == "out.weight" and m.axis == 1]
    assert (m.layout.outer, m.layout.inner_rep) == (1, 2)  # index i*2 + j is unit i of a's space
    assert rep.coverage == 1.0
