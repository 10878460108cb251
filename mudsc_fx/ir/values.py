"""What every traced node produced: one frozen record per node under ``node.meta[META_KEY]``
(written by the front ends, read by every pass through :func:`value_of`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

META_KEY = "mudsc_fx.value"


@dataclass(frozen=True)
class TensorValue:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Opaque:
    """A value that is neither a tensor, a number, nor a container of those."""
    type_name: str


def abstract(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorValue(tuple(v.shape), v.dtype)
    if isinstance(v, (tuple, list)):
        return tuple(abstract(x) for x in v)
    if isinstance(v, dict):
        return {k: abstract(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.Size, slice, type(Ellipsis))):
        return tuple(v) if isinstance(v, torch.Size) else v
    return Opaque(type(v).__name__)


def value_of(node: fx.Node) -> Any:
    """The abstract value (TensorValue, tuple, number, ...) ``node`` produced while tracing."""
    try:
        return node.meta[META_KEY]
    except KeyError:
        raise RuntimeError(f"node {node.format_node()} has no shape record: run mudsc_fx.trace first") from None


def tensor_value(node: Any) -> TensorValue | None:
    if isinstance(node, fx.Node):
        v = value_of(node)
        return v if isinstance(v, TensorValue) else None
    return None
