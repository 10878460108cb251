"""The fuzzer in the default suite: seeded random models (tests/fuzz_models.py) must be proven
by ``mf.check`` (and by permuting each free space alone) or fail with a clear error.

A failure message gives, per failing model, the generating seed, the outcome, the shrunk
program (one line per op) and a ``build(Program(...))`` repro.

Known-failing families are excluded from the main run and each has its own strict xfail, so
the xfail turns into an error the day the fix lands (then delete the marker and the ban).
None is open today.

Merging a model with a permuted copy of itself (``act_align``) must give the model back: a
seeded run of the merge oracle, and one small model per cause the fuzzer found (a part of a
concat layout no matching covers, spaces no rule taps, a flat weight viewed as [out, in]).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mudsc_fx as mf
from mudsc_fx.ir.layout import Concat, Fixed, spaces_of
from mudsc_fx.passes.alignment import Alignment, SpaceMatching
from mudsc_fx.passes.apply import apply_permutations
from mudsc_fx.passes.stats import taps_by_space

from fuzz_harness import FAILURES, Options, report, run_seed, shrink
from fuzz_models import DEFAULT, Profile

PLAIN_ATTRIBUTES = frozenset({"const"})
CLEAN = DEFAULT  # plain tensor attributes included: check's float64 copy converts them


def fuzz(seeds, profile: Profile = DEFAULT, opts: Options = Options(check_seeds=(0,)), max_reports: int = 3,
         stop_at_first: bool = False):
    """Run the seeds; return (outcomes, failure report text). Failures are shrunk (the first
    ``max_reports``); ``stop_at_first`` ends the run at the first failure (known-failing
    families only need one to stay xfailed)."""
    outcomes, failed = [], []
    for seed in seeds:
        program, out = run_seed(seed, opts, profile)
        outcomes.append(out)
        if out.status in FAILURES or out.status == "generator_failed":
            failed.append((program, out))
            if stop_at_first:
                break
    texts = []
    for program, out in failed[:max_reports]:
        if program is None:
            texts.append(f"seed {out.seed}: {out.status}: {out.detail}")
            continue
        small, small_out = shrink(program, out, opts)
        texts.append(report(small, small_out))
    summary = f"{len(failed)} of {len(outcomes)} models failed: " + ", ".join(
        f"seed {o.seed} {o.status}" for _, o in failed[:20])
    return outcomes, (summary + "\n\n" + "\n\n".join(texts)) if failed else ""


def test_500_fuzzed_models_are_proven_or_fail_clearly():
    outcomes, text = fuzz(range(500), CLEAN)
    assert not text, text
    statuses = {o.status for o in outcomes}
    assert statuses <= {"proven", "clear_error"}
    # the run is not vacuous: most models have free spaces, some have barriers
    assert sum(o.n_free > 0 for o in outcomes) > 0.6 * len(outcomes)
    assert sum(o.n_barriers > 0 for o in outcomes) > 0.1 * len(outcomes)


def test_fuzzed_plain_tensor_attributes():
    """Plain tensor attributes (not in the state dict) as weights and scales: the float64 proof
    converts them too (it used to die with a raw dtype error)."""
    profile = Profile(require_sources=PLAIN_ATTRIBUTES,
                      require=frozenset({"linear.fn", "matmul.param", "embedding.fn", "channel_affine"}))
    _, text = fuzz(range(20_000, 20_080), profile, max_reports=0, stop_at_first=True)
    assert not text, text


def test_fuzzed_merge_with_a_permuted_copy_gives_back_the_model():
    outcomes, text = fuzz(range(30_000, 30_080), CLEAN, Options(check_seeds=(0,), single_space=False, merge=True),
                          max_reports=1)
    assert not text, text
    assert sum(o.n_free > 0 for o in outcomes) > 0.6 * len(outcomes)


# ---------------------------------------------------------------------------------------------
# the merge with a permuted copy: one small model per cause the fuzzer found (seeded, exact)
def _merge_back(model, x, method="act_align", n_batches=8, seed=0):
    """(merged model, merge result, graph): ``method`` merging of ``model`` with a randomly
    permuted copy of itself, on seeded calibration batches of ``x``'s shape."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, x)
        perms = mf.random_permutations(pg, np.random.default_rng(seed))
        assert perms, "the model has no free space: the test would prove nothing"
        permuted = apply_permutations(model, pg, perms).eval()
        g = torch.Generator().manual_seed(seed)
        data = [torch.randn(x.shape, generator=g) for _ in range(n_batches)]
        res = mf.Merger([model, permuted], data).merge(method, reset_bn=False)
    return res.model.eval(), res, pg


