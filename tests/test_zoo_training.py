"""Fast checks of mudsc_fx.zoo: data, traceable models, training, caching, evaluation."""
import pytest
import torch
import torch.fx

from mudsc_fx.zoo.data import calibration_batches, load_dataset, split_classes, task_subset
from mudsc_fx.zoo.evaluate import ensemble_logits, evaluate
from mudsc_fx.zoo.models import ARCHS, ClassHead, build
from mudsc_fx.zoo.train import cache_path, finetune, run_count, train, train_cached

SHAPES = {"digits": ((1, 8, 8), 1437, 360), "mnist": ((1, 28, 28), 4000, 1000), "mnist1d": ((1, 40), 4000, 1000)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_dataset_shapes_and_split(name):
    ds = load_dataset(name)
    shape, ntr, nte = SHAPES[name]
    assert ds.input_shape == shape and ds.num_classes == 10
    assert ds.x_train.shape == (ntr, *shape) and ds.x_test.shape == (nte, *shape)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.shape == (ntr,) and ds.y_test.shape == (nte,)
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert abs(float(ds.x_train.mean())) < 0.05 and abs(float(ds.x_train.std()) - 1) < 0.05
    # the split is fixed: a second load gives the same tensors
    ds2 = load_dataset(name)
    assert torch.equal(ds.x_test, ds2.x_test) and torch.equal(ds.y_train, ds2.y_train)


def test_split_classes_disjoint_and_seeded():
    for n_tasks in (2, 3, 5):
        tasks = split_classes(10, n_tasks, seed=0)
        assert len(tasks) == n_tasks
        flat = [c for t in tasks for c in t]
        assert sorted(flat) == list(range(10))  # disjoint and covering
    assert split_classes(10, 2, seed=0) == split_classes(10, 2, seed=0)
    assert split_classes(10, 2, seed=0) != split_classes(10, 2, seed=1)
    assert split_classes(10, 2, seed=None) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    ds = load_dataset("digits")
    a, b = split_classes(10, 2, seed=0)
    sa, sb = task_subset(ds, a), task_subset(ds, b)
    assert set(sa.y_train.tolist()) == set(a) and set(sb.y_test.tolist()) == set(b)
    assert len(sa.y_train) + len(sb.y_train) == len(ds.y_train)
    batches = calibration_batches(ds.x_train, 500)
    assert len(batches) == 3 and [len(x) for x in batches] == [500, 500, 437]
    assert torch.equal(torch.cat(list(batches)), ds.x_train)  # re-iterable, in order
    assert len(calibration_batches(ds.x_train, 100, max_batches=2, shuffle=True)) == 2


@pytest.mark.parametrize("name", ["digits", "mnist", "mnist1d"])
@pytest.mark.parametrize("arch", ARCHS)
def test_models_trace_and_return_embeddings(arch, name):
    ds = load_dataset(name)
    model = build(arch, ds, seed=0, out_dim=32).eval()
    gm = torch.fx.symbolic_trace(model)
    x = ds.x_test[:3]
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 32)
        torch.testing.assert_close(gm(x), out)
    # seeded builds are reproducible and leave the global RNG alone
    state = torch.get_rng_state()
    again = build(arch, ds, seed=0, out_dim=32)
    assert torch.equal(state, torch.get_rng_state())
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_class_head_shared_and_frozen():
    h1, h2 = ClassHead(10, 64, seed=0), ClassHead(10, 64, seed=0)
    assert torch.equal(h1.embeddings, h2.embeddings) and not list(h1.parameters())
    torch.testing.assert_close(h1.embeddings.norm(dim=1), torch.ones(10))
    emb = torch.randn(4, 64)
    full = h1(emb)
    assert full.shape == (4, 10)
    torch.testing.assert_close(h1(emb, [7, 2]), full[:, [7, 2]])
    assert full.abs().max() <= h1.scale + 1e-4


