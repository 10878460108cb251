"""The fuzzer's op catalogue: every op a generated model can contain.

A value of a generated model has a *kind* that says where its channel axis is:

- ``img`` [B, C, H, W], ``c1d`` [B, C, L], ``c3d`` [B, C, D, H, W] (channel axis 1),
- ``seq`` [B, T, C], ``vec`` [B, C] (channel axis last),
- ``heads`` [B, H, T, d] (attention heads), ``tok`` [B, T] (int64 token ids),
- ``other``: any float tensor (attention weights, Gram matrices); only generic ops read it.

An op is a :class:`FuzzOp` subclass with ``propose(r, x, env) -> (args, extra inputs) | None``
(choose hyper-parameters for primary input ``x``) and ``run(P, a, x, *extra) -> tensor(s)``.
``run`` is the op's forward and also builds its weights: ``P.param`` / ``P.buffer`` /
``P.const`` / ``P.module`` create the tensor or submodule while the model is built and fetch
it while it runs (so fx sees parameters and buffers as get_attr nodes, plain tensor attributes
as constants, modules as call_module). Multi-output ops return a tuple of known length.
``barrier = True`` marks ops that no rule may know (a wrapped function, a leaf module): the
inferred graph must record a barrier at them.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

FLOAT_KINDS = ("img", "c1d", "c3d", "seq", "vec", "heads", "other")
CHANNEL_KINDS = ("img", "c1d", "c3d", "seq", "vec")
SPATIAL_KINDS = ("img", "c1d", "c3d")
SPATIAL_DIMS = {"c1d": 1, "img": 2, "c3d": 3}


def channel_axis(kind: str, ndim: int) -> int:
    return ndim - 1 if kind in ("seq", "vec", "heads") else 1


class Rand:
    """Seeded choices for the generator."""

    def __init__(self, seed: int):
        self.g = np.random.default_rng(seed)

    def choice(self, items):
        items = list(items)
        return items[int(self.g.integers(len(items)))]

    def coin(self, p: float = 0.5) -> bool:
        return bool(self.g.random() < p)

    def int(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi]."""
        return int(self.g.integers(lo, hi + 1))

    def channels(self) -> int:
        return self.choice((3, 4, 6, 8))


class FuzzOp:
    """One row of the catalogue. Subclasses set ``name``, ``kinds``, ``family``."""
    name: str = ""
    kinds: tuple[str, ...] = ()
    family: str = ""
    barrier: bool = False
    weight: float = 1.0
    producer: bool = False     # makes a fresh channel space (a stem candidate)

    def propose(self, r: Rand, x: "Value", env: list["Value"]) -> Optional[tuple[dict, tuple[int, ...]]]:
        raise NotImplementedError

    def run(self, P: "Params", a: dict, x: torch.Tensor, *rest: torch.Tensor):
        raise NotImplementedError

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            OPS[cls.name] = cls()


OPS: dict[str, FuzzOp] = {}


class Value:
    """A value of the program: its id, shape, kind and dtype name."""
    __slots__ = ("id", "shape", "kind", "dtype")

    def __init__(self, id: int, shape: tuple[int, ...], kind: str, dtype: str = "float"):
        self.id, self.shape, self.kind, self.dtype = id, tuple(shape), kind, dtype

    @property
    def ch(self) -> int:
        return channel_axis(self.kind, len(self.shape))

    @property
    def C(self) -> int:
        return self.shape[self.ch]

    def __repr__(self) -> str:
        return f"v{self.id}{list(self.shape)}:{self.kind}"

    def __deepcopy__(self, memo):  # immutable
        return self


class Params:
    """Weights of one step: created while building (``building=True``), fetched while running."""

    def __init__(self, net: nn.Module, prefix: str, building: bool, seed: int = 0):
        self.net, self.prefix, self.building = net, prefix, building
        self.created: list[str] = []
        self.gen = torch.Generator().manual_seed(seed)

    def _get(self, name: str):
        return getattr(self.net, self.prefix + name)

    def _rand(self, shape, scale: Optional[float]) -> torch.Tensor:
        shape = tuple(shape)
        fan = math.prod(shape[1:]) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / math.sqrt(max(fan, 1))
        return torch.randn(shape, generator=self.gen) * s

    def _add(self, name: str, setter) -> None:
        full = self.prefix + name
        setter(full)
        self.created.append(full)

    def param(self, name: str, shape=(), scale: Optional[float] = None, value: Optional[torch.Tensor] = None):
        if self.building:
            t = value if value is not None else self._rand(shape, scale)
            self._add(name, lambda n: self.net.register_parameter(n, nn.Parameter(t)))
        return self._get(name)

    def buffer(self, name: str, shape=(), scale: Optional[float] = None, value: Optional[torch.Tensor] = None):
        if self.building:
            t = value if value is not None else self._rand(shape, scale)
            self._add(name, lambda n: self.net.register_buffer(n, t))
        return self._get(name)

    def const(self, name: str, shape=(), scale: Optional[float] = None, value: Optional[torch.Tensor] = None):
        """A plain tensor attribute: used in forward, not in the state dict."""
        if self.building:
            t = value if value is not None else self._rand(shape, scale)
            self._add(name, lambda n: object.__setattr__(self.net, n, t))
        return self._get(name)

    def module(self, name: str, factory=None) -> nn.Module:
        if self.building:
            torch.default_generator.manual_seed(int(self.gen.initial_seed()))  # torch.manual_seed is ~3 ms
            self._add(name, lambda n: self.net.add_module(n, factory()))
        return self._get(name)

    def tensor(self, name: str, source: str, shape, scale: Optional[float] = None):
        """A weight-like tensor from ``source``: param, buffer or const (plain attribute)."""
        return {"param": self.param, "buffer": self.buffer, "const": self.const}[source](name, shape, scale)


# ---------------------------------------------------------------------------------------------
# helpers
def _divisors(n: int, lo: int = 2) -> list[int]:
    return [d for d in range(lo, n) if n % d == 0]


def _bshape(x: "Value") -> tuple[int, ...]:
    """Shape of a per-channel tensor that broadcasts along x's channel axis."""
    s = [1] * len(x.shape)
    s[x.ch] = x.C
    return tuple(s[1:]) if x.ch != 0 else tuple(s)


def _same_shape(env: list["Value"], x: "Value", kinds=None) -> list["Value"]:
    return [v for v in env if v.id != x.id and v.shape == x.shape and v.dtype == "float"
            and (kinds is None or v.kind in kinds)]


_WEIGHT_SOURCES = ("param", "param", "buffer", "const", "ws", "scale", "flip", "view", "transposed", "inforward")


def weight(P: Params, a: dict, shape: tuple[int, ...], out_axis: int = 0, dtype=None) -> torch.Tensor:
    """A weight of ``shape`` from source ``a['w']`` (module-free forms of conv / linear)."""
    src = a["w"]
    if src in ("param", "buffer", "const"):
        return P.tensor("w", src, shape)
    if src == "ws":  # weight standardisation (timm StdConv, BiT)
        w = P.param("w", shape)
        dims = tuple(d for d in range(len(shape)) if d != out_axis)
        return (w - w.mean(dim=dims, keepdim=True)) / (w.std(dim=dims, keepdim=True) + 1e-5)
    if src == "scale":  # a per-output-channel gain times a base weight
        g = [1] * len(shape)
        g[out_axis] = shape[out_axis]
        return P.param("w", shape) * P.param("g", tuple(g), scale=1.0).abs()
    if src == "flip":  # a kernel read backwards (spatial axes of conv, input axis of linear)
        return P.param("w", shape).flip(-1)
    if src == "view":  # stored flat, viewed in forward
        return P.param("w", (math.prod(shape),), scale=1.0 / math.sqrt(max(math.prod(shape[1:]), 1))).view(shape)
    if src == "transposed":  # stored with the first two axes swapped
        return P.param("w", (shape[1], shape[0]) + tuple(shape[2:])).transpose(0, 1)
    if src == "inforward":  # made in forward: a constant no merge can touch
        return torch.ones(shape, dtype=dtype) / math.prod(shape[1:])
    raise ValueError(src)


def bias(P: Params, a: dict, n: int) -> Optional[torch.Tensor]:
    src = a.get("b")
    if src is None:
        return None
    if src == "computed":
        return P.param("b", (n,), scale=0.1) * 2.0
    return P.tensor("b", src, (n,), scale=0.1)


def _conv_groups(r: Rand, cin: int, allow: tuple[str, ...] = ("1", "1", "g", "dw")) -> tuple[int, int]:
    """(groups, out channels)."""
    mode = r.choice(allow)
    if mode == "g" and _divisors(cin):
        g = r.choice(_divisors(cin))
        return g, g * r.int(1, 3)
    if mode == "dw":
        return cin, cin * r.choice((1, 1, 2))
    return 1, r.channels()


_CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT_F = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_M = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT_M = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN_M = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_IN_M = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


# ---------------------------------------------------------------------------------------------
# convolutions
class ConvModule(FuzzOp):
    name, kinds, family = "conv.module", SPATIAL_KINDS, "conv"
    producer = True
    weight = 3.0

    def propose(self, r, x, env):
        groups, out = _conv_groups(r, x.C)
        k = r.choice((1, 3))
        return dict(out=out, k=k, stride=r.choice((1, 1, 2)), groups=groups, bias=r.coin()), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        m = P.module("m", lambda: _CONV_M[d](a["_shape"][1], a["out"], a["k"], a["stride"], a["k"] // 2,
                                             groups=a["groups"], bias=a["bias"]))
        return m(x)


