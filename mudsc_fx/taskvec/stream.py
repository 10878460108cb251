"""Task vectors, tensor by tensor: the one access path every task-vector method reads through.

A :class:`TaskVectorStream` holds a reader for the base and one per task model (lazy for
safetensors files, see :mod:`mudsc_fx.checkpoints`) and yields :class:`Chunk` s: a flat piece of
one merged entry (at most ``chunk_size`` scalars) with the base's values and the N task vectors
``tau_t = theta_t - theta_0`` of that piece. A pass over the model therefore holds the N + 1
pieces being combined plus what the method keeps, whatever the size of the model; a method
that needs whole-model quantities makes more than one pass.

Task models may be modules, state dicts, checkpoint paths, readers, or zero-argument callables
returning one of those. A callable is called once, when the merge starts, and what it returns
is held until the merge ends (a method reads every model at every tensor); to keep N large
models out of memory, give safetensors paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointReader, TensorMapReader, open_checkpoint
from .vector_layout import Entry, KeepSpec, TaskVectorLayout

__all__ = ["ModelSource", "DEFAULT_CHUNK_SIZE", "Chunk", "TaskVectorStream", "as_sources", "open_source",
           "open_stream", "check_finite"]

ModelSource = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike, CheckpointReader, Callable[[], object]]
DEFAULT_CHUNK_SIZE = 1 << 22  # scalars per task per chunk (16 MB in float32)


def as_sources(models: Iterable[ModelSource]) -> list[ModelSource]:
    """The task-model inputs as a list (items stay unopened), or a clear error."""
    if isinstance(models, (str, bytes, os.PathLike, nn.Module, Mapping, CheckpointReader)) \
            or not isinstance(models, Iterable):
        raise TypeError(f"models must be a sequence of models, got {type(models).__name__}")
    sources = list(models)
    if not sources:
        raise ValueError("models is empty: give at least one fine-tuned model")
    return sources


def open_source(source: ModelSource, label: str) -> CheckpointReader:
    """A reader for one input: a module, a state dict, a checkpoint path, a reader or a callable."""
    if callable(source) and not isinstance(source, (nn.Module, Mapping, CheckpointReader)):
        source = source()
    if isinstance(source, CheckpointReader):
        return source
    if isinstance(source, nn.Module):
        return TensorMapReader(source.state_dict(), label)
    if isinstance(source, Mapping):
        return TensorMapReader(source, label)
    if isinstance(source, (str, os.PathLike)):
        return open_checkpoint(source, label)
    raise TypeError(f"{label}: expected an nn.Module, a state dict, a checkpoint path or a zero-argument callable "
                    f"returning one, got {type(source).__name__}")


def all_finite(values: Tensor) -> bool:
    """No NaN and no inf (min and max propagate both; one pass, no temporary)."""
    if not values.is_floating_point() or values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(values: Tensor, who: str, name: str) -> None:
    if not all_finite(values):
        raise ValueError(f"{who}: parameter {name!r} contains NaN or inf")


@dataclass(frozen=True, eq=False)
class Chunk:
    """Scalars ``[start, start + size)`` of one merged entry (``offset`` in the flat vector).

    ``base`` (size,) and ``taus`` (N, size) are private ``work_dtype`` tensors: a method may
    change them in place.
    """

    entry: Entry
    start: int
    offset: int
    base: Tensor
    taus: Tensor

    @property
    def size(self) -> int:
        return self.base.numel()


class TaskVectorStream:
    """Chunks of the task vectors of ``models`` against ``base`` over a :class:`TaskVectorLayout`.

    Every reader is checked against the layout on creation (names, shapes, floating-point
    merged entries); values are checked for NaN / inf as they are read. ``scalars_read``
    counts merged scalars read per model, so ``scalars_read / layout.num_scalars`` is the
    number of passes made.
    """

    def __init__(self, base: CheckpointReader, models: Sequence[CheckpointReader], layout: TaskVectorLayout,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.base, self.models, self.layout, self.chunk_size = base, list(models), layout, int(chunk_size)
        for reader in [base, *self.models]:
            layout.check(reader.specs, reader.label)
        self._offsets = {entry.name: span.start for entry, span in layout.segments()}
        self.scalars_read = 0

    @property
    def num_models(self) -> int:
        return len(self.models)

    def chunks(self, entries: Optional[Sequence[Entry]] = None) -> Iterator[Chunk]:
        """One pass over ``entries`` (default: every merged entry), in order, chunk by chunk."""
        work = self.layout.work_dtype
        for entry in self.layout.merged if entries is None else entries:
            for start in range(0, entry.numel, self.chunk_size):
                stop = min(entry.numel, start + self.chunk_size)
                base = self.base.read_into(entry.name, start, torch.empty(stop - start, dtype=work))
                check_finite(base, self.base.label, entry.name)
                taus = torch.empty((len(self.models), stop - start), dtype=work)
                for row, reader in zip(taus, self.models):
                    reader.read_into(entry.name, start, row)
                if not all_finite(taus):
                    for row, reader in zip(taus, self.models):
                        check_finite(row, reader.label, entry.name)
                taus.sub_(base)
                self.scalars_read += stop - start
                yield Chunk(entry, start, self._offsets[entry.name] + start, base, taus)

    def pieces(self, reader: CheckpointReader, entry: Entry) -> Iterator[Tensor]:
        """Entry ``entry`` of ``reader`` (a kept or copied one), chunk by chunk, checked for NaN / inf."""
        for start in range(0, entry.numel, self.chunk_size):
            piece = reader.read(entry.name, start, min(entry.numel, start + self.chunk_size))
            check_finite(piece, reader.label, entry.name)
            yield piece

    def kept(self, index: int) -> dict[str, Tensor]:
        """Private copies of model ``index``'s kept entries (its task head)."""
        reader = self.models[index]
        out = {}
        for entry in self.layout.kept:
            tensor = reader.tensor(entry.name).clone(memory_format=torch.contiguous_format)
            check_finite(tensor, reader.label, entry.name)
            out[entry.name] = tensor
        return out

    def close(self) -> None:
        for reader in [self.base, *self.models]:
            reader.close()


def open_stream(base: ModelSource, models: Iterable[ModelSource], keep: KeepSpec = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> TaskVectorStream:
    """Open the base and every task model and check them against the base's layout."""
    sources = as_sources(models)
    readers: list[CheckpointReader] = []
    try:
        readers.append(open_source(base, "base"))
        readers.extend(open_source(source, f"model {index}") for index, source in enumerate(sources))
        layout = TaskVectorLayout.of(readers[0].specs, keep)
        return TaskVectorStream(readers[0], readers[1:], layout, chunk_size)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
