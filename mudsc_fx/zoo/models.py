"""Small torch.fx-traceable architectures for the merging experiments.

Every backbone maps an input batch to an *embedding* ``[B, D]`` (``D`` =
``out_dim``, default 64) and returns it; no backbone owns a classifier.
Classification is done outside the model by :class:`ClassHead`, a frozen,
seeded set of random unit vectors (one per class) shared by all models -- the
offline stand-in for the CLIP text-embedding head of the MuDSC/ZipIt papers.
Because the head is shared and fixed, a merged backbone can score every
class of every task.

All forwards are free of data-dependent Python control flow, so
``torch.fx.symbolic_trace(model)`` works for every model :func:`build` makes.

Architectures (``build(arch, dataset)`` names):

* ``"mlp"`` -- :class:`MLP` on the flattened input.
* ``"resnet20"`` / ``"resnet20_gn"`` -- :class:`ResNet20` (CIFAR style,
  3 stages x 3 basic blocks, ``16*width`` channels, 1x1 conv + norm shortcuts
  where the shape changes) with BatchNorm or GroupNorm(8 groups).  For 1-D
  data (mnist1d) the same network is built with Conv1d/BatchNorm1d.
* ``"vit"`` -- :class:`SmallViT`, timm-style blocks with explicit attention
  (fused qkv Linear) and a cls token; for 1-D data the patch embedding is a
  Conv1d over the sequence.

Parameter names follow timm/torchvision habits (``patch_embed.proj``,
``blocks.0.attn.qkv``, ``layer1.0.conv1``, ``shortcut``...).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ClassHead", "MLP", "ResNet20", "BasicBlock", "SmallViT", "build", "ARCHS", "default_kwargs"]

ARCHS = ("mlp", "resnet20", "resnet20_gn", "vit")


# --------------------------------------------------------------------------- head
class ClassHead(nn.Module):
    """Frozen shared class head: ``logits = scale * normalize(emb) @ E.T``.

    ``E`` is ``[num_classes, dim]``, rows are unit vectors drawn from a normal
    distribution with a private ``torch.Generator`` seeded by ``seed`` (so two
    heads with the same arguments are identical, and the global RNG is not
    touched).  ``E`` is a buffer: it has no gradient and is not a parameter.

    ``forward(emb, classes=None)``: with ``classes`` (a sequence of class ids)
    only those columns are returned, in that order.
    """

    def __init__(self, num_classes: int, dim: int = 64, scale: float = 16.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        e = torch.randn(num_classes, dim, generator=g)
        self.register_buffer("embeddings", F.normalize(e, dim=1))
        self.scale = float(scale)
        self.num_classes = int(num_classes)
        self.dim = int(dim)

    def forward(self, emb: torch.Tensor, classes: Sequence[int] | None = None) -> torch.Tensor:
        e = self.embeddings
        if classes is not None:
            e = e[torch.as_tensor(list(classes), dtype=torch.long, device=e.device)]
        return self.scale * F.normalize(emb, dim=-1) @ e.t()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, scale={self.scale}"


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """``depth`` hidden Linear+ReLU layers of ``width`` units, then ``Linear(width, out_dim)``.

    The input is flattened from dim 1, so it accepts ``[B, in_features]`` as
    well as images ``[B, C, H, W]`` / sequences ``[B, C, L]``.
    Layers are ``layers.{2i}`` (Linear) and ``layers.{2i+1}`` (ReLU); the
    projection is ``proj``.
    """

    def __init__(self, in_features: int, width: int = 256, depth: int = 3, out_dim: int = 64):
        super().__init__()
        mods = []
        d = in_features
        for _ in range(depth):
            mods += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.layers = nn.Sequential(*mods)
        self.proj = nn.Linear(d, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.layers(torch.flatten(x, 1)))


# --------------------------------------------------------------------------- ResNet-20
def _conv(ndim: int):
    return {1: nn.Conv1d, 2: nn.Conv2d}[ndim]


def _norm(kind: str, ch: int, ndim: int, groups: int = 8) -> nn.Module:
    if kind == "bn":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[ndim](ch)
    if kind == "gn":
        return nn.GroupNorm(min(groups, ch), ch)
    raise ValueError(f"norm must be 'bn' or 'gn', not {kind!r}")


class BasicBlock(nn.Module):
    """conv3-norm-relu-conv3-norm (+ shortcut) -> relu.  Shortcut is a 1x1
    conv + norm when stride != 1 or the channel count changes, else identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "bn", ndim: int = 2):
        super().__init__()
        Conv = _conv(ndim)
        self.conv1 = Conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout, ndim)
        self.relu1 = nn.ReLU()
        self.conv2 = Conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout, ndim)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(Conv(cin, cout, 1, stride, bias=False), _norm(norm, cout, ndim))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 ending in ``Linear(64*width, out_dim)``.

    stem conv3x3(in_ch -> 16w) + norm + relu; ``layer1..3``: 3 BasicBlocks
    each with 16w, 32w, 64w channels and strides 1, 2, 2; global average
    pool; ``proj``.  ``norm="gn"`` uses GroupNorm with 8 groups.  ``ndim=1``
    builds the Conv1d variant for sequences ``[B, in_ch, L]``.
    """

    def __init__(self, width: int = 2, norm: str = "bn", in_ch: int = 1, out_dim: int = 64,
                 ndim: int = 2, blocks_per_stage: int = 3):
        super().__init__()
        Conv = _conv(ndim)
        c = 16 * width
        self.conv1 = Conv(in_ch, c, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, c, ndim)
        self.relu = nn.ReLU()
        layers = []
        cin = c
        for stage, mult in enumerate((1, 2, 4)):
            cout = c * mult
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, norm, ndim))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool1d(1) if ndim == 1 else nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(cin, out_dim)
        self.out_dim = out_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.proj(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- ViT
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> ``[B, N, dim]`` via a strided conv ``proj``."""

    def __init__(self, in_ch: int, dim: int, patch: int, ndim: int = 2):
        super().__init__()
        self.proj = _conv(ndim)(in_ch, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style multi-head self-attention with a fused ``qkv`` Linear and ``proj``."""

    def __init__(self, dim: int, heads: int = 4, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Tiny ViT: patch embed + cls token + learned pos_embed, ``depth`` blocks,
    final LayerNorm ``norm``, cls-token output projected by ``head`` to ``out_dim``.

    ``image_size`` is the side of a square image (``ndim=2``) or the sequence
    length (``ndim=1``); it must be divisible by ``patch``.
    """

    def __init__(self, image_size: int, patch: int, dim: int = 64, depth: int = 4, heads: int = 4,
                 in_ch: int = 1, out_dim: int = 64, mlp_ratio: float = 2.0, ndim: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} not divisible by patch {patch}")
        n_patches = (image_size // patch) ** ndim
        self.patch_embed = PatchEmbed(in_ch, dim, patch, ndim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.out_dim = out_dim
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- factory
def _input_shape(dataset) -> tuple:
    if hasattr(dataset, "input_shape"):
        return tuple(dataset.input_shape)
    if isinstance(dataset, str):
        return {"digits": (1, 8, 8), "mnist": (1, 28, 28), "mnist1d": (1, 40)}[dataset]
    return tuple(dataset)


def default_kwargs(arch: str, input_shape: tuple) -> dict:
    """Constructor kwargs :func:`build` uses for ``arch`` on ``input_shape``."""
    ndim = len(input_shape) - 1
    in_ch = input_shape[0]
    if arch == "mlp":
        return {"in_features": math.prod(input_shape)}
    if arch in ("resnet20", "resnet20_gn"):
        return {"in_ch": in_ch, "ndim": ndim, "norm": "gn" if arch.endswith("_gn") else "bn"}
    if arch == "vit":
        size = input_shape[-1]
        if ndim == 2 and input_shape[-2] != size:
            raise ValueError(f"SmallViT needs square images, got {input_shape}")
        patch = {8: 2, 28: 7, 32: 4, 40: 4}.get(size)
        if patch is None:
            patch = next(p for p in (4, 2, 1) if size % p == 0)
        return {"image_size": size, "patch": patch, "in_ch": in_ch, "ndim": ndim}
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def build(arch: str, dataset, seed: int | None = None, **kw) -> nn.Module:
    """Build ``arch`` (one of :data:`ARCHS`) for ``dataset``.

    ``dataset`` is a :class:`~mudsc_fx.zoo.data.Dataset`, a data-set name, or
    an input shape (without batch dim).  Input-dependent constructor
    arguments (``in_features``, ``in_ch``, ``ndim``, ``image_size``,
    ``patch``) are derived from it; ``**kw`` overrides or adds any argument
    (e.g. ``width=1``, ``depth=2``, ``out_dim=32``).  With ``seed`` the
    initialisation is drawn from ``torch.manual_seed(seed)`` inside a forked
    RNG (the global RNG state is left untouched); without it the global RNG
    is used.  Patches default to 2 (digits), 7 (mnist), 4 (mnist1d).
    """
    shape = _input_shape(dataset)
    kwargs = {**default_kwargs(arch, shape), **kw}
    cls = {"mlp": MLP, "resnet20": ResNet20, "resnet20_gn": ResNet20, "vit": SmallViT}[arch]
    if seed is None:
        return cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls(**kwargs)
