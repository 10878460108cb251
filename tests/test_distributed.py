"""torch.distributed: two local gloo ranks give the statistics and the merged model of one
process (each rank reads every other batch, the moments are all-reduced, rank 0 solves)."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mudsc_fx as mf
from mudsc_fx import distributed

from topologies import by_name

WORLD = 2


def _setup():
    t = by_name("resnet_bn")
    torch.manual_seed(0)
    models = [t.build().eval(), t.build(seed=7).eval()]
    g = torch.Generator().manual_seed(0)
    shape = tuple(t.example()[0].shape[1:]) if isinstance(t.example(), tuple) else tuple(t.example().shape[1:])
    data = [torch.randn((16,) + shape, generator=g) for _ in range(5)]  # 5 batches: ranks get 3 and 2
    return models, data


def _run(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        models, data = _setup()
        merger = mf.Merger(models, data)
        stats = merger.statistics()
        result = merger.merge("zipit")
        torch.save({"corr": stats.corr, "samples": stats.samples, "dead": stats.dead,
                    "state": result.model.state_dict(),
                    "M": {s: [np.asarray(m) for m in ms] for s, ms in result.alignment.M.items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    models, data = _setup()
    merger = mf.Merger(models, data)
    return merger.statistics(), merger.merge("zipit")


def test_two_ranks_give_the_statistics_of_one_process(two_ranks, one_process):
    stats, _ = one_process
    for out in two_ranks:
        assert out["samples"] == stats.samples
        assert out["corr"].keys() == stats.corr.keys()
        for s in stats.corr:
            np.testing.assert_allclose(out["corr"][s], stats.corr[s], atol=1e-6)
            np.testing.assert_array_equal(out["dead"][s], stats.dead[s])


def test_two_ranks_return_the_merged_model_of_one_process(two_ranks, one_process):
    _, result = one_process
    for out in two_ranks:
        assert out["M"].keys() == result.alignment.M.keys()
        for s in out["M"]:
            for a, b in zip(out["M"][s], result.alignment.M[s]):
                np.testing.assert_array_equal(a, b)
        ref = result.model.state_dict()
        for name, value in out["state"].items():  # BatchNorm statistics averaged over both ranks' batches
            torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6)
    for name, value in two_ranks[0]["state"].items():  # every rank holds the same model
        assert torch.equal(value, two_ranks[1]["state"][name])


def test_sharding_is_every_world_th_batch():
    class Fake(distributed.Sharding):
        rank = 1
        world = 3
    assert list(distributed.shard(range(10), Fake())) == [1, 4, 7]
    assert list(distributed.shard(range(4), Fake(presharded=True))) == [0, 1, 2, 3]
    assert list(distributed.shard(range(4), None)) == [0, 1, 2, 3]


def test_no_process_group_means_a_single_process():
    assert not dist.is_initialized()
    assert distributed.resolve("auto") is None and distributed.resolve(None) is None
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.resolve(distributed.Sharding())
    with pytest.raises(ValueError, match="sharding must be"):
        distributed.resolve("yes")
    assert distributed.on_main(lambda: 42, None) == 42


def test_torchrun_cli_merge_writes_the_model_of_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m mudsc_fx.cli merge ...`` (rank 0 writes) equals the
    single-process CLI merge."""
    import subprocess
    import sys
    from pathlib import Path

    from mudsc_fx.cli import main
    from test_cli import CNN, _checkpoints
    here = Path(__file__).parent
    ck = _checkpoints(tmp_path, 2)
    args = ["merge", "--arch", CNN, "--checkpoints", *ck, "--data", "cli_models:calibration", "--method", "zipit"]
    cwd = os.getcwd()
    os.chdir(here)  # --data module:function imports from the working directory
    try:
        assert main(args + ["-o", str(tmp_path / "one.pt")]) == 0
    finally:
        os.chdir(cwd)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mudsc_fx.cli", *args, "-o", str(tmp_path / "two.pt")],
                          cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("merged 2 models with zipit") == 1  # only rank 0 reports (and writes)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
