"""Which base entries a task-vector merge combines, keeps per task or copies, and the flat vector.

Every task-vector method works on the *merged* scalars: the floating-point entries of the
base that the caller did not ``keep``, taken in the base's order and concatenated into one
flat vector of ``num_scalars`` values. :class:`TaskVectorLayout` records three kinds of entries:

- merged: floating-point entries, combined by the method;
- kept: entries named by ``keep`` (task heads), never merged: each task has its own;
- copied: the other entries (integer buffers such as ``num_batches_tracked``), taken from
  the base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Union

import torch

from ..checkpoints import TensorSpec

__all__ = ["KeepSpec", "Entry", "TaskVectorLayout"]

KeepSpec = Union[None, str, Callable[[str], bool], Collection[str]]
Entry = TensorSpec  # one entry of the base: name, shape, dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _entry_to_json(entry: Entry) -> list:
    return [entry.name, list(entry.shape), _dtype_name(entry.dtype)]


def _entry_from_json(item: object) -> Entry:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            and isinstance(item[1], list) and all(isinstance(d, int) and d >= 0 for d in item[1])
            and isinstance(item[2], str)):
        raise ValueError(f"malformed layout entry {item!r}")
    return Entry(item[0], tuple(item[1]), _parse_dtype(item[2]))


def _keep_predicate(keep: KeepSpec, names: list[str]) -> Callable[[str], bool]:
    if keep is None:
        return lambda name: False
    if isinstance(keep, str):
        try:
            pattern = re.compile(keep)
        except re.error as err:
            raise ValueError(f"keep {keep!r} is not a valid regular expression ({err})") from None
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
class TaskVectorLayout:
    """Merged, kept and copied entries of the base, and the flat merged vector.

    Merged values are computed in ``work_dtype`` (at least float32) and stored in
    ``storage_dtype`` (the promoted dtype of the merged entries).
    """

    merged: tuple[Entry, ...]
    kept: tuple[Entry, ...]
    copied: tuple[Entry, ...]

    @classmethod
    def of(cls, specs: Mapping[str, TensorSpec], keep: KeepSpec = None) -> TaskVectorLayout:
        """The layout of the base's tensor ``specs`` (in order) for a ``keep`` spec.

        ``keep`` is a regex (matched with ``re.search``), a ``callable(name) -> bool`` or a
        collection of entry names; kept entries are never merged.
        """
        is_kept = _keep_predicate(keep, list(specs))
        merged, kept, copied = [], [], []
        for spec in specs.values():
            if is_kept(spec.name):
                kept.append(spec)
            elif spec.dtype.is_floating_point:
                merged.append(spec)
            else:
                copied.append(spec)
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

    def check(self, specs: Mapping[str, TensorSpec], who: str) -> None:
        """Raise ValueError (naming ``who`` and the entry) unless ``specs`` fit this layout.

        Names and shapes must match and merged entries must be floating point; dtypes may
        otherwise differ (a float16 checkpoint of a float32 base is merged in ``work_dtype``).
        Values (NaN, inf) are checked when they are read.
        """
        names, expected = set(specs), {entry.name for entry in self.entries}
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise ValueError(f"{who}: parameter names differ from the base: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        merged = {entry.name for entry in self.merged}
        for entry in self.entries:
            spec = specs[entry.name]
            if spec.shape != entry.shape:
                raise ValueError(f"{who}: parameter {entry.name!r} has shape {spec.shape}, the base has {entry.shape}")
            if entry.name in merged and not spec.dtype.is_floating_point:
                raise ValueError(f"{who}: parameter {entry.name!r} is {spec.dtype}, "
                                 f"the base has floating-point {entry.dtype}")

    def to_json(self) -> str:
        return json.dumps({key: [_entry_to_json(e) for e in getattr(self, key)] for key in ("merged", "kept", "copied")},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TaskVectorLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(data, dict) or set(data) != {"merged", "kept", "copied"}:
            raise ValueError("layout must be an object with keys 'merged', 'kept', 'copied'")
        return cls(*(tuple(_entry_from_json(item) for item in data[key]) for key in ("merged", "kept", "copied")))
