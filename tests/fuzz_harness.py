"""Run generated models through inference and the proof, judge the outcome, shrink failures.

Outcomes of one model (:func:`run_program`):

- ``proven``: ``mf.check`` passes for every seed, every free space alone passes the
  single-space oracle, and every op no rule may know is a barrier.
- ``clear_error``: inference or the check raised a ValueError / TypeError from mudsc_fx code
  whose message names something of the model (a node, op, parameter or module).
- ``unclear_error``: any other exception (a raw torch error from deep inside, a KeyError...).
- ``wrong_proof``: the inferred graph claims a symmetry the model does not have: the check
  fails for some seed, or permuting one free space alone (a random non-identity valid
  permutation) changes the outputs.
- ``wrong_merge`` (optional oracle): merging the model with a randomly permuted copy of
  itself (``act_align``) does not give the model back (see :func:`merge_oracle`).
- ``missing_barrier``: an op without a rule (a wrapped function, a leaf module) passed
  through silently.

:func:`shrink` drops steps of a failing program while the failure keeps its kind.
"""
from __future__ import annotations

import copy
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

import mudsc_fx as mf
from mudsc_fx.passes.apply import (apply_permutations, load_tensors, named_tensors, permutation_op,
                                   transform_params)
from mudsc_fx.passes.check import perturb_
from mudsc_fx.rules import table as rule_table

from fuzz_models import (DEFAULT, LEAF_MODULES, Profile, GenerationFailed, Program, build, bypass, describe, drop_input,
                         generate_model, prune)
from fuzz_ops import OPS

FAILURES = ("unclear_error", "wrong_proof", "missing_barrier", "wrong_merge")


@dataclass(frozen=True)
class Outcome:
    seed: int
    status: str                    # proven | clear_error | unclear_error | wrong_proof | missing_barrier
    detail: str = ""
    ops: tuple[str, ...] = ()
    n_free: int = 0
    n_barriers: int = 0
    coverage: float = 0.0
    families: tuple[str, ...] = field(default=(), compare=False)
    rule_keys: tuple[str, ...] = field(default=(), compare=False)  # rows of the rule table the graph used
    seconds: float = field(default=0.0, compare=False)

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


# ---------------------------------------------------------------------------------------------
# oracles
def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _max_err(a, b) -> tuple[float, float]:
    err = scale = 0.0
    for x, y in zip(_flat(a), _flat(b)):
        if x.is_floating_point():
            err = max(err, float((x - y).abs().max()))
            scale = max(scale, float(x.abs().max()))
        elif not torch.equal(x, y):
            err = float("inf")
    return err, scale


def _non_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if n < 2 or (p != np.arange(n)).any():
            return p


def single_space_permutations(pg: mf.PermutationGraph, rng: np.random.Generator):
    """(description, perms): for each free space alone, a random non-identity valid permutation
    (a head space moves the blocks of every space tied to it; a blocked unit space permutes
    within its blocks only)."""
    for s in pg.spaces:
        if not pg.is_free(s.id):
            continue
        if s.kind == "head":
            tied = [t for t in pg.spaces if t.head == s.id and t.blocks is not None]
            if s.fixed or s.size < 2:
                continue
            sigma = _non_identity(rng, s.size)
            perms = {s.id: sigma}  # members laid out by the head space itself (per-head tensors)
            for t in tied:
                G, g = t.blocks
                perms[t.id] = np.concatenate([sigma[b] * g + np.arange(g) for b in range(G)])
            yield f"head space S{s.id} (size {s.size}, ties {[t.id for t in tied]})", perms
        elif s.blocks is None:
            yield f"space S{s.id} (size {s.size})", {s.id: _non_identity(rng, s.size)}
        elif s.within == "free" and s.blocks[1] > 1:
            G, g = s.blocks
            within = np.concatenate([b * g + _non_identity(rng, g) for b in range(G)])
            yield f"space S{s.id} within blocks {s.blocks}", {s.id: within}


