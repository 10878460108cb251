"""Per-op knowledge: THE rule table (DESIGN.md rules 1-12).

``RULES`` maps a module class, a function object or a Tensor method name to a rule
``rule(ctx, node) -> label``. A rule returns the output label (``TensorLabel`` per tensor,
tuples for tuple outputs) and may unify, fix, add members, taps and producers through ``ctx``.
Supporting an op is one row here plus a test; an op without a row is a barrier.

The rules themselves live in modules by kind: ``rules_layers`` (weights: linear, conv, norms,
embedding, attention), ``rules_elementwise`` (elementwise ops, reductions, ops along one axis),
``rules_shape`` (reshape, permute, indexing, cat/split, pooling), ``rules_matmul`` (matmul,
addmm, sdpa, einsum); their shared helpers in ``rules_common``.
"""
from __future__ import annotations

import operator
import sys
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import rules_elementwise as E
from . import rules_layers as L
from . import rules_matmul as M
from . import rules_shape as S
from .infer import InferContext

Rule = Callable[[InferContext, fx.Node], object]

# ---------------------------------------------------------------------------------------
# The table. Keys: nn.Module subclasses (matched along the MRO for torch.nn classes),
# functions (identity), method names (str).
# ---------------------------------------------------------------------------------------
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.softmax, F.log_softmax, F.softmin, F.normalize,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.sin, torch.cos, torch.erf, torch.square, torch.clamp, torch.clip, torch.sign,
    torch.softmax, torch.log_softmax, torch.nan_to_num, torch.reciprocal, torch.log1p, torch.expm1,
    torch.dropout, torch.exp2, torch.floor, torch.ceil, torch.round, torch.logical_not,
    operator.neg, operator.pos, torch.detach,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs",
    "neg", "sin", "cos", "erf", "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
    "float", "double", "half", "bfloat16", "to", "type", "contiguous", "clone", "detach",
    "softmax", "log_softmax", "sign", "reciprocal", "requires_grad_", "cpu", "cuda", "exp_",
    "log1p", "expm1", "floor", "ceil", "round", "logical_not", "nan_to_num",
)
_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where, torch.atan2,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
    torch.masked_fill, torch.addcmul, torch.addcdiv, torch.lerp, torch.fmod, torch.remainder,
)
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_",
    "maximum", "minimum", "masked_fill", "masked_fill_", "where", "eq", "ne", "lt", "le", "gt",
    "ge", "addcmul", "addcmul_", "addcdiv", "lerp", "fmod", "remainder", "logical_and", "logical_or",
    "copy_",
)
_REDUCTIONS = (torch.sum, torch.mean, torch.amax, torch.amin, torch.logsumexp, torch.var, torch.std,
               torch.norm, torch.prod, torch.all, torch.any, torch.count_nonzero, torch.linalg.vector_norm,
               torch.nansum, torch.nanmean)
_REDUCTION_METHODS = ("sum", "mean", "amax", "amin", "logsumexp", "var", "std", "norm", "prod", "all",
                      "any", "count_nonzero", "nansum", "nanmean")
_ALONG_DIM = (torch.cumsum, torch.cumprod, torch.flip, torch.sort, torch.argsort, torch.topk,
              torch.cummax, torch.cummin, torch.gather, torch.index_select, torch.take_along_dim,
              torch.roll, torch.argmax, torch.argmin, torch.median, torch.kthvalue, torch.mode)
_ALONG_DIM_METHODS = ("cumsum", "cumprod", "flip", "sort", "argsort", "topk", "cummax", "cummin",
                      "gather", "index_select", "roll", "argmax", "argmin", "median", "kthvalue",
                      "scatter", "scatter_add", "index_add", "index_fill")

RULES: dict[object, Rule] = {}


def _register(keys, rule: Rule) -> None:
    for k in keys:
        RULES[k] = rule


_register(_UNARY_MODULES + _UNARY_FUNCTIONS + _UNARY_METHODS, E.passthrough)
_register(_BINARY + _BINARY_METHODS, E.binary)
_register(_REDUCTIONS + _REDUCTION_METHODS, E.reduction)
_register((torch.max, torch.min, "max", "min"), E.max_min)
_register(_ALONG_DIM + _ALONG_DIM_METHODS, E.along_dim)
_register((torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel, "reshape", "view",
           "flatten", "squeeze", "unsqueeze", "unflatten", "ravel", "view_as", "reshape_as", nn.Flatten,
           nn.Unflatten, torch.unflatten, "squeeze_", "unsqueeze_"), S.reshape)
