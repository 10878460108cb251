"""Helpers shared by the rule modules: argument access, result values, falling back to a
barrier, and broadcasting (rule 4)."""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx

from ..ir.layout import Plain
from ..ir.values import TensorValue, value_of
from .context import AxisLabel, InferContext, Parts, TensorLabel, Within, fixed_label


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def out_value(node: fx.Node) -> Any:
    return value_of(node)


def norm_dims(dim: Any, ndim: int) -> Optional[list[int]]:
    if dim is None:
        return None
    if isinstance(dim, int):
        return [dim % ndim] if ndim else []
    return [d % ndim for d in dim]


def is_layout(a: AxisLabel) -> bool:
    return a is not None and not isinstance(a, (Within, Parts))


def is_head(ctx: InferContext, a: AxisLabel) -> bool:
    return isinstance(a, Plain) and ctx.is_head_space(a.space)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return [a for a in out if InferContext.is_tensor(a)]


def metadata_only(ctx: InferContext, node: fx.Node, skip: int = 1) -> None:
    """Tensor arguments after the first ``skip`` whose values the op does not read, only their
    shape or dtype (``expand_as``, ``view_as``, ``type_as``): invariant on every axis."""
    for t in tensor_args(node)[skip:]:
        for a in ctx.tlabel(t).axes:
            ctx.invariant(a)


def fallback(ctx: InferContext, node: fx.Node, reason: str):
    ctx.barrier(node, reason)
    v = out_value(node)
    return fixed_of(v)


def fixed_of(v: Any):
    if isinstance(v, TensorValue):
        return fixed_label(v.ndim)
    if isinstance(v, tuple):
        return tuple(fixed_of(x) for x in v)
    return None


def broadcast(ctx: InferContext, labels: list[TensorLabel], shapes: list[tuple[int, ...]],
              out_shape: tuple[int, ...], why: str) -> TensorLabel:
    """Rule 4: aligned axes of equal size share a permutation; size-1 axes impose nothing."""
    nd = len(out_shape)
    out: list[AxisLabel] = []
    for k in range(nd):
        cur: Any = UNSET
        for lab, shp in zip(labels, shapes):
            off = nd - len(shp)
            if k < off:
                continue
            if shp[k - off] == 1 and out_shape[k] != 1:
                continue
            a = lab[k - off]
            cur = a if cur is UNSET else ctx.unify(cur, a, why)
        out.append(None if cur is UNSET else cur)
    return TensorLabel(tuple(out))


UNSET = object()
