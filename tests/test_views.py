"""Views of a permutation graph: the picture's geometry, the page's structure, the text, JSON
and page agreeing on every parameter, the command line, and the facts shown for a merge."""
import json
import re
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import mudsc_fx as mf
from mudsc_fx import views
from mudsc_fx.cli import main
from mudsc_fx.passes.apply import apply_permutations, random_permutations
from mudsc_fx.views.explain import space_status
from mudsc_fx.views.matching import space_matches
from mudsc_fx.views.picture import build

from topologies import by_name

SMALL = ["mlp", "resnet_bn", "resnet_gn", "vit_mha", "gpt", "channel_shuffle", "unknown_op", "densenet",
         "inception", "resnext", "timm_attention", "convnext", "swiglu", "mobilenetv2"]


def _infer(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.infer(model.eval(), x)


def _topology(name):
    t = by_name(name)
    return _infer(t.build(), t.example())


def mlp4():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=4, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5)


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


MODELS = {"mlp4": (mlp4, (2, 8)), "resnet18": (resnet18, (1, 3, 32, 32)), "small_vit": (small_vit, (1, 3, 16, 16))}


def _model_graph(name):
    build_model, shape = MODELS[name]
    return _infer(build_model(), torch.randn(shape))


# -- the picture ---------------------------------------------------------------------------------

def _inside(inner, outer, slack=0.5):
    x, y, w, h = inner
    X, Y, W, H = outer
    return x >= X - slack and y >= Y - slack and x + w <= X + W + slack and y + h <= Y + H + slack


def _check_scene(pg, scene):
    assert scene.overlaps() == [], [(a.text, b.text) for a, b in scene.overlaps()[:5]]
    assert scene.outside() == []
    items = [r for r in scene.rects if r.role == "box"]
    for i, a in enumerate(items):  # item boxes never overlap each other
        for b in items[i + 1:]:
            assert not (a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h), (a.key, b.key)
    boxes = {r.key: (r.x, r.y, r.w, r.h) for r in items}
    for lab in scene.labels:  # an item's text stays inside its box
        if lab.key in boxes:
            assert _inside(lab.box, boxes[lab.key]), (lab.text, lab.key)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("fold", ["never", "always"])
def test_picture_of_topologies_has_no_overlapping_labels(name, fold):
    pg = _topology(name)
    _check_scene(pg, build(pg, title=name, fold=fold))


@pytest.mark.parametrize("name", list(MODELS))
def test_picture_of_mlp_resnet_vit(name, tmp_path):
    pg = _model_graph(name)
    for fold in ("never", "auto"):
        scene = build(pg, title=name, fold=fold)
        _check_scene(pg, scene)
    png = views.render(pg, tmp_path / "g.png", title=name)
    assert png.read_bytes()[:4] == b"\x89PNG"
    svg = ET.parse(views.render(pg, tmp_path / "g.svg", title=name)).getroot()
    assert svg.tag.endswith("svg") and float(svg.get("width")) == pytest.approx(scene.width, abs=1)


def test_picture_shows_streams_heads_and_folds_repeated_blocks():
    pg = _model_graph("small_vit")
    from mudsc_fx.views.fold import fold
    from mudsc_fx.views.outline import outline
    ol = outline(pg)
    # the residual stream is one band that every encoder layer reads and writes
    stream = next(b for b in ol.bands if b.note.startswith("stream"))
    layers = {it.block for it in ol.items if stream.spaces[0] in it.reads and stream.spaces[0] in it.writes}
    assert layers == {f"encoder.layers.encoder_layer_{i}" for i in range(4)}
    # each attention layer is one group: head space first, q.k and v spaces tied to it
    groups = [it for it in ol.items if it.kind == "group"]
    assert len(groups) == 4
    for g in groups:
        assert pg.spaces[g.spaces[0]].kind == "head" and set(pg.ties()[g.spaces[0]]) == set(g.spaces[1:])
    # four identical layers fold into one drawn layer that keeps every copy's spaces
    folded = fold(pg, ol.items, min_run=3)
    assert len(folded) == len(ol.items) - 3 * 2
    drawn = {s for it in folded for c in (it.copies or (it.spaces,)) for s in c} | {s for b in ol.bands for s in b.spaces}
    assert drawn == set(range(len(pg.spaces)))
    # model order: an item's position is its first producer's node
    assert [it.pos for it in ol.items] == sorted(it.pos for it in ol.items)