class ConvFunction(FuzzOp):
    name, kinds, family = "conv.fn", SPATIAL_KINDS, "conv"
    producer = True
    weight = 3.0

    def propose(self, r, x, env):
        groups, out = _conv_groups(r, x.C)
        return dict(out=out, k=r.choice((1, 3)), stride=r.choice((1, 1, 2)), groups=groups,
                    w=r.choice(_WEIGHT_SOURCES), b=r.choice((None, "param", "buffer", "computed")),
                    kw=r.coin()), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        w = weight(P, a, (a["out"], a["_shape"][1] // a["groups"]) + (a["k"],) * d, dtype=x.dtype)
        b = bias(P, a, a["out"])
        if a["kw"]:
            return _CONV_F[d](x, w, b, stride=a["stride"], padding=a["k"] // 2, groups=a["groups"])
        return _CONV_F[d](x, w, b, a["stride"], a["k"] // 2, 1, a["groups"])


def _standardized(w: torch.Tensor, nd: int) -> torch.Tensor:
    dims = tuple(range(1, nd))
    return (w - w.mean(dim=dims, keepdim=True)) / (w.std(dim=dims, keepdim=True) + 1e-5)


class StdConv1d(nn.Conv1d):
    """A user subclass with its own forward: fx traces into it (F.conv1d on a computed weight)."""

    def forward(self, x):
        return F.conv1d(x, _standardized(self.weight, 3), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, _standardized(self.weight, 4), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv3d(nn.Conv3d):
    def forward(self, x):
        return F.conv3d(x, _standardized(self.weight, 5), self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainConv2d(nn.Conv2d):
    """torchvision's Conv3DSimple pattern: a subclass whose forward calls the parent's."""

    def forward(self, x):
        return super().forward(x)


_STD = {1: StdConv1d, 2: StdConv2d, 3: StdConv3d}


class ConvSubclass(FuzzOp):
    name, kinds, family = "conv.subclass", SPATIAL_KINDS, "conv"
    producer = True

    def propose(self, r, x, env):
        groups, out = _conv_groups(r, x.C)
        return dict(out=out, k=r.choice((1, 3)), groups=groups, bias=r.coin(),
                    cls=r.choice(("std", "plain") if x.kind == "img" else ("std",))), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        cls = _STD[d] if a["cls"] == "std" else PlainConv2d
        return P.module("m", lambda: cls(a["_shape"][1], a["out"], a["k"], 1, a["k"] // 2, groups=a["groups"],
                                         bias=a["bias"]))(x)


class ConvTransposeModule(FuzzOp):
    name, kinds, family = "conv_transpose.module", SPATIAL_KINDS, "conv"
    producer = True

    def propose(self, r, x, env):
        groups, out = _conv_groups(r, x.C, ("1", "1", "g"))
        up = r.coin(0.3)
        return dict(out=out, k=2 if up else 3, stride=2 if up else 1, pad=0 if up else 1, groups=groups,
                    bias=r.coin()), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        return P.module("m", lambda: _CONVT_M[d](a["_shape"][1], a["out"], a["k"], a["stride"], a["pad"],
                                                 groups=a["groups"], bias=a["bias"]))(x)


class ConvTransposeFunction(FuzzOp):
    name, kinds, family = "conv_transpose.fn", SPATIAL_KINDS, "conv"
    producer = True

    def propose(self, r, x, env):
        groups, out = _conv_groups(r, x.C, ("1", "1", "g"))
        return dict(out=out, groups=groups, w=r.choice(("param", "param", "buffer", "ws", "flip", "const")),
                    b=r.choice((None, "param"))), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        w = weight(P, a, (a["_shape"][1], a["out"] // a["groups"]) + (3,) * d, out_axis=1, dtype=x.dtype)
        return _CONVT_F[d](x, w, bias(P, a, a["out"]), 1, 1, 0, a["groups"])


# ---------------------------------------------------------------------------------------------
# linear-like
class LinearModule(FuzzOp):
    name, kinds, family = "linear.module", ("seq", "vec", "heads"), "linear"
    producer = True
    weight = 3.0

    def propose(self, r, x, env):
        return dict(out=r.channels(), bias=r.coin(0.7)), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.Linear(x.shape[-1], a["out"], bias=a["bias"]))(x)


class LinearFunction(FuzzOp):
    name, kinds, family = "linear.fn", ("seq", "vec"), "linear"
    producer = True
    weight = 2.0

    def propose(self, r, x, env):
        return dict(out=r.channels(), w=r.choice(_WEIGHT_SOURCES), b=r.choice((None, "param", "buffer", "computed"))), ()

    def run(self, P, a, x):
        return F.linear(x, weight(P, a, (a["out"], a["_shape"][-1]), dtype=x.dtype), bias(P, a, a["out"]))


class LinearTied(FuzzOp):
    """One nn.Linear called twice (rule 12: a shared parameter unifies its call sites)."""
    name, kinds, family = "linear.tied", ("seq", "vec"), "linear"

    def propose(self, r, x, env):
        return {}, ()

    def run(self, P, a, x):
        m = P.module("m", lambda: nn.Linear(x.shape[-1], x.shape[-1]))
        return m(torch.tanh(m(x)))


class MatmulParam(FuzzOp):
    """x @ W with W [in, out] (GPT-2 Conv1D layout)."""
    name, kinds, family = "matmul.param", ("seq", "vec"), "linear"
    producer = True

    def propose(self, r, x, env):
        return dict(out=r.channels(), form=r.choice(("@", "torch.matmul", "method", "mm")),
                    src=r.choice(("param", "param", "buffer", "const"))), ()

    def run(self, P, a, x):
        C = a["_shape"][-1]
        w = P.tensor("w", a["src"], (C, a["out"]), scale=1 / math.sqrt(C))
        if a["form"] == "@":
            return x @ w
        if a["form"] == "torch.matmul":
            return torch.matmul(x, w)
        if a["form"] == "mm" and len(a["_shape"]) == 2:
            return torch.mm(x, w)
        return x.matmul(w)


class Addmm(FuzzOp):
    name, kinds, family = "addmm", ("seq", "vec"), "linear"
    producer = True

    def propose(self, r, x, env):
        return dict(out=r.channels(), stored=r.choice(("oi", "io")), method=r.coin()), ()

    def run(self, P, a, x):
        S = a["_shape"]
        C = S[-1]
        b = P.param("b", (a["out"],), scale=0.1)
        w = P.param("w", (a["out"], C)).t() if a["stored"] == "oi" else P.param("w", (C, a["out"]))
        x2 = x.reshape(-1, C) if len(S) != 2 else x
        y = b.addmm(x2, w) if a["method"] else torch.addmm(b, x2, w)
        return y.view(tuple(S[:-1]) + (a["out"],)) if len(S) != 2 else y


class EinsumProjection(FuzzOp):
    """A weight contracted with the channel axis by einsum ('bchw,oc->bohw', '...c,oc->...o')."""
    name, kinds, family = "einsum.proj", CHANNEL_KINDS, "einsum"
    producer = True
    weight = 1.5

    def propose(self, r, x, env):
        return dict(out=r.channels(), eq=r.choice(("explicit", "ellipsis"))), ()

    def run(self, P, a, x):
        S, ch = a["_shape"], a["_ch"]
        w = P.param("w", (a["out"], S[ch]))
        if a["eq"] == "ellipsis" and ch == len(S) - 1:
            return torch.einsum("...c,oc->...o", x, w)
        letters = "bpqrs"[: len(S)]
        return torch.einsum(f"{letters[:ch]}c{letters[ch + 1:]},oc->{letters[:ch]}o{letters[ch + 1:]}", x, w)


class EinsumScale(FuzzOp):
    """einsum with a per-channel parameter kept in the output ('...c,c->...c')."""
    name, kinds, family = "einsum.scale", ("seq", "vec"), "einsum"

    def propose(self, r, x, env):
        return {}, ()

    def run(self, P, a, x):
        return torch.einsum("...c,c->...c", x, P.param("g", (a["_shape"][-1],), scale=1.0))


class EinsumAttention(FuzzOp):
    """Token-token scores by einsum, softmax, then mixing another sequence: attention by einsum."""
    name, kinds, family = "einsum.attention", ("seq",), "attention"

    def propose(self, r, x, env):
        vs = [v for v in env if v.kind == "seq" and v.shape[:2] == x.shape[:2]]
        return {}, (r.choice(vs).id,)

    def run(self, P, a, x, v):
        s = torch.einsum("btc,bsc->bts", x, x) / math.sqrt(a["_shape"][-1])
        return torch.einsum("bts,bsd->btd", s.softmax(-1), v)


class Bilinear(FuzzOp):
    """nn.Bilinear: a torch.nn module without a rule (a barrier)."""
    name, kinds, family = "bilinear.module", ("vec", "seq"), "unruled"

    def propose(self, r, x, env):
        return dict(out=r.channels()), ()

    def run(self, P, a, x):
        C = a["_shape"][-1]
        return P.module("m", lambda: nn.Bilinear(C, C, a["out"]))(x, x)


VOCAB = 11


class EmbeddingModule(FuzzOp):
    name, kinds, family = "embedding.module", ("tok",), "embedding"
    producer = True
    weight = 4.0

    def propose(self, r, x, env):
        return dict(out=r.channels(), pad=r.choice((None, None, 0)), kind="seq"), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.Embedding(VOCAB, a["out"], padding_idx=a["pad"]))(x)


class EmbeddingFunction(FuzzOp):
    name, kinds, family = "embedding.fn", ("tok",), "embedding"
    producer = True
    weight = 2.0

    def propose(self, r, x, env):
        return dict(out=r.channels(), src=r.choice(("param", "param", "buffer", "const")), kind="seq"), ()

    def run(self, P, a, x):
        return F.embedding(x, P.tensor("w", a["src"], (VOCAB, a["out"]), scale=1.0))


# ---------------------------------------------------------------------------------------------
# norms
class BatchNormModule(FuzzOp):
    name, kinds, family = "batchnorm.module", ("img", "c1d", "c3d", "vec", "seq"), "norm"
    weight = 2.0

    def propose(self, r, x, env):
        return dict(affine=r.coin(0.8), track=r.coin(0.9)), ()

    def run(self, P, a, x):
        S = a["_shape"]
        d = {2: 1, 3: 1, 4: 2, 5: 3}[len(S)]
        return P.module("m", lambda: _BN_M[d](S[1], affine=a["affine"], track_running_stats=a["track"]))(x)


class BatchNormFunction(FuzzOp):
    name, kinds, family = "batchnorm.fn", ("img", "c1d", "c3d", "vec"), "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin(0.7), kw=r.coin()), ()

    def run(self, P, a, x):
        C = a["_shape"][1]
        rm = P.buffer("rm", (C,), scale=0.1)
        rv = P.buffer("rv", value=torch.rand(C, generator=P.gen) + 0.5 if P.building else None)
        w = P.param("w", (C,), scale=1.0) if a["affine"] else None
        b = P.param("b", (C,), scale=0.1) if a["affine"] else None
        if a["kw"]:
            return F.batch_norm(x, rm, rv, weight=w, bias=b, training=False)
        return F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)


class InstanceNormModule(FuzzOp):
    name, kinds, family = "instancenorm.module", SPATIAL_KINDS, "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin(), track=r.coin(0.3)), ()

    def run(self, P, a, x):
        S = a["_shape"]
        return P.module("m", lambda: _IN_M[len(S) - 2](S[1], affine=a["affine"], track_running_stats=a["track"]))(x)


class InstanceNormFunction(FuzzOp):
    name, kinds, family = "instancenorm.fn", SPATIAL_KINDS, "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin()), ()

    def run(self, P, a, x):
        if not a["affine"]:
            return F.instance_norm(x)
        C = a["_shape"][1]
        return F.instance_norm(x, weight=P.param("w", (C,), scale=1.0), bias=P.param("b", (C,), scale=0.1))


class GroupNormModule(FuzzOp):
    name, kinds, family = "groupnorm.module", ("img", "c1d", "c3d", "vec"), "norm"

    def propose(self, r, x, env):
        return dict(G=r.choice([1] + _divisors(x.C) + [x.C]), affine=r.coin(0.8)), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.GroupNorm(a["G"], a["_shape"][1], affine=a["affine"]))(x)


class GroupNormFunction(FuzzOp):
    name, kinds, family = "groupnorm.fn", ("img", "c1d", "c3d"), "norm"

    def propose(self, r, x, env):
        return dict(G=r.choice([1] + _divisors(x.C) + [x.C])), ()

    def run(self, P, a, x):
        C = a["_shape"][1]
        return F.group_norm(x, a["G"], P.param("w", (C,), scale=1.0), P.param("b", (C,), scale=0.1))


class LayerNormModule(FuzzOp):
    name, kinds, family = "layernorm.module", ("seq", "vec", "img", "heads"), "norm"
    weight = 2.0

    def propose(self, r, x, env):
        over = r.choice(("chw", "last")) if x.kind == "img" else "last"
        return dict(over=over, affine=r.coin(0.8), bias=r.coin(0.8)), ()

    def run(self, P, a, x):
        S = a["_shape"]
        shape = tuple(S[1:]) if a["over"] == "chw" else (S[-1],)
        return P.module("m", lambda: nn.LayerNorm(shape, elementwise_affine=a["affine"], bias=a["bias"]))(x)


class LayerNormFunction(FuzzOp):
    name, kinds, family = "layernorm.fn", ("seq", "vec", "img"), "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin(0.7)), ()

    def run(self, P, a, x):
        C = a["_shape"][-1]
        if not a["affine"]:
            return F.layer_norm(x, (C,))
        return F.layer_norm(x, (C,), P.param("w", (C,), scale=1.0), P.param("b", (C,), scale=0.1))


class LayerNormChannelsLast(FuzzOp):
    """ConvNeXt: permute NCHW -> NHWC, LayerNorm over C, permute back."""
    name, kinds, family = "layernorm.channels_last", ("img",), "norm"

    def propose(self, r, x, env):
        return dict(form=r.choice(("permute", "movedim"))), ()

    def run(self, P, a, x):
        m = P.module("m", lambda: nn.LayerNorm(a["_shape"][1]))
        if a["form"] == "permute":
            return m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return m(x.movedim(1, -1)).movedim(-1, 1)


class RMSNormModule(FuzzOp):
    name, kinds, family = "rmsnorm.module", ("seq", "vec"), "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin(0.8)), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.RMSNorm(a["_shape"][-1], elementwise_affine=a["affine"]))(x)


class RMSNormFunction(FuzzOp):
    name, kinds, family = "rmsnorm.fn", ("seq", "vec"), "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin(0.7)), ()

    def run(self, P, a, x):
        C = a["_shape"][-1]
        return F.rms_norm(x, (C,), P.param("w", (C,), scale=1.0) if a["affine"] else None, eps=1e-6)


class PReLUModule(FuzzOp):
    name, kinds, family = "prelu.module", ("img", "c1d", "c3d", "vec"), "activation"

    def propose(self, r, x, env):
        return dict(n=r.choice((1, x.C))), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.PReLU(a["n"], init=0.2))(x)


class PReLUFunction(FuzzOp):
    name, kinds, family = "prelu.fn", ("img", "c1d", "vec"), "activation"

    def propose(self, r, x, env):
        return {}, ()

    def run(self, P, a, x):
        return F.prelu(x, P.param("w", (a["_shape"][1],), scale=0.3))


# ---------------------------------------------------------------------------------------------
# elementwise and per-channel
_ACT_MODULES = {"ReLU": nn.ReLU, "GELU": nn.GELU, "SiLU": nn.SiLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid,
                "LeakyReLU": nn.LeakyReLU, "Softplus": nn.Softplus, "Hardswish": nn.Hardswish, "ELU": nn.ELU,
                "Dropout": nn.Dropout, "Identity": nn.Identity, "Mish": nn.Mish, "ReLU6": nn.ReLU6}
_ACT_FUNCTIONS = {"F.relu": F.relu, "F.gelu": F.gelu, "F.silu": F.silu, "torch.tanh": torch.tanh,
                  "torch.sigmoid": torch.sigmoid, "F.leaky_relu": F.leaky_relu, "F.softplus": F.softplus,
                  "F.elu": F.elu, "F.hardswish": F.hardswish, "torch.abs": torch.abs, "torch.erf": torch.erf,
                  "torch.sin": torch.sin, "F.dropout": F.dropout, "torch.neg": torch.neg}
_ACT_METHODS = ("relu", "sigmoid", "tanh", "abs", "neg", "clone", "contiguous", "detach", "sin", "square")


class ActivationModule(FuzzOp):
    name, kinds, family = "activation.module", FLOAT_KINDS, "activation"
    weight = 2.0

    def propose(self, r, x, env):
        return dict(cls=r.choice(sorted(_ACT_MODULES))), ()

    def run(self, P, a, x):
        return P.module("m", _ACT_MODULES[a["cls"]])(x)


class ActivationFunction(FuzzOp):
    name, kinds, family = "activation.fn", FLOAT_KINDS, "activation"
    weight = 2.0

    def propose(self, r, x, env):
        return dict(fn=r.choice(sorted(_ACT_FUNCTIONS))), ()

    def run(self, P, a, x):
        if a["fn"] == "F.dropout":
            return F.dropout(x, 0.2, training=False)
        return _ACT_FUNCTIONS[a["fn"]](x)


class ActivationMethod(FuzzOp):
    name, kinds, family = "activation.method", FLOAT_KINDS, "activation"

    def propose(self, r, x, env):
        return dict(m=r.choice(_ACT_METHODS + ("clamp", "to"))), ()

    def run(self, P, a, x):
        if a["m"] == "clamp":
            return x.clamp(-1.5, 1.5)
        if a["m"] == "to":
            return x.to(x.dtype)
        if a["m"] == "square":
            return x.square() * 0.5
        return getattr(x, a["m"])()


class ScalarArith(FuzzOp):
    name, kinds, family = "scalar", FLOAT_KINDS, "elementwise"

    def propose(self, r, x, env):
        return dict(form=r.choice(("x*0.5+1", "x/3-1", "2*x", "x**2", "1-x", "torch.mul"))), ()

    def run(self, P, a, x):
        return {"x*0.5+1": lambda: x * 0.5 + 1, "x/3-1": lambda: x / 3 - 1, "2*x": lambda: 2 * x,
                "x**2": lambda: 0.5 * x ** 2, "1-x": lambda: 1 - x, "torch.mul": lambda: torch.mul(x, 0.7)}[a["form"]]()


class Binary(FuzzOp):
    """Two values of one shape combined elementwise (rule 4): residual add, gating, max, where."""
    name, kinds, family = "binary", FLOAT_KINDS, "elementwise"
    weight = 3.0

    def propose(self, r, x, env):
        others = _same_shape(env, x)
        if not others:
            return None
        return dict(form=r.choice(("+", "-", "*", "torch.add", "add_method", "gate", "torch.maximum", "where",
                                   "lerp"))), (r.choice(others).id,)

    def run(self, P, a, x, y):
        return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y,
                "torch.add": lambda: torch.add(x, y, alpha=0.5), "add_method": lambda: x.add(y),
                "gate": lambda: x * torch.sigmoid(y), "torch.maximum": lambda: torch.maximum(x, y),
                "lerp": lambda: torch.lerp(x, y, 0.3), "where": lambda: torch.where(y > 0, x, y)}[a["form"]]()


class BroadcastGate(FuzzOp):
    """x * sigmoid(s) where s broadcasts to x (squeeze-excite gates)."""
    name, kinds, family = "gate.broadcast", FLOAT_KINDS, "elementwise"
    weight = 2.0

    def propose(self, r, x, env):
        def ok(v):
            return v.id != x.id and v.dtype == "float" and len(v.shape) <= len(x.shape) and v.shape != x.shape and \
                all(b in (1, c) for b, c in zip(v.shape[::-1], x.shape[::-1]))
        cands = [v for v in env if ok(v)]
        if not cands:
            return None
        return dict(op=r.choice(("*", "+"))), (r.choice(cands).id,)

    def run(self, P, a, x, s):
        return x * torch.sigmoid(s) if a["op"] == "*" else x + s


class ChannelAffine(FuzzOp):
    """x * g + b with per-channel g, b from every kind of source (layer-scale, plain tensors,
    constants made in forward)."""
    name, kinds, family = "channel_affine", CHANNEL_KINDS, "elementwise"
    weight = 2.0

    def propose(self, r, x, env):
        return dict(src=r.choice(("param", "param", "buffer", "const", "computed", "inforward", "arange", "scalar")),
                    index=r.choice(("view", "getitem", "shaped"))), ()

    def run(self, P, a, x):
        S, ch, src = a["_shape"], a["_ch"], a["src"]
        C, nd = S[ch], len(S)

        def per_channel(name):
            if src in ("param", "buffer", "const"):
                return P.tensor(name, src, (C,), scale=1.0)
            if src == "computed":
                return P.param(name, (C,), scale=0.3).exp()
            if src == "scalar":
                return P.param(name, (1,), scale=1.0)
            if src == "arange":
                return torch.arange(C, dtype=x.dtype) / C
            return torch.ones(C, dtype=x.dtype) * 0.5

        if a["index"] == "shaped" and src in ("param", "buffer", "const") and ch != nd - 1:
            shape = [1] * (nd - 1)
            shape[ch - 1] = C
            return x * P.tensor("gs", src, tuple(shape), scale=1.0) + per_channel("b").view(shape)
        g, b = per_channel("g"), per_channel("b")
        if ch == nd - 1:
            return x * g + b
        if a["index"] == "getitem":
            idx = (None, slice(None)) + (None,) * (nd - 2)
            return x * g[idx] + b[idx]
        shape = (1, -1) + (1,) * (nd - 2)
        return x * g.view(shape) + b.reshape(shape)


class MaskedFill(FuzzOp):
    name, kinds, family = "masked_fill", CHANNEL_KINDS + ("other",), "elementwise"

    def propose(self, r, x, env):
        srcs = ("self", "self_method", "inplace")
        if x.kind in CHANNEL_KINDS:
            srcs += ("bool_buffer", "arange")
        return dict(mask=r.choice(srcs)), ()

    def run(self, P, a, x):
        m = a["mask"]
        if m == "self":
            return torch.masked_fill(x, x > 0.5, 0.0)
        if m == "self_method":
            return x.masked_fill(x < -0.5, -1.0)
        if m == "inplace":
            y = x.clone()
            return y.masked_fill_(y.abs() > 1.0, 0.25)
        S, ch = a["_shape"], a["_ch"]
        C = S[ch]
        shape = [1] * len(S)
        shape[ch] = C
        if m == "bool_buffer":
            mask = P.buffer("mask", value=(torch.arange(C) % 3 == 0) if P.building else None)
            return x.masked_fill(mask.view(shape), 0.0)
        return x.masked_fill((torch.arange(C) % 2 == 0).view(shape), 0.0)


class ChannelReduce(FuzzOp):
    """Reductions over the channel axis whose result is broadcast back (rule 6): centring,
    normalising, softmax."""
    name, kinds, family = "reduce.channel", CHANNEL_KINDS + ("heads",), "reduction"
    weight = 1.5

    def propose(self, r, x, env):
        return dict(form=r.choice(("center", "norm", "F.normalize", "softmax", "amax", "logsumexp", "var", "sum",
                                   "linalg_norm", "log_softmax"))), ()

    def run(self, P, a, x):
        ch, f = a["_ch"], a["form"]
        return {"center": lambda: x - x.mean(dim=ch, keepdim=True),
                "norm": lambda: x / (x.norm(dim=ch, keepdim=True) + 1e-3),
                "F.normalize": lambda: F.normalize(x, dim=ch),
                "softmax": lambda: F.softmax(x, dim=ch),
                "log_softmax": lambda: torch.log_softmax(x, ch),
                "amax": lambda: x - x.amax(ch, keepdim=True),
                "logsumexp": lambda: x - torch.logsumexp(x, dim=ch, keepdim=True),
                "var": lambda: x / (x.var(dim=ch, keepdim=True) + 1.0).sqrt(),
                "linalg_norm": lambda: x / (torch.linalg.vector_norm(x, dim=ch, keepdim=True) + 1e-3),
                "sum": lambda: x * torch.sum(x, ch, keepdim=True) / a["_shape"][ch]}[f]()


class AlongAxis(FuzzOp):
    """Ops along one axis: cumsum / sort / flip / roll / cummax / gather / index_select. Along
    the channel axis they pin it (rule 6); along another axis they leave the channels free."""
    name, kinds, family = "along_axis", CHANNEL_KINDS + ("heads",), "along_axis"
    weight = 1.5

    def propose(self, r, x, env):
        axes = list(range(1, len(x.shape)))
        return dict(form=r.choice(("cumsum", "flip", "roll", "sort", "cummax", "torch.cumsum", "torch.flip",
                                   "argsort_gather", "topk", "index_select")),
                    axis=r.choice(axes + [x.ch])), ()

    def run(self, P, a, x):
        d, f = a["axis"], a["form"]
        n = a["_shape"][d]
        return {"cumsum": lambda: x.cumsum(d) / n, "torch.cumsum": lambda: torch.cumsum(x, dim=d) / n,
                "flip": lambda: x.flip(d), "torch.flip": lambda: torch.flip(x, dims=(d,)),
                "roll": lambda: torch.roll(x, 1, d), "sort": lambda: x.sort(d)[0],
                "cummax": lambda: torch.cummax(x, d)[0], "topk": lambda: x.topk(n, dim=d)[0],
                "index_select": lambda: x.index_select(d, torch.arange(n - 1, -1, -1)),
                "argsort_gather": lambda: x.gather(d, x.argsort(d))}[f]()


class Reduce(FuzzOp):
    """Reductions that drop axes: spatial / token pooling to a vector, a sum over heads."""
    name, kinds, family = "reduce.drop", ("img", "c1d", "c3d", "seq", "heads"), "reduction"
    weight = 2.0

    def propose(self, r, x, env):
        if x.kind in SPATIAL_KINDS:
            return dict(form=r.choice(("mean", "amax", "sum", "torch.mean", "max")), kind="vec"), ()
        if x.kind == "heads":
            return dict(form=r.choice(("heads_mean", "heads_sum")), kind="other"), ()
        return dict(form=r.choice(("mean", "amax", "max", "first", "last")), kind="vec"), ()

    def run(self, P, a, x):
        f, S = a["form"], a["_shape"]
        if a["_kin"] == "seq":
            return {"first": lambda: x[:, 0], "last": lambda: x[:, -1, :], "max": lambda: x.max(dim=1)[0],
                    "mean": lambda: x.mean(1), "amax": lambda: x.amax(1)}[f]()
        if f.startswith("heads"):
            return x.mean(1) if f == "heads_mean" else torch.sum(x, dim=1)
        dims = tuple(range(2, len(S)))
        return {"mean": lambda: x.mean(dims), "torch.mean": lambda: torch.mean(x, dim=dims),
                "sum": lambda: x.sum(dims) / math.prod(S[2:]), "max": lambda: x.flatten(2).max(-1)[0],
                "amax": lambda: x.amax(dim=dims)}[f]()


# ---------------------------------------------------------------------------------------------
# shape
class Flatten(FuzzOp):
    """Spatial tensor to a vector: flatten / view / reshape / nn.Flatten (kron layouts)."""
    name, kinds, family = "flatten", SPATIAL_KINDS + ("heads",), "reshape"
    weight = 2.0

    def propose(self, r, x, env):
        if math.prod(x.shape[1:]) > 256:
            return None
        return dict(form=r.choice(("flatten", "torch.flatten", "view", "reshape", "nn.Flatten", "pool_flatten")),
                    kind="vec"), ()

    def run(self, P, a, x):
        f, S = a["form"], a["_shape"]
        if f == "flatten":
            return x.flatten(1)
        if f == "torch.flatten":
            return torch.flatten(x, 1)
        if f == "view":
            return x.view(x.shape[0], -1)
        if f == "reshape":
            return x.reshape(x.size(0), -1)
        if f == "nn.Flatten":
            return P.module("m", nn.Flatten)(x)
        if len(S) == 4 and a["_kin"] == "img":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x.mean(tuple(range(2, len(S))))


class ToSeq(FuzzOp):
    """Spatial tensor to tokens [B, HW, C] (ViT patch tokens), or c1d transposed."""
    name, kinds, family = "to_seq", ("img", "c1d"), "reshape"
    weight = 1.5

    def propose(self, r, x, env):
        return dict(form=r.choice(("flatten_transpose", "permute_reshape", "movedim")), kind="seq"), ()

    def run(self, P, a, x):
        f, S = a["form"], a["_shape"]
        if len(S) == 3:
            return x.transpose(1, 2) if f != "movedim" else x.movedim(1, 2)
        if f == "flatten_transpose":
            return x.flatten(2).transpose(1, 2)
        if f == "permute_reshape":
            B, C, H, W = S
            return x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        return torch.movedim(x, 1, -1).flatten(1, 2)


class SeqTo(FuzzOp):
    """Tokens back to a spatial layout: [B, T, C] -> [B, C, T] or [B, C, h, w]."""
    name, kinds, family = "seq_to", ("seq",), "reshape"

    def propose(self, r, x, env):
        T = x.shape[1]
        hw = [(h, T // h) for h in range(2, T) if T % h == 0 and T // h > 1]
        if hw and r.coin():
            h, w = r.choice(hw)
            return dict(h=h, w=w, kind="img"), ()
        return dict(kind="c1d", form=r.choice(("transpose", "permute", "swapaxes"))), ()

    def run(self, P, a, x):
        if a["kind"] == "img":
            B, T, C = a["_shape"]
            return x.transpose(1, 2).reshape(B, C, a["h"], a["w"])
        if a["form"] == "permute":
            return x.permute(0, 2, 1)
        if a["form"] == "swapaxes":
            return torch.swapaxes(x, 1, 2)
        return x.transpose(-1, -2)


class VecTo(FuzzOp):
    name, kinds, family = "vec_to", ("vec",), "reshape"

    def propose(self, r, x, env):
        return dict(kind=r.choice(("img", "c1d", "seq")), n=r.choice((1, 3))), ()

    def run(self, P, a, x):
        B, C = a["_shape"]
        n = a["n"]
        if a["kind"] == "img":
            return x[:, :, None, None].expand(B, C, n, n) if n > 1 else x.view(B, C, 1, 1)
        if a["kind"] == "c1d":
            return x.unsqueeze(-1).expand(-1, -1, n) if n > 1 else torch.unsqueeze(x, 2)
        return x.unsqueeze(1).repeat(1, n, 1)


class SpatialTo(FuzzOp):
    """c3d -> img (mean over depth), img -> c1d (flatten(2) / mean over H), img -> c3d
    (unsqueeze), c1d -> img (view)."""
    name, kinds, family = "spatial_to", SPATIAL_KINDS, "reshape"

    def propose(self, r, x, env):
        if x.kind == "c3d":
            return dict(kind="img"), ()
        if x.kind == "img":
            return dict(kind=r.choice(("c1d", "c1d", "c3d")), form=r.choice(("flatten", "mean"))), ()
        if x.shape[2] % 2 == 0 and x.shape[2] >= 4:
            return dict(kind="img"), ()
        return None

    def run(self, P, a, x):
        S = a["_shape"]
        if len(S) == 5:
            return x.mean(2)
        if len(S) == 3:
            return x.view(S[0], S[1], 2, S[2] // 2)
        if a["kind"] == "c3d":
            return x.unsqueeze(2)
        return x.flatten(2) if a["form"] == "flatten" else x.mean(2)


class Heads(FuzzOp):
    """[B, T, C] -> [B, H, T, d]: attention heads by view + transpose / unflatten + permute."""
    name, kinds, family = "heads.split", ("seq",), "attention"
    weight = 1.5

    def propose(self, r, x, env):
        heads = [h for h in _divisors(x.C) if x.C // h >= 2] or [1]  # head dim >= 2: within-head structure
        return dict(H=r.choice(heads + [x.C] if r.coin(0.1) else heads), form=r.choice(("view", "unflatten", "reshape")),
                    kind="heads"), ()

    def run(self, P, a, x):
        B, T, C = a["_shape"]
        H = a["H"]
        if a["form"] == "view":
            return x.view(B, T, H, C // H).transpose(1, 2)
        if a["form"] == "unflatten":
            return x.unflatten(-1, (H, C // H)).permute(0, 2, 1, 3)
        return x.reshape(B, T, H, -1).permute(0, 2, 1, 3)


class HeadsMerge(FuzzOp):
    name, kinds, family = "heads.merge", ("heads",), "attention"

    def propose(self, r, x, env):
        return dict(form=r.choice(("transpose_reshape", "permute_flatten")), kind="seq"), ()

    def run(self, P, a, x):
        B, H, T, d = a["_shape"]
        if a["form"] == "transpose_reshape":
            return x.transpose(1, 2).reshape(B, T, H * d)
        return x.permute(0, 2, 1, 3).flatten(2)


class SDPA(FuzzOp):
    name, kinds, family = "sdpa", ("heads",), "attention"
    weight = 1.5

    def propose(self, r, x, env):
        kv = [v for v in env if v.kind == "heads" and v.shape[:2] == x.shape[:2] and v.shape[3] == x.shape[3]]
        k, v = r.choice(kv), r.choice(kv)
        if k.shape[2] != v.shape[2]:
            v = k
        causal = r.coin(0.3) and k.shape[2] == x.shape[2]
        mask = None if causal else r.choice((None, None, "bool_buffer", "float_buffer", "param"))
        return dict(causal=causal, kw=r.coin(), mask=mask, S=k.shape[2]), (k.id, v.id)

    def run(self, P, a, q, k, v):
        T, S = a["_shape"][2], a["S"]
        mask = None
        if a["mask"] == "bool_buffer":
            mask = P.buffer("mask", value=torch.rand(T, S, generator=P.gen) > 0.3 if P.building else None)
            if P.building:
                mask[:, 0] = True  # every query sees at least one key
        elif a["mask"] == "float_buffer":
            mask = P.buffer("mask", (T, S), scale=1.0)
        elif a["mask"] == "param":  # a learned additive bias over (query, key)
            mask = P.param("mask", (T, S), scale=1.0)
        if a["kw"]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["causal"])
        return F.scaled_dot_product_attention(q, k, v, mask, 0.0, a["causal"])


class ExplicitAttention(FuzzOp):
    """softmax(q @ k^T * scale [masked]) @ v, written out."""
    name, kinds, family = "attention.explicit", ("heads",), "attention"
    weight = 1.5

    def propose(self, r, x, env):
        kv = [v for v in env if v.kind == "heads" and v.shape == x.shape]
        k, v = r.choice(kv), r.choice(kv)
        return dict(mask=r.choice((None, "triu", "tril_buffer", "rel_bias")), kt=r.choice(("transpose", "mT", "permute"))), \
            (k.id, v.id)

    def run(self, P, a, q, k, v):
        kt = {"transpose": lambda t: t.transpose(-2, -1), "mT": lambda t: t.mT,
              "permute": lambda t: t.permute(0, 1, 3, 2)}[a["kt"]](k)
        B, H, T, d = a["_shape"]
        s = q @ kt * (d ** -0.5)
        if a["mask"] == "triu":
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), -1e4)
        elif a["mask"] == "tril_buffer":
            m = P.buffer("causal", value=torch.tril(torch.ones(T, T)) if P.building else None)
            s = s.masked_fill(m == 0, -1e4)
        elif a["mask"] == "rel_bias":  # a learned bias per head and (query, key): follows the head permutation
            s = s + P.param("bias", (H, T, T), scale=0.5)
        return torch.softmax(s, dim=-1) @ v


class AttentionScores(FuzzOp):
    """softmax(q @ k^T) alone: an `other` value (attention weights)."""
    name, kinds, family = "attention.scores", ("heads",), "attention"

    def propose(self, r, x, env):
        ks = [v for v in env if v.kind == "heads" and v.shape == x.shape]
        return dict(kind="other"), (r.choice(ks).id,)

    def run(self, P, a, q, k):
        return torch.matmul(q, k.transpose(-1, -2)).softmax(-1)


class MHA(FuzzOp):
    name, kinds, family = "mha.module", ("seq",), "attention"
    weight = 1.5

    def propose(self, r, x, env):
        heads = r.choice(_divisors(x.C) + [1, x.C])
        kvs = [v for v in env if v.kind == "seq" and v.shape[0] == x.shape[0]]
        kv = r.choice(kvs) if r.coin(0.3) else x
        return dict(H=heads, bias=r.coin(0.8), kvdim=kv.C if kv.C != x.C else None, need_weights=r.coin(0.3),
                    bias_kv=r.coin(0.15)), (kv.id,)

    def run(self, P, a, x, kv):
        m = P.module("m", lambda: nn.MultiheadAttention(a["_shape"][-1], a["H"], bias=a["bias"], batch_first=True,
                                                        kdim=a["kvdim"], vdim=a["kvdim"], add_bias_kv=a["bias_kv"]))
        return m(x, kv, kv, need_weights=a["need_weights"])[0]


class TransformerAttentionBlock(FuzzOp):
    """A ViT attention block: LN, fused qkv Linear, heads by reshape, sdpa, proj, residual."""
    name, kinds, family = "attention.block", ("seq",), "attention"

    def propose(self, r, x, env):
        heads = [h for h in _divisors(x.C) if x.C // h >= 2] or [1]
        d = x.C // heads[0]
        return dict(H=r.choice(heads), unbind=r.coin(),
                    core=r.choice(("sdpa", "sdpa_causal", "explicit", "einsum", "rel_bias")),
                    qk=r.choice((None, None, "qknorm") + (("rope",) if d % 2 == 0 and x.C % 2 == 0 else ()))), ()

    def run(self, P, a, x):
        B, T, C = a["_shape"]
        H = a["H"]
        d = C // H
        qkv = P.module("qkv", lambda: nn.Linear(C, 3 * C))(P.module("norm", lambda: nn.LayerNorm(C))(x))
        qkv = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        if a["unbind"]:
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
        if a["qk"] == "qknorm":  # one LayerNorm(d) shared by every head (QK-norm)
            n = P.module("qknorm", lambda: nn.LayerNorm(d))
            q, k = n(q), n(k)
        elif a["qk"] == "rope" and d % 2 == 0:
            ang = torch.arange(T)[:, None] * torch.arange(1, d // 2 + 1)[None] * 0.3 if P.building else None
            cos = P.buffer("cos", value=ang.cos().repeat(1, 2) if P.building else None)
            sin = P.buffer("sin", value=ang.sin().repeat(1, 2) if P.building else None)
            q = q * cos + torch.cat([-q[..., d // 2:], q[..., : d // 2]], -1) * sin
            k = k * cos + torch.cat([-k[..., d // 2:], k[..., : d // 2]], -1) * sin
        core = a["core"]
        if core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif core == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif core == "einsum":
            o = torch.einsum("bhts,bhsd->bhtd", torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1), v)
        else:
            s = (q @ k.transpose(-2, -1)) * d ** -0.5
            if core == "rel_bias":
                s = s + P.param("rel_bias", (H, T, T), scale=0.5)
            o = s.softmax(dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, T, C)
        return x + P.module("proj", lambda: nn.Linear(C, C))(o)


class GLU(FuzzOp):
    """Linear to 2n, split in two, a * act(b) (SwiGLU); F.glu (no rule)."""
    name, kinds, family = "glu", ("seq", "vec"), "linear"
    producer = True

    def propose(self, r, x, env):
        return dict(n=r.channels(), split=r.choice(("chunk", "split", "getitem", "F.glu"))), ()

    def run(self, P, a, x):
        n = a["n"]
        y = P.module("m", lambda: nn.Linear(a["_shape"][-1], 2 * n))(x)
        if a["split"] == "chunk":
            u, g = y.chunk(2, dim=-1)
        elif a["split"] == "split":
            u, g = torch.split(y, n, dim=-1)
        elif a["split"] == "getitem":
            u, g = y[..., :n], y[..., n:]
        else:
            return F.glu(y, dim=-1)
        return u * F.silu(g)


class ClsToken(FuzzOp):
    name, kinds, family = "cls_token", ("seq",), "shape"

    def propose(self, r, x, env):
        return dict(pos=r.coin()), ()

    def run(self, P, a, x):
        B, T, C = a["_shape"]
        y = torch.cat([P.param("cls", (1, 1, C), scale=1.0).expand(B, -1, -1), x], dim=1)
        if a["pos"]:
            y = y + P.param("pos", (1, T + 1, C), scale=0.1)
        return y


class Cat(FuzzOp):
    """torch.cat along the channel axis (concat layout) or along another axis (unify)."""
    name, kinds, family = "cat", CHANNEL_KINDS + ("heads",), "cat_split"
    weight = 2.0

    def propose(self, r, x, env):
        axis = r.choice((x.ch, x.ch, r.int(1, len(x.shape) - 1)))
        cands = [v for v in env if v.kind == x.kind and len(v.shape) == len(x.shape) and v.dtype == "float"
                 and all(n == m for i, (n, m) in enumerate(zip(v.shape, x.shape)) if i != axis)]
        return dict(axis=axis, fn=r.choice(("torch.cat", "torch.concat")), neg=r.coin()), (r.choice(cands).id,)

    def run(self, P, a, x, y):
        d = a["axis"] - len(a["_shape"]) if a["neg"] else a["axis"]
        return (torch.cat if a["fn"] == "torch.cat" else torch.concat)([x, y], dim=d)


class Split(FuzzOp):
    """split / chunk / tensor_split / unbind: several outputs."""
    name, kinds, family = "split", CHANNEL_KINDS + ("heads",), "cat_split"
    weight = 1.5

    def propose(self, r, x, env):
        axis = x.ch if r.coin(0.7) else r.int(1, len(x.shape) - 1)
        n = x.shape[axis]
        if n < 2:
            return None
        forms = ["split_sizes", "split_int", "tensor_split"] + (["chunk"] if n % 2 == 0 else [])
        if n <= 4 and axis != x.ch:
            forms.append("unbind")
        form = r.choice(forms)
        if form == "split_sizes":
            k = r.int(1, n - 1)
            sizes = (k, n - k)
        elif form == "split_int":
            k = r.int(1, n - 1)
            sizes = tuple([k] * (n // k) + ([n % k] if n % k else []))
        elif form in ("chunk", "tensor_split"):
            sizes = (n - n // 2, n // 2)
        else:
            sizes = (1,) * n
        kinds = (x.kind,) * len(sizes)
        if form == "unbind":
            kinds = tuple(_dropped_kind(x, axis) for _ in sizes)
        return dict(axis=axis, form=form, sizes=sizes, kinds=kinds, method=r.coin()), ()

    def run(self, P, a, x):
        d, f, sizes = a["axis"], a["form"], a["sizes"]
        if f == "split_sizes":
            parts = x.split(list(sizes), d) if a["method"] else torch.split(x, list(sizes), dim=d)
        elif f == "split_int":
            parts = x.split(sizes[0], dim=d) if a["method"] else torch.split(x, sizes[0], d)
        elif f == "chunk":
            parts = x.chunk(2, d) if a["method"] else torch.chunk(x, 2, dim=d)
        elif f == "tensor_split":
            parts = torch.tensor_split(x, 2, dim=d)
        else:
            parts = x.unbind(d) if a["method"] else torch.unbind(x, dim=d)
        return tuple(parts[i] for i in range(len(sizes)))


def _dropped_kind(x: "Value", axis: int) -> str:
    """The kind of x after one non-channel axis is indexed away."""
    if x.kind == "img":
        return "c1d"
    if x.kind == "c3d":
        return "img"
    if x.kind == "seq" and axis == 1:
        return "vec"
    return "other"


class Slice(FuzzOp):
    """getitem with slices: a channel range (refines the space), a step (pins it), spatial crops."""
    name, kinds, family = "slice", CHANNEL_KINDS + ("heads",), "indexing"
    weight = 1.5

    def propose(self, r, x, env):
        axis = x.ch if r.coin(0.6) else r.int(1, len(x.shape) - 1)
        n = x.shape[axis]
        if n < 2:
            return None
        return dict(axis=axis, form=r.choice(("prefix", "suffix", "range", "step", "full", "neg")),
                    k=r.int(1, n - 1), ell=r.coin()), ()

    def run(self, P, a, x):
        d, k, f = a["axis"], a["k"], a["form"]
        sl = {"prefix": slice(None, k), "suffix": slice(k, None), "range": slice(k // 2, k + 1),
              "step": slice(None, None, 2), "full": slice(None), "neg": slice(-k, None)}[f]
        if a["ell"] and d == len(a["_shape"]) - 1:
            return x[..., sl]
        return x[(slice(None),) * d + (sl,)]


class Index(FuzzOp):
    """Integer / tensor / list indexing along an axis, index_select with a constant index."""
    name, kinds, family = "index", CHANNEL_KINDS, "indexing"

    def propose(self, r, x, env):
        axis = r.int(1, len(x.shape) - 1)
        n = x.shape[axis]
        form = r.choice(("int", "tensor", "list", "index_select_const"))
        if form == "int":
            if len(x.shape) < 3:
                return None
            return dict(axis=axis, form=form, i=r.int(0, n - 1), kind=_dropped_kind(x, axis)), ()
        return dict(axis=axis, form=form, idx=tuple(int(i) for i in r.g.permutation(n))), ()

    def run(self, P, a, x):
        d = a["axis"]
        if a["form"] == "int":
            return x[(slice(None),) * d + (a["i"],)]
        idx = list(a["idx"])
        if a["form"] == "list":
            return x[(slice(None),) * d + (idx,)]
        if a["form"] == "tensor":
            return x[(slice(None),) * d + (torch.tensor(idx),)]
        return torch.index_select(x, d, torch.tensor(idx))


class Repeat(FuzzOp):
    """repeat / tile / repeat_interleave / stack+flatten / expand+reshape along an axis."""
    name, kinds, family = "repeat", CHANNEL_KINDS, "shape"

    def propose(self, r, x, env):
        return dict(axis=x.ch if r.coin(0.7) else r.int(1, len(x.shape) - 1),
                    form=r.choice(("repeat", "tile", "repeat_interleave", "stack_flatten", "expand_reshape"))), ()

    def run(self, P, a, x):
        d, f, S = a["axis"], a["form"], a["_shape"]
        reps = [1] * len(S)
        reps[d] = 2
        if f == "repeat":
            return x.repeat(*reps)
        if f == "tile":
            return torch.tile(x, tuple(reps))
        if f == "repeat_interleave":
            return x.repeat_interleave(2, dim=d)
        if f == "stack_flatten":  # index c*2 + j: a kron layout with inner 2
            return torch.stack([x, 2 * x], dim=d + 1).flatten(d, d + 1)
        shape = list(S)
        shape.insert(d, 2)
        return x.unsqueeze(d).expand(*shape).reshape(*(S[:d] + (2 * S[d],) + S[d + 1:]))


class ChannelBlocks(FuzzOp):
    """The channel axis viewed as (G, g) (rule 8 blocks): per-group centring and sums, a max
    over groups, channel shuffle (must pin), pixel shuffle (no rule)."""
    name, kinds, family = "channel_blocks", CHANNEL_KINDS, "reshape"
    weight = 1.5

    def propose(self, r, x, env):
        ds = _divisors(x.C)
        if not ds:
            return None
        forms = ["group_center", "group_sum", "shuffle", "head_max"]
        if x.kind == "img" and x.C % 4 == 0:
            forms += ["pixel_shuffle", "nn.PixelShuffle"]
        return dict(G=r.choice(ds), form=r.choice(forms)), ()

    def run(self, P, a, x):
        ch, G, f, S = a["_ch"], a["G"], a["form"], a["_shape"]
        C = S[ch]
        if f == "pixel_shuffle":
            return F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2)
        if f == "nn.PixelShuffle":
            return P.module("m", lambda: nn.PixelShuffle(2))(x)
        y = x.unflatten(ch, (G, C // G))
        if f == "group_center":
            y = y - y.mean(dim=ch + 1, keepdim=True)
        elif f == "group_sum":
            y = y * y.sum(dim=ch + 1, keepdim=True)
        elif f == "head_max":
            y = y * y.amax(dim=ch, keepdim=True)
        else:
            y = y.transpose(ch, ch + 1)
        return y.flatten(ch, ch + 1)


class Pool(FuzzOp):
    name, kinds, family = "pool", SPATIAL_KINDS, "pooling"
    weight = 1.5

    def propose(self, r, x, env):
        if min(x.shape[2:]) < 2:
            return dict(form="adaptive", size=1), ()
        return dict(form=r.choice(("max", "avg", "adaptive", "max_module", "avg_module", "adaptive_max_module")),
                    size=r.choice((1, 2))), ()

    def run(self, P, a, x):
        d = len(a["_shape"]) - 2
        f = a["form"]
        if f == "max":
            return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1](x, 2)
        if f == "avg":
            return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1](x, 2)
        if f == "adaptive":
            return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1](x, a["size"])
        cls = {"max_module": (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
               "avg_module": (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
               "adaptive_max_module": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)}[f][d - 1]
        size = a["size"] if f.startswith("adaptive") else 2
        return P.module("m", lambda: cls(size))(x)


class Interpolate(FuzzOp):
    name, kinds, family = "interpolate", SPATIAL_KINDS, "pooling"

    def propose(self, r, x, env):
        if max(x.shape[2:]) > 8:
            return None
        modes = {"c1d": ("nearest", "linear"), "img": ("nearest", "bilinear", "bicubic"),
                 "c3d": ("nearest", "trilinear")}[x.kind]
        return dict(mode=r.choice(modes), module=r.coin(0.3)), ()

    def run(self, P, a, x):
        if a["module"]:
            return P.module("m", lambda: nn.Upsample(scale_factor=2, mode=a["mode"]))(x)
        return F.interpolate(x, scale_factor=2, mode=a["mode"])


class Pad(FuzzOp):
    """F.pad over spatial axes or tokens (channels stay free) or over the channel axis (pins
    it); pad modules."""
    name, kinds, family = "pad", CHANNEL_KINDS, "pooling"

    def propose(self, r, x, env):
        forms = ["channel"]
        if x.kind in SPATIAL_KINDS:
            forms += ["spatial", "spatial_mode"]
            if x.kind == "img":
                forms += ["ZeroPad2d", "ReflectionPad2d"]
        if x.kind == "seq":
            forms += ["tokens"]
        return dict(form=r.choice(forms), big=min(x.shape[2:] or (0,)) >= 2), ()

    def run(self, P, a, x):
        f, S, ch = a["form"], a["_shape"], a["_ch"]
        d = len(S) - 2
        if f == "spatial":
            return F.pad(x, (1, 1) * d)
        if f == "spatial_mode":
            if a["big"]:
                return F.pad(x, (1, 1) * d, mode="reflect" if d < 3 else "replicate")
            return F.pad(x, (0, 1) * d, value=0.5)
        if f == "ZeroPad2d":
            return P.module("m", lambda: nn.ZeroPad2d(1))(x)
        if f == "ReflectionPad2d":
            return P.module("m", lambda: nn.ReflectionPad2d((1, 0, 1, 0)) if a["big"] else nn.ConstantPad2d(1, 0.3))(x)
        if f == "tokens":
            return F.pad(x, (0, 0, 1, 0))
        return F.pad(x, (0, 0) * (len(S) - ch - 1) + (1, 0))


class Triangular(FuzzOp):
    name, kinds, family = "triangular", ("other", "heads", "img"), "indexing"

    def propose(self, r, x, env):
        if len(x.shape) < 2 or x.shape[-1] != x.shape[-2] or x.shape[-1] < 2:
            return None
        return dict(form=r.choice(("triu", "tril", "triu_method", "tril_method")), k=r.choice((0, 1, -1))), ()

    def run(self, P, a, x):
        f, k = a["form"], a["k"]
        return {"triu": lambda: torch.triu(x, k), "tril": lambda: torch.tril(x, diagonal=k),
                "triu_method": lambda: x.triu(k), "tril_method": lambda: x.tril(k)}[f]()


class Factory(FuzzOp):
    """Tensors made in forward and mixed with x: zeros_like / ones_like / full_like (harmless),
    eye, full, linspace, new_ones, tensor, arange (constants that pin the axes they meet)."""
    name, kinds, family = "factory", CHANNEL_KINDS, "factory"

    def propose(self, r, x, env):
        return dict(form=r.choice(("zeros_like", "ones_like", "full_like", "eye", "full", "linspace",
                                   "new_ones", "tensor", "arange"))), ()

    def run(self, P, a, x):
        C = a["_shape"][-1]
        return {"zeros_like": lambda: x + torch.zeros_like(x), "ones_like": lambda: x * torch.ones_like(x),
                "full_like": lambda: x + torch.full_like(x, 0.5),
                "eye": lambda: x @ (torch.eye(C, dtype=x.dtype) * 2.0),
                "full": lambda: x * torch.full((C,), 0.5, dtype=x.dtype),
                "linspace": lambda: x + torch.linspace(0, 1, C, dtype=x.dtype),
                "new_ones": lambda: x * x.new_ones(x.shape) * 0.5,
                "tensor": lambda: x * torch.tensor(0.5, dtype=x.dtype),
                "arange": lambda: x + torch.arange(C, dtype=x.dtype) * 0.1}[a["form"]]()


class SharedModule(FuzzOp):
    """An earlier step's module called again on another value (rule 12: one parameter used at
    several call sites unifies the spaces it meets there)."""
    name, kinds, family = "shared_module", ("seq", "vec", "img", "c1d"), "shared"
    weight = 1.5

    def propose(self, r, x, env):
        net = getattr(env, "net", None)  # the generator passes the model being built
        if net is None:
            return None
        cands = []
        for k, step in enumerate(net.program.steps[:-1]):
            if step.op in ("linear.module", "conv.module", "layernorm.module", "batchnorm.module", "groupnorm.module",
                           "rmsnorm.module"):
                src = net.values[step.inputs[0]]
                if src.kind == x.kind and src.shape[1:] == x.shape[1:] and src.id != x.id:
                    cands.append(k)
        if not cands:
            return None
        return dict(step=r.choice(cands)), ()

    def run(self, P, a, x):
        return getattr(P.net, f"s{a['step']}_m")(x)


class Reorder(FuzzOp):
    """Split the channel axis in two and concatenate the pieces in the other order (a concat of
    refined parts), or cut and re-join in the same order (must give back the space)."""
    name, kinds, family = "reorder", CHANNEL_KINDS, "cat_split"

    def propose(self, r, x, env):
        if x.C < 2:
            return None
        return dict(k=r.int(1, x.C - 1), swap=r.coin(0.7), form=r.choice(("slices", "split", "narrow"))), ()

    def run(self, P, a, x):
        ch, k, S = a["_ch"], a["k"], a["_shape"]
        if a["form"] == "split":
            lo, hi = torch.split(x, [k, S[ch] - k], dim=ch)
        elif a["form"] == "narrow":
            lo, hi = x.narrow(ch, 0, k), x.narrow(ch, k, S[ch] - k)
        else:
            idx = (slice(None),) * ch
            lo, hi = x[idx + (slice(None, k),)], x[idx + (slice(k, None),)]
        return torch.cat([hi, lo] if a["swap"] else [lo, hi], dim=ch)


class Ternary(FuzzOp):
    """Elementwise ops of three tensors: addcmul, addcdiv, where(cond from a third value)."""
    name, kinds, family = "ternary", FLOAT_KINDS, "elementwise"

    def propose(self, r, x, env):
        others = _same_shape(env, x)
        if not others:
            return None
        return dict(form=r.choice(("addcmul", "addcdiv", "where", "addcmul_method"))), \
            (r.choice(others).id, r.choice(others).id)

    def run(self, P, a, x, y, z):
        f = a["form"]
        if f == "addcmul":
            return torch.addcmul(x, y, z, value=0.5)
        if f == "addcmul_method":
            return x.addcmul(y, z)
        if f == "addcdiv":
            return torch.addcdiv(x, y, z.abs() + 1.0, value=0.5)
        return torch.where(z > 0, x, y)


class InPlace(FuzzOp):
    """In-place ops on a fresh copy: clone().add_(y), relu_(), mul_(scalar), masked_fill_."""
    name, kinds, family = "inplace", FLOAT_KINDS, "elementwise"

    def propose(self, r, x, env):
        others = _same_shape(env, x)
        form = r.choice(("add_", "relu_", "mul_", "sigmoid_", "clamp_"))
        if form == "add_" and not others:
            form = "mul_"
        return dict(form=form), ((r.choice(others).id,) if form == "add_" else ())

    def run(self, P, a, x, *y):
        t = x.clone()
        f = a["form"]
        if f == "add_":
            return t.add_(y[0])
        if f == "relu_":
            return t.relu_()
        if f == "sigmoid_":
            return t.sigmoid_()
        if f == "clamp_":
            return t.clamp_(-1.0, 1.0)
        return t.mul_(0.5)


class GlobalScale(FuzzOp):
    """x times a full reduction of itself (a scalar: imposes nothing)."""
    name, kinds, family = "global_scale", FLOAT_KINDS, "reduction"

    def propose(self, r, x, env):
        return dict(form=r.choice(("mean", "norm", "amax", "std"))), ()

    def run(self, P, a, x):
        f = a["form"]
        if f == "mean":
            return x * torch.sigmoid(x.mean())
        if f == "norm":
            return x / (x.norm() + 1.0)
        if f == "std":
            return x / (torch.std(x) + 1.0)
        return x / (x.abs().amax() + 1.0)


class HeadsEinsum(FuzzOp):
    """Attention over heads with einsum: 'bhtd,bhsd->bhts', softmax, 'bhts,bhsd->bhtd'."""
    name, kinds, family = "einsum.heads", ("heads",), "attention"

    def propose(self, r, x, env):
        kv = [v for v in env if v.kind == "heads" and v.shape == x.shape]
        return dict(eq=r.choice(("explicit", "ellipsis"))), (r.choice(kv).id, r.choice(kv).id)

    def run(self, P, a, q, k, v):
        if a["eq"] == "ellipsis":
            s = torch.einsum("...td,...sd->...ts", q, k)
            return torch.einsum("...ts,...sd->...td", s.softmax(-1), v)
        s = torch.einsum("bhtd,bhsd->bhts", q, k) * (a["_shape"][-1] ** -0.5)
        return torch.einsum("bhts,bhsd->bhtd", s.softmax(dim=-1), v)


class ArgIndex(FuzzOp):
    """Indices of a maximum used as an index (rule 6: the axis they index must not move)."""
    name, kinds, family = "arg_index", CHANNEL_KINDS, "along_axis"

    def propose(self, r, x, env):
        axis = x.ch if r.coin(0.7) else r.int(1, len(x.shape) - 1)
        return dict(axis=axis, form=r.choice(("max_gather", "argmax_gather", "topk_gather"))), ()

    def run(self, P, a, x):
        d = a["axis"]
        if a["form"] == "max_gather":
            _, i = x.max(dim=d, keepdim=True)
        elif a["form"] == "topk_gather":
            i = x.topk(1, dim=d)[1]
        else:
            i = torch.argmax(x, dim=d, keepdim=True)
        return x + torch.gather(x, d, i)


class MaskedMHA(FuzzOp):
    """nn.MultiheadAttention with a causal attn_mask and / or a key padding mask."""
    name, kinds, family = "mha.masked", ("seq",), "attention"

    def propose(self, r, x, env):
        # a padding mask over the only key would mask whole rows (NaN in float64, not in float32's fast path)
        return dict(H=r.choice(_divisors(x.C) + [1, x.C]), causal=r.coin(), padding=r.coin() and x.shape[1] > 1), ()

    def run(self, P, a, x):
        B, T, C = a["_shape"]
        m = P.module("m", lambda: nn.MultiheadAttention(C, a["H"], batch_first=True))
        mask = P.buffer("causal", value=torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if P.building else None) \
            if a["causal"] else None
        pad = P.buffer("pad", value=torch.arange(T).expand(B, T) >= T - 1 if P.building else None) \
            if a["padding"] else None
        return m(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0]


class LayerNormTokens(FuzzOp):
    """LayerNorm over (T, C) of a sequence: the statistics mix tokens and channels."""
    name, kinds, family = "layernorm.tokens", ("seq",), "norm"

    def propose(self, r, x, env):
        return dict(affine=r.coin()), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.LayerNorm(tuple(a["_shape"][1:]), elementwise_affine=a["affine"]))(x)


class FlattenUnflatten(FuzzOp):
    """Spatial axes flattened into the channel axis and viewed back (kron there and back)."""
    name, kinds, family = "flatten_unflatten", ("img", "c1d"), "reshape"

    def propose(self, r, x, env):
        return dict(form=r.choice(("flatten_view", "flatten_unflatten", "reshape_reshape"))), ()

    def run(self, P, a, x):
        S = a["_shape"]
        if a["form"] == "flatten_view":
            return x.flatten(1).view(S) * 2.0
        if a["form"] == "flatten_unflatten":
            return torch.flatten(x, 1).unflatten(1, tuple(S[1:])) * 2.0
        return x.reshape(S[0], -1).reshape(*S) * 2.0


class RoPE(FuzzOp):
    """Rotary position embedding on heads: x * cos + rotate_half(x) * sin (cos / sin buffers
    over (token, head dim)): the within-head permutation must stay the identity."""
    name, kinds, family = "rope", ("heads",), "attention"

    def propose(self, r, x, env):
        if x.shape[-1] % 2:
            return None
        return dict(form=r.choice(("cat", "stack"))), ()

    def run(self, P, a, x):
        B, H, T, d = a["_shape"]
        if P.building:
            ang = torch.arange(T)[:, None] * torch.arange(1, d // 2 + 1)[None] * 0.3
            cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        cos, sin = P.buffer("cos", value=cos if P.building else None), P.buffer("sin", value=sin if P.building else None)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        rot = torch.cat([-x2, x1], dim=-1) if a["form"] == "cat" else torch.stack([-x2, x1], -2).flatten(-2)
        return x * cos + rot * sin


class MQA(FuzzOp):
    """Multi-query attention: H query heads, one key/value head of the head size broadcast
    over them (by matmul broadcasting or by expand into sdpa)."""
    name, kinds, family = "mqa", ("seq",), "attention"

    def propose(self, r, x, env):
        return dict(H=r.choice(_divisors(x.C) + [x.C]), form=r.choice(("matmul", "sdpa_expand"))), ()

    def run(self, P, a, x):
        B, T, C = a["_shape"]
        H = a["H"]
        d = C // H
        q = P.module("q", lambda: nn.Linear(C, C))(x).view(B, T, H, d).transpose(1, 2)
        k = P.module("k", lambda: nn.Linear(C, d))(x).unsqueeze(1)
        v = P.module("v", lambda: nn.Linear(C, d))(x).unsqueeze(1)
        if a["form"] == "matmul":
            o = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k.expand(B, H, T, d), v.expand(B, H, T, d))
        return o.transpose(1, 2).reshape(B, T, C)


class TiedHead(FuzzOp):
    """An output projection tied to an earlier embedding: F.linear(x, embedding.weight)."""
    name, kinds, family = "tied_head", ("seq", "vec"), "shared"

    def propose(self, r, x, env):
        net = getattr(env, "net", None)
        if net is None:
            return None
        cands = [k for k, st in enumerate(net.program.steps[:-1]) if st.op == "embedding.module" and st.a["out"] == x.C]
        return (dict(step=r.choice(cands)), ()) if cands else None

    def run(self, P, a, x):
        return F.linear(x, getattr(P.net, f"s{a['step']}_m").weight)


# ---------------------------------------------------------------------------------------------
# ops no rule may know: each must become a barrier
def fuzz_unruled(x: torch.Tensor) -> torch.Tensor:
    """A user function hidden from fx: mixes neighbouring channels (passing it through is wrong)."""
    return x + 0.5 * torch.roll(x, 1, dims=1)


torch.fx.wrap("fuzz_unruled")


class FuzzLeaf(nn.Module):
    """A user leaf module (traced as one call_module) that mixes channels with its own weight."""

    def __init__(self, c: int):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        return x + torch.roll(x, 1, dims=-1) * self.mix


LEAF_MODULES = (FuzzLeaf,)


class Unruled(FuzzOp):
    name, kinds, family = "unruled.wrapped", CHANNEL_KINDS + ("heads",), "unruled"
    barrier = True

    def propose(self, r, x, env):
        return {}, ()

    def run(self, P, a, x):
        return fuzz_unruled(x)


class Leaf(FuzzOp):
    name, kinds, family = "unruled.leaf", ("seq", "vec"), "unruled"
    barrier = True

    def propose(self, r, x, env):
        return {}, ()

    def run(self, P, a, x):
        return P.module("m", lambda: FuzzLeaf(a["_shape"][-1]))(x)


class Readout(FuzzOp):
    """Ends a dangling value the way models end: a Linear over the channel axis (the other axes
    stay), or flatten + Linear. Its input spaces stay free; only its own outputs are fixed."""
    name, kinds, family = "readout", FLOAT_KINDS, "readout"
    weight = 0.0  # placed by the generator, never drawn

    def propose(self, r, x, env):
        small = math.prod(x.shape[1:]) <= 256
        forms = ["channel", "channel", "channel"] + (["flatten"] if small else [])
        if x.kind == "other":
            forms = ["flatten"] if small else ["last"]
        return dict(form=r.choice(forms), kind="other"), ()

    def run(self, P, a, x):
        S, ch = a["_shape"], a["_ch"]
        if a["form"] == "flatten":
            return P.module("m", lambda: nn.Linear(math.prod(S[1:]), 3))(x.flatten(1))
        if a["form"] == "last" or ch == len(S) - 1:
            return P.module("m", lambda: nn.Linear(S[-1], 3))(x)
        return P.module("m", lambda: nn.Linear(S[ch], 3))(x.movedim(ch, -1))


class Head(FuzzOp):
    """A classifier head: the usual last op (its output space reaches the model output)."""
    name, kinds, family = "head", ("vec",), "linear"
    weight = 0.0  # placed by the generator, never drawn

    def propose(self, r, x, env):
        return dict(out=3), ()

    def run(self, P, a, x):
        return P.module("m", lambda: nn.Linear(a["_shape"][-1], a["out"]))(x)