def _space_text(pg: mf.PermutationGraph, perms: dict) -> str:
    parts = []
    for sid in perms:
        sp = pg.spaces[sid]
        mem = ", ".join(f"{m.fqn}[{m.axis}]{'' if m.role == 'out' else '<in>'}" for m in sp.members[:6])
        parts.append(f"S{sid} members: {mem or '(none)'}")
    return "; ".join(parts)


def _double_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model``, plain tensor attributes used in forward included."""
    work = copy.deepcopy(model).double()
    for m in work.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_floating_point():
                object.__setattr__(m, k, v.double())
    return work


def _double_inputs(inputs):
    return tuple(x.double() if x.is_floating_point() else x for x in inputs)


def single_space_oracle(model, inputs, pg, seed: int = 0, rtol: float = 1e-7) -> Optional[str]:
    """None if permuting each free space alone keeps the outputs; else what failed. One float64
    copy is permuted in place and restored per space (no copy per space)."""
    work = _double_model(model).eval()
    perturb_(work, seed)
    orig = {k: t.clone() for k, t in named_tensors(work).items()}
    x = _double_inputs(inputs)
    with torch.no_grad():
        base = work(*x)
        for what, perms in single_space_permutations(pg, np.random.default_rng(seed)):
            new = transform_params(pg, orig, permutation_op(perms))
            load_tensors(work, new)
            err, scale = _max_err(base, work(*x))
            load_tensors(work, {k: orig[k] for k in new})
            if not err <= rtol * max(1.0, scale):
                return f"permuting {what} alone changes the outputs by {err:.3g}: {_space_text(pg, perms)}"
    return None


def calibration_batch(inputs: tuple, seed: int) -> tuple:
    """Fresh inputs of the example's shapes (the generated models have static shapes)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g) if x.is_floating_point() else
                 torch.randint(0, int(x.max()) + 1, x.shape, generator=g) for x in inputs)