_register((torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims, torch.t,
           "permute", "transpose", "movedim", "swapaxes", "swapdims", "t", "transpose_"), S.permute)
_register(("expand", "expand_as", torch.broadcast_to, "broadcast_to"), S.expand)
_register(("repeat", torch.tile, "tile"), S.repeat)
_register((torch.cat, torch.concat, torch.concatenate), S.cat)
_register((torch.stack,), S.stack)
_register((torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk", "unbind",
           "tensor_split", "split_with_sizes"), S.split)
_register((operator.getitem,), S.getitem)
_register((getattr,), S.getattr_rule)
_register((torch._assert, torch._assert_async, "size", "dim", "numel", "nelement", "data_ptr", "is_contiguous", "get_device", "__len__",
           len, torch.numel), E.non_tensor)
_register((torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm", "__matmul__"),
          M.matmul)
_register((torch.einsum,), M.einsum)
_register((F.pad,), S.pad)
_register((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
           F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d), S.spatial(1))
_register((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
           F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, nn.ZeroPad2d,
           nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), S.spatial(2))
_register((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
           F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d), S.spatial(3))
_register((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample),
          S.spatial(None))

_register((torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.linspace,
           torch.tensor, torch.as_tensor, torch.rand, torch.randn, torch.randint, "new_zeros", "new_ones",
           "new_full", "new_empty", "new_tensor"), E.constant)
_register((torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "zero_", "fill_"),
          E.passthrough)  # constant along every axis: any permutation leaves it unchanged
_register((torch.triu, torch.tril, "triu", "tril"), E.last_two_fixed)

_register((nn.Linear, nn.LazyLinear), L.linear_module)
_register((F.linear,), L.linear_function)
_register((nn.Conv1d, nn.Conv2d, nn.Conv3d), L.conv_module)
_register((F.conv1d, F.conv2d, F.conv3d), L.conv_function)
_register((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), L.conv_transpose_module)
_register((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), L.conv_transpose_function)
_register((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
           nn.InstanceNorm2d, nn.InstanceNorm3d), L.channel_norm_module)
_register((F.batch_norm,), L.batch_norm_function)
_register((F.instance_norm,), L.instance_norm_function)
_register((nn.LayerNorm, nn.RMSNorm), L.layer_norm_module)
_register((F.layer_norm, F.rms_norm), L.layer_norm_function)
_register((nn.GroupNorm,), L.group_norm_module)
_register((F.group_norm,), L.group_norm_function)
_register((nn.PReLU,), L.prelu_module)
_register((nn.Embedding,), L.embedding_module)
_register((F.embedding,), L.embedding_function)
_register((nn.MultiheadAttention,), L.multihead_attention)
_register((F.scaled_dot_product_attention,), M.sdpa)
_register((torch.addmm, "addmm"), M.addmm)


_OPTIONAL = {"torchvision": False}  # third-party rows, registered once the library is imported


def _register_optional() -> None:
    """Rows for functions that third-party libraries hide from fx with torch.fx.wrap.

    Registered on first lookup after the library is imported (a model that calls them has
    imported it), so importing mudsc_fx never pays for importing torchvision (~2 s)."""
    if _OPTIONAL["torchvision"] or "torchvision" not in sys.modules:
        return
    _OPTIONAL["torchvision"] = True
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.models import swin_transformer as swin
    except Exception:  # a broken or partial torchvision: its functions stay barriers
        return
    RULES[stochastic_depth] = E.passthrough
    RULES[swin._patch_merging_pad] = L.swin_patch_merging_pad
    RULES[swin._get_relative_position_bias] = L.swin_relative_position_bias
    RULES[swin.shifted_window_attention] = L.swin_window_attention


def lookup_rule(ctx: InferContext, node: fx.Node) -> Optional[Rule]:
    _register_optional()
    if node.op == "call_module":
        cls = type(ctx.module(node))
        for klass in cls.__mro__:
            if klass in RULES:
                # a user subclass that overrides forward is not the class the rule knows
                if klass is not cls and "forward" in vars(cls):
                    return None
                return RULES[klass]
            if klass is nn.Module:
                return None
        return None
    if node.op == "call_method":
        return RULES.get(node.target)
    if node.op == "call_function":
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None
