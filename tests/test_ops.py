"""One small model per rule of the table, as a specification of the rule.

Every case is a tiny model around one op, proven by ``mf.check`` (two seeds, float64), with
the structure the rule must infer: which channel spaces are free, which are fixed, which are
one space, which are blocks, and the coverage where it is derived by hand. A case reads as
"<op>: <what its rule says>".

The templates put the op between two producers so that what the op's rule decides is
visible on their weights:

- ``Chain(op)``: x [2, 5, 4] -> ``fc_in`` (Linear 4->6) -> op -> ``fc_out`` (Linear n->3);
  the op's input is the hidden space H = ``fc_in.weight[0]``.
- ``Pair(op)``: a = ``fc_a(x)``, b = ``fc_b(x)`` (two producers, two spaces) -> op(a, b) ->
  ``fc_out``: elementwise ops must make A and B one space.
- ``ConvChain(op, d)``: x [2, 3, 5, ...] -> ``conv_in`` (1x1, 3->6) -> op -> ``conv_out``;
  the channel axis is 1.

:func:`test_every_rule_key_has_a_per_op_case` traces every case and fails when a key of
``mudsc_fx.rules.RULES`` is exercised by none (a new row needs a case here), except the keys
in ``UNREACHABLE``, each with a test showing that torch.fx can never produce it.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import mudsc_fx as mf
from mudsc_fx.ir.layout import Concat, Kron, spaces_of
from mudsc_fx.rules import table as rule_table

from fuzz_harness import key_name, rule_keys

torch.fx.wrap("len")  # len(x) becomes a call_function node (rule: non-tensor result)


# ---------------------------------------------------------------------------------------------
# templates
def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    with torch.no_grad():  # per-unit biases away from their symmetric init
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


class Chain(nn.Module):
    """x [2, 5, 4] -> fc_in (4 -> 6) -> op -> fc_out (-> 3)."""

    def __init__(self, op: Callable, shape=(2, 5, 4), hidden: int = 6):
        super().__init__()
        self.fc_in = nn.Linear(shape[-1], hidden)
        self.op = op
        with torch.no_grad():
            n = op(self.fc_in(torch.zeros(shape))).shape[-1]
        self.fc_out = nn.Linear(n, 3)

    def forward(self, x):
        return self.fc_out(self.op(self.fc_in(x)))


class Pair(nn.Module):
    """a = fc_a(x), b = fc_b(x) (two spaces A, B) -> op(a, b) -> fc_out."""

    def __init__(self, op: Callable, shape=(2, 5, 4), hidden: int = 6):
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(shape[-1], hidden), nn.Linear(shape[-1], hidden)
        self.op = op
        with torch.no_grad():
            n = op(self.fc_a(torch.zeros(shape)), self.fc_b(torch.zeros(shape))).shape[-1]
        self.fc_out = nn.Linear(n, 3)

    def forward(self, x):
        return self.fc_out(self.op(self.fc_a(x), self.fc_b(x)))


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvChain(nn.Module):
    """x [2, 3, 5, ...] -> conv_in (1x1, 3 -> 6) -> op -> conv_out (1x1, -> 3)."""

    def __init__(self, op: Callable, d: int = 2, size: int = 5, hidden: int = 6):
        super().__init__()
        self.shape = (2, 3) + (size,) * d
        self.conv_in = _CONV[d](3, hidden, 1)
        self.op = op
        with torch.no_grad():
            n = op(self.conv_in(torch.zeros(self.shape))).shape[1]
        self.conv_out = _CONV[d](n, 3, 1)

    def forward(self, x):
        return self.conv_out(self.op(self.conv_in(x)))


def _randn(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# reading the graph
def member(pg, fqn: str, axis: int):
    return next((m for m in pg.members if m.fqn == fqn and m.axis == axis), None)


def spaces(pg, fqn: str, axis: int) -> set[int]:
    m = member(pg, fqn, axis)
    return set() if m is None else set(spaces_of(m.layout))


def free(pg, fqn: str, axis: int) -> bool:
    """Every unit of the axis lies in a free space."""
    m = member(pg, fqn, axis)
    return m is not None and all(pg.is_free(s) for s in spaces_of(m.layout))


def fixed(pg, fqn: str, axis: int) -> bool:
    """No unit of the axis can move (the member is absent or all its spaces are fixed)."""
    return not spaces(pg, fqn, axis) or not any(pg.is_free(s) for s in spaces(pg, fqn, axis))


def same(pg, a: tuple[str, int], b: tuple[str, int]) -> bool:
    return bool(spaces(pg, *a)) and spaces(pg, *a) == spaces(pg, *b)


# expectations: functions of the graph that assert
def H_free(pg):
    """The hidden space is free and is what fc_out reads."""
    assert free(pg, "fc_in.weight", 0), pg.summary()
    assert spaces(pg, "fc_in.weight", 0) <= spaces(pg, "fc_out.weight", 1), pg.summary()
    assert pg.coverage() == 1.0


def H_fixed(pg):
    """The op pins the hidden space."""
    assert fixed(pg, "fc_in.weight", 0), pg.summary()
    assert pg.coverage() == 0.0


def AB_one_space(pg):
    """An elementwise op of a and b makes their spaces one (rule 4)."""
    assert free(pg, "fc_a.weight", 0) and same(pg, ("fc_a.weight", 0), ("fc_b.weight", 0)), pg.summary()
    assert pg.coverage() == 1.0


def AB_fixed(pg):
    assert fixed(pg, "fc_a.weight", 0) and fixed(pg, "fc_b.weight", 0), pg.summary()


def C_free(pg):
    """conv_in's output space is free and is what conv_out reads."""
    assert free(pg, "conv_in.weight", 0), pg.summary()
    assert spaces(pg, "conv_in.weight", 0) <= spaces(pg, "conv_out.weight", 1), pg.summary()
    assert pg.coverage() == 1.0


def C_fixed(pg):
    assert fixed(pg, "conv_in.weight", 0), pg.summary()


# ---------------------------------------------------------------------------------------------
# cases
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    expect: Callable[[Any], None]
    spec: str = ""
    gap: str = ""  # a known coverage gap: the rule is sound but pins more than the spec (strict xfail)
    leaves: tuple = ()  # module classes traced as leaves (rows that serve leaf modules)


CASES: list[Case] = []


def case(id: str, build: Callable[[], nn.Module], expect: Callable, spec: str, inputs: Optional[Callable] = None,
         gap: str = "", leaves: tuple = ()):
    CASES.append(Case(id, build, inputs or (lambda: (_randn(2, 5, 4),)), expect, spec, gap, leaves))


def chain(id: str, op: Callable, expect: Callable, spec: str, gap: str = "", leaves: tuple = (), **kw):
    case(id, lambda: Chain(op, **kw), expect, spec,
         (lambda: (_randn(*kw["shape"]),)) if "shape" in kw else None, gap, leaves)


def pair(id: str, op: Callable, expect: Callable = AB_one_space, spec: str = "one space (rule 4)", gap: str = ""):
    case(id, lambda: Pair(op), expect, spec, gap=gap)


def conv_chain(id: str, op: Callable, expect: Callable, spec: str, d: int = 2, size: int = 5, gap: str = ""):
    case(id, lambda: ConvChain(op, d, size), expect, spec, lambda: (_randn(2, 3, *(size,) * d),), gap)


# --- rule 3: elementwise unary ops keep every axis's space ----------------------------------------
PASS = "elementwise: every axis keeps its space"
for cls, kw in [(nn.ReLU, {}), (nn.ReLU6, {}), (nn.GELU, {}), (nn.SiLU, {}), (nn.Sigmoid, {}), (nn.Tanh, {}),
                (nn.Hardswish, {}), (nn.Hardsigmoid, {}), (nn.LeakyReLU, {}), (nn.ELU, {}), (nn.SELU, {}),
                (nn.CELU, {}), (nn.Mish, {}), (nn.Softplus, {}), (nn.Softsign, {}), (nn.Hardtanh, {}),
                (nn.Tanhshrink, {}), (nn.Identity, {}), (nn.Dropout, {}), (nn.Dropout1d, {}),
                (nn.AlphaDropout, {}), (nn.Softmax, {"dim": -1}), (nn.LogSoftmax, {"dim": -1}),
                (nn.Softmin, {"dim": -1})]:
    chain(f"module {cls.__name__}", cls(**kw), H_free, PASS)
for cls in (nn.Dropout2d, nn.Dropout3d):
    conv_chain(f"module {cls.__name__}", cls(), C_free, PASS, d=2 if cls is nn.Dropout2d else 3, size=3)

