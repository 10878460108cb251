"""Stage 5: rewrite N aligned models into one (docs/design.md, "Merge math").

For model i every governed axis is transformed (M_i on `out` axes, U_i on `in` axes) and the
results are summed. Every entry of a merged tensor must be a mean over the models: M_i carries
the 1/N (or a cluster's weights) on the parts of `out` axes that a matching covers, and every
other entry (no aligned `out` axis, or a part of a concat layout no matching covers: a fixed
piece, an unmatched space) gets an explicit 1/N; an entry covered on k >= 2 `out` axes gets
N^(k-1) back. The alignment is applied in its compact form: gathers for permutations, segment
sums for zip clusters.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from ..ir.graph import Member, PermutationGraph
from ..ir.layout import layout_size, transform_axis
from .alignment import Alignment, SpaceMatching
from .apply import AlignmentOps, compress_grouped, load_tensors, members_by_fqn, named_tensors, transform_tensor


def rewrite(models: list[nn.Module], pg: PermutationGraph, alignment: Alignment) -> nn.Module:
    """One module of models[0]'s class holding the merged parameters and buffers."""
    N = len(models)
    tensors = [named_tensors(m) for m in models]
    table = AlignmentOps(N, torch.float64)
    for s, matching in alignment.spaces.items():
        table.set_matching(s, matching)
    ops = [table.op(i) for i in range(N)]
    by_fqn = members_by_fqn(pg)
    merged_tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for fqn in pg.params:
            members = by_fqn.get(fqn, ())
            dtype = tensors[0][fqn].dtype
            acc = None
            for i in range(N):
                t = tensors[i][fqn].detach().to(torch.float64)
                t = transform_tensor(t, members, ops[i], pg.size) if members else t
                acc = t if acc is None else acc + t
            merged_tensors[fqn] = (acc * mean_scale(acc.shape, members, alignment.spaces, N, pg)).to(dtype)
    merged = copy.deepcopy(models[0])
    load_tensors(merged, merged_tensors)
    return merged


def covered(member: Member, spaces: Mapping[int, SpaceMatching], pg: PermutationGraph) -> torch.Tensor:
    """1.0 at the merged indices of ``member``'s axis that a matching covers (its M_i carries
    the average there), 0.0 at fixed pieces and unmatched spaces of the layout."""
    def op(s: int, x: torch.Tensor, axis: int) -> torch.Tensor:
        m = spaces.get(s)
        if m is None:
            return x
        shape = list(x.shape)
        shape[axis] = m.size
        return x.new_ones(shape)
    zeros = torch.zeros(layout_size(member.layout, pg.size), dtype=torch.float64)
    return transform_axis(zeros, 0, member.layout, op, pg.size)


def mean_scale(shape: torch.Size, members: tuple[Member, ...], spaces: Mapping[int, SpaceMatching], N: int,
               pg: PermutationGraph) -> torch.Tensor | float:
    """The factor that turns the sum over models into a mean, entry by entry: N^(k-1) where k
    is the number of `out` axes on which the entry lies in a matched part (k = 0: 1/N). A
    grouped axis (a grouped conv_transpose's output axis) is counted on its dense
    block-diagonal form, then compressed back."""
    groups = max((m.groups for m in members), default=1)
    dense = list(shape)
    if groups > 1:
        dense[1] *= groups
    k = None
    for m in members:
        if m.role != "out":
            continue
        c = covered(m, spaces, pg)
        if not c.any():
            continue
        view = [1] * len(dense)
        view[m.axis] = -1
        c = c.view(view)
        k = c if k is None else k + c
    if k is None:
        return 1.0 / N
    scale = torch.pow(float(N), k - 1.0)
    if groups > 1:  # only the two grouped axes are expanded (a big grouped weight is GBs dense)
        scale = compress_grouped(scale.expand(dense[:2] + list(scale.shape[2:])), groups)
    return scale
