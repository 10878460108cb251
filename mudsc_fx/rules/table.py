"""THE rule table: per-op knowledge as data (the IR's rules 1-12).

``RULES`` maps a key to a rule ``rule(ctx, node) -> label`` (see :mod:`.context`). Keys are
``nn.Module`` subclasses (matched along the MRO for classes whose ``forward`` is inherited),
functions (by identity; ATen overloads included) and Tensor method names (str). Rules that
differ only by where an argument sits are one body with parameters (``reduction(dim_pos=2)``),
never a string match on the op inside the body.

Supporting an op is one row plus a test. An op without a row is a barrier (with a warning):
the spaces it touches stay fixed. Third-party rows live in their own modules
(``LIBRARIES``) and are registered through :func:`register_rule` once their library has been
imported (a model that calls them has imported it), so importing mudsc_fx never pays for them.
"""
from __future__ import annotations

import importlib
import logging
import operator
import sys
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import elementwise as E
from . import layers as L
from . import matmul as M
from . import shape as S
from .context import InferContext

log = logging.getLogger(__name__)

Rule = Callable[[InferContext, fx.Node], Any]
RULES: dict[object, Rule] = {}


def register_rule(keys: Any, rule: Rule, *, replace: bool = True) -> None:
    """Register ``rule`` for one key or an iterable of keys (module class, function or
    Tensor method name). With ``replace=False`` an existing row is an error.

    >>> import torch, mudsc_fx as mf
    >>> def my_gate(x):                      # a user's own op, hidden from fx by torch.fx.wrap
    ...     return x * torch.sigmoid(x)
    >>> mf.register_rule(my_gate, mf.rules.passthrough)   # elementwise: labels pass through
    """
    if isinstance(keys, (str, type)) or callable(keys) and not isinstance(keys, (list, tuple)):
        keys = (keys,)
    for k in keys:
        if not replace and k in RULES:
            raise ValueError(f"a rule for {k!r} is already registered")
        RULES[k] = rule


def _rows(rule: Rule, *keys: Any) -> None:
    register_rule(keys, rule)


# --------------------------------------------------------------------------- elementwise (3, 4)
_rows(E.passthrough,
      nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
      nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink, nn.Identity,
      nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
      nn.Softmin,
      F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
      F.selu, F.celu, F.mish, F.softplus, F.softsign, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
      F.dropout3d, F.alpha_dropout, F.softmax, F.log_softmax, F.softmin, F.normalize,
      torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
      torch.neg, torch.sin, torch.cos, torch.erf, torch.square, torch.clamp, torch.clip, torch.sign,
      torch.softmax, torch.log_softmax, torch.nan_to_num, torch.reciprocal, torch.log1p, torch.expm1,
      torch.dropout, torch.exp2, torch.floor, torch.ceil, torch.round, torch.logical_not, operator.neg,
      operator.pos, torch.detach,
      "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
      "sin", "cos", "erf", "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "float", "double",
      "half", "bfloat16", "to", "type", "contiguous", "clone", "detach", "softmax", "log_softmax", "sign",
      "reciprocal", "requires_grad_", "cpu", "cuda", "exp_", "log1p", "expm1", "floor", "ceil", "round",
      "logical_not", "nan_to_num",
      # constant along every axis: any permutation leaves the result unchanged
      torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "zero_", "fill_")
_rows(E.binary,
      operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
      operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.eq,
      operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
      torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
      torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where, torch.atan2, torch.eq,
      torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
      torch.masked_fill, torch.addcmul, torch.addcdiv, torch.lerp, torch.fmod, torch.remainder,
      "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_", "maximum",
      "minimum", "masked_fill", "masked_fill_", "where", "eq", "ne", "lt", "le", "gt", "ge", "addcmul",
      "addcmul_", "addcdiv", "lerp", "fmod", "remainder", "logical_and", "logical_or", "copy_")
_rows(E.constant,  # tensors made in forward: fixed on every axis (rule 11)
      torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.linspace, torch.tensor,
      torch.as_tensor, torch.rand, torch.randn, torch.randint, "new_zeros", "new_ones", "new_full",
      "new_empty", "new_tensor")
_rows(E.last_two_fixed, torch.triu, torch.tril, "triu", "tril")
_rows(E.non_tensor, torch._assert, torch._assert_async, "size", "dim", "numel", "nelement", "data_ptr",
      "is_contiguous", "get_device", "__len__", len, torch.numel)

# --------------------------------------------------------------------------- reductions (6)
_rows(E.reduction(), torch.sum, torch.mean, torch.amax, torch.amin, torch.logsumexp, torch.var, torch.std,
      torch.prod, torch.all, torch.any, torch.count_nonzero, torch.nansum, torch.nanmean,
      "sum", "mean", "amax", "amin", "logsumexp", "var", "std", "prod", "all", "any", "count_nonzero",
      "nansum", "nanmean")
_rows(E.reduction(dim_pos=2), torch.norm, "norm", torch.linalg.vector_norm)
_rows(E.max_min, torch.max, torch.min, "max", "min")
_rows(E.along_dim(1), torch.cumsum, torch.cumprod, torch.cummax, torch.cummin, torch.gather,
      torch.index_select, torch.argmax, torch.argmin, torch.median,
      "cumsum", "cumprod", "cummax", "cummin", "gather", "index_select", "argmax", "argmin", "median",
      "scatter", "scatter_add", "index_add", "index_fill")