_UNARY_FN = {
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu, "F.sigmoid": F.sigmoid,
    "F.tanh": F.tanh, "F.hardswish": F.hardswish, "F.hardsigmoid": F.hardsigmoid, "F.leaky_relu": F.leaky_relu,
    "F.elu": F.elu, "F.selu": F.selu, "F.celu": F.celu, "F.mish": F.mish, "F.softplus": F.softplus,
    "F.softsign": F.softsign, "F.hardtanh": F.hardtanh, "F.dropout": lambda h: F.dropout(h, 0.3, training=False),
    "F.dropout1d": lambda h: F.dropout1d(h, 0.3, training=False),
    "F.alpha_dropout": lambda h: F.alpha_dropout(h, 0.3, training=False),
    "F.softmax": lambda h: F.softmax(h, dim=-1), "F.log_softmax": lambda h: F.log_softmax(h, -1),
    "F.softmin": lambda h: F.softmin(h, -1), "F.normalize": lambda h: F.normalize(h, dim=-1),
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "torch.exp": lambda h: torch.exp(h.tanh()), "torch.log": lambda h: torch.log(h.abs() + 1),
    "torch.sqrt": lambda h: torch.sqrt(h.abs() + 1), "torch.rsqrt": lambda h: torch.rsqrt(h.abs() + 1),
    "torch.abs": torch.abs, "torch.neg": torch.neg, "torch.sin": torch.sin, "torch.cos": torch.cos,
    "torch.erf": torch.erf, "torch.square": torch.square, "torch.clamp": lambda h: torch.clamp(h, -0.5, 0.5),
    "torch.clip": lambda h: torch.clip(h, min=-0.2), "torch.sign": lambda h: h * torch.sign(h),
    "torch.softmax": lambda h: torch.softmax(h, -1), "torch.log_softmax": lambda h: torch.log_softmax(h, -1),
    "torch.nan_to_num": torch.nan_to_num, "torch.reciprocal": lambda h: torch.reciprocal(h.abs() + 1),
    "torch.log1p": lambda h: torch.log1p(h.abs()), "torch.expm1": lambda h: torch.expm1(h.tanh()),
    "torch.dropout": lambda h: torch.dropout(h, 0.3, False), "torch.exp2": lambda h: torch.exp2(h.tanh()),
    "torch.floor": lambda h: torch.floor(4 * h), "torch.ceil": lambda h: torch.ceil(4 * h),
    "torch.round": lambda h: torch.round(4 * h), "torch.detach": torch.detach,
    "torch.logical_not": lambda h: h * torch.logical_not(h > 0).to(h.dtype),
    "operator.neg": lambda h: -h, "operator.pos": lambda h: +h,
    "torch.zeros_like": lambda h: h + torch.zeros_like(h), "torch.ones_like": lambda h: h * torch.ones_like(h),
    "torch.full_like": lambda h: h - torch.full_like(h, 0.5),
    "torch.empty_like": lambda h: h + torch.empty_like(h).fill_(0.25),
}
for name, fn in _UNARY_FN.items():
    chain(name, fn, H_free, PASS)
conv_chain("F.dropout2d", lambda h: F.dropout2d(h, 0.3, training=False), C_free, PASS)
conv_chain("F.dropout3d", lambda h: F.dropout3d(h, 0.3, training=False), C_free, PASS, d=3, size=3)

_UNARY_METHODS = {
    "relu": lambda h: h.relu(), "relu_": lambda h: h.clone().relu_(), "sigmoid": lambda h: h.sigmoid(),
    "sigmoid_": lambda h: h.clone().sigmoid_(), "tanh": lambda h: h.tanh(), "tanh_": lambda h: h.clone().tanh_(),
    "exp": lambda h: h.tanh().exp(), "exp_": lambda h: h.tanh().exp_(), "log": lambda h: (h.abs() + 1).log(),
    "sqrt": lambda h: (h.abs() + 1).sqrt(), "rsqrt": lambda h: (h.abs() + 1).rsqrt(), "abs": lambda h: h.abs(),
    "neg": lambda h: h.neg(), "sin": lambda h: h.sin(), "cos": lambda h: h.cos(), "erf": lambda h: h.erf(),
    "square": lambda h: h.square(), "clamp": lambda h: h.clamp(-0.5, 0.5), "clamp_": lambda h: h.clone().clamp_(max=0.3),
    "clamp_min": lambda h: h.clamp_min(-0.1), "clamp_max": lambda h: h.clamp_max(0.1), "clip": lambda h: h.clip(-1, 1),
    "float": lambda h: h.float().to(h.dtype), "double": lambda h: h.double().to(h.dtype),
    "half": lambda h: h.half().to(h.dtype), "bfloat16": lambda h: h.bfloat16().to(h.dtype),
    "to": lambda h: h.to(h.dtype), "type": lambda h: h.type(h.dtype), "contiguous": lambda h: h.contiguous(),
    "clone": lambda h: h.clone(), "detach": lambda h: h.detach(), "softmax": lambda h: h.softmax(-1),
    "log_softmax": lambda h: h.log_softmax(dim=-1), "sign": lambda h: h * h.sign(),
    "reciprocal": lambda h: (h.abs() + 1).reciprocal(), "requires_grad_": lambda h: h.requires_grad_(False),
    "cpu": lambda h: h.cpu(), "log1p": lambda h: h.abs().log1p(), "expm1": lambda h: h.tanh().expm1(),
    "floor": lambda h: (4 * h).floor(), "ceil": lambda h: (4 * h).ceil(), "round": lambda h: (4 * h).round(),
    "logical_not": lambda h: h * (h > 0).logical_not().to(h.dtype), "nan_to_num": lambda h: h.nan_to_num(),
    "zero_": lambda h: h + h.clone().zero_(), "fill_": lambda h: h * h.clone().fill_(2.0),
}
for name, fn in _UNARY_METHODS.items():
    chain(f"Tensor.{name}", fn, H_free, PASS)


# --- rule 4: binary elementwise ops make aligned axes one space ---------------------------------
_BINARY = {
    "operator.add": lambda a, b: a + b, "operator.sub": lambda a, b: a - b, "operator.mul": lambda a, b: a * b,
    "operator.truediv": lambda a, b: a / (b.abs() + 1), "operator.floordiv": lambda a, b: a // (b.abs() + 0.5),
    "operator.pow": lambda a, b: (a.abs() + 1) ** b.tanh(), "operator.mod": lambda a, b: a % (b.abs() + 1),
    "operator.eq": lambda a, b: a * (a.round() == b.round()).to(a.dtype),
    "operator.ne": lambda a, b: a * (a.round() != b.round()).to(a.dtype),
    "operator.lt": lambda a, b: a * (a < b).to(a.dtype), "operator.le": lambda a, b: a * (a <= b).to(a.dtype),
    "operator.gt": lambda a, b: a * (a > b).to(a.dtype), "operator.ge": lambda a, b: a * (a >= b).to(a.dtype),
    "operator.and_": lambda a, b: a * ((a > 0) & (b > 0)).to(a.dtype),
    "operator.or_": lambda a, b: a * ((a > 0) | (b > 0)).to(a.dtype),
    "torch.add": lambda a, b: torch.add(a, b, alpha=0.5), "torch.sub": torch.sub, "torch.subtract": torch.subtract,
    "torch.mul": torch.mul, "torch.multiply": torch.multiply, "torch.div": lambda a, b: torch.div(a, b.abs() + 1),
    "torch.divide": lambda a, b: torch.divide(a, b.abs() + 1),
    "torch.true_divide": lambda a, b: torch.true_divide(a, b.abs() + 1), "torch.maximum": torch.maximum,
    "torch.minimum": torch.minimum, "torch.pow": lambda a, b: torch.pow(a.abs() + 1, b.tanh()),
    "torch.where": lambda a, b: torch.where(a > 0, a, b), "torch.atan2": torch.atan2,
    "torch.eq": lambda a, b: a * torch.eq(a.round(), b.round()).to(a.dtype),
    "torch.ne": lambda a, b: a * torch.ne(a.round(), b.round()).to(a.dtype),
    "torch.lt": lambda a, b: a * torch.lt(a, b).to(a.dtype), "torch.le": lambda a, b: a * torch.le(a, b).to(a.dtype),
    "torch.gt": lambda a, b: a * torch.gt(a, b).to(a.dtype), "torch.ge": lambda a, b: a * torch.ge(a, b).to(a.dtype),
    "torch.logical_and": lambda a, b: a * torch.logical_and(a > 0, b > 0).to(a.dtype),
    "torch.logical_or": lambda a, b: a * torch.logical_or(a > 0, b > 0).to(a.dtype),
    "torch.masked_fill": lambda a, b: torch.masked_fill(a, b > 0, 0.0),
    "torch.addcmul": lambda a, b: torch.addcmul(a, b, b, value=0.5),
    "torch.addcdiv": lambda a, b: torch.addcdiv(a, a, b.abs() + 1), "torch.lerp": lambda a, b: torch.lerp(a, b, 0.3),
    "torch.fmod": lambda a, b: torch.fmod(a, b.abs() + 1), "torch.remainder": lambda a, b: torch.remainder(a, b.abs() + 1),
    "Tensor.add": lambda a, b: a.add(b), "Tensor.add_": lambda a, b: a.clone().add_(b),
    "Tensor.sub": lambda a, b: a.sub(b), "Tensor.sub_": lambda a, b: a.clone().sub_(b),
    "Tensor.mul": lambda a, b: a.mul(b), "Tensor.mul_": lambda a, b: a.clone().mul_(b),
    "Tensor.div": lambda a, b: a.div(b.abs() + 1), "Tensor.div_": lambda a, b: a.clone().div_(b.abs() + 1),
    "Tensor.pow": lambda a, b: (a.abs() + 1).pow(b.tanh()), "Tensor.pow_": lambda a, b: (a.abs() + 1).pow_(b.tanh()),
    "Tensor.maximum": lambda a, b: a.maximum(b), "Tensor.minimum": lambda a, b: a.minimum(b),
    "Tensor.masked_fill": lambda a, b: a.masked_fill(b > 0, 0.5),
    "Tensor.masked_fill_": lambda a, b: a.clone().masked_fill_(b > 0, 0.5),
    "Tensor.where": lambda a, b: a.where(a > 0, b),
    "Tensor.eq": lambda a, b: a * a.round().eq(b.round()).to(a.dtype),
    "Tensor.ne": lambda a, b: a * a.round().ne(b.round()).to(a.dtype),
    "Tensor.lt": lambda a, b: a * a.lt(b).to(a.dtype), "Tensor.le": lambda a, b: a * a.le(b).to(a.dtype),
    "Tensor.gt": lambda a, b: a * a.gt(b).to(a.dtype), "Tensor.ge": lambda a, b: a * a.ge(b).to(a.dtype),
    "Tensor.addcmul": lambda a, b: a.addcmul(b, b), "Tensor.addcmul_": lambda a, b: a.clone().addcmul_(b, a),
    "Tensor.addcdiv": lambda a, b: a.addcdiv(b, b.abs() + 1), "Tensor.lerp": lambda a, b: a.lerp(b, 0.5),
    "Tensor.fmod": lambda a, b: a.fmod(b.abs() + 1), "Tensor.remainder": lambda a, b: a.remainder(b.abs() + 1),
    "Tensor.logical_and": lambda a, b: a * (a > 0).logical_and(b > 0).to(a.dtype),
    "Tensor.logical_or": lambda a, b: a * (a > 0).logical_or(b > 0).to(a.dtype),
    "Tensor.copy_": lambda a, b: a.clone().copy_(b) + a,
}
for name, fn in _BINARY.items():
    pair(name, fn)
