"""Out-of-core task vectors: file-to-file merges streamed in chunks equal the in-memory merges,
the exact streaming top-k equals a sort, the method registry drives every entry point."""

from __future__ import annotations

import copy
import inspect
import struct

import pytest
import torch
from torch.testing import assert_close

from mudsc_fx.checkpoints import SafetensorsReader, read_state_dict, write_state_dict
from mudsc_fx.taskvec import (EMRModel, emr_merge, get_method, merge_checkpoints, method_names, registry,
                              task_arithmetic, ties_merge)
from mudsc_fx.taskvec.driver import checkpoint_method
from mudsc_fx.taskvec.emr_artifact import MaskPacker, pack_mask
from mudsc_fx.taskvec.topk import kth_largest, kth_largest_dense
from test_taskvec import convnet, finetune, mlp

HEAD = r"^5\."  # convnet's classifier

CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"lam": 0.7}),
    ("ties", {}),
    ("ties", {"k": 0.35, "lam": 0.6}),
    ("ties", {"per_tensor": True}),
    ("ties", {"k": 1.0}),
    ("emr", {}),
    ("emr", {"rescale": "per_tensor_mean"}),
]
IN_MEMORY = {"task_arithmetic": task_arithmetic, "ties": ties_merge, "emr": emr_merge}


def save_all(tmp_path, base, models, dtype=None):
    def state(module):
        return {n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
                for n, t in module.state_dict().items()}
    write_state_dict(base.state_dict(), tmp_path / "base.safetensors")
    paths = []
    for index, model in enumerate(models):
        paths.append(tmp_path / f"task{index}.safetensors")
        write_state_dict(state(model), paths[-1])
    return tmp_path / "base.safetensors", paths


@pytest.mark.parametrize("chunk_size", [5, 1 << 22])
@pytest.mark.parametrize("method,options", CASES)
def test_streamed_file_merge_equals_in_memory_merge(tmp_path, method, options, chunk_size):
    """Chunks of 5 scalars cut every tensor, so thresholds, masks and statistics cross chunks."""
    base = convnet()
    models = [finetune(base, s, scale=0.05 * (s + 1)) for s in range(3)]
    base_path, paths = save_all(tmp_path, base, models)
    expected = IN_MEMORY[method](base, models, keep=HEAD, **options)
    suffix = ".safetensors" if method == "emr" or chunk_size == 5 else ".pt"
    result = merge_checkpoints(method, base_path, paths, tmp_path / f"out{suffix}", keep=HEAD,
                               chunk_size=chunk_size, **options)
    assert result.num_models == 3 and result.kept == ("5.weight", "5.bias")
    if method != "emr":
        merged = read_state_dict(result.path)
        assert set(merged) == set(expected.state_dict())
        for name, tensor in expected.state_dict().items():
            assert torch.equal(merged[name], tensor), name
        return
    loaded = EMRModel.load(result.path, base_module=base)
    assert torch.equal(loaded.tau_uni, expected.tau_uni)
    for task in range(3):
        assert torch.equal(loaded.mask(task), expected.mask(task))
        for name, tensor in expected.task_state(task).items():
            assert_close(loaded.task_state(task)[name], tensor, rtol=1e-12, atol=1e-12)
    assert loaded.rescalers == pytest.approx(expected.rescalers, rel=1e-12)
    assert result.rescalers == loaded.rescalers


@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {}), ("emr", {})])
def test_half_precision_checkpoints_merge_like_their_float32_values(tmp_path, method, options):
    """bfloat16 fine-tunes of a float32 base: read and merged in float32, values exact."""
    base = mlp()
    models = [finetune(base, s) for s in range(2)]
    rounded = [{n: t.to(torch.bfloat16).float() for n, t in m.state_dict().items()} for m in models]
    base_path, paths = save_all(tmp_path, base, models, dtype=torch.bfloat16)
    expected = IN_MEMORY[method](base, rounded, **options)
    result = merge_checkpoints(method, base_path, paths, tmp_path / "out.safetensors", chunk_size=7, **options)
    if method == "emr":
        assert torch.equal(EMRModel.load(result.path, base_module=base).tau_uni, expected.tau_uni)
    else:
        merged = read_state_dict(result.path)
        assert all(torch.equal(merged[n], t) for n, t in expected.state_dict().items())


