"""Task Arithmetic, TIES and EMR-Merging against slow dense references written here."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.testing import assert_close

from mudsc_fx.checkpoints import write_state_dict
from mudsc_fx.taskvec import EMRModel, emr_merge, task_arithmetic, task_heads, ties_merge

HEAD = r"^4\."  # the last Linear of mlp()


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3))


def finetune(base: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """A copy of ``base`` with seeded noise on every float entry (running_var kept positive)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * scale
            tensor.mul_(noise.exp()) if name.endswith("running_var") else tensor.add_(noise)
    return model


def snapshot(module_or_state) -> dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def assert_states_equal(actual, expected, exact: bool = False) -> None:
    actual = actual.state_dict() if isinstance(actual, nn.Module) else actual
    expected = expected.state_dict() if isinstance(expected, nn.Module) else expected
    assert list(actual) == list(expected)
    for name in expected:
        if exact:
            assert torch.equal(actual[name], expected[name]), name
        else:
            assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


def merged_names(base: nn.Module, keep=()) -> list[str]:
    return [n for n, t in base.state_dict().items() if t.is_floating_point() and n not in keep]


# ---------------------------------------------------------------- slow dense references


def reference_emr(base, models, rescale, keep=()):
    """Per-tensor dense EMR with bool masks; returns (tau_uni, masks, rescalers, task states)."""
    b = base.state_dict()
    names = merged_names(base, keep)
    taus = [{n: m.state_dict()[n] - b[n] for n in names} for m in models]
    tau_uni, masks = {}, [{} for _ in models]
    for n in names:
        total = taus[0][n].clone()
        for tau in taus[1:]:
            total = total + tau[n]
        gamma = torch.sign(total)
        epsilon = torch.zeros_like(total)
        for t, tau in enumerate(taus):
            masks[t][n] = tau[n] * gamma > 0
            epsilon = torch.where(masks[t][n], torch.maximum(epsilon, tau[n].abs()), epsilon)
        tau_uni[n] = gamma * epsilon

    def stat(tensors):
        if rescale == "paper":
            return sum(t.double().abs().sum().item() for t in tensors)
        return sum(t.double().abs().mean().item() for t in tensors)

    rescalers, states = [], []
    for t, model in enumerate(models):
        lam = stat([taus[t][n] for n in names]) / stat([masks[t][n] * tau_uni[n] for n in names])
        rescalers.append(lam)
        state = {}
        for n, value in b.items():
            if n in keep:
                state[n] = model.state_dict()[n]
            elif n in names:
                state[n] = b[n] + lam * (masks[t][n] * tau_uni[n])
            else:
                state[n] = value
        states.append(state)
    flat_uni = torch.cat([tau_uni[n].flatten() for n in names])
    flat_masks = [torch.cat([m[n].flatten() for n in names]) for m in masks]
    return flat_uni, flat_masks, rescalers, states


def reference_ties(base, models, k, lam, per_tensor):
    """Dense TIES on the N x P matrix; trimming by topk indices (not by threshold)."""
    b = base.state_dict()
    names = merged_names(base)
    sizes = [b[n].numel() for n in names]
    taus = torch.stack([torch.cat([(m.state_dict()[n] - b[n]).flatten() for n in names]) for m in models])
    trimmed = torch.zeros_like(taus)
    for row in range(len(models)):
        spans, start = [], 0
        for size in (sizes if per_tensor else [sum(sizes)]):
            spans.append((start, start + size))
            start += size
        for lo, hi in spans:
            keep_count = max(1, round(k * (hi - lo)))
            index = taus[row, lo:hi].abs().topk(keep_count).indices + lo
            trimmed[row, index] = taus[row, index]
    gamma = trimmed.sum(0).sign()
    agrees = trimmed * gamma > 0
    merged = (trimmed * agrees).sum(0) / agrees.sum(0).clamp(min=1)
    out, start = {}, 0
    for n, value in b.items():
        if n in names:
            out[n] = value + lam * merged[start:start + value.numel()].view_as(value)
            start += value.numel()
        else:
            out[n] = value
    return out


# ---------------------------------------------------------------- Task Arithmetic and TIES


def test_task_arithmetic_with_one_over_n_is_the_average():
    base = mlp()
    models = [finetune(base, s) for s in range(3)]
    merged = task_arithmetic(base, models, lam=1 / 3)
    states = [m.state_dict() for m in models]
    assert_states_equal(merged, {n: (states[0][n] + states[1][n] + states[2][n]) / 3 for n in states[0]})


