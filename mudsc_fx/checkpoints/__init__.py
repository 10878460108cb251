"""Checkpoint I/O shared by the command line and the task-vector merges.

Reading: :func:`open_checkpoint` gives a :class:`CheckpointReader` (``readers``) for a
``.safetensors`` file (lazy: the header is parsed on open, tensor data is read on request, a
flat slice at a time, into ordinary memory; ``safetensors_file``) or for a PyTorch
``.pt``/``.pth``/``.bin``/``.ckpt`` file (loaded whole with ``torch.load(weights_only=True)``:
a pickle that needs anything beyond tensors and plain containers is refused and nothing in it
is executed; ``torch_file``). :class:`TensorMapReader` gives the same interface over a state
dict already in memory.

Writing: :class:`SafetensorsWriter` streams tensors into a safetensors file whose header is
known up front (so a merge never holds its whole output), writes a SHA-256 of the tensor data
into the metadata (``tensors_sha256``) and moves the finished file into place atomically.
:func:`write_state_dict` writes a whole state dict (tied weights are stored once per name in
safetensors, shared in PyTorch files). Files get ordinary permissions (``0o666`` minus the
umask). Every problem is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .readers import CheckpointError, CheckpointReader, TensorMapReader, TensorSpec
from .safetensors_file import CHECKSUM_KEY, SafetensorsReader, SafetensorsWriter, partial_path
from .torch_file import load_torch_object, load_torch_state

__all__ = [
    "SAFETENSORS_SUFFIX", "TORCH_SUFFIXES", "CHECKPOINT_SUFFIXES", "CHECKSUM_KEY", "CheckpointError", "TensorSpec",
    "CheckpointReader", "TensorMapReader", "SafetensorsReader", "open_checkpoint", "read_state_dict",
    "SafetensorsWriter", "write_state_dict", "check_output_path", "load_into",
    "load_torch_object", "PathLike",
]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX,) + TORCH_SUFFIXES
PathLike = Union[str, os.PathLike]


def open_checkpoint(path: PathLike, label: Optional[str] = None) -> CheckpointReader:
    """A reader for a checkpoint file (lazy for safetensors), or CheckpointError / FileNotFoundError.

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/m.safetensors"
    >>> write_state_dict({"w": torch.ones(2, 3)}, path)
    >>> with open_checkpoint(path) as reader:
    ...     reader.specs["w"].shape, reader.read("w", 1, 3).tolist()
    ((2, 3), [1.0, 1.0])
    """
    path = Path(path)
    label = f"{label} ({path})" if label else str(path)
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{label}: unknown checkpoint suffix {suffix!r}; expected one of {CHECKPOINT_SUFFIXES}")
    if not path.exists():
        raise FileNotFoundError(f"{label}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{label}: is a directory, not a checkpoint file")
    if suffix == SAFETENSORS_SUFFIX:
        return SafetensorsReader(path, label)
    return TensorMapReader(load_torch_state(path, label), label)


def read_state_dict(path: PathLike, label: Optional[str] = None) -> dict[str, Tensor]:
    """The whole state dict of a checkpoint file (a safetensors checksum is verified if present)."""
    with open_checkpoint(path, label) as reader:
        if isinstance(reader, SafetensorsReader):
            reader.verify_checksum()
        return reader.state_dict()


def check_output_path(path: PathLike, suffixes: Sequence[str] = CHECKPOINT_SUFFIXES, what: str = "output") -> Path:
    """Validate a file to be written before any long work: suffix, existing writable folder."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise CheckpointError(f"{what} {path}: the suffix must be one of {tuple(suffixes)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise CheckpointError(f"{what} {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{what} {path}: {folder} is not a folder")
    if path.is_dir():
        raise CheckpointError(f"{what} {path}: is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {path}: the folder {folder} is not writable")
    return path


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor`` detached and contiguous, cloned if it is a view into a larger storage."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def write_state_dict(state: Mapping[str, Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a state dict to ``.safetensors`` (with a data checksum) or a PyTorch file.

    Tied weights (one storage under several names) are stored once per name in safetensors
    and shared in PyTorch files; either loads back into the module with ``load_state_dict``.
    """
    path = check_output_path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        specs = [TensorSpec.of(name, tensor) for name, tensor in state.items()]
        with SafetensorsWriter(path, specs, metadata) as out:
            for name, tensor in state.items():
                out.write_tensor(name, tensor)
        return
    if metadata:
        raise CheckpointError(f"{path}: metadata can only be stored in .safetensors files")
    partial = partial_path(path)
    try:
        torch.save({name: _own_storage(tensor) for name, tensor in state.items()}, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_into(module: nn.Module, state: Mapping[str, Tensor], label: str) -> nn.Module:
    """Copy ``state`` into ``module`` (names and shapes must match exactly), or CheckpointError."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{label} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{label}: {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the model has {tuple(tensor.shape)}")
    module.load_state_dict(state)
    return module
