"""The stored part of an EMR-Merging result, its bit-packed masks and its safetensors format.

File format (``format_version`` 2), one safetensors file:

- tensors: ``tau_uni`` (P,) in the layout's storage dtype; ``kept.{t}.{name}`` for each task
  t and kept entry ``name``; ``masks`` (N, ceil(P/8)) uint8, row t = task t's mask packed with
  ``numpy.packbits(bitorder="little")`` (bit j of byte b is scalar 8*b + j, padding bits
  zero); ``rescalers`` (N,) float64.
- header metadata (all strings): ``format`` = ``"mudsc_fx.emr"``, ``format_version``,
  ``num_tasks``, ``num_scalars`` (P), ``rescale``, ``mask_bitorder`` = ``"little"``,
  ``layout`` (JSON: merged / kept / copied entries as ``[name, shape, dtype]``, in order),
  ``base_sha256`` (digest of the base's merged and copied entries; the base is not stored and
  must be supplied, unchanged, on load) and ``tensors_sha256`` (SHA-256 of all tensor data, in
  file order). Loading recomputes the data checksum; any mismatch is an error.

Version 1 files (no data checksum) are refused: merge again to write version 2.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoints import CheckpointError, CheckpointReader, SafetensorsReader, SafetensorsWriter, TensorSpec
from .vector_layout import TaskVectorLayout

__all__ = ["RESCALE_MODES", "FORMAT", "FORMAT_VERSION", "EMRArtifact", "MaskPacker", "pack_mask", "unpack_mask",
           "base_digest", "artifact_specs", "artifact_metadata", "kept_key", "write_artifact", "read_artifact"]

RESCALE_MODES = ("paper", "per_tensor_mean")
FORMAT = "mudsc_fx.emr"
FORMAT_VERSION = 2
_DIGEST_CHUNK = 1 << 22


def pack_mask(mask: Tensor) -> Tensor:
    """A flat bool mask of P scalars as ceil(P/8) uint8 bytes (little bit order)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), bitorder="little"))