def test_ties_k1_unanimous_signs_is_the_disjoint_mean():
    base = mlp()
    torch.manual_seed(5)
    signs = {n: torch.randn(t.shape).sign() for n, t in base.state_dict().items()}
    models = []
    for s in range(3):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for n, t in model.state_dict().items():
                t.add_(signs[n] * (torch.rand(t.shape) + 0.01) * (s + 1) * 0.1)
        models.append(model)
    merged = ties_merge(base, models, k=1.0, lam=1.0)
    states = [m.state_dict() for m in models]
    assert_states_equal(merged, {n: (states[0][n] + states[1][n] + states[2][n]) / 3 for n in states[0]})
    assert_states_equal(merged, reference_ties(base, models, k=1.0, lam=1.0, per_tensor=False))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_ties_matches_reference(per_tensor):
    base = mlp()
    models = [finetune(base, s) for s in range(3)]
    merged = ties_merge(base, models, k=0.2, lam=0.7, per_tensor=per_tensor)
    assert_states_equal(merged, reference_ties(base, models, k=0.2, lam=0.7, per_tensor=per_tensor))


def test_ties_per_tensor_and_global_differ_when_one_tensor_dominates():
    base = mlp()
    models = [finetune(base, s, scale=0.01) for s in range(2)]
    for s, model in enumerate(models):  # make layer 0's weight deltas 100x larger
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=torch.Generator().manual_seed(s)))
    globally = ties_merge(base, models, k=0.2).state_dict()
    per_tensor = ties_merge(base, models, k=0.2, per_tensor=True).state_dict()
    b = base.state_dict()
    # 20% of all scalars is fewer than layer 0's weight has: global trimming keeps nothing else.
    for name in b:
        if name == "0.weight":
            assert not torch.equal(globally[name], b[name])
        else:
            assert torch.equal(globally[name], b[name]), name
            assert not torch.equal(per_tensor[name], b[name]), name


def test_ta_and_ties_keep_base_heads_and_task_heads_returns_each_tasks():
    base = mlp()
    models = [finetune(base, s) for s in range(2)]
    for merged in (task_arithmetic(base, models, keep=HEAD), ties_merge(base, models, keep=HEAD)):
        assert torch.equal(merged[4].weight, base[4].weight)
        assert not torch.equal(merged[0].weight, base[0].weight)
    heads = task_heads(base, models, keep=HEAD)
    assert [sorted(h) for h in heads] == [["4.bias", "4.weight"]] * 2
    assert all(torch.equal(h["4.weight"], m[4].weight) for h, m in zip(heads, models))


# ---------------------------------------------------------------- EMR


@pytest.mark.parametrize("make", [mlp, convnet])
def test_emr_with_one_model_reproduces_it(make):
    base = make()
    tuned = finetune(base, 1)
    emr = emr_merge(base, [tuned])
    assert emr.rescalers == (1.0,)
    task = emr.task(0)
    assert_states_equal(task, tuned)
    task.eval(), tuned.eval()
    x = torch.randn(5, 8) if make is mlp else torch.randn(2, 3, 8, 8)
    assert_close(task(x), tuned(x))


@pytest.mark.parametrize("rescale", ["paper", "per_tensor_mean"])
def test_emr_matches_dense_reference(rescale):
    base = mlp()
    models = [finetune(base, s, scale=0.05 * (s + 1)) for s in range(3)]
    emr = emr_merge(base, models, rescale=rescale)
    tau_uni, masks, rescalers, states = reference_emr(base, models, rescale)
    assert len(emr) == 3
    assert torch.equal(emr.tau_uni, tau_uni)
    for t in range(3):
        assert torch.equal(emr.mask(t), masks[t])
        assert_states_equal(emr.task(t), states[t])
    assert_close(torch.tensor(emr.rescalers, dtype=torch.float64), torch.tensor(rescalers, dtype=torch.float64))


def test_emr_zero_task_vectors_and_cancelling_signs():
    """Frozen entries (tau = 0) and exact cancellation (gamma = 0) are masked out."""
    base = mlp()
    with torch.no_grad():
        base[2].bias.copy_(torch.arange(16) / 1024)  # dyadic: the arithmetic below is exact
    models = [finetune(base, s) for s in range(3)]
    with torch.no_grad():
        models[0][2].bias.copy_(base[2].bias)
        models[1][2].bias.copy_(base[2].bias + 0.25)
        models[2][2].bias.copy_(base[2].bias - 0.25)
        models[0][0].weight.copy_(base[0].weight)
    emr = emr_merge(base, models)
    tau_uni, masks, rescalers, states = reference_emr(base, models, "paper")
    assert torch.equal(emr.tau_uni, tau_uni)
    for t in range(3):
        assert torch.equal(emr.mask(t), masks[t])
        assert_states_equal(emr.task(t), states[t])
        assert torch.equal(emr.task(t)[2].bias, base[2].bias)
    assert not emr.mask(0)[:128].any()  # model 0 left layer 0's weight unchanged


