"""Checkpoint I/O: lazy safetensors reads, streamed writes with a data checksum, weights-only
PyTorch files, one clear error per bad file, ordinary file permissions."""

from __future__ import annotations

import os
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

from mudsc_fx.checkpoints import (CheckpointError, SafetensorsReader, SafetensorsWriter, TensorSpec, check_output_path,
                                  load_into, open_checkpoint, read_state_dict, write_state_dict)


def sample_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 7, generator=generator), "h": torch.randn(9, generator=generator).half(),
            "b": torch.randn(3, 2, generator=generator).bfloat16(), "n": torch.tensor(7),
            "mask": torch.rand(11, generator=generator) > 0.5, "empty": torch.zeros(0, 4),
            "d": torch.randn(2, 2, dtype=torch.float64, generator=generator)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_of_every_dtype_and_shape(tmp_path, suffix):
    state = sample_state()
    path = tmp_path / f"s{suffix}"
    write_state_dict(state, path)
    loaded = read_state_dict(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    if suffix == ".safetensors":  # the safetensors library reads what we write, and we read what it writes
        assert all(torch.equal(v, state[k]) for k, v in safetensors.torch.load_file(str(path)).items())
        safetensors.torch.save_file(state, str(tmp_path / "lib.safetensors"))
        assert all(torch.equal(v, state[k]) for k, v in read_state_dict(tmp_path / "lib.safetensors").items())


def test_lazy_reads_of_flat_slices(tmp_path):
    state = sample_state()
    write_state_dict(state, tmp_path / "s.safetensors")
    with open_checkpoint(tmp_path / "s.safetensors") as reader:
        assert isinstance(reader, SafetensorsReader)
        assert reader.specs["w"] == TensorSpec("w", (5, 7), torch.float32)
        for name, tensor in state.items():
            flat = tensor.reshape(-1)
            n = flat.numel()
            for start, stop in ((0, n), (min(1, n), min(4, n)), (n, n)):
                assert torch.equal(reader.read(name, start, stop), flat[start:stop]), name
        with pytest.raises(IndexError):
            reader.read("w", 3, 99)
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            reader.read("nope")


def test_streamed_writer_checks_order_sizes_and_completeness(tmp_path):
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (2,), torch.int64)]
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="got 'b', expected 'a' next"):
        with SafetensorsWriter(path, specs) as out:
            out.write("b", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="'a' is torch.float32, got torch.float64"):
        with SafetensorsWriter(path, specs) as out:
            out.write("a", torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"not \(fully\) written: \['a', 'b'\]"):
        with SafetensorsWriter(path, specs) as out:
            out.write("a", torch.zeros(3))
    assert not path.exists() and not list(tmp_path.iterdir())  # no partial file left behind
    with SafetensorsWriter(path, specs, metadata={"note": "x"}) as out:
        out.write("a", torch.arange(2.0))
        out.write("a", torch.arange(2.0, 4.0))
        out.write("b", torch.tensor([5, 6]))
    with open_checkpoint(path) as reader:
        assert reader.metadata["note"] == "x" and reader.verify_checksum(required=True)
        assert reader.read("a").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_any_flipped_data_byte_fails_the_checksum(tmp_path):
    path = tmp_path / "s.safetensors"
    write_state_dict({"w": torch.arange(64.0)}, path)
    data = path.read_bytes()
    for where in (len(data) - 256, len(data) - 1):
        corrupt = bytearray(data)
        corrupt[where] ^= 0x10
        (tmp_path / "c.safetensors").write_bytes(bytes(corrupt))
        with pytest.raises(CheckpointError, match="c.safetensors: the tensor data does not match its checksum"):
            read_state_dict(tmp_path / "c.safetensors")


def test_bad_files_are_clear_errors(tmp_path):
    write_state_dict({"w": torch.ones(8)}, tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    cases = {
        "empty.safetensors": (b"", "not a valid safetensors file: the file is empty"),
        "short.safetensors": (b"abc", "not a valid safetensors file: only 3 bytes"),
        "garbage.safetensors": (b"x" * 64, "not a valid safetensors file: header length .* does not fit"),
        "truncated.safetensors": (good[:-4], "not a valid safetensors file: the tensors cover 32 bytes of 28"),
        "trailing.safetensors": (good + b"\0" * 4, "not a valid safetensors file: the tensors cover 32 bytes of 36"),
        "empty.pt": (b"", "not a PyTorch file: it is empty or truncated"),
        "text.pt": (b"hello", "not a readable PyTorch file"),
        "junk.pt": (b"not a checkpoint", "refused by the weights-only loader"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: {message}"):
            read_state_dict(tmp_path / name)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="absent.safetensors: no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint suffix '.txt'"):
        open_checkpoint(tmp_path / "weights.txt")


class _Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    _Payload.marker = str(tmp_path / "PWNED")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    torch.save({"weight": _Payload()}, tmp_path / "evil_zip.pt")
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}: refused .* nothing in the file was executed"):
            read_state_dict(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


def test_lightning_checkpoints_are_unwrapped(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "l.ckpt")
    assert list(read_state_dict(tmp_path / "l.ckpt")) == ["w"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_weights_round_trip(tmp_path, suffix):
    model = Tied()
    path = tmp_path / f"t{suffix}"
    write_state_dict(model.state_dict(), path)
    loaded = read_state_dict(path)
    assert set(loaded) == {"embed.weight", "head.weight"}
    other = load_into(Tied(), loaded, "t")
    assert other.head.weight is other.embed.weight and torch.equal(other.embed.weight, model.embed.weight)


def test_views_are_saved_without_their_whole_storage(tmp_path):
    big = torch.zeros(1000, 1000)
    write_state_dict({"row": big[0]}, tmp_path / "v.pt")
    assert (tmp_path / "v.pt").stat().st_size < 100_000


def test_output_paths_are_checked_up_front(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    cases = [(tmp_path / "missing" / "o.pt", "the folder .*missing does not exist"),
             (tmp_path / "o.txt", r"the suffix must be one of \('.safetensors', '.pt'"),
             (tmp_path / "folder.pt", "folder.pt: is a folder")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            check_output_path(path)
    assert check_output_path(tmp_path / "fine.safetensors") == tmp_path / "fine.safetensors"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_written_files_get_ordinary_permissions(tmp_path, suffix):
    old = os.umask(0o022)
    try:
        write_state_dict({"w": torch.ones(2)}, tmp_path / f"p{suffix}")
    finally:
        os.umask(old)
    assert (tmp_path / f"p{suffix}").stat().st_mode & 0o777 == 0o644


def test_load_into_names_the_mismatch():
    with pytest.raises(CheckpointError, match=r"ck: 'weight' has shape \(2, 3\), the model has \(2, 4\)"):
        load_into(nn.Linear(4, 2), {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, "ck")
    with pytest.raises(CheckpointError, match=r"ck does not fit the model: missing \['bias'\]"):
        load_into(nn.Linear(4, 2), {"weight": torch.ones(2, 4)}, "ck")