def _assert_same_function(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    for u, v in zip(ya if isinstance(ya, tuple) else (ya,), yb if isinstance(yb, tuple) else (yb,)):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5)


def _spaces(layout) -> set[int]:
    return set(spaces_of(layout))


def _has_unmatched_part(pg) -> bool:
    """Some `out` axis is a concat with a part that no matching can cover."""
    return any(isinstance(m.layout, Concat) and any(isinstance(p, Fixed) or not _spaces(p) <= set(pg.free_spaces)
                                                    for p in m.layout.parts)
               for m in pg.members if m.role == "out")


class SlicedConvTranspose(nn.Module):
    """F.conv_transpose2d with a buffer weight; channels 0-1 are outputs (fixed), 2-5 feed a
    conv: the weight's output axis is cat(fixed part, free space) (fuzz seed 190)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3, 6, 3, 3, generator=g))
        self.b = nn.Parameter(torch.randn(6, generator=g))
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, 4, 1, 1, generator=g))

    def forward(self, x):
        h = F.conv_transpose2d(x, self.w, self.b, padding=1)
        return h[:, :2], self.head(torch.relu(h[:, 2:]))


def test_merge_averages_the_unmatched_part_of_a_concat_layout():
    """Cause 1: a part of an `out` axis that no matching covers (a fixed piece of a concat
    layout) was summed over the models without the 1/N; every entry must be a mean."""
    model, x = SlicedConvTranspose(), torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    merged, _, pg = _merge_back(model, x)
    assert _has_unmatched_part(pg)
    _assert_same_function(model, merged, x)


def test_merge_of_a_grouped_conv_transpose_is_a_mean():
    """The output axis of a grouped conv_transpose is the weight's short grouped axis 1 (fuzz
    seed 30035): its entries are counted on the dense block-diagonal form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(6, 9, 3, groups=3, padding=1), nn.ReLU(), nn.Conv2d(9, 2, 1))
    x = torch.randn(2, 6, 4, 4)
    merged, _, pg = _merge_back(model, x)
    assert any(m.role == "out" and m.groups > 1 for m in pg.members)
    _assert_same_function(model, merged, x)


def test_rewrite_with_identity_matchings_is_the_plain_average_of_every_tensor():
    """Two different models, every free space matched to itself (a permutation matching and a
    zip one): every merged tensor entry is the mean of the two models' entries, unmatched
    parts of concat layouts included."""
    a, b = SlicedConvTranspose(0), SlicedConvTranspose(1)
    pg = mf.infer(a, torch.randn(2, 3, 5, 5))
    assert _has_unmatched_part(pg)
    for kind in ("perms", "labels"):
        spaces = {}
        for s in pg.free_spaces:
            n = pg.size(s)
            spaces[s] = (SpaceMatching.from_perms([np.arange(n)] * 2) if kind == "perms"
                         else SpaceMatching.from_labels(np.tile(np.arange(n), 2), 2, n))
        merged = mf.rewrite([a, b], pg, Alignment(spaces, 2))
        for (k, ta), tb, tm in zip(a.state_dict().items(), b.state_dict().values(), merged.state_dict().values()):
            torch.testing.assert_close(tm, (ta + tb) / 2, msg=f"{kind}: {k}")


class EinsumMLP(nn.Module):
    """A hidden space read and written only by einsum (no rule taps it; fuzz seed 1830)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(8, 4, generator=g))
        self.w2 = nn.Parameter(torch.randn(3, 8, generator=g))

    def forward(self, x):
        h = torch.tanh(torch.einsum("bi,oi->bo", x, self.w1))
        return torch.einsum("bo,ko->bk", h, self.w2)


class AttentionThenEinsum(nn.Module):
    """nn.MultiheadAttention whose out-projection output is read only by an einsum (fuzz seed
    5270): the out-projection's space has no rule tap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        a = self.attn(x, x, x, need_weights=False)[0]
        return torch.einsum("btd,kd->btk", torch.relu(a), self.w)