def test_labels_name_the_module_path():
    pg = _model_graph("resnet18")
    from mudsc_fx.views.outline import outline
    ol = outline(pg)
    by_space = {s: it for it in ol.items for s in it.spaces}
    s = next(m for m in pg.members if m.fqn == "layer2.0.conv1.weight" and m.role == "out")
    it = by_space[next(iter(views.param_facts(pg, s.fqn).axes[0].spaces))]
    assert (it.block, it.stage, it.label) == ("layer2.0", "layer2", "conv1 -> bn1 -> conv2")


# -- the page ------------------------------------------------------------------------------------

class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self.keys = [], {}, {}
        self._script, self._svg = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "script":
            self._script = a.get("id", "inline")
            self.scripts[self._script] = ""
        if tag == "svg":
            self._svg = a.get("id")
            self.keys[self._svg] = set()
        if "data-key" in a and self._svg:
            self.keys[self._svg].add(a["data-key"])

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script:
            self.scripts[self._script] += data


def check_page(pg, text):
    p = _PageParser()
    p.feed(text)
    data = json.loads(p.scripts["graph-data"])
    # nothing is loaded at view time: no external URL, no src/href, no stylesheet link or import
    assert not re.search(r"(https?|ftp):|@import|url\(", text, re.I)
    assert all(k not in a for _, a in p.tags for k in ("src", "href", "xlink:href"))
    assert all(tag not in ("link", "iframe", "img", "object", "embed") for tag, _ in p.tags)
    # every space, with its members, status, reasons and the box that shows it in every view
    assert [s["id"] for s in data["spaces"]] == list(range(len(pg.spaces)))
    for sp, rec in zip(pg.spaces, data["spaces"]):
        assert {(m["param"], m["axis"], m["role"]) for m in rec["members"]} == {(m.fqn, m.axis, m.role) for m in sp.members}
        assert rec["free"] == pg.is_free(sp.id) and rec["why"] == space_status(pg, sp.id).why
        assert rec["fixed_by"] == sorted(sp.fixed_by)
        if sp.fixed:
            assert rec["why"].startswith("fixed:") and rec["fixed_by"]
        for view in data["views"]:
            key = rec["element"][view]
            item = data["items"][view][key]
            assert sp.id in {s for c in (item["copies"] or [item["spaces"]]) for s in c} | set(item["spaces"])
            assert key in p.keys[f"view-{view}"]
    # the search index holds every parameter, buffer and tied alias, each pointing at its members
    expected = set(pg.params) | {m.fqn for m in pg.members} | {a for a, _ in pg.aliases}
    assert expected <= set(data["params"])
    for name, rec in data["params"].items():
        for axis in rec["axes"]:
            for s in axis["spaces"]:
                assert (rec["canonical"], axis["axis"]) in {(m["param"], m["axis"]) for m in data["spaces"][s]["members"]}
    assert [(b["node"], b["reason"]) for b in data["barriers"]] == [(b.node, b.reason) for b in pg.barriers]
    return data


@pytest.mark.parametrize("name", SMALL)
def test_page_of_topologies(name, tmp_path):
    pg = _topology(name)
    check_page(pg, views.write_html(pg, tmp_path / "g.html", title=name).read_text())


