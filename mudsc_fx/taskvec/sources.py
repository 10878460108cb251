"""Task-model inputs: lazy loading, validation against the base, and the flat merge layout.

Every task-vector method works on one flat vector of the *merged* scalars: the floating-point
entries of the base's ``state_dict()`` that the caller did not ``keep``, concatenated in
``state_dict`` order. :class:`Layout` records which entries are merged, kept (taken per task,
never merged) or copied (non-float buffers such as ``num_batches_tracked``, taken from the
base), and where each merged entry lives in the flat vector.

Models are loaded one at a time by :func:`iter_task_vectors`, which drops the loaded state
before yielding its task vector, so a pass over N models holds one model plus one flat buffer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = [
    "KeepSpec",
    "ModelSource",
    "Entry",
    "Layout",
    "as_sources",
    "load_state",
    "as_module",
    "iter_task_vectors",
    "write_state",
]

StateDict = Mapping[str, Tensor]
ModelSource = Union[nn.Module, StateDict, str, os.PathLike, Callable[[], object]]
KeepSpec = Union[None, str, Callable[[str], bool], Collection[str]]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class Entry:
    """One ``state_dict`` entry of the base: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_json(self) -> list:
        return [self.name, list(self.shape), _dtype_name(self.dtype)]

    @classmethod
    def from_json(cls, item: object) -> Entry:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], list) and all(isinstance(d, int) and d >= 0 for d in item[1])
                and isinstance(item[2], str)):
            raise ValueError(f"malformed layout entry {item!r}")
        return cls(item[0], tuple(item[1]), _parse_dtype(item[2]))


def _keep_predicate(keep: KeepSpec, names: list[str]) -> Callable[[str], bool]:
    if keep is None:
        return lambda name: False
    if isinstance(keep, str):
        pattern = re.compile(keep)
        return lambda name: pattern.search(name) is not None
    if callable(keep):
        return keep
    if isinstance(keep, Collection):
        wanted = set(keep)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ValueError(f"keep names entries the base does not have: {unknown}")
        return wanted.__contains__
    raise TypeError(f"keep must be None, a regex string, a callable(name) -> bool or a collection of "
                    f"names, got {type(keep).__name__}")


