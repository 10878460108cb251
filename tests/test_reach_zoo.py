"""Models plain torch.fx does not trace: timm models through timm's conventions and the rows they
need, a torchvision detector and RAFT through the compositional fallback, video models with
their torchvision rows. Marked ``zoo`` (CI runs them); the full sweeps are
benchmarks/zoo_timm_draw.py and benchmarks/zoo_detection.py."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mudsc_fx as mf
from mudsc_fx.passes import compose as C

pytestmark = pytest.mark.zoo
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _check(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.check(model, x)


@pytest.mark.parametrize("name, size, plain_fx_fails", [
    ("tf_efficientnet_b0", 64, True),      # Conv2dSame / pad_same: a leaf by timm's convention, a conv row
    ("crossvit_tiny_240", 240, True),      # crossvit.scale_image: wrapped by timm's convention
    ("nf_regnet_b0", 64, False),           # ScaledStdConv2d (grouped): an always-leaf with a row
    ("skresnet18", 64, False),             # blocks with a fixed block permutation meet the paths' channels
    ("regnetz_b16_evos", 64, False),       # EvoNorm's group std expanded over its group
])
def test_timm_models_that_need_conventions_or_rows(name, size, plain_fx_fails):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if plain_fx_fails:
        with pytest.raises(Exception):
            torch.fx.symbolic_trace(model)
    rep = _check(model, torch.randn(1, 3, size, size))
    assert rep.ok, rep.max_abs_err
    assert rep.coverage >= 0.99, (rep.coverage, rep.graph.summary()[:2000])


def test_detector_merges_through_the_compositional_fallback():
    pytest.importorskip("torchvision")
    import zoo_detection as Z
    name, size = "fasterrcnn_mobilenet_v3_large_320_fpn", 64
    a, b = Z.build(name, 0, size), Z.build(name, 1, size)
    example = (Z.images(100, size=size),)
    data = [Z.images(s, size=size) for s in range(2)]
    with pytest.raises(mf.TraceError):
        mf.trace(a, example)
    comp = C.plan_composition(a, example, whole_error="per-image loops")
    rep = comp.report
    assert {"backbone", "rpn.head", "roi_heads.box_head"} <= {u.path for u in rep.units}
    assert rep.merged_fraction == 1.0 and rep.max_abs_err < 1e-8
    assert {"rpn", "roi_heads"} <= {t.path for t in rep.untraced}
    permuted = C.permuted_copy(a, comp, seed=1)
    assert not torch.equal(permuted.backbone.fpn.inner_blocks[0][0].weight, a.backbone.fpn.inner_blocks[0][0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = C.merge_compositional([a, permuted], data, "act_align", reset_bn=False, input_fn=lambda x: (x,),
                                     unit_merger=mf.Merger, composition=comp)
        merged = mf.merge([a, b], data, "act_align", input_fn=lambda x: (x,))  # the fallback through mf.merge
    want, got = Z.detections(a, example[0]), Z.detections(back, example[0])
    assert len(want) == len(got) and want[0].shape[0] > 0
    for x, y in zip(want, got):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert type(merged) is type(a)
    assert all(torch.isfinite(t.float()).all() for t in Z.detections(merged, example[0]))


def test_raft_merges_through_the_compositional_fallback():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model("raft_small", weights=None).eval()
    g = torch.Generator().manual_seed(0)
    x = tuple(torch.rand(1, 3, 128, 128, generator=g) for _ in range(2)) + (3,)  # 3 flow updates
    comp = C.plan_composition(model, x)  # RAFT is tried as a whole first (its shape checks do not trace)
    rep = comp.report
    assert {u.path for u in rep.units} == {"feature_encoder", "context_encoder", "update_block"}
    assert rep.proof_dtype == "float32"  # RAFT builds float32 grids: the proof runs in float32
    assert [u.calls for u in rep.units if u.path == "update_block"] == [3]
    permuted = C.permuted_copy(model, comp, seed=2)
    data = [tuple(torch.rand(2, 3, 128, 128, generator=g) for _ in range(2)) + (3,)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = C.merge_compositional([model, permuted], data, "act_align", reset_bn=False, input_fn=lambda d: d,
                                     unit_merger=mf.Merger, composition=comp)
    with torch.no_grad():
        for p, q in zip(model(*x), back(*x)):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["swin3d_t"])
def test_video_swin_window_attention_rows(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    rep = _check(model, torch.randn(1, 3, 4, 64, 64))
    assert rep.ok and rep.coverage == 1.0 and not rep.barriers, rep.graph.summary()[:2000]
    assert any(s.kind == "head" and rep.graph.is_free(s.id) for s in rep.graph.spaces)