class RecordingReader(SafetensorsReader):
    largest_read = 0

    def read(self, name, start=0, stop=None):
        out = super().read(name, start, stop)
        RecordingReader.largest_read = max(RecordingReader.largest_read, out.numel())
        return out


@pytest.mark.parametrize("method,options,passes", [
    ("task_arithmetic", {}, 1), ("ties", {}, 3), ("ties", {"per_tensor": True}, None), ("emr", {}, 1)])
def test_files_are_read_in_chunks_with_the_documented_number_of_passes(tmp_path, method, options, passes):
    base = convnet()
    base_path, paths = save_all(tmp_path, base, [finetune(base, s) for s in range(3)])
    RecordingReader.largest_read = 0
    readers = [RecordingReader(path) for path in paths]
    result = merge_checkpoints(method, RecordingReader(base_path), readers, tmp_path / "o.safetensors",
                               keep=HEAD, chunk_size=16, **options)
    assert RecordingReader.largest_read <= 16
    if passes is None:  # per-tensor TIES: 3 passes over tensors larger than a chunk, 1 over the others
        sizes = [t.numel() for n, t in base.state_dict().items() if t.is_floating_point() and not n.startswith("5.")]
        passes = sum(3 * n if n > 16 else n for n in sizes) / sum(sizes)
    assert result.passes == pytest.approx(passes)
    # tensors that fit one chunk are thresholded from that chunk: per-tensor TIES reads them once
    result = merge_checkpoints(method, base_path, paths, tmp_path / "p.safetensors", keep=HEAD, **options)
    assert result.passes == (3 if (method, options) == ("ties", {}) else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_kth_largest_is_exact(dtype):
    generator = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    for trial in range(40):
        n = int(torch.randint(1, 2000, (1,), generator=generator))
        values = torch.randn(3, n, generator=generator, dtype=dtype).abs()
        if trial % 3 == 0:
            values = (values * 4).round() / 4  # many ties and zeros
        if trial % 5 == 0:
            values[:, ::3] = tiny / 8  # subnormals
        rank = int(torch.randint(1, n + 1, (1,), generator=generator))
        size = int(torch.randint(1, n + 1, (1,), generator=generator))
        got = kth_largest(lambda: (values[:, s:s + size] for s in range(0, n, size)), rank, 3, dtype)
        assert torch.equal(got, kth_largest_dense(values, rank)), (trial, n, rank, size)
    with pytest.raises(ValueError, match="exceeds"):
        kth_largest(lambda: [torch.ones(1, 3, dtype=dtype)], 4, 1, dtype)


def test_mask_packer_equals_packing_whole_rows():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 101, generator=generator) > 0.5
    packer, start = MaskPacker(3, 101), 0
    for size in (1, 7, 8, 13, 0, 40, 32):
        packer.append(masks[:, start:start + size])
        start += size
    packed = packer.finish()
    assert start == 101
    assert all(torch.equal(packed[row], pack_mask(masks[row])) for row in range(3))


def test_a_flipped_byte_in_an_emr_artifact_is_a_clear_error(tmp_path):
    base = mlp()
    emr = emr_merge(base, [finetune(base, s) for s in range(2)], keep=r"^4\.")
    path = tmp_path / "emr.safetensors"
    emr.save(path)
    data = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", data[:8])[0]
    for where in (data_start + 3, len(data) - 20, (data_start + len(data)) // 2):
        corrupt = bytearray(data)
        corrupt[where] ^= 0x01
        target = tmp_path / f"flipped{where}.safetensors"
        target.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match=rf"{target.name}: the tensor data does not match its checksum"):
            EMRModel.load(target, base_module=base)
    assert EMRModel.load(path, base_module=base).rescalers == emr.rescalers


# ------------------------------------------------------------------ the registry