chain("broadcast over tokens", lambda h: h * torch.sigmoid(h.mean(1, keepdim=True)), H_free,
      "size-1 axes impose nothing: a per-channel gate keeps H free")


def _indep(pg):
    assert free(pg, "fc_a.weight", 0) and free(pg, "fc_b.weight", 0)
    assert not same(pg, ("fc_a.weight", 0), ("fc_b.weight", 0)), pg.summary()


pair("a plus a reduction of b", lambda a, b: a + b.mean(-1, keepdim=True), _indep,
     "axes that are not aligned (b's is reduced away) stay independent spaces")
pair("outer product flattened", lambda a, b: (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2), AB_fixed,
     "flattening two permuted axes into one (a product layout) is not tracked: both are pinned")


# --- rule 11: tensors made in forward pin the spaces they meet ----------------------------------
CONST = "a tensor made in forward is fixed on every axis: the space it meets is fixed"
for name, fn in {
    "torch.arange": lambda h: h + torch.arange(6, dtype=h.dtype),
    "torch.zeros": lambda h: h + torch.zeros(6, dtype=h.dtype), "torch.ones": lambda h: h * torch.ones(6, dtype=h.dtype),
    "torch.full": lambda h: h * torch.full((6,), 2.0, dtype=h.dtype),
    "torch.empty": lambda h: h + torch.empty(6, dtype=h.dtype).fill_(0.5),
    "torch.eye": lambda h: h @ torch.eye(6, dtype=h.dtype), "torch.linspace": lambda h: h * torch.linspace(0, 1, 6, dtype=h.dtype),
    "torch.tensor": lambda h: h * torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=h.dtype),
    "torch.as_tensor": lambda h: h * torch.as_tensor([1.0, 2, 3, 4, 5, 6], dtype=h.dtype),
    "torch.rand": lambda h: h + 0 * torch.rand(6, dtype=h.dtype), "torch.randn": lambda h: h + 0 * torch.randn(6, dtype=h.dtype),
    "torch.randint": lambda h: h + 0 * torch.randint(0, 3, (6,), device=h.device).to(h.dtype),
    "Tensor.new_zeros": lambda h: h + h.new_zeros(6), "Tensor.new_ones": lambda h: h * h.new_ones(6),
    "Tensor.new_full": lambda h: h * h.new_full((6,), 3.0), "Tensor.new_empty": lambda h: h + h.new_empty(6).fill_(1.0),
    "Tensor.new_tensor": lambda h: h * h.new_tensor([1.0, 2, 3, 4, 5, 6]),
}.items():
    chain(name, fn, H_fixed, CONST)


# --- triangular masks: the last two axes are fixed -----------------------------------------------
TRI = "triu / tril pin their last two axes"
for name, fn in {"torch.triu": lambda s: torch.triu(s, 1), "torch.tril": torch.tril,
                 "Tensor.triu": lambda s: s.triu(), "Tensor.tril": lambda s: s.tril(-1)}.items():
    # over token-token scores the channels stay free ...
    chain(f"{name} over tokens", (lambda f: lambda h: f(h @ h.transpose(-1, -2)) @ h)(fn), H_free, TRI)
    # ... over channel-channel products they are pinned
    chain(f"{name} over channels", (lambda f: lambda h: h @ f(h.transpose(-1, -2) @ h))(fn), H_fixed, TRI)


# --- non-tensor results (sizes, asserts) impose nothing ------------------------------------------
NONT = "ops with non-tensor results constrain nothing"
for name, fn in {
    "Tensor.size": lambda h: h * (h.size(-1) / 6), "Tensor.dim": lambda h: h * (h.dim() / 3),
    "Tensor.numel": lambda h: h * (h.numel() / 60), "Tensor.nelement": lambda h: h * (h.nelement() / 60),
    "Tensor.data_ptr": lambda h: h + 0 * (h.data_ptr() % 7), "Tensor.is_contiguous": lambda h: h * h.is_contiguous(),
    "Tensor.get_device": lambda h: h * (h.get_device() + 2), "len": lambda h: h * len(h),
    "torch.numel": lambda h: h * (torch.numel(h) / 60),
    "torch._assert": lambda h: (torch._assert(h.dim() == 3, "3-d"), h)[1],
    "torch._assert_async": lambda h: (torch._assert_async(h.sum() == h.sum()), h)[1],
}.items():
    chain(name, fn, H_free, NONT)


# --- rule 6: reductions over the permuted axis are invariant -------------------------------------
RED = "a reduction over the permuted axis is invariant: the axis disappears"
for name, fn in {
    "torch.sum": lambda h: h * torch.sum(h, -1, keepdim=True), "torch.mean": lambda h: h - torch.mean(h, dim=-1, keepdim=True),
    "torch.amax": lambda h: h - torch.amax(h, -1, keepdim=True), "torch.amin": lambda h: h - torch.amin(h, -1, True),
    "torch.logsumexp": lambda h: h - torch.logsumexp(h, -1, keepdim=True),
    "torch.var": lambda h: h / (torch.var(h, -1, keepdim=True) + 1), "torch.std": lambda h: h / (torch.std(h, dim=-1, keepdim=True) + 1),
    "torch.prod": lambda h: h * torch.prod(torch.sigmoid(h), -1, keepdim=True),
    "torch.all": lambda h: h * torch.all(h > -3, -1, keepdim=True).to(h.dtype),
    "torch.any": lambda h: h * torch.any(h > 0, dim=-1, keepdim=True).to(h.dtype),
    "torch.count_nonzero": lambda h: h * torch.count_nonzero(h > 0, -1).unsqueeze(-1).to(h.dtype),
    "torch.nansum": lambda h: h * torch.nansum(h, -1, keepdim=True), "torch.nanmean": lambda h: h - torch.nanmean(h, -1, keepdim=True),
    "Tensor.sum": lambda h: h * h.sum(-1, keepdim=True), "Tensor.mean": lambda h: h - h.mean(-1, keepdim=True),
    "Tensor.amax": lambda h: h - h.amax(-1, keepdim=True), "Tensor.amin": lambda h: h - h.amin(dim=-1, keepdim=True),
    "Tensor.logsumexp": lambda h: h - h.logsumexp(-1, keepdim=True), "Tensor.var": lambda h: h / (h.var(-1, keepdim=True) + 1),
    "Tensor.std": lambda h: h / (h.std(-1, keepdim=True) + 1), "Tensor.prod": lambda h: h * h.sigmoid().prod(-1, keepdim=True),
    "Tensor.all": lambda h: h * (h > -3).all(-1, keepdim=True).to(h.dtype),
    "Tensor.any": lambda h: h * (h > 0).any(-1, keepdim=True).to(h.dtype),
    "Tensor.count_nonzero": lambda h: h * (h > 0).count_nonzero(-1).unsqueeze(-1).to(h.dtype),
    "Tensor.nansum": lambda h: h * h.nansum(-1, keepdim=True), "Tensor.nanmean": lambda h: h - h.nanmean(-1, keepdim=True),
    "torch.norm": lambda h: h / (torch.norm(h, 2, -1, True) + 1), "Tensor.norm": lambda h: h / (h.norm(dim=-1, keepdim=True) + 1),
    "torch.linalg.vector_norm": lambda h: h / (torch.linalg.vector_norm(h, 2, -1, keepdim=True) + 1),
    "reduction dropping the axis": lambda h: h.sum(-1, keepdim=True) * h.mean(1, keepdim=True),
}.items():
    chain(name, fn, H_free, RED)

MAX = "max / min over an axis: values are invariant; indices used as an index pin the axis"
chain("torch.min(...).values", lambda h: h - torch.min(h, dim=-1, keepdim=True).values, H_free, MAX,
      gap="`.values` of a max/min result is a barrier (attribute of a tensor) and counts as the indices being used")
for name, fn, exp in [
    ("torch.max values", lambda h: h - torch.max(h, -1, keepdim=True)[0], H_free),
    ("torch.min values", lambda h: h - torch.min(h, dim=-1, keepdim=True)[0], H_free),
    ("Tensor.max values", lambda h: h - h.max(-1, keepdim=True)[0], H_free),
    ("Tensor.min values", lambda h: h - h.min(-1, True)[0], H_free),
    ("torch.max of everything", lambda h: h / (torch.max(h).abs() + 1), H_free),
    ("torch.max indices as an index", lambda h: h + torch.gather(h, -1, torch.max(h, -1, keepdim=True)[1]), H_fixed),
    ("Tensor.min indices as an index", lambda h: h + h.gather(-1, h.min(-1, keepdim=True)[1]), H_fixed),
]:
    chain(name, fn, exp, MAX)
pair("torch.max of two tensors", lambda a, b: torch.max(a, b))
pair("Tensor.min of two tensors", lambda a, b: a.min(b))


