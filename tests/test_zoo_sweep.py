"""The project's own zoo CI: every torchvision classification model (random weights, eval mode)
proven equivalent under a random permutation of every free space, run as a CI job runs it:
``mudsc-fx check --zoo torchvision --jobs 2`` against the committed baseline, in worker
processes with the memory guard. Marked ``zoo``: slow, but CI runs it."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from torch import nn

from mudsc_fx.rules import RULES
from mudsc_fx.sources import zoo
from mudsc_fx.zoo_check import Limits, ZooReport, check_zoo, load_report
from mudsc_fx.zoo_check.baseline import compare

pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks/results/zoo_torchvision.json"
COVERAGE_95 = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0", "convnext_tiny",
               "vit_b_16", "densenet121", "regnet_x_400mf", "resnext50_32x4d"]
GIANTS = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"}   # > 250M parameters


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The CLI in a fresh interpreter (a lean parent to fork the workers from), this checkout's
    code first on the path."""
    out = tmp_path_factory.mktemp("zoo")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "mudsc_fx.cli", "check", "--zoo", "torchvision", "--jobs", "2",
           "--baseline", str(BASELINE), "--json", str(out / "zoo.json"), "--junit", str(out / "zoo.xml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    report = load_report(out / "zoo.json") if (out / "zoo.json").exists() else None
    return proc, report, out / "zoo.xml"


def test_no_regression_against_the_committed_baseline(sweep):
    proc, report, _ = sweep
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report is not None and "compared with the baseline: 0 regressions" in proc.stdout


def test_whole_zoo_has_no_equivalence_failure(sweep):
    _, report, _ = sweep
    bad = {r.model: r.error or r.max_abs_err for r in report.results if r.failed}
    assert not bad, bad
    assert report.counts()["ok"] >= 70


def test_only_giant_models_are_skipped(sweep):
    _, report, _ = sweep
    skipped = {r.model: r.error for r in report.results if r.status == "skipped"}
    assert set(skipped) <= GIANTS, skipped
    assert all("parameters (> 250M)" in why for why in skipped.values())


def test_every_worker_stays_under_the_memory_guard(sweep):
    _, report, _ = sweep
    checked = [r for r in report.results if r.status != "skipped"]
    assert all(r.peak_rss_mb is not None and r.peak_rss_mb < Limits.memory_gb * 1024 for r in checked)


def test_a_removed_rule_fails_against_the_committed_baseline(monkeypatch):
    """The baseline demonstration on the real zoo: without nn.Hardswish's row, mobilenet_v3_small
    loses most of its spaces; the comparison names the model, the spaces and the new barriers."""
    monkeypatch.delitem(RULES, nn.Hardswish)     # forked workers inherit the edited table
    now = ZooReport("torchvision", check_zoo(zoo("torchvision", only="mobilenet_v3_small"), jobs=1))
    cmp = compare(load_report(BASELINE), now)
    [reg] = cmp.regressions
    assert reg.model == "mobilenet_v3_small" and reg.kind == "coverage drop"
    lost = {m for s in reg.lost for m in s.members}
    assert "features.0.0.weight[0]" in lost and "classifier.0.weight[0]" in lost
    assert len(reg.new_barriers) == 19 and "features_0_2 (module features.0.2)" in reg.new_barriers   # every Hardswish
    assert "REGRESSION mobilenet_v3_small: coverage drop" in "\n".join(cmp.lines())
    monkeypatch.undo()                            # the same model with the row back: no regression
    again = ZooReport("torchvision", check_zoo(zoo("torchvision", only="mobilenet_v3_small"), jobs=1))
    assert compare(load_report(BASELINE), again).ok


@pytest.mark.parametrize("name", COVERAGE_95)
def test_coverage_of_main_architectures(sweep, name):
    assert sweep[1].by_model()[name].coverage >= 0.95


def test_junit_report_has_one_case_per_model(sweep):
    _, report, junit = sweep
    cases = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")]
    assert cases == [r.model for r in report.results]


@pytest.mark.parametrize("name", ["swin_t", "maxvit_t"])
def test_window_attention_models_have_structured_heads(name):
    import warnings
    import torchvision
    import mudsc_fx as mf
    model = torchvision.models.get_model(name, weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg = mf.infer(model, torch.randn(1, 3, 224, 224))
    ties = pg.ties()
    assert ties, "no head spaces found"
    heads = [pg.spaces[h] for h in ties]
    assert all(not h.fixed for h in heads)
    # the relative position bias tables move with the heads
    table_members = [m for h in heads for m in h.members if "relative_position" in m.fqn]
    assert table_members


def test_timm_representatives_have_no_failure():
    pytest.importorskip("timm")
    from mudsc_fx.sources import TIMM_SAMPLE, timm_zoo
    rows = check_zoo(timm_zoo(names=TIMM_SAMPLE), jobs=2)
    bad = [r for r in rows if r.status != "ok"]
    assert not bad, bad
    cov = {r.model: r.coverage for r in rows}
    assert cov["vit_tiny_patch16_224"] == 1.0 and cov["resnet50d"] == 1.0 and cov["convnext_atto"] == 1.0