def unpack_mask(packed: Tensor, num_bits: int) -> Tensor:
    """Inverse of :func:`pack_mask`: the first ``num_bits`` bits as a bool tensor."""
    bits = np.unpackbits(packed.cpu().numpy(), count=num_bits, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


class MaskPacker:
    """Packs (rows, c) bool chunks, appended in order, into (rows, ceil(bits/8)) uint8 rows.

    Equal to :func:`pack_mask` of each whole row; the < 8 bits that do not fill a byte wait
    for the next chunk.
    """

    def __init__(self, rows: int, bits: int):
        self.packed = torch.zeros((rows, (bits + 7) // 8), dtype=torch.uint8)
        self._pending = np.zeros((rows, 0), dtype=np.bool_)
        self._byte = 0

    def append(self, mask: Tensor) -> None:
        bits = np.concatenate([self._pending, mask.numpy()], axis=1)
        whole = bits.shape[1] // 8 * 8
        self._put(np.packbits(bits[:, :whole], axis=1, bitorder="little"))
        self._pending = bits[:, whole:]

    def _put(self, packed: np.ndarray) -> None:
        self.packed[:, self._byte:self._byte + packed.shape[1]] = torch.from_numpy(packed)
        self._byte += packed.shape[1]

    def finish(self) -> Tensor:
        if self._pending.shape[1]:
            self._put(np.packbits(self._pending, axis=1, bitorder="little"))
            self._pending = self._pending[:, :0]
        if self._byte != self.packed.shape[1]:
            raise ValueError(f"MaskPacker: {self._byte} of {self.packed.shape[1]} bytes written")
        return self.packed


def base_digest(layout: TaskVectorLayout, base: CheckpointReader, chunk_size: int = _DIGEST_CHUNK) -> str:
    """SHA-256 of the base entries an EMR artifact depends on (merged and copied), streamed."""
    digest = hashlib.sha256()
    for entry in layout.merged + layout.copied:
        digest.update(f"{entry.name}|{entry.dtype}|{entry.shape}|".encode())
        for start in range(0, entry.numel, chunk_size):
            piece = base.read(entry.name, start, min(entry.numel, start + chunk_size)).contiguous()
            digest.update(memoryview(piece.view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class EMRArtifact:
    """Everything an EMR merge stores besides the base: checked for consistency on creation."""

    layout: TaskVectorLayout
    rescale: str
    tau_uni: Tensor  # (P,) storage dtype
    masks: Tensor  # (N, ceil(P/8)) uint8
    rescalers: Tensor  # (N,) float64
    kept: tuple[dict[str, Tensor], ...]  # per task: kept entry name -> tensor
    base_sha256: str

    def __post_init__(self) -> None:
        num_scalars, num_tasks = self.layout.num_scalars, self.num_tasks
        if self.rescale not in RESCALE_MODES:
            raise ValueError(f"rescale is {self.rescale!r}, expected one of {RESCALE_MODES}")
        if num_tasks < 1:
            raise ValueError("no tasks")
        _expect(self.tau_uni, "tau_uni", (num_scalars,), self.layout.storage_dtype)
        _expect(self.masks, "masks", (num_tasks, (num_scalars + 7) // 8), torch.uint8)
        _expect(self.rescalers, "rescalers", (num_tasks,), torch.float64)
        if not (bool(torch.isfinite(self.tau_uni).all()) and bool(torch.isfinite(self.rescalers).all())
                and bool((self.rescalers >= 0).all())):
            raise ValueError("tau_uni or rescalers hold NaN, inf or negative rescalers")
        if len(self.kept) != num_tasks:
            raise ValueError(f"kept tensors for {len(self.kept)} tasks, expected {num_tasks}")
        for task, heads in enumerate(self.kept):
            if set(heads) != {entry.name for entry in self.layout.kept}:
                raise ValueError(f"task {task}: kept tensors {sorted(heads)} do not match the layout")
            for entry in self.layout.kept:
                if tuple(heads[entry.name].shape) != entry.shape:
                    raise ValueError(f"task {task}: kept tensor {entry.name!r} has shape "
                                     f"{tuple(heads[entry.name].shape)}, expected {entry.shape}")

    @property
    def num_tasks(self) -> int:
        return int(self.masks.shape[0]) if self.masks.dim() == 2 else 0


def _expect(tensor: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")


def kept_key(task: int, name: str) -> str:
    return f"kept.{task}.{name}"


def artifact_specs(layout: TaskVectorLayout, kept_dtypes: list[dict[str, torch.dtype]]) -> list[TensorSpec]:
    """The artifact's tensors in file order, for ``len(kept_dtypes)`` tasks."""
    num_tasks, num_scalars = len(kept_dtypes), layout.num_scalars
    specs = [TensorSpec("tau_uni", (num_scalars,), layout.storage_dtype)]
    specs += [TensorSpec(kept_key(task, entry.name), entry.shape, dtypes[entry.name])
              for task, dtypes in enumerate(kept_dtypes) for entry in layout.kept]
    specs += [TensorSpec("masks", (num_tasks, (num_scalars + 7) // 8), torch.uint8),
              TensorSpec("rescalers", (num_tasks,), torch.float64)]
    return specs


def artifact_metadata(layout: TaskVectorLayout, num_tasks: int, rescale: str, base_sha256: str) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "num_tasks": str(num_tasks),
            "num_scalars": str(layout.num_scalars), "rescale": rescale, "mask_bitorder": "little",
            "layout": layout.to_json(), "base_sha256": base_sha256}


def write_artifact(artifact: EMRArtifact, path: str | os.PathLike) -> None:
    """Write ``artifact`` to ``path`` (atomically, with the data checksum)."""
    specs = artifact_specs(artifact.layout, [{n: t.dtype for n, t in heads.items()} for heads in artifact.kept])
    metadata = artifact_metadata(artifact.layout, artifact.num_tasks, artifact.rescale, artifact.base_sha256)
    with SafetensorsWriter(path, specs, metadata) as out:
        out.write("tau_uni", artifact.tau_uni)
        for task, heads in enumerate(artifact.kept):
            for entry in artifact.layout.kept:
                out.write_tensor(kept_key(task, entry.name), heads[entry.name])
        out.write_tensor("masks", artifact.masks)
        out.write("rescalers", artifact.rescalers)


def read_artifact(path: str | os.PathLike) -> EMRArtifact:
    """Read, verify (data checksum) and validate an artifact; ValueError naming ``path`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such EMR artifact file")
    try:
        with SafetensorsReader(path) as reader:
            metadata = dict(reader.metadata)
            _check_format(metadata)
            reader.verify_checksum(required=True)
            tensors = reader.state_dict()
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        return _artifact_from(metadata, tensors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _check_format(metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not an EMR-Merging artifact (metadata 'format' is {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"unsupported format_version {metadata.get('format_version')!r} "
                         f"(this version reads {FORMAT_VERSION}; version 1 files carry no checksum: merge again)")


def _metadata_int(metadata: dict[str, str], key: str) -> int:
    try:
        return int(metadata[key])
    except ValueError:
        raise ValueError(f"metadata {key!r} is {metadata[key]!r}, not an integer") from None


def _artifact_from(metadata: dict[str, str], tensors: dict[str, Tensor]) -> EMRArtifact:
    required = ("num_tasks", "num_scalars", "rescale", "mask_bitorder", "layout", "base_sha256")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}")
    if metadata["mask_bitorder"] != "little":
        raise ValueError(f"metadata 'mask_bitorder' is {metadata['mask_bitorder']!r}, expected 'little'")
    try:
        layout = TaskVectorLayout.from_json(metadata["layout"])
    except ValueError as err:
        raise ValueError(f"metadata 'layout' is invalid: {err}") from None
    num_tasks, num_scalars = _metadata_int(metadata, "num_tasks"), _metadata_int(metadata, "num_scalars")
    if num_scalars != layout.num_scalars:
        raise ValueError(f"metadata 'num_scalars' is {num_scalars}, the layout has {layout.num_scalars}")
    if num_tasks < 1:
        raise ValueError(f"metadata 'num_tasks' is {num_tasks}")
    expected = {"tau_uni", "masks", "rescalers"} | {
        kept_key(task, entry.name) for task in range(num_tasks) for entry in layout.kept}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"tensors do not match the metadata: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if tensors["masks"].dim() != 2 or tensors["masks"].shape[0] != num_tasks:
        raise ValueError(f"tensor 'masks' has shape {tuple(tensors['masks'].shape)}, "
                         f"expected ({num_tasks}, {(num_scalars + 7) // 8})")
    kept = tuple({entry.name: tensors[kept_key(task, entry.name)] for entry in layout.kept}
                 for task in range(num_tasks))
    return EMRArtifact(layout, metadata["rescale"], tensors["tau_uni"], tensors["masks"],
                       tensors["rescalers"], kept, metadata["base_sha256"])