def test_emr_rescale_modes_differ_and_heads_and_int_buffers():
    base = convnet()
    models = [finetune(base, s, scale=0.05 * (s + 1)) for s in range(3)]
    for model in models:
        model[1].num_batches_tracked.fill_(7)
    keep = "5.weight 5.bias".split()
    paper = emr_merge(base, models, keep=keep)
    mean = emr_merge(base, models, rescale="per_tensor_mean", keep=keep)
    assert all(abs(a - b) > 1e-4 for a, b in zip(paper.rescalers, mean.rescalers))
    _, _, _, states = reference_emr(base, models, "per_tensor_mean", keep=keep)
    for t in range(3):
        task = mean.task(t)
        assert_states_equal(task, states[t])
        assert torch.equal(task[5].weight, models[t][5].weight)
        assert int(task[1].num_batches_tracked) == int(base[1].num_batches_tracked)


def test_keep_spec_forms_agree():
    base = mlp()
    models = [finetune(base, s) for s in range(2)]
    forms = [HEAD, lambda name: name.startswith("4."), {"4.weight", "4.bias"}]
    results = [emr_merge(base, models, keep=keep) for keep in forms]
    for emr in results[1:]:
        assert torch.equal(emr.tau_uni, results[0].tau_uni)
        assert emr.rescalers == results[0].rescalers
        assert_states_equal(emr.task(1), results[0].task(1), exact=True)


