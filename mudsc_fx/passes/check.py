"""The proof: permute every free space at random and compare outputs in float64.

:func:`check` proves an inferred graph on a model; when the proof fails, the failing spaces
are located (bisection over the groups of spaces that move together, one float64 forward
per test) and named, and coverage never counts them. :func:`verify` is the same proof as a
pipeline stage: it returns the graph with the failing spaces frozen, so that a merge never
moves a space that was not proven.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..ir.graph import Barrier, PermutationGraph
from ..ir.inputs import ModelCall, eval_mode, flat_tensors, model_call
from .apply import inverse_permutations, permute_in_place, random_permutations
from .infer import infer

FAILED_REASON = "failed the equivalence check"


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`. ``ok`` means outputs matched within ``tolerance``;
    ``failing_spaces`` are the spaces whose permutation changed the output (located when the
    check failed); ``coverage`` counts only spaces that passed."""
    model: str
    ok: bool
    max_abs_err: float
    tolerance: float
    coverage: float
    n_spaces: int
    n_free: int
    barriers: tuple[Barrier, ...]
    graph: Optional[PermutationGraph]
    seconds: float
    error: Optional[str] = None
    failing_spaces: tuple[int, ...] = ()

    def row(self) -> dict:
        return {"model": self.model, "spaces": self.n_spaces, "free": self.n_free,
                "coverage": round(self.coverage, 4), "max_abs_err": self.max_abs_err,
                "barriers": len(self.barriers), "status": "ok" if self.ok else ("error" if self.error else "FAIL"),
                "seconds": round(self.seconds, 2), "error": self.error,
                "failing_spaces": list(self.failing_spaces)}


