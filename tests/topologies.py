"""A zoo of tiny models, one per topology, with hand-derived permutation coverage.

Every entry is a `Topology`:

* ``build(seed=0) -> nn.Module``: a seeded model in eval mode. Per-unit members that default to
  permutation-invariant values (biases, norm affine params, BatchNorm running statistics,
  layer-scale, attention in-proj biases) are jittered so that a member the rewrite forgets to
  permute changes the output.
* ``example(seed=0) -> tuple``: the example inputs (float32; token ids are int64).
* ``coverage``: the exact expected coverage (see below).
* ``frozen``: named_modules names of every producer whose OUTPUT space must be FIXED. This
  always includes the producers whose output reaches a model output; for the barrier models
  (channel_shuffle, unknown_op) it is also exactly the producers whose space the barrier touches.
* ``note``: what the topology exercises.

Every model is traceable by ``torch.fx.symbolic_trace`` (no data-dependent control flow),
has 4-16 channels, spatial size <= 8x8, sequence length <= 6, batch 2.

Coverage (exact, derived by hand in the comment next to each number):

* Producers: Linear, Conv1d/2d/3d, ConvTranspose, Embedding, nn.MultiheadAttention (in_proj
  counts 3E units: q, k, v; out_proj E), F.linear / F.conv*. A producer call contributes its
  output channels. Depthwise / grouped convs are producers too (their output channels count,
  even when their space is their input's space).
* Output producers (output space reaches a returned tensor through pass-through ops: norms,
  activations, pooling, residual adds, flatten, ...) are left out of the denominator.
* A unit is free when its space admits a non-identity permutation under the DESIGN rules
  (blocked spaces count as free). Barriers (model inputs, model outputs, unknown ops,
  untrackable ops such as channel_shuffle or an FFT over channels) FIX the spaces they touch;
  a residual stream that touches a barrier is fixed as a whole.
* coverage = free producer output units / non-output producer output units.

Run ``python tests/topologies.py`` to build, trace and run every entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Topology", "TOPOLOGIES", "by_name"]


@dataclass(frozen=True)
class Topology:
    name: str
    build: Callable[..., nn.Module]
    example: Callable[..., tuple]
    coverage: Fraction
    frozen: tuple[str, ...]
    note: str


# ----------------------------------------------------------------------------------------------
# helpers


def _jitter_(model: nn.Module) -> nn.Module:
    """Make per-unit members non-trivial (uses the caller's seeded global RNG), eval mode."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        for _, p in model.named_parameters():
            if p.dim() == 1:  # biases, norm weight/bias, layer-scale gamma, in_proj_bias
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _seeded(cls: type[nn.Module], **kwargs) -> Callable[..., nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _jitter_(cls(**kwargs))

    build.__name__ = f"build_{cls.__name__}"
    return build


def _images(c: int = 3, hw: int = 8, batch: int = 2) -> Callable[..., tuple]:
    def example(seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(1000 + seed)
        return (torch.randn(batch, c, hw, hw, generator=g),)

    return example


def _vectors(*shape: int) -> Callable[..., tuple]:
    def example(seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(1000 + seed)
        return (torch.randn(*shape, generator=g),)

    return example


def _tokens(vocab: int, batch: int = 2, seq: int = 6) -> Callable[..., tuple]:
    def example(seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(1000 + seed)
        return (torch.randint(0, vocab, (batch, seq), generator=g),)

    return example


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


# ----------------------------------------------------------------------------------------------
# models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm + (1x1 conv-norm shortcut), relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn_sc = norm(cout)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.bn_sc(self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, group_norm: bool = False):
        super().__init__()
        if group_norm:
            norm = lambda c: nn.GroupNorm(2 if c == 8 else 4, c)  # noqa: E731
        else:
            norm = nn.BatchNorm2d
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = norm(8)
        self.layer1 = BasicBlock(8, 8, 1, norm)
        self.layer2 = BasicBlock(8, 16, 2, norm)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4 -> 2x2
        x = torch.flatten(x, 1)  # NCHW: index c*4 + (h*2+w) -> kron(conv2, inner=4)
        return self.fc2(F.relu(self.fc1(x)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dense1 = DenseLayer(8, 4)  # -> 12 channels
        self.dense2 = DenseLayer(12, 4)  # -> 16 channels
        self.trans_norm = nn.BatchNorm2d(16)
        self.trans_conv = nn.Conv2d(16, 8, 1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.dense2(self.dense1(self.stem(x)))
        x = F.avg_pool2d(self.trans_conv(F.relu(self.trans_norm(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1)
        return self.fc(x)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2_reduce = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(4, 6, 3, padding=1)
        self.b3 = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y1 = self.b1(x)
        y2 = self.b2(F.relu(self.b2_reduce(x)))
        y3 = self.b3(F.max_pool2d(x, 3, 1, 1))
        y = F.relu(self.bn(torch.cat([y1, y2, y3], dim=1)))  # concat(4, 6, 4)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int):
        super().__init__()
        h = c * expand
        self.expand = _conv_bn(c, h, 1)
        self.dw = _conv_bn(h, h, 3, groups=h)
        self.project = _conv_bn(h, c, 1)

    def forward(self, x):
        y = F.relu6(self.expand(x))
        y = F.relu6(self.dw(y))
        return x + self.project(y)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, stride=2)  # 8x8 -> 4x4
        self.block = InvertedResidual(8, 2)
        self.head = _conv_bn(8, 16, 1)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(F.relu6(self.stem(x)))
        x = F.relu6(self.head(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x * s
        x = F.relu(self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 2 * dim)
        self.pwconv2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)  # NCHW -> NHWC
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        y = y.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)  # patchify 8x8 -> 4x4
        self.block = ConvNeXtBlock(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


class ViT(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)  # 8x8 -> 2x2 = 4 tokens
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 5, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, 4, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, 5, dim]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


class TimmAttention(nn.Module):
    def __init__(self, dim: int = 8, num_heads: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TimmMlp(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TimmBlockFeatures(nn.Module):
    """Token embedding + one pre-norm timm block, returns the features (forward_features)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.norm(x)


class SwiGLU(nn.Module):
    """Pre-norm residual SwiGLU MLP directly on the input tokens, then a head."""

    def __init__(self, dim: int = 8, hidden: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        a, b = self.fc1(self.norm(x)).chunk(2, dim=-1)
        x = x + self.fc2(F.silu(a) * b)  # residual on the MODEL INPUT
        return self.head(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class GPTMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class GPT(nn.Module):
    def __init__(self, vocab: int = 16, block_size: int = 6, dim: int = 8, heads: int = 2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(block_size, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = GPTMlp(dim)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def forward(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.lm_head(self.ln_f(x))


class ResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv1 = _conv_bn(8, 16, 1)
        self.conv2 = _conv_bn(16, 16, 3, groups=4)
        self.conv3 = _conv_bn(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y))
        x = F.relu(x + self.conv3(y))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvTransposeAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, 2, 1)  # 8x8 -> 4x4
        self.enc2 = nn.Conv2d(8, 16, 3, 2, 1)  # 4x4 -> 2x2
        self.dec1 = nn.ConvTranspose2d(16, 8, 2, 2)  # 2x2 -> 4x4, weight [16, 8, 2, 2]
        self.dec_g = nn.ConvTranspose2d(8, 8, 3, 1, 1, groups=2)  # weight [8, 4, 3, 3]
        self.dec2 = nn.ConvTranspose2d(8, 3, 2, 2)  # 4x4 -> 8x8
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        z = F.relu(self.enc2(F.relu(self.enc1(x))))
        y = F.relu(self.dec1(z))
        y = F.relu(self.bn(self.dec_g(y)))
        return torch.sigmoid(self.dec2(y))


class ShuffleUnit(nn.Module):
    """ShuffleNet-style unit: 1x1 conv -> channel_shuffle -> depthwise 3x3 -> 1x1 conv, residual.

    The 1x1 convs are plain (groups=1) on purpose: a grouped conv next to the barrier would
    leave its neighbour space "block permutation fixed, within-block free", an ambiguity this
    fixture avoids.
    """

    def __init__(self, c: int = 8, groups: int = 2):
        super().__init__()
        self.groups = groups
        self.conv_a = _conv_bn(c, c, 1)
        self.dw = _conv_bn(c, c, 3, groups=c)
        self.conv_b = _conv_bn(c, c, 1)

    def forward(self, x):
        y = F.relu(self.conv_a(x))
        B, C, H, W = y.shape
        y = y.view(B, self.groups, C // self.groups, H, W).transpose(1, 2).reshape(B, C, H, W)
        y = self.dw(y)
        return F.relu(x + self.conv_b(y))


class ChannelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.unit = ShuffleUnit(8, 2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.unit(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class UnknownOpBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1 = _conv_bn(c, c)
        self.conv2 = _conv_bn(c, c)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class UnknownOpNet(nn.Module):
    """A plain residual conv net with torch.fft.rfft over the CHANNEL axis in the middle."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.block = UnknownOpBlock(8)
        self.conv3 = nn.Conv2d(5, 8, 1)  # rfft over 8 channels -> 5 frequencies
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        x = torch.fft.rfft(x, dim=1).abs()  # unknown op, mixes along the channel axis
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------------------------
# the zoo

TOPOLOGIES: list[Topology] = [
    Topology(
        "mlp", _seeded(MLP), _vectors(2, 8),
        # spaces fc1(16), fc2(12) free; fc3(4) is the output -> excluded. 28/28
        Fraction(28, 28),
        ("fc3",),
        "Linear-ReLU chain",
    ),
    Topology(
        "resnet_bn", _seeded(ResNet, group_norm=False), _images(),
        # stem(8); l1.conv1(8); l1 out {l1.conv2, l1.shortcut}(8); l2.conv1(16);
        # l2 out {l2.conv2, l2.shortcut}(16): all free; fc(10) output -> excluded.
        # units 8+8+8+8+16+16+16 = 80, free 80
        Fraction(80, 80),
        ("fc",),
        "2-stage ResNet, BatchNorm, 1x1-conv shortcuts (residual add joins conv2 and shortcut)",
    ),
    Topology(
        "resnet_gn", _seeded(ResNet, group_norm=True), _images(),
        # as resnet_bn, spaces blocks(2,4) for C=8 and blocks(4,4) for C=16 (GroupNorm):
        # blocked spaces are free. units 80, free 80
        Fraction(80, 80),
        ("fc",),
        "2-stage ResNet, GroupNorm (blocks), 1x1-conv shortcuts",
    ),
    Topology(
        "vgg_flatten", _seeded(VGG), _images(),
        # conv1(8), conv2(16) (enters fc1 as kron(conv2, inner=4)), fc1(16) free; fc2(10)
        # output -> excluded. 8+16+16 = 40, free 40
        Fraction(40, 40),
        ("fc2",),
        "VGG, NCHW flatten of a 2x2 map into Linear (kron layout)",
    ),
    Topology(
        "densenet", _seeded(DenseNet), _images(),
        # stem(8), dense1.conv(4), dense2.conv(4) appear as concat parts, trans_conv(8): all
        # free; fc(10) output -> excluded. 8+4+4+8 = 24, free 24
        Fraction(24, 24),
        ("fc",),
        "dense block (torch.cat growth, BN on concat layouts) + transition",
    ),
    Topology(
        "inception", _seeded(Inception), _images(),
        # stem(8), b1(4), b2_reduce(4), b2(6), b3(4): all free (cat -> concat(b1,b2,b3));
        # fc(10) output -> excluded. 8+4+4+6+4 = 26, free 26
        Fraction(26, 26),
        ("fc",),
        "parallel branches (1x1 / 1x1-3x3 / maxpool-1x1) concatenated, BN on the concat",
    ),
    Topology(
        "mobilenetv2", _seeded(MobileNetV2), _images(),
        # residual {stem.0, block.project.0}(8); expand space {block.expand.0,
        # block.dw.0}(16) (depthwise keeps its input space); head.0(16): all free;
        # classifier(10) output -> excluded. 8+16+16+8+16 = 64, free 64
        Fraction(64, 64),
        ("classifier",),
        "inverted residual: expand 1x1, depthwise 3x3 (groups=C), project, residual add",
    ),
    Topology(
        "squeeze_excite", _seeded(SqueezeExcite), _images(),
        # {stem.0, se_expand}(8) joined by the gating multiply; se_reduce(4); conv(12): all
        # free; fc(10) output -> excluded. 8+4+8+12 = 32, free 32
        Fraction(32, 32),
        ("fc",),
        "squeeze-excite gate: pool -> 1x1 -> relu -> 1x1 -> sigmoid -> multiply",
    ),
    Topology(
        "convnext", _seeded(ConvNeXt), _images(),
        # residual {stem, block.dwconv, block.pwconv2}(8) (NHWC via permute; gamma is an
        # out member); block.pwconv1(16): all free; head(10) output -> excluded.
        # 8+8+16+8 = 40, free 40
        Fraction(40, 40),
        ("head",),
        "ConvNeXt block: dw 7x7, permute NHWC, LayerNorm, Linear-GELU-Linear, layer-scale, add",
    ),
    Topology(
        "vit_mha", _seeded(ViT), _images(),
        # residual {patch_embed, attn.out_proj, fc2}(8) (cls_token, pos_embed, norms are out
        # members); attn in_proj q,k (blocks(2,4), one space) + v (blocks(2,4), sigma tied):
        # 24 units; fc1(16): all free; head(10) output -> excluded.
        # 8 + 24 + 8 + 16 + 8 = 64, free 64
        Fraction(64, 64),
        ("head",),
        "ViT: nn.MultiheadAttention(batch_first), cls token (cat), pos_embed (add), head on token 0",
    ),
    Topology(
        "timm_attention", _seeded(TimmBlockFeatures), _vectors(2, 6, 8),
        # returns norm(residual) -> residual {embed, attn.proj, mlp.fc2} reaches the output:
        # fixed and excluded. attn.qkv(24) = concat(q, k, v), q/k one space blocks(2,4), v
        # blocks(2,4) sigma tied -> free; mlp.fc1(16) free. 24+16 = 40, free 40
        Fraction(40, 40),
        ("embed", "attn.proj", "mlp.fc2"),
        "timm Attention: fused qkv, reshape(B,N,3,H,d).permute(2,0,3,1,4).unbind(0), returns features",
    ),
    Topology(
        "swiglu", _seeded(SwiGLU), _vectors(2, 6, 8),
        # fc1(16) = concat(a(8), b(8)) with a, b unified by silu(a)*b -> free; fc2(8) is added
        # to the MODEL INPUT (input barrier) -> residual fixed; head(4) output -> excluded.
        # free 16 / (16 + 8)
        Fraction(16, 24),
        ("fc2", "head"),
        "SwiGLU: fc1(x).chunk(2,-1), silu(a)*b, fc2; residual on the raw input (input barrier)",
    ),
    Topology(
        "gpt", _seeded(GPT), _tokens(16),
        # residual {tok_emb, pos_emb, attn.proj, mlp.proj}(8) free (tied lm_head.weight is
        # the tok_emb weight: residual axis is its in axis, vocab axis is fixed anyway);
        # attn.q/attn.k one space blocks(2,4), attn.v blocks(2,4) sigma tied: 8+8+8;
        # mlp.fc(16); lm_head(16) output -> excluded.
        # 8+8+8+8+8+8+16+8 = 72, free 72
        Fraction(72, 72),
        ("lm_head",),
        "GPT block: token + learned position Embeddings, SDPA is_causal, separate q/k/v, tied LM head",
    ),
    Topology(
        "resnext", _seeded(ResNeXt), _images(),
        # residual {stem.0, conv3.0}(8); conv1.0(16) and conv2.0(16) both blocks(4,4) with
        # a shared block permutation (grouped conv, groups=4): free; fc(10) output ->
        # excluded. 8+16+16+8 = 48, free 48
        Fraction(48, 48),
        ("fc",),
        "ResNeXt bottleneck: 1x1, grouped 3x3 (groups=4), 1x1, identity residual",
    ),
    Topology(
        "convtranspose_ae", _seeded(ConvTransposeAE), _images(),
        # enc1(8), enc2(16), dec1(8) and dec_g(8) (grouped ConvTranspose, groups=2: both
        # blocks(2,4), sigma shared; weight [in, out/g, k, k]): free; dec2(3) output ->
        # excluded. 8+16+8+8 = 40, free 40
        Fraction(40, 40),
        ("dec2",),
        "conv encoder, ConvTranspose2d decoder incl. a grouped ConvTranspose2d",
    ),
    Topology(
        "channel_shuffle", _seeded(ChannelShuffleNet), _images(),
        # barrier: view(B,2,4,H,W).transpose(1,2).reshape interleaves the channels -> FIXED.
        # It touches unit.conv_a.0's space (8, its input) and its output axis, which the
        # depthwise unit.dw.0 keeps as its own space (8, fixed). residual {stem.0,
        # unit.conv_b.0}(8) free; fc(10) output -> excluded. free 8+8 / (8+8+8+8)
        Fraction(16, 32),
        ("unit.conv_a.0", "unit.dw.0", "fc"),
        "ShuffleNet channel_shuffle (view/transpose/reshape) is a barrier; depthwise after it stays fixed",
    ),
    Topology(
        "unknown_op", _seeded(UnknownOpNet), _images(),
        # barrier: torch.fft.rfft over channels (no rule). It touches the residual stream
        # {stem.0, block.conv2.0}(8+8) -> fixed as a whole; block.conv1.0(8) free; its output
        # (5 freqs) is fixed, conv3(8) makes a fresh free space; fc(10) output -> excluded.
        # free 8+8 / (8+8+8+8)
        Fraction(16, 32),
        ("stem.0", "block.conv2.0", "fc"),
        "torch.fft.rfft over the channel axis inside a residual conv net: an unknown-op barrier",
    ),
]

_BY_NAME = {t.name: t for t in TOPOLOGIES}
assert len(_BY_NAME) == len(TOPOLOGIES), "duplicate topology names"


def by_name(name: str) -> Topology:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topology {name!r}; known: {sorted(_BY_NAME)}") from None


# ----------------------------------------------------------------------------------------------
# sanity check


def _producer_units(model: nn.Module) -> dict[str, int]:
    """Output units per producer module (MHA counts 3E + E), for the self-check below."""
    units = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            units[name] = 4 * m.embed_dim
        elif isinstance(m, nn.Linear) and not name.endswith("out_proj"):
            units[name] = m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            units[name] = m.out_channels
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            units[name] = m.out_channels
        elif isinstance(m, nn.Embedding):
            units[name] = m.embedding_dim
    return units


def sanity_check(topo: Topology, seed: int = 0) -> dict:
    import time

    import torch.fx

    model = topo.build(seed)
    assert not model.training, f"{topo.name}: not in eval mode"
    inputs = topo.example(seed)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(*inputs)
        out_gm = gm(*inputs)
        t0 = time.perf_counter()
        for _ in range(5):
            model(*inputs)
        ms = (time.perf_counter() - t0) / 5 * 1e3
    assert torch.isfinite(out).all(), f"{topo.name}: non-finite output"
    assert torch.equal(out, out_gm), f"{topo.name}: traced graph differs from eager"
    # same seed -> same weights; other seed -> other weights
    again = topo.build(seed).state_dict()
    other = topo.build(seed + 1).state_dict()
    ref = model.state_dict()
    assert all(torch.equal(ref[k], again[k]) for k in ref), f"{topo.name}: build not seeded"
    assert any(not torch.equal(ref[k], other[k]) for k in ref), f"{topo.name}: seed ignored"
    # frozen names are producers; coverage is consistent with them when no barrier mixes
    units = _producer_units(model)
    for f in topo.frozen:
        assert f in units, f"{topo.name}: frozen {f!r} is not a producer module"
    assert 0 <= topo.coverage <= 1
    return {"name": topo.name, "ms": ms, "out": tuple(out.shape), "units": sum(units.values())}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for t in TOPOLOGIES:
        r = sanity_check(t)
        flag = "" if r["ms"] < 5 else "  SLOW"
        print(f"{t.name:18s} coverage={str(t.coverage):6s} ({float(t.coverage):.3f}) "
              f"out={r['out']} forward={r['ms']:.2f}ms{flag}")
    print(f"ok: {len(TOPOLOGIES)} topologies")