_rows(E.along_dim(1, -1), torch.sort, torch.argsort, torch.mode, "sort", "argsort", "mode")
_rows(E.along_dim(2, -1), torch.topk, torch.kthvalue, "topk", "kthvalue")
_rows(E.along_dim(1, dim_key="dims"), torch.flip, "flip")
_rows(E.along_dim(2, dim_key="dims"), torch.roll, "roll")
_rows(E.along_dim(2), torch.take_along_dim)

# --------------------------------------------------------------------------- shapes (7, 8)
_rows(S.reshape, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel, torch.unflatten,
      nn.Flatten, nn.Unflatten, "reshape", "view", "flatten", "squeeze", "unsqueeze", "unflatten", "ravel",
      "view_as", "reshape_as", "squeeze_", "unsqueeze_")
_rows(S.permute, torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims, torch.t,
      "permute", "transpose", "movedim", "swapaxes", "swapdims", "t", "transpose_")
_rows(S.expand, torch.broadcast_to, "expand", "expand_as", "broadcast_to")
_rows(S.repeat, torch.tile, "repeat", "tile")
_rows(S.repeat_interleave, torch.repeat_interleave, "repeat_interleave")
_rows(E.type_as, "type_as")
_rows(S.cat, torch.cat, torch.concat, torch.concatenate)
_rows(S.stack, torch.stack)
_rows(S.split, torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
      "split_with_sizes")
_rows(S.unbind, torch.unbind, "unbind")
_rows(S.getitem, operator.getitem)
_rows(S.getattr_rule, getattr)
_rows(S.pad, F.pad)
_rows(S.spatial(1), nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
      F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)
_rows(S.spatial(2), nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
      F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, nn.ZeroPad2d,
      nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_rows(S.spatial(3), nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d,
      F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)
_rows(S.spatial(None), nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample)

# --------------------------------------------------------------------------- contractions (5)
_rows(M.matmul, torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm", "__matmul__")
_rows(M.einsum, torch.einsum)
_rows(M.addmm, torch.addmm, "addmm")
_rows(M.sdpa, F.scaled_dot_product_attention)

# --------------------------------------------------------------------------- layers (1, 2, 9, 10)
_rows(L.linear_module, nn.Linear, nn.LazyLinear)
_rows(L.linear_function, F.linear)
_rows(L.conv_module, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_rows(L.conv_function, F.conv1d, F.conv2d, F.conv3d)
_rows(L.conv_transpose_module, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_rows(L.conv_transpose_function, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_rows(L.channel_norm_module, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
      nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_rows(L.batch_norm_function, F.batch_norm)
_rows(L.instance_norm_function, F.instance_norm)
_rows(L.layer_norm_module, nn.LayerNorm, nn.RMSNorm)
_rows(L.layer_norm_function(has_bias=True), F.layer_norm)
_rows(L.layer_norm_function(has_bias=False), F.rms_norm)
_rows(L.group_norm_module, nn.GroupNorm)
_rows(L.group_norm_function, F.group_norm)
_rows(L.prelu_module, nn.PReLU)
_rows(L.embedding_module, nn.Embedding)
_rows(L.embedding_function, F.embedding)
_rows(L.multihead_attention, nn.MultiheadAttention)

# --------------------------------------------------------------------------- third-party rows
# library (top-level module name) -> module of rows with ``register(register_rule)``
LIBRARIES: dict[str, str] = {"torchvision": "mudsc_fx.rules.torchvision", "timm": "mudsc_fx.rules.timm",
                             "torch": "mudsc_fx.rules.aten",  # torch.export graphs (ATen ops)
                             "transformers": "mudsc_fx.rules.transformers"}
_loaded: set[str] = set()


def register_library(library: str, rows_module: str) -> None:
    """Rows for a third-party library, loaded on the first lookup after it is imported."""
    LIBRARIES[library] = rows_module
    _loaded.discard(library)


def _load_libraries() -> None:
    for lib, rows_module in LIBRARIES.items():
        if lib in _loaded or lib not in sys.modules:
            continue
        _loaded.add(lib)
        try:
            importlib.import_module(rows_module).register(register_rule)
        except Exception as e:  # a broken or partial library: its functions stay barriers
            log.warning("mudsc_fx: rows for %s not loaded (%s: %s); its ops are barriers", lib,
                        type(e).__name__, e)


def lookup_rule(ctx: InferContext, node: fx.Node) -> Optional[Rule]:
    """The rule for a call node, or None (the node becomes a barrier)."""
    _load_libraries()
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
    if node.op in ("call_method", "call_function"):
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def rule_name(rule: Rule) -> str:
    return getattr(rule, "__qualname__", None) or getattr(rule, "__name__", repr(rule))


def keys_of(rule: Rule) -> list[Any]:
    """Every key registered for ``rule`` (for tests that want one per-op test per row)."""
    return [k for k, r in RULES.items() if r is rule]


def all_keys() -> Iterable[Any]:
    _load_libraries()
    return tuple(RULES)