# --- rule 6: ops along one axis pin it; along another axis they leave the channels free -----------
ALONG = "cumsum / sort / flip / gather ... along a permuted axis pin it"
_ALONG = {
    "torch.cumsum": lambda h, d: torch.cumsum(h, d), "torch.cumprod": lambda h, d: torch.cumprod(h.tanh(), dim=d),
    "torch.cummax": lambda h, d: torch.cummax(h, d)[0], "torch.cummin": lambda h, d: torch.cummin(h, d).values,
    "torch.gather": lambda h, d: torch.gather(h, d, h.argsort(d)),
    "torch.index_select": lambda h, d: torch.index_select(h, d, torch.tensor([1, 0, 2, 3])),
    "torch.argmax": lambda h, d: h * torch.argmax(h, d, keepdim=True).to(h.dtype),
    "torch.argmin": lambda h, d: h * torch.argmin(h, dim=d, keepdim=True).to(h.dtype),
    "torch.median": lambda h, d: h - torch.median(h, d, keepdim=True)[0],
    "torch.sort": lambda h, d: torch.sort(h, d)[0], "torch.argsort": lambda h, d: h * torch.argsort(h, d).to(h.dtype),
    "torch.mode": lambda h, d: h - torch.mode(h.round(), d, True)[0],
    "torch.topk": lambda h, d: torch.topk(h, 2, d)[0], "torch.kthvalue": lambda h, d: h - torch.kthvalue(h, 2, d, True)[0],
    "torch.flip": lambda h, d: torch.flip(h, (d,)), "torch.roll": lambda h, d: torch.roll(h, 1, d),
    "torch.take_along_dim": lambda h, d: torch.take_along_dim(h, h.argsort(d), d),
    "Tensor.cumsum": lambda h, d: h.cumsum(d), "Tensor.cumprod": lambda h, d: h.tanh().cumprod(d),
    "Tensor.cummax": lambda h, d: h.cummax(d)[0], "Tensor.cummin": lambda h, d: h.cummin(d)[0],
    "Tensor.gather": lambda h, d: h.gather(d, h.argsort(d, descending=True)),
    "Tensor.index_select": lambda h, d: h.index_select(d, torch.tensor([0, 2, 1])),
    "Tensor.argmax": lambda h, d: h * h.argmax(d, keepdim=True).to(h.dtype),
    "Tensor.argmin": lambda h, d: h * h.argmin(d, keepdim=True).to(h.dtype),
    "Tensor.median": lambda h, d: h - h.median(d, keepdim=True)[0], "Tensor.sort": lambda h, d: h.sort(d)[0],
    "Tensor.argsort": lambda h, d: h * h.argsort(d).to(h.dtype), "Tensor.mode": lambda h, d: h - h.round().mode(d, True)[0],
    "Tensor.topk": lambda h, d: h.topk(2, d)[0], "Tensor.kthvalue": lambda h, d: h - h.kthvalue(2, d, True)[0],
    "Tensor.flip": lambda h, d: h.flip(d), "Tensor.roll": lambda h, d: h.roll(1, d),
    "Tensor.scatter": lambda h, d: h.scatter(d, h.argsort(d), h),
    "Tensor.scatter_add": lambda h, d: h.scatter_add(d, h.argsort(d), h),
    "Tensor.index_add": lambda h, d: h.index_add(d, torch.tensor([1, 0]), h.narrow(d, 0, 2)),
    "Tensor.index_fill": lambda h, d: h.index_fill(d, torch.tensor([1]), 0.5),
}
for name, fn in _ALONG.items():
    chain(f"{name} along channels", (lambda f: lambda h: f(h, -1))(fn), H_fixed, ALONG)
for name in ("torch.cumsum", "torch.sort", "torch.flip", "torch.roll", "Tensor.topk"):
    chain(f"{name} along tokens", (lambda f: lambda h: f(h, 1))(_ALONG[name]), H_free,
          "along a non-permuted axis the channels stay free")
chain("torch.gather along tokens", lambda h: torch.gather(h, 1, h.argsort(1)), H_free,
      "gather along tokens with an index laid out like h is equivariant in the channels",
      gap="the index tensor of gather is pinned on every axis, its channel axis included")


# --- rules 7, 8: shapes ---------------------------------------------------------------------------
RESHAPE = "reshape: a permuted axis merged with fixed axes is kron; split into (G, g) is blocks"


def _kron_reader(inner_rep: int):
    def expect(pg):
        m = member(pg, "fc.weight", 1)
        assert m is not None and isinstance(m.layout, Kron) and m.layout.inner_rep == inner_rep, pg.summary()
        assert free(pg, "conv.weight", 0) and set(spaces_of(m.layout)) == spaces(pg, "conv.weight", 0)
    return expect


class ConvFlatten(nn.Module):
    """conv (3 -> 6) on 2x2 -> flatten -> Linear(24 -> 3): fc.weight[1] is kron(conv space, inner 4)."""

    def __init__(self, flatten: Callable):
        super().__init__()
        self.conv, self.flatten, self.fc = nn.Conv2d(3, 6, 1), flatten, nn.Linear(24, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.conv(x)))


for name, fn in {"torch.flatten": lambda h: torch.flatten(h, 1), "torch.reshape": lambda h: torch.reshape(h, (2, 24)),
                 "nn.Flatten": nn.Flatten(), "Tensor.flatten": lambda h: h.flatten(1),
                 "Tensor.view": lambda h: h.view(h.shape[0], -1), "Tensor.reshape": lambda h: h.reshape(2, -1)}.items():
    case(f"{name} NCHW -> features", (lambda f: lambda: ConvFlatten(f))(fn), _kron_reader(4), RESHAPE,
         lambda: (_randn(2, 3, 2, 2),))


def _blocks(G: int, g: int):
    def expect(pg):
        H_free(pg)
        (s,) = spaces(pg, "fc_in.weight", 0)
        assert pg.spaces[s].blocks == (G, g), pg.summary()
    return expect


