"""Named tensors of one checkpoint behind one interface: specs up front, flat slices on request."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CheckpointError", "TensorSpec", "CheckpointReader", "TensorMapReader", "bytes_of"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's name, shape and dtype (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), tensor.dtype)


def bytes_of(tensor: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, numpy need not know it)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class CheckpointReader:
    """Named tensors of one checkpoint: specs up front, data on request.

    ``specs`` lists the tensors in stored order. :meth:`read` returns a flat slice of one
    tensor in its stored dtype; callers treat it as read-only (a view for in-memory readers).
    """

    label: str
    specs: Mapping[str, TensorSpec]
    metadata: Mapping[str, str]

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> Tensor:
        raise NotImplementedError

    def read_into(self, name: str, start: int, out: Tensor) -> Tensor:
        """Read ``out.numel()`` elements from ``start`` into ``out`` (converted to its dtype)."""
        return out.copy_(self.read(name, start, start + out.numel()))

    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` with its shape (a private copy for file readers)."""
        return self.read(name).reshape(self.specs[name].shape)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: self.tensor(name) for name in self.specs}

    def close(self) -> None:
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _span(self, name: str, start: int, stop: Optional[int]) -> tuple[TensorSpec, int, int]:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.label}: no tensor {name!r}")
        stop = spec.numel if stop is None else stop
        if not 0 <= start <= stop <= spec.numel:
            raise IndexError(f"{self.label}: elements [{start}, {stop}) of {name!r} ({spec.numel} elements)")
        return spec, start, stop


class TensorMapReader(CheckpointReader):
    """A reader over tensors already in memory (a state dict or a module's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, object], label: str = "state dict"):
        self.label = label
        self._tensors = dict(tensors)
        for name, value in self._tensors.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{label}: {name!r} is a {type(value).__name__}, not a tensor")
        self.specs = {name: TensorSpec.of(name, value) for name, value in self._tensors.items()}
        self.metadata = {}
        self._flat: tuple[str, Tensor] = ("", torch.empty(0))  # last non-contiguous tensor, flattened

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> Tensor:
        _, start, stop = self._span(name, start, stop)
        tensor = self._tensors[name].detach()
        if tensor.is_contiguous():
            return tensor.view(-1)[start:stop]
        if self._flat[0] != name:  # flatten once per tensor, not once per slice
            self._flat = (name, tensor.reshape(-1))
        return self._flat[1][start:stop]
