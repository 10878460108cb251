"""Rows for the ATen ops of torch.export graphs (the export front end, ``ir/export.py``).

Registered through the table's one path for library rows (``LIBRARIES["torch"]``).

An exported graph calls ``torch.ops.aten.<op>.<overload>`` with parameters read by
``get_attr``. Wherever an ATen op means what a torch / F function means, its row points at
the same rule body (one body, several keys); the small adapters below only read arguments
that ATen orders differently (embedding takes the weight first, batch_norm orders its
tensors differently, ``slice``/``select`` are ``getitem`` spelled as ops). Unknown ATen
ops have no row and are barriers, as everywhere.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx as fx

from ..ir.layout import kron
from ..ir.values import TensorValue, value_of
from . import elementwise as E
from . import layers as L
from . import matmul as M
from . import shape as S
from .common import arg, fallback, is_head, is_layout, out_value
from .context import InferContext, TensorLabel, Within, fixed_label

Rule = Callable[[InferContext, fx.Node], object]
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------
# adapters (ATen argument order -> the shared rule bodies)
# ---------------------------------------------------------------------------------------
def embedding(ctx: InferContext, node: fx.Node):
    """aten.embedding(weight, indices, ...): the weight comes first."""
    w = L._operand(ctx, node.args[0])
    if w is None:
        return fallback(ctx, node, "embedding with an unexpected weight")
    return L._embedding(ctx, node, node.args[1], w)


def convolution(ctx: InferContext, node: fx.Node):
    """aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
    w = L._operand(ctx, node.args[1])
    if w is None:
        return fallback(ctx, node, "convolution with an unexpected weight")
    core = L._conv_transpose if node.args[6] else L._conv
    return core(ctx, node, node.args[0], w, L._operand(ctx, node.args[2]), node.args[8])


def native_layer_norm(ctx: InferContext, node: fx.Node):
    """native_layer_norm(input, normalized_shape, weight, bias, eps) -> (out, mean, rstd)."""
    k = len(node.args[1])
    out = _LAYER_NORM(ctx, node)
    stat = TensorLabel(out.axes[:-k] + (None,) * k)
    return (out, stat, stat)


_LAYER_NORM = L.layer_norm_function(has_bias=True)


def _norm_operands(ctx: InferContext, node: fx.Node) -> list:
    """batch_norm / instance_norm / _native_batch_norm_legit*: (input, weight, bias, mean, var, ...)."""
    return [L._operand(ctx, a) for a in node.args[1:5]]


def batch_norm(ctx: InferContext, node: fx.Node):
    out = L._channel_norm(ctx, node, node.args[0], _norm_operands(ctx, node))
    v = out_value(node)
    if isinstance(v, tuple):  # _native_batch_norm_legit_no_training: (out, empty, empty) in eval mode
        return (out,) + tuple(fixed_label(x.ndim) if isinstance(x, TensorValue) else None for x in v[1:])
    return out


def prelu(ctx: InferContext, node: fx.Node):
    return L._channel_norm(ctx, node, node.args[0], [L._operand(ctx, node.args[1])])


def first_operand(ctx: InferContext, node: fx.Node):
    """type_as / to(other): the first tensor's values; the second only lends a dtype."""
    x = node.args[0]
    if ctx.shape(x) != out_value(node).shape:
        return fallback(ctx, node, "shape changed in a cast")
    for t in node.args[1:2]:
        if ctx.is_tensor(t):
            for a in ctx.tlabel(t).axes:
                ctx.invariant(a)
    return ctx.tlabel(x)


def new_factory(ctx: InferContext, node: fx.Node):
    """new_zeros / new_ones / new_full / new_empty: a constant; ``self`` only lends dtype and
    device, so its spaces are not constrained."""
    for a in ctx.tlabel(node.args[0]).axes:
        ctx.invariant(a)
    v = out_value(node)
    return fixed_label(v.ndim) if isinstance(v, TensorValue) else None


def slice_tensor(ctx: InferContext, node: fx.Node):
    """aten.slice(self, dim, start, end, step) = x[..., start:end:step, ...]."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    dim = arg(node, 1, "dim", 0) % len(shp)
    sl = slice(arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1))
    return lx.replace(dim, _slice_axis(ctx, lx[dim], shp[dim], sl, f"slice {node.name}"))


def narrow(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    dim, start, length = node.args[1] % len(shp), node.args[2], node.args[3]
    sl = slice(start, start + length) if isinstance(start, int) and isinstance(length, int) else slice(start, None)
    return lx.replace(dim, _slice_axis(ctx, lx[dim], shp[dim], sl, f"narrow {node.name}"))


def _slice_axis(ctx: InferContext, a, n: int, sl: slice, why: str):
    if isinstance(a, Within):
        bounds = (sl.start, sl.stop, sl.step)
        if all(v is None or isinstance(v, int) for v in bounds) and slice(*bounds).indices(n) == (0, n, 1):
            return a
        # the same slice of every head (rotary halves): heads still move, units inside do not
        ctx.identity_within(a.space)
        return None
    return S._slice_label(ctx, a, n, sl, why)


def select(ctx: InferContext, node: fx.Node):
    """aten.select(self, dim, index) = x[..., index, ...] (picks part t of fused projections)."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    dim = node.args[1] % len(shp)
    idx = node.args[2]
    if not isinstance(idx, int):
        ctx.fix(lx[dim], f"select {node.name} at a computed index")
        return TensorLabel(lx.axes[:dim] + lx.axes[dim + 1:])
    return TensorLabel(tuple(S._index_axis(ctx, lx, dim, idx % shp[dim], f"select {node.name}")))