for name, fn in {"torch.unflatten": lambda h: torch.unflatten(h, -1, (2, 3)).flatten(-2),
                 "Tensor.unflatten": lambda h: h.unflatten(-1, (3, 2)).flatten(2),
                 "Tensor.view (split channels)": lambda h: h.view(2, 5, 2, 3).reshape(2, 5, 6)}.items():
    G = 3 if name.startswith("Tensor.unflatten") else 2
    chain(name, fn, _blocks(G, 6 // G), RESHAPE)
for name, fn in {
    "torch.squeeze": lambda h: torch.squeeze(h.unsqueeze(2), 2), "torch.unsqueeze": lambda h: torch.unsqueeze(h, 0)[0],
    "torch.ravel": lambda h: torch.ravel(h).view(2, 5, 6), "Tensor.ravel": lambda h: h.ravel().reshape(2, 5, 6),
    "Tensor.squeeze": lambda h: h.unsqueeze(1).squeeze(1), "Tensor.unsqueeze": lambda h: h.unsqueeze(-2).sum(-2),
    "Tensor.squeeze_": lambda h: h.unsqueeze(0).squeeze_(0), "Tensor.unsqueeze_": lambda h: h.clone().unsqueeze_(1)[:, 0],
    "Tensor.view_as": lambda h: h.reshape(10, 6).view_as(h), "Tensor.reshape_as": lambda h: h.flatten(0, 1).reshape_as(h),
}.items():
    chain(name, fn, H_free, "squeezing and unsqueezing size-1 axes keeps the space")
chain("channel shuffle", lambda h: h.view(2, 5, 2, 3).transpose(-1, -2).reshape(2, 5, 6), H_fixed,
      "a reshape that interleaves blocks of a permuted axis (channel shuffle) pins it")


class VecToConv(nn.Module):
    """Linear (4 -> 6) -> nn.Unflatten to [6, 1, 1] -> 1x1 conv: one space."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.unflatten, self.conv = nn.Linear(4, 6), nn.Unflatten(1, (6, 1, 1)), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.conv(self.unflatten(self.fc_in(x)))


def _vec_to_conv(pg):
    assert free(pg, "fc_in.weight", 0) and same(pg, ("fc_in.weight", 0), ("conv.weight", 1)), pg.summary()


case("nn.Unflatten", VecToConv, _vec_to_conv, "unflatten with size-1 axes keeps the space", lambda: (_randn(2, 4),))

PERM = "axis permutations move labels with the axes"
for name, fn in {
    "torch.permute": lambda h: torch.permute(torch.permute(h, (2, 0, 1)), (1, 2, 0)),
    "torch.transpose": lambda h: torch.transpose(h, 1, 2).transpose(-1, -2),
    "torch.movedim": lambda h: torch.movedim(torch.movedim(h, -1, 0), 0, -1),
    "torch.swapaxes": lambda h: torch.swapaxes(h, 0, 2).swapaxes(0, 2),
    "torch.swapdims": lambda h: torch.swapdims(torch.swapdims(h, 1, 2), 1, 2),
    "Tensor.permute": lambda h: h.permute(0, 2, 1).permute(0, 2, 1),
    "Tensor.transpose": lambda h: h.transpose(1, 2).mean(-1, keepdim=True).transpose(1, 2) * h,
    "Tensor.movedim": lambda h: h.movedim(2, 1).movedim(1, 2), "Tensor.swapaxes": lambda h: h.swapaxes(1, 2).swapaxes(1, 2),
    "Tensor.swapdims": lambda h: h.swapdims(1, 2).swapdims(2, 1),
    "Tensor.transpose_": lambda h: h.clone().transpose_(1, 2).transpose(1, 2),
    "getattr mT": lambda h: h.mT.mT,
}.items():
    chain(name, fn, H_free, PERM)
for name, fn in {"torch.t": lambda h: torch.t(torch.t(h)), "Tensor.t": lambda h: h.t().t(), "getattr T": lambda h: h.T.T}.items():
    chain(name, fn, H_free, PERM, shape=(2, 4))

EXP = "expand / broadcast_to of new axes keep the space"
for name, fn in {"Tensor.expand": lambda h: h.unsqueeze(1).expand(2, 5, 6),
                 "Tensor.expand_as": lambda h: h.unsqueeze(1).expand_as(torch.zeros(2, 5, 6, dtype=h.dtype)),
                 "torch.broadcast_to": lambda h: torch.broadcast_to(h[:, None], (2, 5, 6)),
                 "Tensor.broadcast_to": lambda h: h[:, None, :].broadcast_to(2, 3, 6)}.items():
    chain(name, fn, H_free, EXP, shape=(2, 4))
chain("expand of a size-1 channel axis", lambda h: h.mean(-1, keepdim=True).expand(2, 5, 6) * h, H_free, EXP,
      gap="an explicitly expanded size-1 axis is labelled fixed and pins what it meets (implicit broadcasting does not)")


def _kron_outer(pg):
    H_free(pg)
    m = member(pg, "fc_out.weight", 1)
    assert isinstance(m.layout, Kron) and m.layout.outer == 2, pg.summary()


for name, fn in {"Tensor.repeat": lambda h: h.repeat(1, 1, 2), "torch.tile": lambda h: torch.tile(h, (1, 1, 2)),
                 "Tensor.tile": lambda h: h.tile((2,))}.items():
    chain(name, fn, _kron_outer, "repeat along a permuted axis gives kron(space, outer = repeats)")


def _kron_inner(pg):
    H_free(pg)
    m = member(pg, "fc_out.weight", 1)
    assert isinstance(m.layout, Kron) and m.layout.inner_rep == 2 and m.layout.outer == 1, pg.summary()


for name, fn in {"torch.repeat_interleave": lambda h: torch.repeat_interleave(h, 2, dim=-1),
                 "Tensor.repeat_interleave": lambda h: h.repeat_interleave(2, -1)}.items():
    chain(name, fn, _kron_inner, "repeat_interleave by r: index i*r + j is unit i, kron(space, inner = r)")
pair("Tensor.type_as", lambda a, b: a.type_as(b), _indep, "type_as: the other tensor gives its dtype only")


def _concat_of_two(pg):
    m = member(pg, "fc_out.weight", 1)
    assert isinstance(m.layout, Concat) and len(m.layout.parts) == 2, pg.summary()
    assert free(pg, "fc_a.weight", 0) and free(pg, "fc_b.weight", 0)
    assert not same(pg, ("fc_a.weight", 0), ("fc_b.weight", 0))


for name, fn in {"torch.cat": lambda a, b: torch.cat([a, b], -1), "torch.concat": lambda a, b: torch.concat((a, b), dim=2),
                 "torch.concatenate": lambda a, b: torch.concatenate([a, b], -1)}.items():
    pair(f"{name} along channels", fn, _concat_of_two, "cat along the permuted axis gives concat(A, B)")
pair("torch.concatenate(axis=)", lambda a, b: torch.concatenate([a, b], axis=-1), _concat_of_two,
     "numpy's spelling axis= is the same cat", gap="the cat rule reads dim= only: axis=-1 is taken as dim 0")
pair("torch.cat along tokens", lambda a, b: torch.cat([a, b], 1), AB_one_space, "cat along another axis unifies")
pair("torch.stack", lambda a, b: torch.stack([a, b], 1).sum(1), AB_one_space, "stack unifies the stacked values")


class SplitHeads(nn.Module):
    """fc_in (4 -> 6) -> split into 2 + 4 -> two Linears."""

    def __init__(self, split: Callable):
        super().__init__()
        self.fc_in, self.split = nn.Linear(4, 6), split
        self.fc_a, self.fc_b = nn.Linear(2, 3), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.split(self.fc_in(x))
        return self.fc_a(a) + self.fc_b(b)


def _refined(pg):
    m = member(pg, "fc_in.weight", 0)
    assert isinstance(m.layout, Concat) and len(m.layout.parts) == 2 and free(pg, "fc_in.weight", 0), pg.summary()
    assert spaces(pg, "fc_a.weight", 1) | spaces(pg, "fc_b.weight", 1) == spaces(pg, "fc_in.weight", 0)


SPLIT = "split / chunk refine the space into aligned parts"
for name, fn in {"torch.split": lambda h: torch.split(h, [2, 4], -1), "Tensor.split": lambda h: h.split([2, 4], dim=-1),
                 "Tensor.split_with_sizes": lambda h: h.split_with_sizes([2, 4], -1),
                 "torch.tensor_split": lambda h: torch.tensor_split(h, [2], -1),
                 "Tensor.tensor_split": lambda h: h.tensor_split([2], dim=-1),
                 "getitem slices": lambda h: (h[..., :2], h[:, :, 2:])}.items():
    case(name, (lambda f: lambda: SplitHeads(f))(fn), _refined, SPLIT)
def _chunks_one_space(pg):
    """Chunks added together (or one chunk alone) still come from one producer; every part moves."""
    assert free(pg, "fc_in.weight", 0), pg.summary()


for name, fn in {"torch.chunk": lambda h: torch.chunk(h, 2, -1)[0] * torch.chunk(h, 2, -1)[1],
                 "Tensor.chunk": lambda h: h.chunk(3, dim=-1)[1]}.items():
    chain(name, fn, _chunks_one_space, SPLIT)
for name, fn in {"torch.unbind": lambda h: torch.unbind(h, 1)[0], "Tensor.unbind": lambda h: h.unbind(dim=1)[-1],
                 "getitem integer": lambda h: h[:, 0], "getitem None / Ellipsis": lambda h: h[None, ..., :][0]}.items():
    chain(name, fn, H_free, "indexing a non-permuted axis keeps the channels free")
chain("getitem step slice", lambda h: h[..., ::2], H_fixed, "a strided slice of a permuted axis pins it")
chain("getitem boolean mask", lambda h: h[h > 0].sum() * h, H_fixed, "a boolean mask over every axis pins them")

PAD = "pad over another axis keeps the channels; pad of the permuted axis pins it"
chain("F.pad tokens", lambda h: F.pad(h, (0, 0, 1, 1)), H_free, PAD)
chain("F.pad channels", lambda h: F.pad(h, (1, 0)), H_fixed, PAD)

POOL = "pooling and resizing over spatial axes keep the channel space"
for d, items in {
    1: {"nn.MaxPool1d": nn.MaxPool1d(2), "nn.AvgPool1d": nn.AvgPool1d(2), "nn.AdaptiveAvgPool1d": nn.AdaptiveAvgPool1d(2),
        "nn.AdaptiveMaxPool1d": nn.AdaptiveMaxPool1d(1), "nn.LPPool1d": nn.LPPool1d(2, 2),
        "F.max_pool1d": lambda h: F.max_pool1d(h, 2), "F.avg_pool1d": lambda h: F.avg_pool1d(h, 2),
        "F.adaptive_avg_pool1d": lambda h: F.adaptive_avg_pool1d(h, 1), "F.adaptive_max_pool1d": lambda h: F.adaptive_max_pool1d(h, 3),
        "F.interpolate linear": lambda h: F.interpolate(h, scale_factor=2, mode="linear")},
    2: {"nn.MaxPool2d": nn.MaxPool2d(2), "nn.AvgPool2d": nn.AvgPool2d(2), "nn.AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(1),
        "nn.AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d(2), "nn.LPPool2d": nn.LPPool2d(2, 2),
        "F.max_pool2d": lambda h: F.max_pool2d(h, 2), "F.avg_pool2d": lambda h: F.avg_pool2d(h, 2, 1),
        "F.adaptive_avg_pool2d": lambda h: F.adaptive_avg_pool2d(h, 2), "F.adaptive_max_pool2d": lambda h: F.adaptive_max_pool2d(h, 1),
        "nn.ZeroPad2d": nn.ZeroPad2d(1), "nn.ConstantPad2d": nn.ConstantPad2d(1, 0.5),
        "nn.ReflectionPad2d": nn.ReflectionPad2d(1), "nn.ReplicationPad2d": nn.ReplicationPad2d((1, 0, 1, 0)),
        "nn.Upsample": nn.Upsample(scale_factor=2), "nn.UpsamplingNearest2d": nn.UpsamplingNearest2d(scale_factor=2),
        "nn.UpsamplingBilinear2d": nn.UpsamplingBilinear2d(scale_factor=2),
        "F.interpolate": lambda h: F.interpolate(h, size=(3, 4), mode="bilinear"),
        "F.upsample": lambda h: F.upsample(h, scale_factor=2)},
    3: {"nn.MaxPool3d": nn.MaxPool3d(2), "nn.AvgPool3d": nn.AvgPool3d(2), "nn.AdaptiveAvgPool3d": nn.AdaptiveAvgPool3d(1),
        "nn.AdaptiveMaxPool3d": nn.AdaptiveMaxPool3d(2), "F.max_pool3d": lambda h: F.max_pool3d(h, 2),
        "F.avg_pool3d": lambda h: F.avg_pool3d(h, 2), "F.adaptive_avg_pool3d": lambda h: F.adaptive_avg_pool3d(h, 2),
        "F.adaptive_max_pool3d": lambda h: F.adaptive_max_pool3d(h, 1),
        "F.interpolate trilinear": lambda h: F.interpolate(h, scale_factor=2, mode="trilinear")},
}.items():
    for name, fn in items.items():
        conv_chain(name, fn, C_free, POOL, d=d, size=4)


# --- rule 5: contractions -------------------------------------------------------------------------
class WithWeight(nn.Module):
    """fc_in (4 -> 6) -> op(h, w) with a Parameter w -> fc_out."""

    def __init__(self, op: Callable, w_shape: tuple, shape=(2, 5, 4), bias: Optional[tuple] = None):
        super().__init__()
        self.fc_in = nn.Linear(shape[-1], 6)
        self.w = nn.Parameter(_randn(*w_shape, seed=3) / math.sqrt(w_shape[-1]))
        self.b = nn.Parameter(_randn(*bias, seed=4) * 0.1) if bias else None
        self.op = op
        with torch.no_grad():
            n = self._op(self.fc_in(torch.zeros(shape))).shape[-1]
        self.fc_out = nn.Linear(n, 3)

    def _op(self, h):
        return self.op(h, self.w) if self.b is None else self.op(h, self.w, self.b)

    def forward(self, x):
        return self.fc_out(self._op(self.fc_in(x)))


def _w_reads_H(w_in: int, w_out: int):
    """w's input axis joins H (role in); its output axis is a fresh free space that fc_out reads."""
    def expect(pg):
        assert free(pg, "fc_in.weight", 0) and same(pg, ("fc_in.weight", 0), ("w", w_in)), pg.summary()
        assert member(pg, "w", w_in).role == "in"
        assert free(pg, "w", w_out) and same(pg, ("w", w_out), ("fc_out.weight", 1)), pg.summary()
        assert not same(pg, ("w", w_in), ("w", w_out))
        assert pg.coverage() == 1.0
    return expect


MM = "x @ W: the contracted axes share one space; W's other axis is a fresh space"
for name, fn in {"torch.matmul": torch.matmul, "operator.matmul": operator.matmul,
                 "Tensor.matmul": lambda h, w: h.matmul(w)}.items():
    case(name, (lambda f: lambda: WithWeight(f, (6, 5)))(fn), _w_reads_H(0, 1), MM)
for name, fn in {"torch.mm": torch.mm, "Tensor.mm": lambda h, w: h.mm(w)}.items():
    case(name, (lambda f: lambda: WithWeight(f, (6, 5), shape=(2, 4)))(fn), _w_reads_H(0, 1), MM, lambda: (_randn(2, 4),))
for name, fn in {"torch.bmm": torch.bmm, "Tensor.bmm": lambda h, w: h.bmm(w)}.items():
    case(name, (lambda f: lambda: WithWeight(f, (2, 6, 5)))(fn), _w_reads_H(1, 2), MM)
for name, fn in {"torch.addmm": lambda h, w, b: torch.addmm(b, h, w), "Tensor.addmm": lambda h, w, b: b.addmm(h, w)}.items():
    def _addmm_expect(pg):
        _w_reads_H(0, 1)(pg)
        assert same(pg, ("b", 0), ("w", 1))
    case(name, (lambda f: lambda: WithWeight(f, (6, 5), shape=(2, 4), bias=(5,)))(fn), _addmm_expect,
         "addmm: a matmul whose bias joins the output space", lambda: (_randn(2, 4),))
case("torch.einsum projection", lambda: WithWeight(lambda h, w: torch.einsum("btc,oc->bto", h, w), (5, 6)),
     _w_reads_H(1, 0), "einsum: a letter contracted away joins its operands' spaces; kept letters carry theirs")
chain("q @ k^T contracts H with itself", lambda h: (h @ h.transpose(-1, -2)).softmax(-1) @ h, H_free,
      "attention scores contract the channels: H stays free")


def _heads(h):
    return h.view(2, 5, 2, 3).transpose(1, 2)


def _merge_heads(o):
    return o.transpose(1, 2).reshape(2, 5, 6)


def _H_blocks(G: int, g: int):
    def expect(pg):
        H_free(pg)
        for s in spaces(pg, "fc_in.weight", 0):
            assert pg.spaces[s].blocks == (G, g), pg.summary()
    return expect


chain("torch.einsum per head", lambda h: _merge_heads(torch.einsum(
    "bhts,bhsd->bhtd", torch.einsum("bhtd,bhsd->bhts", _heads(h), _heads(h)).softmax(-1), _heads(h))),
    _H_blocks(2, 3), "a per-head contraction: heads are blocks of the channel space")


class SDPA(nn.Module):
    """q = k from fc_qk, v from fc_v, 2 heads of 3 by view + transpose, sdpa, heads merged, fc_out."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.fc_qk, self.fc_v, self.fc_out, self.causal = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3), causal

    def forward(self, x):
        qk, v = _heads(self.fc_qk(x)), _heads(self.fc_v(x))
        return self.fc_out(_merge_heads(F.scaled_dot_product_attention(qk, qk, v, is_causal=self.causal)))


def _qk_v_tied(qk: str, v: str):
    """Rule 9: the q/k space and the v space are blocks of (heads, head dim) sharing one head
    permutation, each free within its heads."""
    def expect(pg):
        (a,), (b,) = spaces(pg, qk, 0), spaces(pg, v, 0)
        assert a != b and pg.spaces[a].blocks == pg.spaces[b].blocks == (2, 3), pg.summary()
        assert pg.spaces[a].head is not None and pg.spaces[a].head == pg.spaces[b].head
        assert pg.is_free(a) and pg.is_free(b) and pg.coverage() == 1.0
    return expect


case("F.scaled_dot_product_attention", SDPA, _qk_v_tied("fc_qk.weight", "fc_v.weight"),
     "sdpa: q/k and v are head-blocked spaces tied by one head permutation")
case("F.scaled_dot_product_attention causal", lambda: SDPA(True), _qk_v_tied("fc_qk.weight", "fc_v.weight"),
     "a causal mask is over tokens: the channel structure is the same")


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.attn, self.fc_out = nn.Linear(4, 6), nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc_in(x)
        return self.fc_out(self.attn(h, h, h, need_weights=False)[0])


def _mha(pg):
    assert free(pg, "fc_in.weight", 0) and same(pg, ("fc_in.weight", 0), ("attn.in_proj_weight", 1)), pg.summary()
    m = member(pg, "attn.in_proj_weight", 0)
    assert isinstance(m.layout, Concat) and len(m.layout.parts) == 3  # q, k, v rows
    qk, k, v = (p.space for p in m.layout.parts)
    assert qk == k and qk != v and pg.spaces[qk].head == pg.spaces[v].head
    assert pg.spaces[qk].blocks == pg.spaces[v].blocks == (2, 3)
    assert spaces(pg, "attn.out_proj.weight", 1) == {v}
    assert free(pg, "attn.out_proj.weight", 0) and same(pg, ("attn.out_proj.weight", 0), ("fc_out.weight", 1))


case("nn.MultiheadAttention", MHA, _mha, "MHA: packed q, k, v rows; q/k and v spaces tied by heads")


# --- rules 1, 2, 10: layers with weights ------------------------------------------------------------
chain("nn.Linear", nn.Identity(), H_free, "Linear: its rows are a fresh space, its columns join the input's")


class Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out = nn.LazyLinear(6), nn.Linear(6, 3)
        self.fc_in(torch.zeros(2, 4))  # materialised, as after a user's first forward

    def forward(self, x):
        return self.fc_out(self.fc_in(x))


case("nn.LazyLinear", Lazy, H_free, "LazyLinear once materialised is a Linear", lambda: (_randn(2, 4),))
case("F.linear", lambda: WithWeight(lambda h, w: F.linear(h, w), (5, 6)), _w_reads_H(1, 0),
     "F.linear with a parameter: the same as nn.Linear")
case("F.linear with a computed weight", lambda: WithWeight(lambda h, w: F.linear(h, w * 2.0), (5, 6)), _w_reads_H(1, 0),
     "a weight computed from a parameter elementwise keeps the parameter's channel axes")


def _conv_expect(w: str, w_in: int, w_out: int, kernel_axes=()):
    def expect(pg):
        assert free(pg, "conv_in.weight", 0) and same(pg, ("conv_in.weight", 0), (w, w_in)), pg.summary()
        assert free(pg, w, w_out) and same(pg, (w, w_out), ("conv_out.weight", 1)), pg.summary()
        for ax in kernel_axes:
            assert member(pg, w, ax) is None, f"kernel axis {ax} of {w} must be fixed\n{pg.summary()}"
    return expect


class Conv(nn.Module):
    """conv_in (1x1, 3 -> 6) -> layer -> conv_out (1x1, -> 3), any dimension."""

    def __init__(self, layer: Callable[[], nn.Module], d: int = 2, w_shape: Optional[tuple] = None):
        super().__init__()
        self.conv_in = _CONV[d](3, 6, 1)
        self.layer = layer()
        self.w = nn.Parameter(_randn(*w_shape, seed=5) * 0.2) if w_shape else None
        self.d = d
        with torch.no_grad():
            n = self._layer(self.conv_in(torch.zeros((2, 3) + (4,) * d))).shape[1]
        self.conv_out = _CONV[d](n, 3, 1)

    def _layer(self, h):
        return self.layer(h) if self.w is None else self.layer(h, self.w)

    def forward(self, x):
        return self.conv_out(self._layer(self.conv_in(x)))


def conv_case(id: str, layer: Callable, expect: Callable, spec: str, d: int = 2, w_shape=None):
    case(id, lambda: Conv(layer, d, w_shape), expect, spec, lambda: (_randn(2, 3, *(4,) * d),))


class FnLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h, w=None):
        return self.fn(h) if w is None else self.fn(h, w)


CONV = "conv: output channels are a fresh space, input channels join the input's; kernel axes are fixed"
for d in (1, 2, 3):
    conv_case(f"nn.Conv{d}d", (lambda d: lambda: _CONV[d](6, 5, 3, padding=1))(d), _conv_expect("layer.weight", 1, 0, (2,)), CONV, d)
    conv_case(f"F.conv{d}d", (lambda d: lambda: FnLayer(lambda h, w: getattr(F, f"conv{d}d")(h, w, padding=1)))(d),
              _conv_expect("w", 1, 0, tuple(range(2, 2 + d))), CONV, d, w_shape=(5, 6) + (3,) * d)
    conv_case(f"nn.ConvTranspose{d}d", (lambda d: lambda: getattr(nn, f"ConvTranspose{d}d")(6, 5, 3, padding=1))(d),
              _conv_expect("layer.weight", 0, 1, (2,)), "ConvTranspose stores [in, out, k...]", d)
    conv_case(f"F.conv_transpose{d}d",
              (lambda d: lambda: FnLayer(lambda h, w: getattr(F, f"conv_transpose{d}d")(h, w, padding=1)))(d),
              _conv_expect("w", 0, 1, tuple(range(2, 2 + d))), "F.conv_transpose with a parameter: [in, out, k...]", d,
              w_shape=(6, 5) + (3,) * d)
conv_case("F.conv2d weight standardisation", lambda: FnLayer(lambda h, w: F.conv2d(
    h, (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5), padding=1)),
    _conv_expect("w", 1, 0, (2, 3)), "a computed weight: channel axes from the consumer, kernel axes fixed",
    w_shape=(5, 6, 3, 3))


def _grouped(pg):
    """Grouped conv (2 groups): input and output spaces are blocks(2, .) sharing the block permutation."""
    (a,), (b,) = spaces(pg, "conv_in.weight", 0), spaces(pg, "layer.weight", 0)
    assert pg.spaces[a].blocks == (2, 3) and pg.spaces[b].blocks == (2, 4), pg.summary()
    assert pg.spaces[a].head == pg.spaces[b].head is not None and pg.is_free(a) and pg.is_free(b)


conv_case("nn.Conv2d grouped", lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), _grouped,
          "grouped conv: one block permutation on input and output, free within groups")


def _depthwise(pg):
    """Depthwise conv with multiplier 2: output unit o reads input unit o // 2: kron(H, inner 2)."""
    m = member(pg, "conv_out.weight", 1)
    assert isinstance(m.layout, Kron) and m.layout.inner_rep == 2, pg.summary()
    assert set(spaces_of(m.layout)) == spaces(pg, "conv_in.weight", 0) and free(pg, "conv_in.weight", 0)


conv_case("nn.Conv2d depthwise", lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6), _depthwise,
          "depthwise conv: the output space is the input space (times the multiplier)")


def _norm_in_H(*names: str):
    def expect(pg):
        C_free(pg)
        for n in names:
            assert same(pg, ("conv_in.weight", 0), (n, 0)), f"{n}\n{pg.summary()}"
    return expect


NORM = "channel norms: statistics are per channel, so their parameters and buffers join the channel space"
BN_PARAMS = ("layer.weight", "layer.bias", "layer.running_mean", "layer.running_var")
for d in (1, 2, 3):
    conv_case(f"nn.BatchNorm{d}d", (lambda d: lambda: getattr(nn, f"BatchNorm{d}d")(6))(d), _norm_in_H(*BN_PARAMS), NORM, d)
    conv_case(f"nn.InstanceNorm{d}d", (lambda d: lambda: getattr(nn, f"InstanceNorm{d}d")(6, affine=True))(d),
              _norm_in_H("layer.weight", "layer.bias"), NORM, d)
conv_case("nn.SyncBatchNorm", lambda: nn.SyncBatchNorm(6), _norm_in_H(*BN_PARAMS), NORM)
conv_case("nn.GroupNorm", lambda: nn.GroupNorm(2, 6), lambda pg: (_norm_in_H("layer.weight")(pg), _conv_blocks(pg, 2, 3)),
          "GroupNorm(G, C): the channel space is blocks(G, C / G)")
conv_case("nn.PReLU per channel", lambda: nn.PReLU(6), _norm_in_H("layer.weight"), "PReLU(C): one slope per channel")
case("nn.PReLU shared", lambda: Conv(lambda: nn.PReLU()), C_free, "PReLU(): one shared slope constrains nothing",
     lambda: (_randn(2, 3, 4, 4),), gap="PReLU's [1] slope is unified with the channel axis, which pins it")


def _conv_blocks(pg, G: int, g: int):
    (s,) = spaces(pg, "conv_in.weight", 0)
    assert pg.spaces[s].blocks == (G, g), pg.summary()


class FnNorm(nn.Module):
    """A functional norm with its own parameters and buffers."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.weight, self.bias = nn.Parameter(1 + 0.1 * _randn(6, seed=6)), nn.Parameter(0.1 * _randn(6, seed=7))
        self.register_buffer("running_mean", 0.1 * _randn(6, seed=8))
        self.register_buffer("running_var", 1 + 0.1 * _randn(6, seed=9).abs())

    def forward(self, h):
        if self.kind == "batch":
            return F.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias, False)
        if self.kind == "instance":
            return F.instance_norm(h, weight=self.weight, bias=self.bias)
        if self.kind == "group":
            return F.group_norm(h, 3, self.weight, self.bias)
        if self.kind == "layer":
            return F.layer_norm(h.transpose(1, -1), (6,), self.weight, self.bias).transpose(1, -1)
        return F.rms_norm(h.transpose(1, -1), (6,), self.weight).transpose(1, -1)


conv_case("F.batch_norm", lambda: FnNorm("batch"), _norm_in_H(*BN_PARAMS), NORM)
conv_case("F.instance_norm", lambda: FnNorm("instance"), _norm_in_H("layer.weight", "layer.bias"), NORM)
conv_case("F.group_norm", lambda: FnNorm("group"), lambda pg: (_norm_in_H("layer.weight")(pg), _conv_blocks(pg, 3, 2)),
          "F.group_norm(G): blocks(G, C / G)")
conv_case("F.layer_norm channels last", lambda: FnNorm("layer"), _norm_in_H("layer.weight", "layer.bias"),
          "LayerNorm over the permuted axis: invariant statistics, affine follows the axis")
conv_case("F.rms_norm channels last", lambda: FnNorm("rms"), _norm_in_H("layer.weight"),
          "RMSNorm over the permuted axis: invariant statistics, weight follows the axis")


def _ln(pg):
    H_free(pg)
    assert same(pg, ("fc_in.weight", 0), ("op.weight", 0)), pg.summary()


chain("nn.LayerNorm", nn.LayerNorm(6), _ln, "LayerNorm over the permuted axis: its affine joins the space")
chain("nn.RMSNorm", nn.RMSNorm(6), _ln, "RMSNorm over the permuted axis: its weight joins the space")
chain("nn.LayerNorm over tokens and channels", nn.LayerNorm((5, 6)), lambda pg: (H_free(pg), None)[1],
      "LayerNorm over (T, C): statistics invariant; the affine's channel axis joins the space")


class Embed(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.emb, self.fc_out = nn.Embedding(11, 6), nn.Linear(6, 3)

    def forward(self, t):
        e = F.embedding(t, self.emb.weight) if self.functional else self.emb(t)
        return self.fc_out(e)


def _embedding(pg):
    assert free(pg, "emb.weight", 1) and same(pg, ("emb.weight", 1), ("fc_out.weight", 1)), pg.summary()
    assert member(pg, "emb.weight", 0) is None  # rows are addressed by token id
    assert pg.coverage() == 1.0


TOKENS = (lambda: (torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2)),))
case("nn.Embedding", Embed, _embedding, "Embedding: its columns are a fresh space, its rows are fixed", TOKENS)
case("F.embedding", lambda: Embed(True), _embedding, "F.embedding with a parameter: the same", TOKENS)


# --- third-party rows (torchvision) -----------------------------------------------------------------
def _torchvision_cases() -> None:
    from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock
    from torchvision.ops import stochastic_depth

    chain("torchvision stochastic_depth", lambda h: stochastic_depth(h, 0.5, "row", training=False), H_free, PASS)

    class Swin(nn.Module):
        """Linear (3 -> 8) on [1, 4, 4, 3] -> a Swin block (2 heads, 2x2 windows) -> patch merging."""

        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(3, 8)
            self.block = SwinTransformerBlock(8, 2, [2, 2], [0, 0], stochastic_depth_prob=0.0)
            self.merge, self.fc_out = PatchMerging(8), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc_out(self.merge(self.block(self.fc_in(x))))

    def _swin(pg):
        assert free(pg, "fc_in.weight", 0), pg.summary()
        qkv = member(pg, "block.attn.qkv.weight", 0)
        assert isinstance(qkv.layout, Concat) and len(qkv.layout.parts) == 3
        assert free(pg, "merge.reduction.weight", 0)

    case("torchvision Swin block + patch merging", Swin, _swin,
         "window attention: packed qkv with head blocks; patch merging concatenates four phases",
         lambda: (_randn(1, 4, 4, 3),))

    from torchvision.models.video import mvit
    from torchvision.models.video.swin_transformer import PatchEmbed3d, ShiftedWindowAttention3d

    def _mvit_squeeze(h):
        y, dim = mvit._unsqueeze(h, 4, 1)  # [2, 5, 6] -> [2, 1, 5, 6]
        return mvit._squeeze(y * 2.0, 4, 1, dim)

    chain("torchvision mvit _unsqueeze / _squeeze", _mvit_squeeze, H_free,
          "MViT's helpers insert and remove a size-1 axis: the labels of the other axes move along")

    class Swin3d(nn.Module):
        """Video patches [1, 3, 2, 5, 5] -> 3-d patch embedding (conv 1x2x2, 3 -> 8, padded to the
        patch size) -> 3-d shifted window attention (2 heads, 2x2x2 windows) -> Linear (8 -> 3)."""

        def __init__(self):
            super().__init__()
            self.embed = PatchEmbed3d([1, 2, 2], 3, 8)
            self.attn, self.fc_out = ShiftedWindowAttention3d(8, [2, 2, 2], [1, 1, 1], 2), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc_out(self.attn(self.embed(x)))

    def _swin3d(pg):
        assert free(pg, "embed.proj.weight", 0) and same(pg, ("embed.proj.weight", 0), ("attn.qkv.weight", 1)), \
            pg.summary()
        qkv = member(pg, "attn.qkv.weight", 0)
        assert isinstance(qkv.layout, Concat) and len(qkv.layout.parts) == 3
        assert free(pg, "attn.proj.weight", 0) and same(pg, ("attn.proj.weight", 0), ("fc_out.weight", 1))

    case("torchvision 3-d patch embedding + shifted window attention", Swin3d, _swin3d,
         "3-d window attention: packed qkv with head blocks, relative position bias per head",
         lambda: (_randn(1, 3, 2, 5, 5),))


def _timm_cases() -> None:
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    def conv_like(pg):
        """conv_in -> op (a conv: its input axis reads conv_in's space, its output is a new free
        space that conv_out reads; a gain follows the output)."""
        assert free(pg, "conv_in.weight", 0) and same(pg, ("conv_in.weight", 0), ("op.weight", 1)), pg.summary()
        assert free(pg, "op.weight", 0) and same(pg, ("op.weight", 0), ("conv_out.weight", 1)), pg.summary()
        assert member(pg, "op.gain", 0) is None or same(pg, ("op.gain", 0), ("op.weight", 0)), pg.summary()
        assert pg.coverage() == 1.0

    # these classes are leaves when tracing needs them (timm's convention) or always (std convs)
    same_pad = "spatial SAME padding then the layer: channels as for Conv2d / pooling"
    conv_chain("timm Conv2dSame", Conv2dSame(6, 6, 3, stride=2, groups=2), conv_like, same_pad)
    conv_chain("timm MaxPool2dSame", MaxPool2dSame(3, stride=2), C_free, same_pad)
    conv_chain("timm AvgPool2dSame", AvgPool2dSame(3, stride=2), C_free, same_pad)
    std = "weight standardisation per output row: the conv rule holds (the gain follows the outputs)"
    conv_chain("timm StdConv2d", StdConv2d(6, 6, 3, padding=1, groups=3), conv_like, std)
    conv_chain("timm StdConv2dSame", StdConv2dSame(6, 6, 3, stride=2), conv_like, std)
    conv_chain("timm ScaledStdConv2d", ScaledStdConv2d(6, 6, 3, padding=1), conv_like, std)
    conv_chain("timm ScaledStdConv2dSame", ScaledStdConv2dSame(6, 6, 3, stride=2, groups=2), conv_like, std)
    # timm wraps these helpers where they are public module globals (what fx's autowrap patches)
    conv_chain("timm crossvit scale_image", lambda h: timm_scale_image(h, (7, 7)), C_free, "a spatial resize")
    conv_chain("timm pad_same", lambda h: timm_pad_same(h, [3, 3], [2, 2]), C_free, "SAME padding of H, W")

    def same_pad(h):
        p = timm_get_same_padding(h.shape[-1], 3, 2, 1)
        return F.pad(h, (p // 2, p - p // 2, p // 2, p - p // 2))

    conv_chain("timm get_same_padding", same_pad, C_free, "an int computed in Python from a size")

    class RelPos(nn.Module):
        """x [1, 4, 8] -> q/k/v (2 heads of 4) -> logits + mvitv2's decomposed position bias -> fc_out."""

        def __init__(self):
            super().__init__()
            self.qkv, self.fc_out = nn.Linear(8, 24), nn.Linear(8, 3)
            self.rel_pos_h, self.rel_pos_w = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            attn = timm_cal_rel_pos_type(q @ k.transpose(-2, -1), q, False, [2, 2], [2, 2], self.rel_pos_h,
                                          self.rel_pos_w)
            return self.fc_out((attn.softmax(-1) @ v).transpose(1, 2).reshape(1, 4, 8))

    def _rel_pos(pg):
        heads = [s for s in pg.spaces if s.kind == "head"]
        assert heads and all(pg.is_free(s.id) for s in heads), pg.summary()
        assert fixed(pg, "rel_pos_h", 1) and fixed(pg, "rel_pos_w", 1)
        assert any(s.within == "identity" for s in pg.spaces if s.blocks)  # q/k units stay in their heads

    case("timm mvitv2 cal_rel_pos_type", RelPos, _rel_pos,
         "a per-head bias from q and tables shared by all heads: heads move, q's units stay",
         lambda: (_randn(1, 4, 8),))


def _transformers_cases() -> None:
    from transformers import activations
    from transformers.pytorch_utils import Conv1D

    for name in ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
                 "PytorchGELUTanh", "AccurateGELUActivation", "MishActivation", "LinearActivation",
                 "LaplaceActivation", "ReLUSquaredActivation", "SiLUActivation"):
        cls = getattr(activations, name, None)
        if isinstance(cls, type):
            chain(f"transformers {name}", cls(), H_free, "as a leaf module, an activation is elementwise", leaves=(cls,))
    chain("transformers ClippedGELUActivation", activations.ClippedGELUActivation(-1.0, 1.0), H_free,
          "as a leaf module, an activation is elementwise", leaves=(activations.ClippedGELUActivation,))

    def _conv1d(pg):  # GPT-2's Conv1D stores [in, out]
        assert free(pg, "fc_in.weight", 0) and same(pg, ("fc_in.weight", 0), ("op.weight", 0)), pg.summary()
        assert member(pg, "op.weight", 0).role == "in"
        assert free(pg, "op.weight", 1) and same(pg, ("op.weight", 1), ("fc_out.weight", 1))

    chain("transformers Conv1D", Conv1D(5, 6), _conv1d, "Conv1D is x @ W + b with W [in, out]")
    chain("transformers Conv1D as a leaf", Conv1D(5, 6), _conv1d, "as a leaf module, the same", leaves=(Conv1D,))


