"""Stage 5: rewrite N aligned models into one (docs/design.md, "Merge math").

For model i every governed axis is transformed (M_i on `out` axes, U_i on `in` axes) and the
results are summed; a tensor with no aligned `out` axis gets an explicit 1/N. The alignment is
applied in its compact form: gathers for permutations, segment sums for zip clusters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ir.graph import PermutationGraph
from ..ir.layout import spaces_of
from .alignment import Alignment
from .apply import AlignmentOps, load_tensors, named_tensors, transform_tensor


def rewrite(models: list[nn.Module], pg: PermutationGraph, alignment: Alignment) -> nn.Module:
    """One module of models[0]'s class holding the merged parameters and buffers."""
    N = len(models)
    tensors = [named_tensors(m) for m in models]
    table = AlignmentOps(N, torch.float64)
    for s, matching in alignment.spaces.items():
        table.set_matching(s, matching)
    ops = [table.op(i) for i in range(N)]
    by_fqn: dict[str, list] = {}
    for m in pg.members:
        by_fqn.setdefault(m.fqn, []).append(m)
    merged_tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for fqn in pg.params:
            members = tuple(sorted(by_fqn.get(fqn, ()), key=lambda m: m.axis))
            dtype = tensors[0][fqn].dtype
            acc = None
            for i in range(N):
                t = tensors[i][fqn].detach().to(torch.float64)
                t = transform_tensor(t, members, ops[i], pg.size) if members else t
                acc = t if acc is None else acc + t
            k = sum(1 for m in members if m.role == "out" and any(s in alignment.spaces for s in spaces_of(m.layout)))
            acc = acc / N if k == 0 else acc * float(N) ** (k - 1)
            merged_tensors[fqn] = acc.to(dtype)
    merged = copy.deepcopy(models[0])
    load_tensors(merged, merged_tensors)
    return merged
