"""Weight-space features per space (MuDSC's Z, Git Re-Basin's cost; DESIGN.md, "Statistics").

For space s and model i: every member tensor touching s, with its other governed axes moved
into the common basis by the current alignment of their spaces, unfolded to [n_units, rest]
and concatenated along ``rest``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..ir.graph import Member, PermutationGraph
from ..ir.layout import spaces_of, transform_axis
from .apply import SpaceOp, _expand_grouped
from .stats import space_features


def unit_weight_features(pg: PermutationGraph, tensors: Mapping[str, torch.Tensor], s: int, op: SpaceOp,
                         normalize: bool = False) -> torch.Tensor:
    """[n_units of s, D] features of space ``s`` for one model (in the tensors' dtype)."""
    blocks = []
    fqns = dict.fromkeys(m.fqn for m in pg.spaces[s].members)
    for fqn in fqns:
        members = sorted(pg.members_of(fqn), key=lambda m: m.axis)
        t = tensors[fqn].detach()
        grouped = [m for m in members if m.groups > 1]
        if grouped:
            t = _expand_grouped(t, grouped[0].groups)
        anchor = next(m for m in members if s in set(spaces_of(m.layout)))
        for m in members:
            if m is not anchor:
                t = transform_axis(t, m.axis, m.layout, lambda sp, x, ax, _r=m.role: op(sp, x, ax, _r), pg.size)
        x = t.movedim(anchor.axis, -1)
        x = x.reshape(-1, x.shape[-1])
        for sp, feats in space_features(x, anchor.layout, pg.size):
            if sp == s:
                f = feats.T  # [n, samples]
                if normalize:
                    f = f / f.norm().clamp_min(1e-12)
                blocks.append(f)
    return torch.cat(blocks, dim=1) if blocks else torch.zeros(pg.size(s), 0)


def pearson_rows(Z: torch.Tensor) -> np.ndarray:
    """Correlation between the rows of Z (float64 result); constant rows give 0 (no NaN)."""
    Z = Z - Z.mean(dim=1, keepdim=True)
    norm = Z.norm(dim=1)
    dead = norm <= 1e-6 * max(float(norm.max()) if norm.numel() else 0.0, 1e-30)
    Zn = Z / torch.where(dead, torch.ones_like(norm), norm)[:, None]
    C = (Zn @ Zn.T).double()
    C[dead, :] = 0.0
    C[:, dead] = 0.0
    return C.clamp(-1.0, 1.0).numpy()


def weight_similarity(pg: PermutationGraph, tensors: list[Mapping[str, torch.Tensor]], s: int,
                      ops: list[SpaceOp], kind: str = "pearson", normalize: bool = False) -> np.ndarray:
    """(N n, N n) similarity of space ``s``: Pearson correlation of the stacked per-unit weight
    features (MuDSC), or raw inner products (``kind="inner"``, Git Re-Basin's cost)."""
    Z = torch.cat([unit_weight_features(pg, t, s, op, normalize) for t, op in zip(tensors, ops)], dim=0)
    if kind == "inner":
        return (Z.double() @ Z.double().T).numpy()
    return pearson_rows(Z)
