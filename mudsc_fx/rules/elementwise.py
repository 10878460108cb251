"""Rules for elementwise ops, reductions and ops along one axis."""
from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx

from ..ir.values import TensorValue
from .context import InferContext, Parts, TensorLabel, fixed_label, op_name
from .common import (
    UNSET, arg, broadcast, fallback, fixed_of, metadata_only, norm_dims, out_value, tensor_args)


# ---------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------
def passthrough(ctx: InferContext, node: fx.Node):
    tens = tensor_args(node)
    out = out_value(node)
    if len(tens) > 1:
        return binary(ctx, node)
    if not tens or not isinstance(out, TensorValue):
        return fallback(ctx, node, "expected one tensor in and one out")
    if ctx.shape(tens[0]) != out.shape:
        return fallback(ctx, node, "shape changed in an elementwise op")
    return ctx.tlabel(tens[0])


def type_as(ctx: InferContext, node: fx.Node):
    """``x.type_as(other)``: a cast of x; other gives its dtype only."""
    metadata_only(ctx, node)
    return ctx.tlabel(node.args[0])


def binary(ctx: InferContext, node: fx.Node):
    out = out_value(node)
    tens = tensor_args(node)
    if not isinstance(out, TensorValue):
        return None if not tens else fallback(ctx, node, "elementwise op without a tensor result")
    return broadcast(ctx, [ctx.tlabel(t) for t in tens], [ctx.shape(t) for t in tens], out.shape,
                     f"elementwise {node.name}")


def constant(ctx: InferContext, node: fx.Node):
    """Tensors made in forward: fixed on every axis (rule 11: they pin what they mix with)."""
    for t in tensor_args(node):
        ctx.fix(ctx.label(t), f"argument of tensor factory {node.name}")
    return fixed_of(out_value(node))


def last_two_fixed(ctx: InferContext, node: fx.Node):
    lx = ctx.tlabel(node.args[0])
    for a in lx.axes[-2:]:
        ctx.fix(a, f"triangular mask {node.name}")
    return TensorLabel(lx.axes[:-2] + (None, None))


def non_tensor(ctx: InferContext, node: fx.Node):
    """Ops that read metadata only (size, dim, numel, asserts): invariant on every axis."""
    if isinstance(out_value(node), TensorValue):
        return fallback(ctx, node, "unexpected tensor result")
    for t in tensor_args(node):
        for a in ctx.tlabel(t).axes:
            ctx.invariant(a)
    return None


# ---------------------------------------------------------------------------------------
# reductions and ops along one axis
# ---------------------------------------------------------------------------------------
def _dims_arg(node: fx.Node, pos: int, keys: tuple[str, ...], ndim: int, default=None) -> Optional[list[int]]:
    d = UNSET
    for k in keys:
        if k in node.kwargs:
            d = node.kwargs[k]
            break
    if d is UNSET:
        d = node.args[pos] if len(node.args) > pos and isinstance(node.args[pos], (int, tuple, list)) \
            and not isinstance(node.args[pos], bool) else default
    return norm_dims(d, ndim)


def _reduce_label(ctx: InferContext, lx: TensorLabel, dims: list[int], keep: bool) -> TensorLabel:
    out = []
    for i, a in enumerate(lx.axes):
        if i in dims:
            if isinstance(a, Parts):
                ctx.fix(a, "reduction over fused parts")
            else:
                ctx.invariant(a)
            if keep:
                out.append(None)
        else:
            out.append(a)
    return TensorLabel(tuple(out))


def reduction(dim_pos: int = 1):
    """Rule 6: reductions over a permuted axis are invariant; the axis disappears.
    ``dim_pos``: position of the dim argument (``torch.norm(x, p, dim)``: 2)."""
    def rule(ctx: InferContext, node: fx.Node):
        x = node.args[0]
        lx, shp = ctx.tlabel(x), ctx.shape(x)
        out = out_value(node)
        if not isinstance(out, TensorValue):
            return fallback(ctx, node, "reduction with a non-tensor result")
        dims = _dims_arg(node, dim_pos, ("dim", "axis"), len(shp))
        if dims is None:
            dims = list(range(len(shp)))
        return _reduce_label(ctx, lx, dims, out.ndim == len(shp))
    return rule


def max_min(ctx: InferContext, node: fx.Node):
    if len(tensor_args(node)) > 1:
        return binary(ctx, node)
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = out_value(node)
    if isinstance(out, TensorValue) and out.ndim == 0:
        return _reduce_label(ctx, lx, list(range(len(shp))), False)
    if not isinstance(out, tuple):
        return fallback(ctx, node, "max/min with an unexpected result")
    dims = norm_dims(arg(node, 1, "dim"), len(shp))
    keep = out[0].ndim == len(shp)
    indices_used = any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0
                       for u in node.users)
    if indices_used:  # argmax used as an index: the reduced axis must not move
        for d in dims:
            ctx.fix(lx[d], f"indices of {node.name} are used")
    lab = _reduce_label(ctx, lx, dims, keep)
    return (lab, lab)


def along_dim(dim_pos: int, default: Optional[int] = None, dim_key: str = "dim"):
    """Rule 6: cumsum, sort, flip, gather, roll, argmax ... along a permuted axis pin it.
    ``dim_pos`` / ``dim_key``: where the dim argument is; ``default`` None = every axis."""
    def rule(ctx: InferContext, node: fx.Node):
        x = node.args[0]
        lx, shp = ctx.tlabel(x), ctx.shape(x)
        dims = _dims_arg(node, dim_pos, (dim_key,), len(shp), default)
        dims = list(range(len(shp))) if dims is None else dims
        for d in dims:
            ctx.fix(lx[d], f"{op_name(node)} along a permuted axis ({node.name})")
        for t in tensor_args(node)[1:]:
            ctx.fix(ctx.label(t), f"index/source tensor of {node.name}")
        lx = ctx.tlabel(x)
        out = out_value(node)

        def shaped(v: TensorValue) -> TensorLabel:
            if v.ndim == len(shp):
                return TensorLabel(tuple(None if i in dims else a for i, a in enumerate(lx.axes)))
            if v.ndim == len(shp) - len(dims):
                return TensorLabel(tuple(a for i, a in enumerate(lx.axes) if i not in dims))
            return fixed_label(v.ndim)

        if isinstance(out, TensorValue):
            return shaped(out)
        if isinstance(out, tuple):
            return tuple(shaped(v) if isinstance(v, TensorValue) else None for v in out)
        return None
    return rule