for _cases in (_torchvision_cases, _transformers_cases):
    try:
        _cases()
    except ImportError:  # a test dependency that is missing: its rows are not loaded either
        pass
try:
    from timm.layers.padding import get_same_padding as timm_get_same_padding, pad_same as timm_pad_same
    from timm.models.crossvit import scale_image as timm_scale_image
    from timm.models.mvitv2 import cal_rel_pos_type as timm_cal_rel_pos_type
    _timm_cases()
except ImportError:  # timm is a test dependency; without it its rows are not loaded either
    pass


# Tensor.cuda on a CPU-only machine: exercised with .cuda() patched to the identity
CUDA_CASE = Case("Tensor.cuda", lambda: Chain(lambda h: h.cuda()), lambda: (_randn(2, 5, 4),), H_free, PASS)


def _cuda_patch():
    from unittest import mock
    return mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self)


# ---------------------------------------------------------------------------------------------
# the tests
_IDS = [c.id for c in CASES]
assert len(set(_IDS)) == len(_IDS), sorted({i for i in _IDS if _IDS.count(i) > 1})


def _prove(c: Case):
    model, x = _seeded(c.build), c.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, x, leaf_modules=c.leaves)
        for seed in (0, 1):
            rep = mf.check(model, x, seed=seed, pg=pg)
            assert rep.ok, f"{c.id}: max abs err {rep.max_abs_err} > {rep.tolerance}\n{pg.summary()}"
    return pg