def test_tiny_training_beats_chance_and_is_deterministic():
    ds = load_dataset("digits")
    a, b = split_classes(10, 2, seed=0)
    head = ClassHead(10)
    kw = dict(epochs=8, lr=3e-3, batch_size=64, seed=0)
    m1 = train(build("mlp", ds, seed=1, width=64, depth=2), head, ds.x_train, ds.y_train, a, **kw)
    m2 = train(build("mlp", ds, seed=1, width=64, depth=2), head, ds.x_train, ds.y_train, a, **kw)
    assert not m1.training
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    res = evaluate(m1, head, ds.x_test, ds.y_test, [a, b])
    assert res["task_a"] > 90.0  # chance is 20%
    assert res["task_b"] < 60.0  # never saw task B
    # fine-tuning copies and leaves the pretrained model unchanged
    before = [p.clone() for p in m1.parameters()]
    ft = finetune(m1, head, ds.x_train, ds.y_train, b, epochs=3, lr=3e-3, seed=0)
    assert ft is not m1 and all(torch.equal(p, q) for p, q in zip(before, m1.parameters()))
    assert evaluate(ft, head, ds.x_test, ds.y_test, [a, b])["task_b"] > 80.0


def test_train_cached_loads_without_training(tmp_path):
    ds = load_dataset("digits")
    a, _ = split_classes(10, 2, seed=0)
    head = ClassHead(10)
    key = {"dataset": "digits", "arch": "mlp", "classes": a, "seed": 1, "epochs": 2}

    def builder():  # builds and trains; on a hit train() is skipped
        m = build("mlp", ds, seed=1, width=32, depth=1)
        return train(m, head, ds.x_train, ds.y_train, a, epochs=2, seed=0)

    n0 = run_count()
    m1 = train_cached(key, builder, tmp_path)
    assert run_count() == n0 + 1 and cache_path(key, tmp_path).exists()
    m2 = train_cached(key, builder, tmp_path)
    assert run_count() == n0 + 1  # no training on the second call
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    # explicit builder + fit convention, with a nested (pretrained) cache entry
    calls = []

    def fit(m):
        calls.append(1)
        return finetune(m, head, ds.x_train, ds.y_train, a, epochs=1)

    k2 = {**key, "finetune": 1}
    f1 = train_cached(k2, lambda: train_cached(key, builder, tmp_path), tmp_path, fit=fit)
    f2 = train_cached(k2, lambda: train_cached(key, builder, tmp_path), tmp_path, fit=fit)
    assert len(calls) == 1 and run_count() == n0 + 2
    assert all(torch.equal(f1.state_dict()[k], f2.state_dict()[k]) for k in sd1)
    assert not all(torch.equal(f1.state_dict()[k], sd1[k]) for k in sd1)


class _Fixed(torch.nn.Module):
    """Backbone returning a fixed embedding per input row (input = row index)."""

    def __init__(self, emb):
        super().__init__()
        self.register_buffer("emb", emb)

    def forward(self, x):
        return self.emb[x.long().view(-1)]


def test_evaluate_matches_hand_computation():
    head = ClassHead(4, dim=4, scale=10.0)
    head.embeddings.copy_(torch.eye(4))  # class c <-> axis c
    # 6 images; labels and the class whose axis each embedding points to
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    # image 0 -> 0 (ok), 1 -> 2 (jointly wrong; restricted to task {0,1}: 1 beats 0), 2 -> 2 ok,
    # 3 -> 0 (jointly wrong; restricted to {2,3}: 2, wrong), 4 -> 1 (wrong both ways),
    # 5 -> 0 (jointly wrong; restricted to {2,3}: 2, right)
    emb = torch.tensor([[1., 0, 0, 0], [0, .5, 1, 0], [0, 0, 1, 0], [1, 0, .5, 0], [.2, 1, 0, 0], [1, 0, .5, 0]])
    model = _Fixed(emb).train()
    x = torch.arange(6).float().view(6, 1)
    res = evaluate(model, head, x, y, [(0, 1), (2, 3)], batch_size=4)
    assert model.training  # mode restored
    assert res["joint"] == pytest.approx(100 * 2 / 6)
    # task (0,1): images 0,1,4 -> correct 0,1 ; task (2,3): images 2,3,5 -> correct 2,5
    assert res["task_a"] == pytest.approx(100 * 2 / 3) and res["task_b"] == pytest.approx(100 * 2 / 3)
    assert res["avg"] == pytest.approx(100 * 2 / 3) and res["n_test"] == 6
    # only one task: images of other classes are ignored, joint argmax is over the union {2,3}
    res1 = evaluate(model, head, x, y, [(2, 3)])
    assert res1["n_test"] == 3 and res1["joint"] == pytest.approx(100 * 2 / 3) and "task_a" not in res1
    # ensemble of the same model twice = that model
    assert evaluate([model, model], head, x, y, [(0, 1), (2, 3)]) == res
    s = ensemble_logits([model, model], head, x, mode="prob")
    torch.testing.assert_close(s, 2 * head(emb).softmax(-1))
