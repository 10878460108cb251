"""Helpers shared by the command modules: input shapes, example inputs, error lines."""
from __future__ import annotations

import argparse
import sys

import torch


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated integers, got {text!r}") from None


def example_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def fail(msg: str) -> int:
    print(f"mudsc-fx: error: {msg}", file=sys.stderr)
    return 2
