"""A tiny zoo for the zoo-check tests: small models of a few topologies, each with its example
input, as a user's own zoo would be written (``--zoo tests/tiny_zoo.py:ZOO``)."""
import time

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.body(h))
        return self.head(h.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return self.out(h.mean(1))


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def layernorm_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


ZOO = {
    "mlp": (mlp, (3, 8)),
    "residual": (Residual, (2, 3, 12, 12)),
    "attention": (Attention, lambda: torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))),
    "layernorm_mlp": (layernorm_mlp, (3, 8)),
}


def broken():
    raise RuntimeError("this factory is broken on purpose")


def sleeper():
    time.sleep(600)
    return mlp()


def memory_hog():
    hog = torch.ones(2**28)   # 1 GiB, touched
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(bool(hog[0]))


def troubled_zoo():
    """Yields (name, factory, example): models that break, hang or grow, between good ones."""
    yield "mlp", mlp, (3, 8)
    yield "broken", broken, (3, 8)
    yield "sleeper", sleeper, (3, 8)
    yield "memory_hog", memory_hog, (3, 8)
    yield "residual", Residual, (2, 3, 12, 12)