def index_tensor(ctx: InferContext, node: fx.Node):
    """aten.index(self, [idx or None per leading axis]): advanced indexing. Indexed axes are
    pinned (rule 6), as are the index tensors; the other axes keep their labels."""
    x, idx = node.args[0], list(node.args[1])
    lx = ctx.tlabel(x)
    out = out_value(node)
    why = f"indexing {node.name}"
    pos = [i for i, t in enumerate(idx) if t is not None]
    tensors = [t for t in idx if isinstance(t, fx.Node)]
    if any(ctx.is_tensor(t) and ctx.shape(t) is not None and _is_bool(t) for t in tensors) or not pos:
        return fallback(ctx, node, "boolean-mask indexing")
    for t in tensors:
        ctx.fix(ctx.label(t), why)
    for i in pos:
        ctx.fix(lx[i], why)
    lx = ctx.tlabel(x)
    rest = [k for k in range(len(lx)) if k not in pos]
    b = out.ndim - len(rest)
    if b < 0:
        return fallback(ctx, node, "indexing pattern not understood")
    if pos == list(range(pos[0], pos[-1] + 1)):  # adjacent: the broadcast index axes sit in place
        axes = lx.axes[:pos[0]] + (None,) * b + lx.axes[pos[-1] + 1:]
    else:
        axes = (None,) * b + tuple(lx[k] for k in rest)
    return TensorLabel(axes)


def _is_bool(node: fx.Node) -> bool:
    v = value_of(node)
    return isinstance(v, TensorValue) and v.dtype == torch.bool


def repeat_interleave(ctx: InferContext, node: fx.Node):
    """repeat_interleave(x, r, dim): output index i*r + j is input index i (kron, inner r)."""
    x, r, dim = node.args[0], node.args[1], arg(node, 2, "dim")
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    if not isinstance(r, int) or dim is None:
        return fallback(ctx, node, "repeat_interleave with tensor repeats or without dim")
    dim %= len(shp)
    a = lx[dim]
    if r == 1:
        return lx
    if is_layout(a) and not is_head(ctx, a):
        return lx.replace(dim, kron(a, 1, r))
    ctx.fix(a, f"repeat_interleave {node.name} of a structured axis")
    return lx.replace(dim, None)


def pool_with_indices(k: int) -> Rule:
    """max_pool*_with_indices / adaptive_max_pool*: (values, indices) with one label: the
    indices are spatial positions, laid out per channel like the values."""
    def rule(ctx: InferContext, node: fx.Node):
        lx = ctx.tlabel(node.args[0])
        lead = len(lx) - k
        for a in lx.axes[lead:]:
            ctx.fix(a, f"pooled axis at {node.name}")
        lab = TensorLabel(tuple(ctx.tlabel(node.args[0]).axes[:lead]) + (None,) * k)
        return (lab, lab)
    return rule


# ---------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------
_UNARY = (
    "abs", "neg", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "exp", "exp2", "log", "log2", "log1p",
    "expm1", "sqrt", "rsqrt", "sin", "cos", "erf", "square", "reciprocal", "sign", "floor", "ceil", "round",
    "trunc", "logical_not", "bitwise_not", "nan_to_num", "clamp", "clamp_min", "clamp_max", "clip", "hardtanh",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softshrink",
    "hardshrink", "logit", "isnan", "isinf", "isfinite", "dropout", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh",
    "_to_copy", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "zeros_like",
    "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "zero", "fill", "positive",
)
_BINARY = (
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "maximum",
    "minimum", "fmax", "fmin", "where", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "masked_fill",
    "addcmul", "addcdiv", "lerp", "atan2", "copy", "hypot", "xlogy", "special_xlog1py",
)
_REDUCE = ("mean", "sum", "amax", "amin", "logsumexp", "var", "std", "prod", "all", "any", "count_nonzero",
           "nansum", "nanmean")
_RESHAPE = ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as", "view_copy", "squeeze_copy", "unsqueeze_copy", "_reshape_alias")
_PERMUTE = ("permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "numpy_T", "mT",
            "permute_copy", "transpose_copy", "t_copy")