@pytest.mark.parametrize("cls,shape", [(EinsumMLP, (4, 4)), (AttentionThenEinsum, (2, 5, 8))],
                         ids=["einsum", "mha_out_proj"])
def test_every_free_space_is_observed_and_merges_back(cls, shape):
    """Cause 2: a free space that no rule taps is observed at an activation that carries it,
    so act_align matches it on data (it was matched blind, on weights that could not tell
    its units apart)."""
    model, x = cls(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    merged, res, pg = _merge_back(model, x)
    units = {s for s in pg.free_spaces if pg.spaces[s].kind == "unit"}  # heads move with their blocks
    tapped = {s for t in pg.in_taps + pg.out_taps for s in _spaces(t.layout)}
    assert units - tapped, "every space has a rule tap: the case tests nothing"
    assert units <= set(taps_by_space(pg)) and units <= set(res.stats.corr)
    _assert_same_function(model, merged, x)


class FlatViewedConv(nn.Module):
    """A conv weight stored flat [out * in] and viewed as [out, in, 1, 1] in forward (fuzz seed
    200): the flat axis is a blocked space (out blocks of in units) whose head space, the
    conv's output channels, holds the BatchNorm and the next conv's input."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(6 * 4))
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 3, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2)
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = F.conv2d(x, self.w.view(6, 4, 1, 1))
        return self.head(torch.relu(self.norm(h)))


@pytest.mark.parametrize("method", ["act_align", "mudsc_align", "rebasin", "zipit"])
def test_a_flat_weight_viewed_as_out_by_in_merges_back(method):
    """Cause 3: the blocks of the flat weight (one number per unit, nothing to match on) were
    matched alone, although their head space, the conv's output channels, is observed and
    has members; the head's own similarity now joins the block matching."""
    model, x = FlatViewedConv(), torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    merged, _, pg = _merge_back(model, x, method=method)
    heads = {s.head for s in pg.spaces if s.blocks is not None and pg.is_free(s.id)}
    assert heads and all(pg.spaces[h].members for h in heads)
    _assert_same_function(model, merged, x)


def test_a_flat_weight_viewed_as_out_by_in_is_averaged_by_zip_clusters():
    """The flat axis of a weight viewed as [out, in] holds the output units block by block, so
    it is an `out` axis: a zip cluster averages its members' rows (it was an `in` axis, whose
    clusters are summed; with the 1/N a cluster of one or three units came out wrong)."""
    a, b = FlatViewedConv(0), FlatViewedConv(1)
    pg = mf.infer(a, torch.randn(2, 4, 5, 5))
    (blocked,) = [s for s in pg.spaces if s.blocks is not None and pg.is_free(s.id)]
    G, g = blocked.blocks
    assert [m.role for m in blocked.members] == ["out"]
    heads = np.array([0, 0, 0, 1, 2, 3, 1, 2, 3, 4, 5, 4])  # clusters of 3, 2, 2, 2, 2 and 1 units
    units = (heads[:, None] * g + np.arange(g)).reshape(-1)
    merged = mf.rewrite([a, b], pg, Alignment({blocked.head: SpaceMatching.from_labels(heads, 2, G),
                                               blocked.id: SpaceMatching.from_labels(units, 2, G * g)}, 2))
    rows = torch.cat([a.w.detach().view(G, g), b.w.detach().view(G, g)]).double()
    gains = torch.cat([a.norm.weight.detach(), b.norm.weight.detach()]).double()
    for c in range(G):
        members = torch.as_tensor(np.flatnonzero(heads == c))
        torch.testing.assert_close(merged.w.detach().view(G, g)[c].double(), rows[members].mean(0))
        torch.testing.assert_close(merged.norm.weight.detach()[c].double(), gains[members].mean())


class ComputedWeightHead(nn.Module):
    """A Linear, then a readout weight applied in one of several forms: F.linear (the
    reference), or a contraction of a weight computed in forward (fuzz seed 5270's addmm of a
    transposed weight)."""

    FORMS = ("linear", "matmul_t", "addmm_t", "einsum_scaled", "weight_first")

    def __init__(self, form: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.form = form
        self.l1 = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        h = torch.relu(self.l1(x))
        if self.form == "linear":
            return F.linear(h, self.w)
        if self.form == "matmul_t":
            return h @ self.w.t()
        if self.form == "addmm_t":
            return torch.addmm(torch.zeros(3), h, self.w.t())
        if self.form == "einsum_scaled":
            return torch.einsum("bi,oi->bo", h, self.w * 1.0)
        return (self.w @ h.t()).t()


@pytest.mark.parametrize("form", ComputedWeightHead.FORMS[1:])
def test_a_computed_weight_in_a_contraction_is_merged_as_an_input(form):
    """The contracted axis of a weight computed in forward (``w.t()``, ``w * g``) consumes
    units, as in F.linear: its source parameter's axis is an `in` axis. A zip merge with
    uneven clusters gives the same merged tensors as the F.linear form (it averaged the
    columns of a cluster instead of summing each model's)."""
    merged = {}
    for f in ("linear", form):
        a, b = ComputedWeightHead(f, 0), ComputedWeightHead(f, 1)
        pg = mf.infer(a, torch.randn(2, 4))
        (hidden,) = {s for m in pg.members if m.fqn == "l1.weight" and m.axis == 0 for s in _spaces(m.layout)}
        assert [m.role for m in pg.members if m.fqn == "w"] == ["in"]
        labels = np.array([0, 0, 0, 2, 3, 4, 1, 2, 3, 4, 5, 5])  # clusters of 3, 1, 2, 2, 2 and 2 units
        merged[f] = mf.rewrite([a, b], pg, Alignment({hidden: SpaceMatching.from_labels(labels, 2, 6)}, 2))
    for k, t in merged["linear"].state_dict().items():
        torch.testing.assert_close(merged[form].state_dict()[k], t, msg=k)


# ---------------------------------------------------------------------------------------------
# negative controls: the harness fails when the rule table is wrong
class _Row:
    """Temporarily replace (or add) a row of the rule table."""

    def __init__(self, key, rule):
        from mudsc_fx.rules import table
        self.table, self.key, self.rule = table.RULES, key, rule

    def __enter__(self):
        self.old = self.table.get(self.key)
        self.table[self.key] = self.rule

    def __exit__(self, *exc):
        if self.old is None:
            self.table.pop(self.key, None)
        else:
            self.table[self.key] = self.old


def _program(*steps, inputs=((2, 5, 4),)):
    from fuzz_models import InputSpec, Program, Step
    return Program(0, tuple(InputSpec(s, "seq") for s in inputs),
                   tuple(Step(op, ins, tuple(sorted(a.items()))) for op, ins, a in steps))


def test_an_op_without_a_rule_passed_through_is_caught():
    import mudsc_fx as mf
    from fuzz_harness import run_program
    from fuzz_ops import fuzz_unruled

    program = _program(("linear.module", (0,), dict(out=6, bias=True)), ("unruled.wrapped", (1,), {}),
                       ("readout", (2,), dict(form="channel", kind="other")))
    assert run_program(program).status == "proven"
    with _Row(fuzz_unruled, mf.rules.passthrough):
        assert run_program(program).status in ("missing_barrier", "wrong_proof")


def test_a_wrong_rule_is_a_wrong_proof():
    """torch.roll along the channels mixes units: a rule that passes it through is unsound."""
    import torch
    import mudsc_fx as mf
    from fuzz_harness import run_program

    program = _program(("linear.module", (0,), dict(out=6, bias=True)),
                       ("along_axis", (1,), dict(form="roll", axis=2)),
                       ("readout", (2,), dict(form="channel", kind="other")))
    assert run_program(program).status == "proven"
    with _Row(torch.roll, mf.rules.passthrough):
        out = run_program(program)
    assert out.status == "wrong_proof" and "check" in out.detail