def test_registry_defaults_are_the_library_defaults_and_follow_the_papers():
    expected = {"task_arithmetic": {"lam": 0.3}, "ties": {"k": 0.2, "lam": 1.0, "per_tensor": False},
                "emr": {"rescale": "paper"}}
    assert set(method_names()) >= set(expected)
    for name, defaults in expected.items():
        assert get_method(name).defaults == defaults
        signature = inspect.signature(IN_MEMORY[name]).parameters
        assert {option: signature[option].default for option in defaults} == defaults


def test_unknown_methods_and_options_are_clear_errors(tmp_path):
    base = mlp()
    base_path, paths = save_all(tmp_path, base, [finetune(base, 0)])
    with pytest.raises(ValueError, match=r"unknown task-vector method 'dare'; registered: \('task_arithmetic'"):
        merge_checkpoints("dare", base_path, paths, tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"ties has no option 'alpha' \(its options: \['k', 'lam', 'per_tensor'\]\)"):
        merge_checkpoints("ties", base_path, paths, tmp_path / "o.safetensors", alpha=0.5)
    with pytest.raises(ValueError, match="task_arithmetic: lam scales the task vectors"):
        merge_checkpoints("task_arithmetic", base_path, paths, tmp_path / "o.safetensors", lam=float("nan"))
    with pytest.raises(ValueError, match=r"EMR artifact .*o.pt: the suffix must be one of \('.safetensors',\)"):
        merge_checkpoints("emr", base_path, paths, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="the folder .*missing does not exist"):
        merge_checkpoints("ties", base_path, paths, tmp_path / "missing" / "o.safetensors")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(get_method("ties"))


def test_a_new_method_is_one_registration(tmp_path, monkeypatch):
    """A method registered from outside the package works through the file API and the CLI."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    def mean_task_vector(stream, options):
        for chunk in stream.chunks():
            yield chunk.entry, chunk.start, chunk.base + options["scale"] * chunk.taus.mean(0)

    registry.register_method(checkpoint_method(
        "mean_tv", "theta_0 + scale * mean task vector",
        (registry.Option("scale", 1.0, registry.nonnegative_number, "scale"),), mean_task_vector))
    base = mlp()
    models = [finetune(base, s) for s in range(2)]
    base_path, paths = save_all(tmp_path, base, models)
    result = merge_checkpoints("mean_tv", base_path, paths, tmp_path / "m.safetensors", chunk_size=9)
    expected = task_arithmetic(base, models, lam=0.5).state_dict()
    merged = read_state_dict(result.path)
    for name, tensor in expected.items():
        assert_close(merged[name], tensor)

    from mudsc_fx.cli import main
    assert main(["merge", "--method", "mean_tv", "--base", str(base_path), "--checkpoints", *map(str, paths),
                 "--heads", "none", "--scale", "0.5", "-o", str(tmp_path / "cli.safetensors")]) == 0
    cli = read_state_dict(tmp_path / "cli.safetensors")
    half = task_arithmetic(base, models, lam=0.25).state_dict()
    assert all(torch.allclose(cli[n], t) for n, t in half.items())


@pytest.mark.parametrize("method,options", CASES)
def test_in_memory_merges_do_not_depend_on_chunking_or_memory_format(method, options):
    """channels_last weights (non-contiguous) in the inputs and the output, chunks of 5."""
    base = convnet()
    models = [finetune(base, s) for s in range(2)]
    expected = IN_MEMORY[method](base, models, keep=HEAD, **options)
    spec = get_method(method)
    last = [m.to(memory_format=torch.channels_last) for m in [copy.deepcopy(base)] + copy.deepcopy(models)]
    assert not last[0][0].weight.is_contiguous()
    got = spec.merge_modules(last[0], last[1:], HEAD, spec.resolve(options), chunk_size=5)
    if method == "emr":
        assert torch.equal(got.tau_uni, expected.tau_uni) and got.rescalers == pytest.approx(expected.rescalers)
    else:
        assert all(torch.equal(got.state_dict()[n], t) for n, t in expected.state_dict().items())
