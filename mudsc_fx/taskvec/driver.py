"""Drivers shared by the task-vector methods: in memory (modules) or streamed (files).

A method whose result is one merged checkpoint is written as a generator
``merged_values(stream, options)`` that yields ``(entry, start, values)`` pieces, in the
stream's order: the merged values of scalars ``[start, start + len(values))`` of ``entry`` in
the layout's work dtype. :func:`checkpoint_method` turns such a generator into a registered
:class:`~mudsc_fx.taskvec.registry.TaskVectorMethod` with both drivers:

- over modules: the pieces are written into a deep copy of the base (kept and copied entries
  keep the base's values);
- over files: the pieces are streamed into a ``.safetensors`` output as they come (a PyTorch
  output file is assembled in memory first), so the peak memory is the pieces in flight plus
  what the method itself keeps.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints import (CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX, PathLike, SafetensorsWriter, check_output_path,
                           write_state_dict)
from .vector_layout import Entry, KeepSpec
from .registry import Option, TaskVectorMethod, get_method
from .stream import DEFAULT_CHUNK_SIZE, ModelSource, TaskVectorStream, open_stream

__all__ = ["MergeFileResult", "MergedValues", "checkpoint_method", "merge_checkpoints", "write_pieces", "file_result"]

MergedValues = Callable[[TaskVectorStream, dict], Iterator[tuple[Entry, int, Tensor]]]


@dataclass(frozen=True)
class MergeFileResult:
    """What a file-to-file merge wrote: the output, its inputs and the cost in passes and time."""

    method: str
    path: Path
    options: tuple[tuple[str, Any], ...]
    num_models: int
    num_scalars: int
    kept: tuple[str, ...]
    passes: float  # reads of every merged scalar of every model
    seconds: float
    rescalers: tuple[float, ...] = ()  # EMR only


def write_pieces(module: nn.Module, pieces: Iterable[tuple[Entry, int, Tensor]]) -> nn.Module:
    """Write merged pieces into ``module``'s tensors in place (cast to each tensor's dtype)."""
    targets = module.state_dict()
    staged: dict[str, Tensor] = {}
    with torch.no_grad():
        for entry, start, values in pieces:
            target = targets[entry.name]
            if target.is_contiguous():
                target.view(-1)[start:start + values.numel()].copy_(values)
            else:  # e.g. channels_last: assemble the entry, copy it at the end
                flat = staged.setdefault(entry.name, torch.empty(entry.numel, dtype=values.dtype))
                flat[start:start + values.numel()].copy_(values)
        for name, flat in staged.items():
            targets[name].copy_(flat.view(targets[name].shape))
    return module


def file_result(name: str, stream: TaskVectorStream, output: Path, options: dict, started: float,
            rescalers: tuple[float, ...] = ()) -> MergeFileResult:
    layout = stream.layout
    return MergeFileResult(name, output, tuple(sorted(options.items())), stream.num_models, layout.num_scalars,
                           tuple(entry.name for entry in layout.kept),
                           stream.scalars_read / max(1, layout.num_scalars), time.perf_counter() - started, rescalers)


def checkpoint_method(name: str, summary: str, options: tuple[Option, ...], merged_values: MergedValues) -> TaskVectorMethod:
    """A method whose result is one merged checkpoint, from its ``merged_values`` generator."""

    def merge_modules(base: nn.Module, models: Iterable[ModelSource], keep: KeepSpec, resolved: dict,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> nn.Module:
        stream = open_stream(base, models, keep, chunk_size)
        try:
            return write_pieces(copy.deepcopy(base), merged_values(stream, resolved))
        finally:
            stream.close()

    def merge_files(base: ModelSource, models: Iterable[ModelSource], output: PathLike, keep: KeepSpec,
                    resolved: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> MergeFileResult:
        started = time.perf_counter()
        output = check_output_path(output, CHECKPOINT_SUFFIXES)
        stream = open_stream(base, models, keep, chunk_size)
        try:
            layout = stream.layout
            unmerged = layout.kept + layout.copied
            if output.suffix.lower() == SAFETENSORS_SUFFIX:
                metadata = {"format": "mudsc_fx.merged", "method": name, "options": json.dumps(resolved)}
                with SafetensorsWriter(output, layout.merged + unmerged, metadata) as out:
                    for entry, _, values in merged_values(stream, resolved):
                        out.write(entry.name, values.to(entry.dtype))
                    for entry in unmerged:
                        for piece in stream.pieces(stream.base, entry):
                            out.write(entry.name, piece)
            else:
                state = {name_: torch.empty(spec.shape, dtype=spec.dtype) for name_, spec in stream.base.specs.items()}
                for entry, start, values in merged_values(stream, resolved):
                    state[entry.name].view(-1)[start:start + values.numel()].copy_(values)
                for entry in unmerged:
                    state[entry.name].copy_(stream.base.tensor(entry.name))
                write_state_dict(state, output)
            return file_result(name, stream, output, resolved, started)
        finally:
            stream.close()

    return TaskVectorMethod(name, summary, options, "checkpoint", merge_modules, merge_files, CHECKPOINT_SUFFIXES)


def merge_checkpoints(method: str, base: ModelSource, models: Iterable[ModelSource], output: PathLike,
                      keep: KeepSpec = None, chunk_size: int = DEFAULT_CHUNK_SIZE, **options: Any) -> MergeFileResult:
    """Merge checkpoint files with a registered task-vector method, streaming into ``output``.

    ``base`` and ``models`` are checkpoint paths (``.safetensors`` inputs are read lazily, a
    chunk at a time; ``.pt`` files are loaded whole), or anything the in-memory functions
    accept. ``output`` is a ``.safetensors`` (streamed) or PyTorch file for methods that
    produce one merged checkpoint, a ``.safetensors`` EMR artifact for ``"emr"``. Options and
    the output path are checked before anything is read.

    >>> import tempfile, torch
    >>> from mudsc_fx.checkpoints import read_state_dict, write_state_dict
    >>> folder = tempfile.mkdtemp()
    >>> for name, value in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
    ...     write_state_dict({"w": torch.full((2,), value)}, f"{folder}/{name}.safetensors")
    >>> result = merge_checkpoints("task_arithmetic", f"{folder}/base.safetensors",
    ...                            [f"{folder}/a.safetensors", f"{folder}/b.safetensors"],
    ...                            f"{folder}/merged.safetensors", lam=0.5)
    >>> read_state_dict(result.path)["w"].tolist()
    [2.0, 2.0]
    """
    spec = get_method(method)
    resolved = spec.resolve(options)
    return spec.merge_files(base, models, output, keep, resolved, chunk_size)
