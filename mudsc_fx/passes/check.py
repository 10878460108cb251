"""The proof: permute every free space at random and compare outputs in float64."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..ir.graph import Barrier, PermutationGraph
from ..ir.trace import as_input_tuple, eval_mode
from .apply import apply_permutations, random_permutations
from .infer import infer


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`. ``ok`` means outputs matched within ``tolerance``."""
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

    def row(self) -> dict:
        return {"model": self.model, "spaces": self.n_spaces, "free": self.n_free,
                "coverage": round(self.coverage, 4), "max_abs_err": self.max_abs_err,
                "barriers": len(self.barriers), "status": "ok" if self.ok else ("error" if self.error else "FAIL"),
                "seconds": round(self.seconds, 2), "error": self.error}


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_tensors(v)]
    if hasattr(out, "__dict__"):
        return [t for v in vars(out).values() for t in _flat_tensors(v)]
    return []


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


def check(model: nn.Module, example_inputs: Any, seed: int = 0, *, pg: Optional[PermutationGraph] = None,
          perturb: bool = True, leaf_modules: Iterable[type] = (), rtol: float = 1e-7,
          name: Optional[str] = None) -> CheckReport:
    """Prove the inferred permutation graph on ``model``: draw a random valid permutation for
    every free space, apply it to a float64 copy and compare outputs with the unpermuted copy.

    >>> import torch, mudsc_fx as mf
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> mf.check(m, torch.randn(3, 4)).ok
    True
    """
    t0 = time.perf_counter()
    name = name or type(model).__name__
    if pg is None:
        pg = infer(model, example_inputs, leaf_modules=leaf_modules)
    ref = copy.deepcopy(model).double()
    if perturb:
        perturb_(ref, seed)
    perms = random_permutations(pg, np.random.default_rng(seed))
    permuted = apply_permutations(ref, pg, perms)
    inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                   for x in as_input_tuple(example_inputs))
    with torch.no_grad(), eval_mode(ref, permuted):
        a = _flat_tensors(ref(*inputs))
        b = _flat_tensors(permuted(*inputs))
    err, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.is_floating_point():
            err = max(err, (x - y).abs().max().item() if x.numel() else 0.0)
            scale = max(scale, x.abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            err = float("inf")
    tol = rtol * max(1.0, scale)
    ok = len(a) == len(b) and err <= tol
    return CheckReport(name, ok, err, tol, pg.coverage(), len(pg.spaces), len(pg.free_spaces),
                       pg.barriers, pg, time.perf_counter() - t0)