@pytest.mark.parametrize("name", list(MODELS))
def test_page_of_mlp_resnet_vit(name):
    pg = _model_graph(name)
    data = check_page(pg, views.to_html(pg, title=name))
    assert data["views"] == (["folded", "full"] if name == "small_vit" else ["full"])


def test_text_json_and_page_agree_on_every_parameter():
    pg = _topology("channel_shuffle")  # free, fixed-by-barrier and output spaces
    page = check_page(pg, views.to_html(pg))
    js = json.loads(pg.to_json())
    assert js["params"] == page["params"]
    for name, rec in js["params"].items():
        text = pg.explain(name)
        for axis in rec["axes"]:
            for s in axis["spaces"]:
                why = space_status(pg, s).why
                assert f"S{s}:" in text and why in text
                assert js["spaces"][s]["why"] == page["spaces"][s]["why"] == why
        assert rec["why"] in text
    fixed = [s.id for s in pg.spaces if not pg.is_free(s.id)]
    summary = pg.summary()
    assert all(re.search(rf"^\s+S{s}\s.*fixed", summary, re.M) for s in fixed)


def test_views_are_part_of_the_package_api():
    assert mf.views is views and callable(mf.views.write_html) and callable(mf.views.render)


def test_explain_names_close_matches_for_an_unknown_parameter():
    pg = _topology("mlp")
    with pytest.raises(ValueError, match=r"no floating-point parameter or buffer 'fc9.weight'.*fc1.weight"):
        pg.explain("fc9.weight")


# -- the command line ------------------------------------------------------------------------------

CNN = f"{Path(__file__).parent / 'cli_models.py'}:small_cnn"


@pytest.mark.parametrize("args, message", [
    (["--format", "text", "-o", "g.png"], "--format text writes .txt files, not 'g.png'; .png is written by --format picture"),
    (["--format", "dot", "-o", "g.svg"], "--format dot writes .dot/.gv files"),
    (["--format", "html"], "--format html writes a file: give -o FILE.html"),
    (["-o", "g.xyz"], "cannot tell the format of 'g.xyz'"),
])
def test_inspect_refuses_a_suffix_that_does_not_fit_before_loading_anything(args, message, capsys):
    # the model does not exist: the format error must come first
    assert main(["inspect", "torchvision:no_such_net", *args]) == 2
    assert message in capsys.readouterr().err


def test_inspect_html_picture_and_param(tmp_path, capsys):
    from cli_models import small_cnn
    pg = _infer(small_cnn(), torch.randn(1, 3, 8, 8))
    out = tmp_path / "g.html"
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
    check_page(pg, out.read_text())
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--format", "picture", "-o", str(tmp_path / "g.svg")]) == 0
    assert ET.parse(tmp_path / "g.svg").getroot().tag.endswith("svg")
    capsys.readouterr()
    name = pg.members[0].fqn
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--param", name]) == 0
    assert capsys.readouterr().out.strip() == pg.explain(name)
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--param", "nope.weight"]) == 2
    assert "no floating-point parameter or buffer 'nope.weight'" in capsys.readouterr().err


# -- a merge result --------------------------------------------------------------------------------

def _merge(models, data, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.Merger(models, data).merge(method, reset_bn=False)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 8, generator=g) for _ in range(4)]


@pytest.mark.parametrize("method, kind", [("act_align", "permutation"), ("zipit", "zip")])
def test_merging_a_permuted_copy_matches_every_unit_to_itself(method, kind):
    model = mlp4().eval()
    pg = _infer(model, torch.randn(2, 8))
    copy = apply_permutations(model, pg, random_permutations(pg, np.random.default_rng(1)))
    matches = space_matches(_merge([model, copy], _data(), method))
    for s in pg.free_spaces:
        m = matches[s]
        assert m.method == kind and m.similarity == pytest.approx(1.0, abs=1e-6)
        assert m.within == 0 and m.merged == pg.spaces[s].size
    assert all(matches[s].method == "fixed" for s in range(len(pg.spaces)) if not pg.is_free(s))