@dataclass(frozen=True)
class Layout:
    """Which base entries are merged, kept per task or copied, and the flat merged vector.

    ``merged`` entries are concatenated (flattened, in order) into a vector of
    ``num_scalars`` values computed in ``work_dtype`` (at least float32) and stored in
    ``storage_dtype`` (the promoted dtype of the merged entries).
    """

    merged: tuple[Entry, ...]
    kept: tuple[Entry, ...]
    copied: tuple[Entry, ...]

    @classmethod
    def of(cls, state: StateDict, keep: KeepSpec = None) -> Layout:
        """The layout of ``state`` (normally ``base.state_dict()``) for a ``keep`` spec.

        ``keep`` is a regex (matched with ``re.search``), a ``callable(name) -> bool`` or a
        collection of entry names; kept entries are never merged. Other floating-point
        entries are merged; the rest (integer buffers) are copied from the base.
        """
        names = list(state)
        is_kept = _keep_predicate(keep, names)
        merged, kept, copied = [], [], []
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"base: {name!r} is a {type(tensor).__name__}, not a tensor")
            entry = Entry(name, tuple(tensor.shape), tensor.dtype)
            if is_kept(name):
                kept.append(entry)
            elif tensor.is_floating_point():
                merged.append(entry)
            else:
                copied.append(entry)
        return cls(tuple(merged), tuple(kept), tuple(copied))

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.merged + self.kept + self.copied

    @property
    def num_scalars(self) -> int:
        return sum(entry.numel for entry in self.merged)

    @property
    def storage_dtype(self) -> torch.dtype:
        dtype = self.merged[0].dtype if self.merged else torch.float32
        for entry in self.merged[1:]:
            dtype = torch.promote_types(dtype, entry.dtype)
        return dtype

    @property
    def work_dtype(self) -> torch.dtype:
        return torch.promote_types(self.storage_dtype, torch.float32)

    def segments(self) -> Iterator[tuple[Entry, slice]]:
        """Each merged entry with its slice of the flat vector."""
        start = 0
        for entry in self.merged:
            yield entry, slice(start, start + entry.numel)
            start += entry.numel

    def zeros(self) -> Tensor:
        return torch.zeros(self.num_scalars, dtype=self.work_dtype)

    def check(self, state: StateDict, who: str) -> None:
        """Raise ValueError (naming ``who`` and the entry) unless ``state`` fits this layout.

        Names and shapes must match; merged entries must be floating point; floating-point
        values must be finite. Dtypes may otherwise differ (a float16 checkpoint of a
        float32 base is accepted and merged in ``work_dtype``).
        """
        names, expected = set(state), {entry.name for entry in self.entries}
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise ValueError(f"{who}: parameter names differ from the base: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        merged = {entry.name for entry in self.merged}
        for entry in self.entries:
            tensor = state[entry.name]
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{who}: {entry.name!r} is a {type(tensor).__name__}, not a tensor")
            if tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{who}: parameter {entry.name!r} has shape {tuple(tensor.shape)}, "
                                 f"the base has {entry.shape}")
            if entry.name in merged and not tensor.is_floating_point():
                raise ValueError(f"{who}: parameter {entry.name!r} is {tensor.dtype}, "
                                 f"the base has floating-point {entry.dtype}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{who}: parameter {entry.name!r} contains NaN or inf")

    def fill_task_vector(self, state: StateDict, base_state: StateDict, out: Tensor) -> Tensor:
        """Write the flat ``state - base_state`` over merged entries into ``out``."""
        for entry, span in self.segments():
            segment = out[span]
            segment.copy_(state[entry.name].detach().reshape(-1))
            segment.sub_(base_state[entry.name].detach().reshape(-1).to(out.device, out.dtype))
        return out

    def kept_of(self, state: StateDict) -> dict[str, Tensor]:
        """Private contiguous CPU copies of the kept entries of ``state``."""
        return {entry.name: state[entry.name].detach().cpu().clone(memory_format=torch.contiguous_format)
                for entry in self.kept}

    def to_json(self) -> str:
        return json.dumps({"merged": [e.to_json() for e in self.merged],
                           "kept": [e.to_json() for e in self.kept],
                           "copied": [e.to_json() for e in self.copied]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"merged", "kept", "copied"}:
            raise ValueError("layout must be an object with keys 'merged', 'kept', 'copied'")
        return cls(*(tuple(Entry.from_json(item) for item in data[key])
                     for key in ("merged", "kept", "copied")))


def as_sources(models: Iterable[ModelSource]) -> list[ModelSource]:
    """The task-model inputs as a list (items stay unloaded), or a clear error."""
    if isinstance(models, (str, bytes, os.PathLike, nn.Module, Mapping)) or not isinstance(models, Iterable):
        raise TypeError(f"models must be a sequence of models, got {type(models).__name__}")
    sources = list(models)
    if not sources:
        raise ValueError("models is empty: give at least one fine-tuned model")
    return sources


def _read_state_file(path: Path, who: str) -> StateDict:
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _CHECKPOINT_SUFFIXES:
        raise ValueError(f"{who}: {path}: unknown checkpoint suffix {suffix!r}; "
                         f"expected .safetensors or one of {_CHECKPOINT_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no such file {path}")
    try:
        if suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files surface as many exception types
        raise ValueError(f"{who}: cannot read {path}: {err}") from err
    if not (isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())):
        raise ValueError(f"{who}: {path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_state(source: ModelSource, index: int) -> StateDict:
    """The state dict of one task model: a module, a state dict, a path or a callable."""
    who = f"model {index}"
    if callable(source) and not isinstance(source, (nn.Module, Mapping)):
        source = source()
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        return _read_state_file(Path(source), who)
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"{who}: expected an nn.Module, a state dict, a .pt/.safetensors path or a "
                    f"zero-argument callable returning one, got {type(source).__name__}")


def as_module(source: ModelSource, index: int, base: nn.Module, layout: Layout) -> nn.Module:
    """Task model ``index`` as a private module of the base's architecture."""
    if isinstance(source, nn.Module):
        layout.check(source.state_dict(), f"model {index}")
        return copy.deepcopy(source)
    state = load_state(source, index)
    layout.check(state, f"model {index}")
    module = copy.deepcopy(base)
    write_state(module, state)
    return module


def iter_task_vectors(sources: list[ModelSource], layout: Layout, base_state: StateDict,
                      with_kept: bool = False) -> Iterator[tuple[int, Tensor, dict[str, Tensor]]]:
    """Yield ``(index, tau, kept)`` per task model, loading each lazily and validating it.

    ``tau`` is one flat buffer reused (overwritten) on every step; the loaded state is
    released before yielding, so a pass holds one model's tensors plus that buffer.
    """
    buffer = layout.zeros()
    for index, source in enumerate(sources):
        state = load_state(source, index)
        layout.check(state, f"model {index}")
        layout.fill_task_vector(state, base_state, out=buffer)
        kept = layout.kept_of(state) if with_kept else {}
        del state
        yield index, buffer, kept


def write_state(module: nn.Module, values: StateDict) -> None:
    """Copy ``values`` into the matching ``state_dict`` tensors of ``module`` in place."""
    targets = module.state_dict()
    with torch.no_grad():
        for name, value in values.items():
            targets[name].copy_(value)