@pytest.mark.parametrize("c", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=f"coverage gap: {c.gap}"))
                               if c.gap else c for c in CASES], ids=_IDS)
def test_op(c: Case):
    c.expect(_prove(c))


def test_tensor_cuda():
    with _cuda_patch():
        CUDA_CASE.expect(_prove(CUDA_CASE))


# ---------------------------------------------------------------------------------------------
# every row has a case
UNREACHABLE = {
    operator.iadd: "fx records `a += b` on a Proxy as operator.add",
    operator.isub: "fx records `a -= b` as operator.sub",
    operator.imul: "fx records `a *= b` as operator.mul",
    operator.itruediv: "fx records `a /= b` as operator.truediv",
    "__matmul__": "fx records a.__matmul__(b) as operator.matmul",
    "__len__": "fx refuses a.__len__() on a Proxy (len(a) under torch.fx.wrap('len') is the builtin len row)",
    "truediv": "torch.Tensor has no method truediv",
    F.sigmoid: "F.sigmoid calls input.sigmoid(): fx records the Tensor method",
    F.tanh: "F.tanh calls input.tanh(): fx records the Tensor method",
    F.upsample: "F.upsample calls F.interpolate: fx records F.interpolate",
    nn.LazyLinear: "a LazyLinear becomes an nn.Linear on its first forward, which tracing runs",
}


