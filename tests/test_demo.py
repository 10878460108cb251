"""The demo end to end on a small MLP (digits): every row scored, the partial row's cost and
cut reported, the files a user is told about written."""
import json

import pytest

from mudsc_fx import demo


@pytest.fixture()
def demo_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MUDSC_FX_CACHE", str(tmp_path / "cache"))
    lines = []
    res = demo.run("digits", out=tmp_path / "out", arch="mlp", methods=["average", "zipit"], auto=False,
                   log=lines.append)
    return res, lines, tmp_path / "out"


def test_demo_rows_files_and_progress(demo_run):
    res, lines, out = demo_run
    names = [r["method"] for r in res["rows"]]
    assert names[:3] == ["model A (task A only)", "model B (task B only)", "ensemble (2 models)"]
    assert "average" in names and "zipit" in names
    part = res["rows"][-1]
    assert part["method"].startswith("mudsc_zip, partial") and part["cut"]
    assert 1.0 < part["flops_vs_one"] < 2.0  # more than one model, less than the ensemble
    for r in res["rows"]:
        assert 0.0 <= r["joint"] <= 100.0 and 0.0 <= r["avg"] <= 100.0
    ens = next(r for r in res["rows"] if r["method"].startswith("ensemble"))
    assert ens["joint"] > 80.0  # two trained models, each good at its own half
    assert any(line.startswith("training model A") for line in lines)  # progress while it trains
    assert any("merging [" in line for line in lines)
    for f in ("results.md", "results.json", "permutation_graph.png", "permutation_graph.html", "partial_merge.html"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert "cut after" in (out / "results.md").read_text()