_NON_TENSOR = ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
               "_assert_async", "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
               "_local_scalar_dense", "_functional_sym_constrain_range", "_functional_assert_async",
               "_functional_assert_scalar", "size", "dim", "numel", "is_nonzero")
_FACTORY = ("arange", "zeros", "ones", "full", "empty", "empty_strided", "eye", "linspace", "logspace",
            "scalar_tensor", "rand", "randn", "randint", "randperm", "tensor")


def _overloads(names: Iterable[str], inplace: bool = True) -> list:
    """Every overload of every named op (and of its in-place ``name_`` twin)."""
    out = []
    for name in names:
        for n in (name, name + "_") if inplace else (name,):
            packet = getattr(aten, n, None)
            if packet is None:
                continue
            out.extend(getattr(packet, o) for o in packet.overloads())
    return out


def register(add: Callable) -> None:
    """The ATen rows: ``add(keys, rule)`` for every overload (and in-place twin) of each op."""
    def put(names, rule, inplace=True):
        add(_overloads(names, inplace), rule)

    put(_UNARY, E.passthrough)
    put(_BINARY, E.binary)
    put(_REDUCE, E.reduction(), inplace=False)
    put(("norm", "linalg_vector_norm"), E.reduction(dim_pos=2), inplace=False)
    put(("max", "min"), E.max_min, inplace=False)
    put(("cumsum", "cumprod", "cummax", "cummin", "gather", "index_select", "argmax", "argmin", "median",
         "scatter", "scatter_add", "index_add", "index_fill"), E.along_dim(1))
    put(("sort", "argsort", "mode"), E.along_dim(1, -1))
    put(("topk", "kthvalue"), E.along_dim(2, -1))
    put(("flip",), E.along_dim(1, dim_key="dims"))
    put(("roll",), E.along_dim(2, dim_key="dims"))
    put(_RESHAPE, S.reshape)
    put(_PERMUTE, S.permute)
    put(("expand", "expand_as", "expand_copy", "broadcast_to"), S.expand, inplace=False)
    put(("repeat", "tile"), S.repeat, inplace=False)
    put(("cat", "concat", "concatenate"), S.cat, inplace=False)
    put(("stack",), S.stack, inplace=False)
    put(("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk",
         "split_copy", "split_with_sizes_copy", "unsafe_split_with_sizes"), S.split, inplace=False)
    put(("unbind", "unbind_copy"), S.unbind, inplace=False)
    put(("slice", "slice_copy"), slice_tensor, inplace=False)
    put(("narrow", "narrow_copy"), narrow, inplace=False)
    put(("select", "select_copy"), select, inplace=False)
    put(("index",), index_tensor, inplace=False)
    put(("repeat_interleave",), repeat_interleave, inplace=False)
    put(("pad", "constant_pad_nd"), S.pad, inplace=False)
    put(("triu", "tril"), E.last_two_fixed)
    put(_NON_TENSOR, E.non_tensor, inplace=False)
    put(_FACTORY, E.constant, inplace=False)
    put(("new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided"), new_factory, inplace=False)
    put(("type_as",), first_operand, inplace=False)
    add([o for o in _overloads(("to",), inplace=False) if o is not aten.to.other], E.passthrough)
    add([aten.to.other], first_operand)
    # weights
    put(("linear",), L.linear_function, inplace=False)
    put(("conv1d", "conv2d", "conv3d"), L.conv_function, inplace=False)
    put(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), L.conv_transpose_function, inplace=False)
    put(("convolution", "_convolution"), convolution, inplace=False)
    put(("layer_norm",), _LAYER_NORM, inplace=False)
    put(("native_layer_norm",), native_layer_norm, inplace=False)
    put(("rms_norm",), L.layer_norm_function(has_bias=False), inplace=False)
    put(("group_norm",), L.group_norm_function, inplace=False)
    put(("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm"), batch_norm, inplace=False)
    put(("prelu", "_prelu_kernel"), prelu, inplace=False)
    put(("embedding",), embedding, inplace=False)
    put(("scaled_dot_product_attention",), M.sdpa, inplace=False)
    put(("matmul", "mm", "bmm"), M.matmul, inplace=False)
    put(("addmm", "baddbmm"), M.addmm, inplace=False)
    put(("einsum",), M.einsum, inplace=False)
    # pooling and resizing
    for k in (1, 2, 3):
        put((f"max_pool{k}d", f"avg_pool{k}d", f"adaptive_avg_pool{k}d", f"_adaptive_avg_pool{k}d",
             f"reflection_pad{k}d", f"replication_pad{k}d", f"lp_pool{k}d"), S.spatial(k), inplace=False)
        put((f"max_pool{k}d_with_indices", f"adaptive_max_pool{k}d"), pool_with_indices(k), inplace=False)
    put(("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
         "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
         "_upsample_bilinear2d_aa"), S.spatial(None), inplace=False)
