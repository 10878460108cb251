"""Factories for CLI tests (loaded as tests/cli_models.py:NAME)."""
import torch
from torch import nn


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


class _Broken(nn.Module):
    """A module whose forward cannot be traced symbolically."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def broken():
    return _Broken()


def calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