def test_matching_quality_and_within_model_zips_agree_with_a_slow_count():
    torch.manual_seed(3)
    a, b = mlp4().eval(), mlp4().eval()
    for p in b.parameters():
        p.data.normal_(0, 0.3)
    res = _merge([a, b], _data(), "zipit")
    matches = space_matches(res)
    for s in res.graph.free_spaces:
        n = res.graph.spaces[s].size
        corr = res.stats.corr[s]
        units = []  # (model, unit, cluster)
        for i, U in enumerate(res.alignment.U[s]):
            for j in range(n):
                (c,) = np.nonzero(U[j])[0]
                units.append((i, j, int(c)))
        dead = res.stats.dead[s]
        sims = [corr[i * n + j, k * n + l] for (i, j, c) in units for (k, l, d) in units
                if c == d and (i, j) != (k, l) and not dead[i * n + j] and not dead[k * n + l]]
        within = sum(1 for (i, j, c) in units if any(k == i and d == c and l != j for (k, l, d) in units))
        assert matches[s].similarity == pytest.approx(float(np.mean(sims, dtype=np.float64)), abs=1e-9)
        assert matches[s].within == within
    assert any(matches[s].within > 0 for s in res.graph.free_spaces)  # zip does merge inside one model here


def test_page_of_a_merge_result(tmp_path):
    torch.manual_seed(4)
    res = _merge([mlp4().eval(), mlp4().eval()], _data(), "zipit")
    data = check_page(res.graph, views.write_html(res, tmp_path / "m.html").read_text())
    assert data["merge"]["config"] == "zipit (match zip, alpha 0)"
    matches = space_matches(res)
    for rec in data["spaces"]:
        m = matches[rec["id"]]
        assert rec["match"] == {"method": m.method, "similarity": m.similarity, "within": m.within,
                                "merged": m.merged, "dead": m.dead}
    _check_scene(res.graph, build(res))


# -- zoo models (slow) -----------------------------------------------------------------------------

@pytest.mark.zoo
@pytest.mark.parametrize("name, shape", [("resnet18", (1, 3, 64, 64)), ("vit_b_16", (1, 3, 224, 224)),
                                         ("swin_b", (1, 3, 224, 224)), ("densenet121", (1, 3, 64, 64)),
                                         ("shufflenet_v2_x1_0", (1, 3, 64, 64))])
def test_zoo_picture_and_page(name, shape):
    torch.manual_seed(0)
    pg = _infer(torchvision.models.get_model(name, weights=None), torch.randn(shape))
    for fold in ("auto", "never"):
        _check_scene(pg, build(pg, title=name, fold=fold))
    check_page(pg, views.to_html(pg, title=name))


def test_merge_command_writes_the_report_of_its_merge(tmp_path, capsys):
    from cli_models import small_cnn
    ck = []
    for i in range(2):
        torch.manual_seed(i)
        torch.save(small_cnn().state_dict(), tmp_path / f"c{i}.pt")
        ck.append(str(tmp_path / f"c{i}.pt"))
    report = tmp_path / "merge.html"
    assert main(["merge", "--arch", CNN, "--checkpoints", *ck, "--data", "cli_models:calibration",
                 "--method", "zipit", "-o", str(tmp_path / "m.pt"), "--report", str(report)]) == 0
    p = _PageParser()
    p.feed(report.read_text())
    data = json.loads(p.scripts["graph-data"])
    assert data["merge"]["config"].startswith("zipit") and any(s["match"]["method"] == "zip" for s in data["spaces"])
    assert main(["merge", "--arch", CNN, "--checkpoints", *ck, "--method", "rebasin", "--input-shape", "1,3,8,8",
                 "-o", str(tmp_path / "m.pt"), "--report", str(tmp_path / "r.txt")]) == 2
    assert "--report" in capsys.readouterr().err
