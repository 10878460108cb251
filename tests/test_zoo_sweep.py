"""Every torchvision classification model (random weights, eval mode) is proven equivalent
under a random permutation of every free space. Marked ``zoo``: slow, but CI runs it."""
import pytest
import torch

from mudsc_fx.cli import run_check
from mudsc_fx.sources import MAX_PARAMS, torchvision_zoo

pytestmark = pytest.mark.zoo

COVERAGE_95 = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0", "convnext_tiny",
               "vit_b_16", "densenet121", "regnet_x_400mf", "resnext50_32x4d"]


@pytest.fixture(scope="module")
def sweep():
    torch.set_num_threads(2)
    return {row["model"]: row for row in run_check(torchvision_zoo())}


def test_whole_zoo_has_no_equivalence_failure(sweep):
    bad = {k: r for k, r in sweep.items() if r["status"] in ("FAIL", "error")}
    assert not bad, bad
    checked = [r for r in sweep.values() if r["status"] == "ok"]
    assert len(checked) >= 70


def test_only_giant_models_are_skipped(sweep):
    skipped = [k for k, r in sweep.items() if r["status"] == "skipped"]
    assert set(skipped) <= {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"}
    assert all(str(MAX_PARAMS // 10**6) in sweep[k]["reason"] for k in skipped)


@pytest.mark.parametrize("name", COVERAGE_95)
def test_coverage_of_main_architectures(sweep, name):
    assert sweep[name]["coverage"] >= 0.95


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
    from mudsc_fx.sources import timm_zoo
    rows = list(run_check(timm_zoo()))
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad
    cov = {r["model"]: r["coverage"] for r in rows}
    assert cov["vit_tiny_patch16_224"] == 1.0 and cov["resnet50d"] == 1.0 and cov["convnext_atto"] == 1.0
