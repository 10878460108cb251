"""The safetensors format, read lazily with positional reads and written as a stream.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data offsets; ``__metadata__`` -> strings) and the tensor data. Data is read with
positional reads into ordinary memory rather than through ``safetensors.safe_open``'s memory
map: a mapped file's touched pages stay resident until the handle is closed, so a pass over N
open checkpoints would hold N checkpoints' worth of resident pages (measured: reading a 1.3 GB
file through ``safe_open`` left 1.3 GB resident). ``safe_open`` still vets every header, so a
file the safetensors library rejects is rejected here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .readers import CheckpointError, CheckpointReader, TensorSpec, bytes_of

__all__ = ["CHECKSUM_KEY", "SafetensorsReader", "SafetensorsWriter", "partial_path"]

PathLike = Union[str, os.PathLike]
CHECKSUM_KEY = "tensors_sha256"
_HEADER_LIMIT = 100 << 20  # the safetensors library's own bound on the JSON header
_BLOCK = 16 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class SafetensorsReader(CheckpointReader):
    """Lazy reader of a safetensors file: the header now, tensor data by positional reads."""

    def __init__(self, path: PathLike, label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        try:
            self.specs, self.metadata, self._offsets, self._data_start = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.label}: not a valid safetensors file: {problem}")

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            raise self._bad("the file is empty")
        if size < 8:
            raise self._bad(f"only {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise self._bad(f"header length {header_len} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(self._file.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._bad(f"the header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise self._bad("'__metadata__' must map names to strings")
        specs, offsets = {}, {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"malformed entry for tensor {name!r}: {info!r}") from None
            specs[name] = TensorSpec(name, shape, dtype)
            if end - begin != specs[name].nbytes:
                raise self._bad(f"tensor {name!r} spans {end - begin} bytes, its shape and dtype need {specs[name].nbytes}")
            offsets[name] = begin
        data_len, position = size - 8 - header_len, 0
        for name in sorted(offsets, key=lambda n: (offsets[n], specs[n].nbytes)):
            if offsets[name] != position:
                raise self._bad(f"tensor {name!r} starts at byte {offsets[name]}, expected {position} (overlap or gap)")
            position += specs[name].nbytes
        if position != data_len:
            raise self._bad(f"the tensors cover {position} bytes of {data_len} (truncated or trailing data)")
        self._vet_with_safetensors()
        return specs, metadata, offsets, 8 + header_len

    def _vet_with_safetensors(self) -> None:
        import safetensors
        try:
            with safetensors.safe_open(str(self.path), framework="pt"):
                pass
        except Exception as err:  # the library reports format errors with several types
            raise self._bad(str(err)) from None

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> Tensor:
        spec, start, stop = self._span(name, start, stop)
        out = torch.empty(stop - start, dtype=spec.dtype)
        if out.numel():
            self._read_into(self._data_start + self._offsets[name] + start * spec.dtype.itemsize, bytes_of(out))
        return out

    def read_into(self, name: str, start: int, out: Tensor) -> Tensor:
        spec, start, stop = self._span(name, start, start + out.numel())
        if out.dtype != spec.dtype or not out.is_contiguous() or out.device.type != "cpu":
            return out.copy_(self.read(name, start, stop))
        if out.numel():  # straight into the caller's buffer: no intermediate copy
            self._read_into(self._data_start + self._offsets[name] + start * spec.dtype.itemsize, bytes_of(out))
        return out

    def _read_into(self, position: int, buffer: memoryview) -> None:
        self._file.seek(position)
        done = 0
        while done < len(buffer):
            count = self._file.readinto(buffer[done:])
            if not count:
                raise CheckpointError(f"{self.label}: unexpected end of file (truncated while reading)")
            done += count

    def data_sha256(self) -> str:
        """SHA-256 of the tensor data (every byte after the header), read in blocks."""
        digest = hashlib.sha256()
        self._file.seek(self._data_start)
        block = bytearray(_BLOCK)
        while count := self._file.readinto(block):
            digest.update(memoryview(block)[:count])
        return digest.hexdigest()

    def verify_checksum(self, required: bool = False) -> bool:
        """Compare the data with the ``tensors_sha256`` metadata; CheckpointError on mismatch.

        Returns whether a checksum was present; with ``required`` a missing one is an error.
        """
        expected = self.metadata.get(CHECKSUM_KEY)
        if expected is None:
            if required:
                raise CheckpointError(f"{self.label}: no '{CHECKSUM_KEY}' in the metadata, cannot verify the tensors")
            return False
        actual = self.data_sha256()
        if actual != expected:
            raise CheckpointError(f"{self.label}: the tensor data does not match its checksum (sha256 {actual[:12]}..., "
                                  f"the metadata says {expected[:12]}...): the file is corrupt or was modified")
        return True

    def close(self) -> None:
        self._file.close()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose tensors are declared up front.

    Write each declared tensor completely, in declaration order, in flat pieces of its dtype
    (:meth:`write`); :meth:`close` checks everything was written, stores the SHA-256 of the
    data in the ``tensors_sha256`` metadata (the header reserves its place) and renames the
    ``.partial`` file into place. Used as a context manager, an exception removes the partial
    file and leaves any earlier file at ``path`` untouched.

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/s.safetensors"
    >>> with SafetensorsWriter(path, [TensorSpec("w", (4,), torch.float32)]) as out:
    ...     out.write("w", torch.zeros(3)); out.write("w", torch.ones(1))
    >>> with SafetensorsReader(path) as reader:
    ...     reader.verify_checksum(required=True), reader.read("w").tolist()
    (True, [0.0, 0.0, 0.0, 1.0])
    """

    def __init__(self, path: PathLike, specs: Sequence[TensorSpec], metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self._specs = list(specs)
        names = [spec.name for spec in self._specs]
        if len(set(names)) != len(names):
            raise ValueError("SafetensorsWriter: duplicate tensor names")
        header: dict[str, object] = {"__metadata__": {CHECKSUM_KEY: "0" * 64, **dict(metadata or {})}}
        position = 0
        for spec in self._specs:
            if spec.dtype not in _DTYPE_CODES:
                raise CheckpointError(f"{self.path}: safetensors cannot store {spec.dtype} (tensor {spec.name!r})")
            header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [position, position + spec.nbytes]}
            position += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._checksum_at = 8 + len(b'{"__metadata__":{"%s":"' % CHECKSUM_KEY.encode())
        self._digest = hashlib.sha256()
        self._current, self._written = 0, 0
        self._partial = partial_path(self.path)
        self._file = open(self._partial, "wb")  # noqa: SIM115 (closed by close/abort)
        self._file.write(struct.pack("<Q", len(text)) + text)

    def _advance(self) -> None:
        while self._current < len(self._specs) and self._written == self._specs[self._current].nbytes:
            self._current, self._written = self._current + 1, 0

    def write(self, name: str, values: Tensor) -> None:
        """Append the next flat piece of tensor ``name`` (which must be the one being written)."""
        data = bytes_of(values)
        if not len(data):
            return
        self._advance()
        if self._current >= len(self._specs) or self._specs[self._current].name != name:
            expected = self._specs[self._current].name if self._current < len(self._specs) else "nothing"
            raise ValueError(f"SafetensorsWriter: got {name!r}, expected {expected!r} next")
        spec = self._specs[self._current]
        if values.dtype != spec.dtype:
            raise ValueError(f"SafetensorsWriter: {name!r} is {spec.dtype}, got {values.dtype}")
        if self._written + len(data) > spec.nbytes:
            raise ValueError(f"SafetensorsWriter: more data for {name!r} than its shape {spec.shape} holds")
        self._file.write(data)
        self._digest.update(data)
        self._written += len(data)

    def write_tensor(self, name: str, tensor: Tensor) -> None:
        self.write(name, tensor.reshape(-1))

    def close(self) -> None:
        self._advance()
        if self._current < len(self._specs):
            self.abort()
            missing = [spec.name for spec in self._specs[self._current:]]
            raise ValueError(f"SafetensorsWriter: {self.path}: tensors not (fully) written: {missing[:5]}")
        self._file.seek(self._checksum_at)
        self._file.write(self._digest.hexdigest().encode())
        self._file.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