def perturb_(model: nn.Module, seed: int, small: int = 1 << 16) -> None:
    """Break the symmetric default init (BN weight 1, bias 0, running stats 0/1, zero-init
    tokens) so that a parameter the rewrite forgets to move changes the output. Large tensors
    are already random unless constant, so only small or constant ones are touched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            if t.numel() > small and not bool((t == t.reshape(-1)[0]).all()):
                continue
            scale = 0.1 * (t.abs().mean().item() + 1e-2)
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("running_var"):
                t.mul_(torch.exp(0.2 * noise))
            else:
                t.add_(scale * noise)


def _double_inputs(example_inputs: Any, model: nn.Module) -> ModelCall:
    """The model's call arguments (tensor, tuple or dict of keyword inputs), floats in float64."""
    return model_call(example_inputs, model).map_tensors(lambda x: x.double() if x.is_floating_point() else x)


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` without an intermediate float32 copy (a deepcopy whose memo
    already holds the converted parameters, buffers and plain tensor attributes)."""
    memo: dict[int, Any] = {}
    plain = (v for m in model.modules() for v in vars(m).values()  # tensor attributes used in forward
             if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
    for t in itertools.chain(model.parameters(), model.buffers(), plain):
        if t.is_floating_point() and id(t) not in memo:
            d = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(d, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else d
    return copy.deepcopy(model, memo)


class _Prover:
    """The float64 reference model and its outputs; ``error(perms)`` permutes the reference in
    place, runs it and permutes it back (one float64 copy of the model in memory, not two)."""

    def __init__(self, model: nn.Module, pg: PermutationGraph, example_inputs: Any, seed: int, perturb: bool):
        self.pg = pg
        self.ref = _float64_copy(model)
        if perturb:
            perturb_(self.ref, seed)
        self.inputs = _double_inputs(example_inputs, model)
        with torch.no_grad(), eval_mode(self.ref):
            self.out = flat_tensors(self.ref(*self.inputs.args, **self.inputs.kwargs))
        if any(x.is_floating_point() and not torch.isfinite(x).all() for x in self.out):
            raise ValueError("non-finite activations: the model's outputs on the example input contain NaN or "
                             "inf (in float64), so no permutation can be proven; check the weights and the inputs")
        self.scale = max((x.abs().max().item() for x in self.out if x.is_floating_point() and x.numel()), default=0.0)

    def error(self, perms: dict) -> float:
        permute_in_place(self.ref, self.pg, perms)
        try:
            with torch.no_grad(), eval_mode(self.ref):
                got = flat_tensors(self.ref(*self.inputs.args, **self.inputs.kwargs))
        finally:
            permute_in_place(self.ref, self.pg, inverse_permutations(perms))
        if len(got) != len(self.out):
            return float("inf")
        err = 0.0
        for x, y in zip(self.out, got):
            if x.shape != y.shape:
                return float("inf")
            if x.is_floating_point():
                d = (x - y).abs().max().item() if x.numel() else 0.0
                err = max(err, d if d == d else float("inf"))  # NaN counts as a failure
            elif not torch.equal(x, y):
                return float("inf")
        return err


def locate_failures(prover: _Prover, tol: float, seed: int) -> tuple[int, ...]:
    """Spaces whose permutation changes the output: bisection over the groups of spaces that
    move together (:meth:`PermutationGraph.motion_groups`), one float64 forward per test."""
    rng = np.random.default_rng(seed + 1)
    pg = prover.pg

    def fails(groups: list[tuple[int, ...]]) -> bool:
        spaces = [s for g in groups for s in g]
        return prover.error(random_permutations(pg, rng, spaces)) > tol

    bad: list[int] = []

    def search(groups: list[tuple[int, ...]]) -> None:
        if not groups or not fails(groups):
            return
        if len(groups) == 1:
            bad.extend(groups[0])
            return
        mid = len(groups) // 2
        search(groups[:mid])
        search(groups[mid:])

    groups = list(pg.motion_groups())
    search(groups)
    remaining = [g for g in groups if not set(g) & set(bad)]
    # permutations that are valid alone compose to a valid one; confirm it on the rest
    if remaining and fails(remaining):
        bad.extend(s for g in remaining for s in g)
    return tuple(sorted(set(bad)))


def check(model: nn.Module, example_inputs: Any, seed: int = 0, *, pg: Optional[PermutationGraph] = None,
          perturb: bool = True, leaf_modules: Iterable[type] = (), rtol: float = 1e-7,
          name: Optional[str] = None, frontend: str = "auto") -> CheckReport:
    """Prove the inferred permutation graph on ``model``: draw a random valid permutation for
    every free space, apply it to a float64 copy and compare outputs with the unpermuted copy.
    On failure the failing spaces are located and named in the report. ``example_inputs``: a
    tensor, a tuple of positional inputs or a dict of keyword inputs; every tensor leaf of the
    outputs (tuples, dicts, ModelOutput, dataclasses) is compared. ``frontend``: see
    :func:`mudsc_fx.trace`.

    >>> import torch, mudsc_fx as mf
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> mf.check(m, torch.randn(3, 4)).ok
    True
    """
    t0 = time.perf_counter()
    name = name or type(model).__name__
    if pg is None:
        pg = infer(model, example_inputs, leaf_modules=leaf_modules, frontend=frontend)
    prover = _Prover(model, pg, example_inputs, seed, perturb)
    tol = rtol * max(1.0, prover.scale)
    err = prover.error(random_permutations(pg, np.random.default_rng(seed)))
    ok = err <= tol
    failing = () if ok else locate_failures(prover, tol, seed)
    coverage = pg.freeze(failing, FAILED_REASON).coverage() if failing else pg.coverage()
    return CheckReport(name, ok, err, tol, coverage, len(pg.spaces), len(pg.free_spaces),
                       pg.barriers, pg, time.perf_counter() - t0, failing_spaces=failing)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: the graph to merge with (failing spaces frozen)."""
    graph: PermutationGraph
    ok: bool
    max_abs_err: float
    failing_spaces: tuple[int, ...]
    seconds: float


def verify(model: nn.Module, pg: PermutationGraph, example_inputs: Any, seed: int = 0,
           rtol: float = 1e-7) -> Verification:
    """The proof as a pipeline stage: the graph with every space that fails the equivalence
    check frozen (a merge then leaves those units where they are)."""
    t0 = time.perf_counter()
    if not pg.free_spaces:
        return Verification(pg, True, 0.0, (), time.perf_counter() - t0)
    rep = check(model, example_inputs, seed, pg=pg, rtol=rtol)
    graph = pg.freeze(rep.failing_spaces, FAILED_REASON) if rep.failing_spaces else pg
    return Verification(graph, rep.ok, rep.max_abs_err, rep.failing_spaces, time.perf_counter() - t0)