def _exercised(c: Case) -> set[str]:
    """Rule keys of the case's graph as mf.trace makes it for infer (library conventions included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(rule_keys(mf.trace(_seeded(c.build), c.inputs(), leaf_modules=c.leaves)))


def test_every_rule_key_has_a_per_op_case():
    import importlib
    import importlib.util
    for library in rule_table.LIBRARIES:  # load every third-party row whose library is installed
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(library)
    # ATen overloads (torch.export graphs) point at the same rule bodies as the fx keys; they
    # are exercised by tests/test_export.py and tests/test_hf.py, not one case per overload
    keys = {key_name(k) for k in rule_table.all_keys() if not isinstance(k, torch._ops.OpOverload)} \
        - {key_name(k) for k in UNREACHABLE}
    seen: set[str] = set()
    for c in CASES:
        seen |= _exercised(c)
    with _cuda_patch():
        seen |= _exercised(CUDA_CASE)
    missing = sorted(keys - seen)
    assert not missing, f"{len(missing)} rule keys have no per-op case in tests/test_ops.py: {missing}"


def test_unreachable_keys_stay_unreachable():
    """The rows in UNREACHABLE can never match a traced node; if torch.fx starts producing
    them, this fails and they need a real case."""
    assert not hasattr(torch.Tensor, "truediv")

    class Inplace(nn.Module):
        def forward(self, a, b):
            c = a.clone()
            c += b
            c -= b
            c *= b
            c /= 2.0
            return c + a.__matmul__(b.transpose(-1, -2)).sum()

    gm = mf.trace(Inplace(), (_randn(2, 3), _randn(2, 3)))
    targets = {n.target for n in gm.graph.nodes}
    assert not targets & {operator.iadd, operator.isub, operator.imul, operator.itruediv, "__matmul__"}

    class Len(nn.Module):
        def forward(self, a):
            return a * a.__len__()

    with pytest.raises(mf.TraceError, match="len"):
        mf.trace(Len(), (_randn(2, 3),), frontend="fx")

    class Deprecated(nn.Module):
        def forward(self, h):
            return F.sigmoid(h) + F.tanh(h) + F.upsample(h, scale_factor=2)[..., ::2, ::2]

    targets = {n.target for n in mf.trace(Deprecated(), (_randn(2, 3, 4, 4),)).graph.nodes}
    assert not targets & {F.sigmoid, F.tanh, F.upsample} and {"sigmoid", "tanh", F.interpolate} <= targets

    lazy = nn.Sequential(nn.LazyLinear(6), nn.Linear(6, 3))
    gm = mf.trace(lazy, (_randn(2, 4),))
    assert {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"} == {nn.Linear}