def merge_oracle(model, inputs, pg, seed: int = 0, rtol: float = 1e-4, batches: int = 32) -> Optional[str]:
    """None if ``act_align`` merging of the model with a randomly permuted copy of itself gives
    back the model; else what went wrong.

    A space whose recovered alignment differs from the planted one is a bug when it has no
    activation statistics (matched blind) or when the planted alignment scores better than
    the one found; when the data cannot tell its units apart (the found alignment scores as
    well: colinear or dead units) the space is ambiguous and the outputs are not compared.
    When every space is recovered exactly, any output difference is a bug of the rewrite."""
    rng = np.random.default_rng(seed)
    perms = mf.random_permutations(pg, rng)
    if not perms:
        return None
    permuted = apply_permutations(model, pg, perms).eval()
    data = [inputs] + [calibration_batch(inputs, seed * 1000 + k) for k in range(batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = mf.Merger([model, permuted], data, input_fn=lambda b: b, leaf_modules=LEAF_MODULES)
        res = merger.merge("act_align", reset_bn=False)
    merged = res.model.eval()
    stats = res.stats
    wrong, ambiguous = [], []
    for sid, found in res.alignment.perms.items():
        planted = perms.get(sid)
        expected = np.argsort(planted) if planted is not None else np.arange(len(found[1]))
        got = np.asarray(found[1])
        if np.array_equal(got, expected):
            continue
        if stats is None or sid not in stats.corr:
            if pg.spaces[sid].kind != "head":
                wrong.append(f"S{sid} matched without activation statistics (no tap)")
            continue
        c = stats.corr[sid]
        n = len(got)
        score = lambda al: float(sum(c[j, n + al[j]] for j in range(n)))  # noqa: E731
        if score(got) >= score(expected) - 1e-6 * n:
            ambiguous.append(sid)
        else:
            wrong.append(f"S{sid}: the solver's matching scores {score(got):.4f} < planted {score(expected):.4f}")
    if wrong:
        return "merge oracle: " + "; ".join(wrong)
    if ambiguous:
        return None
    with torch.no_grad():
        err, scale = _max_err(model(*inputs), merged(*inputs))
    if not err <= rtol * max(1.0, scale):
        return (f"merge oracle: every space was matched to its planted permutation, yet the merged model "
                f"differs by {err:.3g} (rewrite)")
    return None


# ---------------------------------------------------------------------------------------------
# errors
def _names(model, pg_or_none=None) -> set[str]:
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    names |= {n for n, _ in model.named_modules() if n}
    names |= {n for n in vars(model) if n.startswith("s") and "_" in n}
    try:
        import torch.fx as fx
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fx.symbolic_trace(model)
        names |= {n.name for n in gm.graph.nodes}
    except Exception:
        pass
    # distinctive names only (s3_w, conv2d_1, s0_m.weight): fx names such as "output" or "add" are words
    return {n for n in names if n != "output" and any(c == "_" or c.isdigit() for c in n)}


def classify_error(e: BaseException, model) -> tuple[str, str]:
    """('clear_error' | 'unclear_error', one-line text)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}" if tb else "?"
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (raised at {where})"
    raised_by_us = bool(tb) and "mudsc_fx" in tb[-1].filename
    named = any(n in str(e) for n in _names(model))
    if isinstance(e, (ValueError, TypeError)) and raised_by_us and named:
        return "clear_error", text
    return "unclear_error", text


# ---------------------------------------------------------------------------------------------
# one model
@dataclass(frozen=True)
class Options:
    check_seeds: tuple[int, ...] = (0, 1)
    single_space: bool = True
    merge: bool = False


def _barrier_steps(program: Program) -> list[int]:
    return [k for k, s in enumerate(program.steps) if OPS[s.op].barrier]


def _has_barrier(pg: mf.PermutationGraph, k: int, op: str) -> bool:
    if op == "unruled.leaf":
        return any(b.op == f"module s{k}_m" for b in pg.barriers)
    return any("fuzz_unruled" in b.op for b in pg.barriers)  # each call: counted by the caller


def run_program(program: Program, opts: Options = Options(), built=None) -> Outcome:
    model, inputs = built if built is not None else build(program)
    fams = tuple(sorted({OPS[s.op].family for s in program.steps}))
    base = dict(seed=program.seed, ops=program.ops, families=fams)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pg = mf.infer(model, inputs, leaf_modules=LEAF_MODULES)
        except Exception as e:
            status, text = classify_error(e, model)
            return Outcome(status=status, detail=f"infer: {text}", **base)
        stats = dict(n_free=len(pg.free_spaces), n_barriers=len(pg.barriers), coverage=pg.coverage(),
                     rule_keys=rule_keys(pg.gm))
        for k in _barrier_steps(program):
            if not _has_barrier(pg, k, program.steps[k].op):
                return Outcome(status="missing_barrier", detail=f"step {k} ({program.steps[k].op}) is not a barrier",
                               **base, **stats)
        wrapped = sum(1 for s in program.steps if s.op == "unruled.wrapped")
        if sum(1 for b in pg.barriers if "fuzz_unruled" in b.op) < wrapped:
            return Outcome(status="missing_barrier", detail=f"{wrapped} calls of fuzz_unruled, fewer barriers",
                           **base, **stats)
        try:
            for s in opts.check_seeds:
                rep = mf.check(model, inputs, seed=s, pg=pg, leaf_modules=LEAF_MODULES)
                if not rep.ok:
                    return Outcome(status="wrong_proof", detail=f"check seed {s}: max abs err {rep.max_abs_err:.3g}"
                                   f" > {rep.tolerance:.3g}", **base, **stats)
            if opts.single_space:
                bad = single_space_oracle(model, inputs, pg)
                if bad:
                    return Outcome(status="wrong_proof", detail=bad, **base, **stats)
            if opts.merge:
                bad = merge_oracle(model, inputs, pg)
                if bad:
                    return Outcome(status="wrong_merge", detail=bad, **base, **stats)
        except Exception as e:
            status, text = classify_error(e, model)
            return Outcome(status=status, detail=f"check: {text}", **base, **stats)
    return Outcome(status="proven", **base, **stats)


def run_seed(seed: int, opts: Options = Options(), profile: Profile = DEFAULT) -> tuple[Optional[Program], Outcome]:
    t = time.perf_counter()
    try:
        program, model, inputs = generate_model(seed, profile)
    except GenerationFailed as e:
        return None, Outcome(seed=seed, status="generator_failed", detail=str(e))
    out = run_program(program, opts, built=(model, inputs))
    return program, replace(out, seconds=time.perf_counter() - t)


def key_name(k) -> str:
    """A rule-table key as text: ``Tensor.view``, ``torch.nn.functional.conv2d``, ``torch.nn.Linear``."""
    if isinstance(k, str):
        return f"Tensor.{k}"
    name = getattr(k, "__name__", repr(k))
    for public, mod in _PUBLIC:
        if getattr(mod, name, None) is k:
            return f"{public}.{name}"
    mod = getattr(k, "__module__", None) or ""
    return f"{mod}.{getattr(k, '__qualname__', name)}".lstrip(".")


_PUBLIC = (("torch.nn", torch.nn), ("F", torch.nn.functional), ("torch", torch), ("torch.linalg", torch.linalg),
           ("operator", __import__("operator")), ("builtins", __import__("builtins")))


def rule_keys(gm, graph=None) -> tuple[str, ...]:
    """The rule-table keys the nodes of a traced graph match (as :func:`key_name` text).
    ``gm`` is the GraphModule, or the root module when ``graph`` is given."""
    out = set()
    for node in (graph if graph is not None else gm.graph).nodes:
        k = None
        if node.op == "call_module":
            k = next((c for c in type(gm.get_submodule(node.target)).__mro__ if c in rule_table.RULES), None)
        elif node.op in ("call_function", "call_method"):
            k = node.target
        try:
            if k is not None and k in rule_table.RULES:
                out.add(key_name(k))
        except TypeError:
            pass
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------
# shrinking
def _same_failure(a: Outcome, b: Outcome) -> bool:
    if a.status != b.status:
        return False
    if a.status == "unclear_error" or a.status == "clear_error":
        return a.detail.split(":")[1] == b.detail.split(":")[1]  # same exception type
    return True


def shrink(program: Program, outcome: Outcome, opts: Options = Options(),
           still_fails: Optional[Callable[[Outcome], bool]] = None, max_rounds: int = 50) -> tuple[Program, Outcome]:
    """Drop steps (with their dependents), bypass shape-preserving steps and drop unused
    inputs while the failure keeps its kind. Returns the smallest failing program found."""
    keep = still_fails or (lambda o: _same_failure(outcome, o))
    best, best_out = program, outcome
    for _ in range(max_rounds):
        improved = False
        for cand in _candidates(best):
            try:
                out = run_program(cand, opts)
            except Exception:
                continue
            if keep(out):
                best, best_out, improved = cand, out, True
                break
        if not improved:
            break
    return best, best_out


def _candidates(program: Program) -> Iterable[Program]:
    n = len(program.steps)
    for k in reversed(range(n)):  # drop a step and its dependents (the cheapest big cut first)
        p = prune(program, {k})
        if p is not None:
            yield p
    for k in range(n):
        try:
            p = bypass(program, k)
        except Exception:
            p = None
        if p is not None:
            yield p
    for i in range(len(program.inputs)):
        p = drop_input(program, i)
        if p is not None:
            yield p


def report(program: Program, outcome: Outcome) -> str:
    return (f"seed {outcome.seed}: {outcome.status}: {outcome.detail}\n{describe(program)}\n"
            f"repro: build({program!r})")