def test_masks_are_bit_packed_in_the_saved_file(tmp_path):
    base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    n = 3
    emr = emr_merge(base, [finetune(base, s) for s in range(n)])
    p = emr.num_scalars
    path = tmp_path / "emr.safetensors"
    emr.save(path)
    size = path.stat().st_size
    payload = 4 * p + n * ((p + 7) // 8) + 8 * n
    sizes = emr.nbytes()
    assert sizes.total == payload and sizes.masks == n * ((p + 7) // 8)
    assert payload <= size <= payload + 4096
    assert size - 4 * p < n * p / 4  # bool-byte masks would need n * p
    assert sizes.checkpoint == 4 * p
    assert size < (1 + n / 32 + 0.02) * sizes.checkpoint < 0.4 * n * sizes.checkpoint


@pytest.mark.parametrize("rescale", ["paper", "per_tensor_mean"])
def test_save_load_round_trip_is_exact(tmp_path, rescale):
    base = convnet()
    models = [finetune(base, s) for s in range(3)]
    emr = emr_merge(base, models, rescale=rescale, keep=r"^5\.")
    path = tmp_path / "emr.safetensors"
    emr.save(path)
    loaded = EMRModel.load(path, base_module=convnet())
    assert len(loaded) == 3 and loaded.rescale == rescale and loaded.rescalers == emr.rescalers
    assert torch.equal(loaded.tau_uni, emr.tau_uni)
    for t in range(3):
        assert torch.equal(loaded.mask(t), emr.mask(t))
        assert_states_equal(loaded.task_state(t), emr.task_state(t), exact=True)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["num_tasks"] == "3" and metadata["rescale"] == rescale and metadata["format_version"] == "2"
    assert [e[0] for e in json.loads(metadata["layout"])["kept"]] == ["5.weight", "5.bias"]


def test_apply_and_remove_restore_exactly():
    base = mlp()
    models = [finetune(base, s) for s in range(3)]
    emr = emr_merge(base, models, keep=HEAD)
    module = mlp(seed=9)
    before = snapshot(module)
    emr.apply(module, 1)
    assert_states_equal(module, emr.task(1), exact=True)
    emr.apply(module, 2)
    assert_states_equal(module, emr.task(2), exact=True)
    emr.remove(module)
    assert_states_equal(module, before, exact=True)
    with pytest.raises(ValueError, match="no task is applied"):
        emr.remove(module)
    # Applying onto the caller's base must not disturb the EMRModel's own copy of it.
    expected = snapshot(emr.task(0))
    emr.apply(base, 2)
    assert_states_equal(emr.task(0), expected, exact=True)
    emr.remove(base)


def test_lazy_inputs_from_paths_and_callables(tmp_path):
    base = convnet()
    models = [finetune(base, s) for s in range(3)]
    torch.save(models[0].state_dict(), tmp_path / "m0.pt")
    safetensors.torch.save_file(models[1].state_dict(), str(tmp_path / "m1.safetensors"))
    torch.save(models[2].state_dict(), tmp_path / "m2.pth")
    lazy = [str(tmp_path / "m0.pt"), tmp_path / "m1.safetensors", lambda: tmp_path / "m2.pth"]
    mixed = [models[0], models[1].state_dict(), lambda: models[2]]
    for inputs in (lazy, mixed):
        assert_states_equal(task_arithmetic(base, inputs), task_arithmetic(base, models), exact=True)
        assert_states_equal(ties_merge(base, inputs), ties_merge(base, models), exact=True)
        emr, expected = emr_merge(base, inputs), emr_merge(base, models)
        assert torch.equal(emr.tau_uni, expected.tau_uni) and emr.rescalers == expected.rescalers


def test_callables_are_called_once_each_in_order():
    base = mlp()
    models = [finetune(base, s) for s in range(3)]
    calls = []

    def loader(index):
        def load():
            calls.append(index)
            return {n: t.clone() for n, t in models[index].state_dict().items()}
        return load

    sources = [loader(i) for i in range(3)]
    for merge in (task_arithmetic, ties_merge, lambda b, m: emr_merge(b, m, keep=HEAD)):
        calls.clear()
        merge(base, sources)
        assert calls == [0, 1, 2]  # once per merge, although TIES and EMR read every model more than once


def test_inputs_are_never_modified():
    base = convnet()
    models = [finetune(base, s) for s in range(2)]
    states = [models[0].state_dict(), {n: t.clone() for n, t in models[1].state_dict().items()}]
    before = [snapshot(base), snapshot(models[0]), snapshot(states[1])]
    task_arithmetic(base, states, keep=r"^5\.")
    ties_merge(base, states, per_tensor=True)
    emr = emr_merge(base, states, rescale="per_tensor_mean", keep=r"^5\.")
    emr.task(0)
    for after, expected in zip([base, models[0], states[1]], before):
        assert_states_equal(after, expected, exact=True)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(tmp_path):
    base = mlp()
    good = finetune(base, 0)
    merges = (task_arithmetic, ties_merge, emr_merge)
    for merge in merges:
        with pytest.raises(ValueError, match="empty"):
            merge(base, [])
        with pytest.raises(TypeError, match="sequence"):
            merge(base, good)
    wrong_shape = mlp(width=12)
    for merge in merges:
        with pytest.raises(ValueError, match=r"model 1: parameter '0.weight' has shape \(12, 8\)"):
            merge(base, [good, wrong_shape])
    missing = {n: t for n, t in good.state_dict().items() if n != "2.bias"}
    with pytest.raises(ValueError, match=r"model 0: parameter names differ.*missing \['2.bias'\]"):
        emr_merge(base, [missing])
    for bad in (float("nan"), float("inf")):
        broken = snapshot(good)
        broken["2.weight"][3, 4] = bad
        with pytest.raises(ValueError, match="model 2: parameter '2.weight' contains NaN or inf"):
            emr_merge(base, [good, good, broken])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model 1 \(.*junk.pt\): refused by the weights-only loader"):
        emr_merge(base, [good, tmp_path / "junk.pt"])
    with pytest.raises(FileNotFoundError, match="model 0"):
        emr_merge(base, [tmp_path / "absent.pt"])
    with pytest.raises(ValueError, match="rescale"):
        emr_merge(base, [good], rescale="mean")
    for k in (20, 0, -0.1, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match="ties: k is the kept fraction .* in \\(0, 1\\]"):
            ties_merge(base, [good], k=k)
    for lam in (float("nan"), float("inf"), -0.3, True, None, "1"):
        for merge in (task_arithmetic, ties_merge):
            with pytest.raises(ValueError, match="lam scales the task vectors and must be a finite number >= 0"):
                merge(base, [good], lam=lam)
    with pytest.raises(ValueError, match="per_tensor must be True or False, got 'yes'"):
        ties_merge(base, [good], per_tensor="yes")
    with pytest.raises(ValueError, match="keep 'head\\[' is not a valid regular expression"):
        task_arithmetic(base, [good], keep="head[")
    with pytest.raises(ValueError, match="keep names entries the base does not have"):
        emr_merge(base, [good], keep=["head.weight"])
    emr = emr_merge(base, [good, good])
    for index in (2, -1):
        with pytest.raises(ValueError, match=f"task index {index} out of range"):
            emr.task(index)
        with pytest.raises(IndexError):
            emr.apply(copy.deepcopy(base), index)
    with pytest.raises(ValueError, match=r"module: parameter '0.weight' has shape"):
        emr.apply(mlp(width=12), 0)


def test_corrupt_or_foreign_files_raise_clear_errors(tmp_path):
    base = mlp()
    emr = emr_merge(base, [finetune(base, s) for s in range(2)], keep=HEAD)
    path = tmp_path / "emr.safetensors"
    emr.save(path)
    data = path.read_bytes()

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(base.state_dict(), str(foreign))
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}

    def variant(name, meta=None, drop=None, checksum=True):
        """The artifact with changed metadata or a tensor dropped, re-checksummed unless told not to."""
        target = tmp_path / name
        kept = {k: v for k, v in tensors.items() if k != drop}
        meta = {k: v for k, v in {**metadata, **(meta or {})}.items() if k != "tensors_sha256"}
        if checksum:
            write_state_dict(kept, target, metadata=meta)
        else:
            safetensors.torch.save_file(kept, str(target), metadata=meta)
        return target

    cases = [
        (junk, "not a valid safetensors file"),
        (truncated, "not a valid safetensors file"),
        (foreign, "not an EMR-Merging artifact"),
        (variant("v1.safetensors", {"format_version": "1"}), "unsupported format_version '1'.*no checksum"),
        (variant("nosum.safetensors", checksum=False), "no 'tensors_sha256' in the metadata"),
        (variant("tasks.safetensors", {"num_tasks": "3"}), "missing"),
        (variant("layout.safetensors", {"layout": "{"}), "metadata 'layout' is invalid"),
        (variant("nomask.safetensors", drop="masks"), r"missing \['masks'\]"),
        (variant("mode.safetensors", {"rescale": "median"}), "rescale is 'median'"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=rf"{bad.name}: .*{message}"):
            EMRModel.load(bad, base_module=base)
    with pytest.raises(ValueError, match="emr.safetensors: base_module's values differ"):
        EMRModel.load(path, base_module=finetune(base, 5))
    with pytest.raises(ValueError, match="emr.safetensors: base_module: parameter '0.weight' has shape"):
        EMRModel.load(path, base_module=mlp(width=12))


# ---------------------------------------------------------------- alignment hook


def test_align_hook_needs_merge_module(monkeypatch):
    base = mlp()
    monkeypatch.setitem(sys.modules, "mudsc_fx.merge", None)
    with pytest.raises(NotImplementedError, match="align_models"):
        emr_merge(base, [finetune(base, 0)], align="weight")


def test_align_hook_aligns_fine_tuned_models_only(monkeypatch):
    base = mlp()
    models = [finetune(base, s) for s in range(2)]
    seen = {}

    def align_models(modules, data, method):
        seen.update(count=len(modules), data=data, method=method,
                    copies=all(m is not o for m, o in zip(modules[1:], models)))
        return modules

    monkeypatch.setitem(sys.modules, "mudsc_fx.merge", types.SimpleNamespace(align_models=align_models))
    aligned = emr_merge(base, [models[0], models[1].state_dict()], align="weight", data="batches")
    assert seen == {"count": 3, "data": "batches", "method": "weight", "copies": True}  # base is the anchor
    plain = emr_merge(base, models)
    assert torch.equal(aligned.tau_uni, plain.tau_uni) and aligned.rescalers == plain.rescalers


# ------------------------------------------------------------------ align first (real engine)
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)) + x
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["act_align", "rebasin"])
def test_align_then_emr_recovers_the_unpermuted_result(method):
    """Two 'differently initialised' models = fine-tunes of one base, each permuted at random.
    Aligning them to the base first must give back the EMR result of the unpermuted case."""
    import numpy as np
    import mudsc_fx as mf
    from mudsc_fx.passes.apply import apply_permutations, random_permutations

    torch.manual_seed(0)
    base = _ConvNet().eval()
    tuned = []
    for s in range(2):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
        tuned.append(m)
    x = torch.randn(2, 1, 6, 6)
    pg = mf.infer(base, x)
    rng = np.random.default_rng(5)
    permuted = [apply_permutations(m, pg, random_permutations(pg, rng)) for m in tuned]
    data = [torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    heads = pg.output_params()
    assert set(heads) == {"fc.weight", "fc.bias"}
    plain = emr_merge(base, tuned, keep=heads)
    aligned = emr_merge(base, permuted, keep=heads, align=method, data=data)
    assert_close(aligned.tau_uni, plain.tau_uni)
    assert aligned.rescalers == pytest.approx(plain.rescalers)
    for t in range(2):
        with torch.no_grad():
            assert_close(aligned.task(t)(x), plain.task(t)(x))
    # without alignment the permuted models give a different (wrong) unified task vector
    naive = emr_merge(base, permuted, keep=heads)
    assert not torch.allclose(naive.tau_uni, plain.tau_uni)
