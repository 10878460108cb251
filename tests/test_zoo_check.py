"""Zoo checking as a product: user zoos, worker processes with limits, serial == parallel,
baselines that catch a removed rule, JUnit / Markdown reports. Tiny models only."""
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_zoo
from mudsc_fx.cli import main
from mudsc_fx.rules import RULES, passthrough
from mudsc_fx.sources import (ModelSpecError, ZooEntry, default_input_shape, load_model, register_zoo,
                              zoo)
from mudsc_fx.zoo_check import Limits, ZooReport, check_model, check_zoo, load_report, rows_equal
from mudsc_fx.zoo_check.baseline import compare
from mudsc_fx.zoo_check.reports import junit_xml, markdown

TINY = str(Path(tiny_zoo.__file__)) + ":ZOO"
TROUBLED = str(Path(tiny_zoo.__file__)) + ":troubled_zoo"


def _report(results, name="tiny") -> ZooReport:
    return ZooReport(name, tuple(results))


@pytest.fixture(scope="module")
def tiny_baseline():
    return _report(check_zoo(zoo(TINY), jobs=2))


# -- zoo specs ------------------------------------------------------------------------------

def test_a_user_zoo_is_a_dict_or_a_function_in_a_file_or_module():
    assert [e.name for e in zoo(TINY)] == ["mlp", "residual", "attention", "layernorm_mlp"]
    assert [e.name for e in zoo(TROUBLED)] == ["mlp", "broken", "sleeper", "memory_hog", "residual"]
    assert [e.name for e in zoo("tiny_zoo:ZOO")] == [e.name for e in zoo(TINY)]   # module:attr
    assert [e.name for e in zoo(TINY + ":*mlp")] == ["mlp", "layernorm_mlp"]         # :pattern
    assert [e.name for e in zoo(TINY, only="res*,attention")] == ["residual", "attention"]


def test_module_specs_import_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_models_cwd.py").write_text(
        "import torch\ndef net():\n    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))\n"
        "ZOO = {'net': (net, (2, 3))}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    path_before = list(sys.path)
    assert isinstance(load_model("my_models_cwd:net"), nn.Sequential)
    assert [e.name for e in zoo("my_models_cwd:ZOO")] == ["net"]
    assert sys.path == path_before            # the current directory was not left on the path


def test_bad_zoo_specs_name_the_problem():
    with pytest.raises(ModelSpecError, match="unknown zoo 'nosuch'.*torchvision, timm, hf"):
        zoo("nosuch")
    with pytest.raises(ModelSpecError, match="no models"):
        zoo(TINY, only="nothing_like_this")
    with pytest.raises(ModelSpecError, match="no attribute 'NOPE'"):
        zoo(str(Path(tiny_zoo.__file__)) + ":NOPE")
    register_zoo("tiny_lazy_missing", "no_such_module_xyz:zoo")
    with pytest.raises(ModelSpecError, match="tiny_lazy_missing zoo is not available.*no_such_module_xyz"):
        zoo("tiny_lazy_missing")
    from mudsc_fx.sources import as_entries
    with pytest.raises(ModelSpecError, match="entry 'a' must be \\(factory, example input\\)"):
        as_entries({"a": tiny_zoo.mlp})
    with pytest.raises(ModelSpecError, match="each item must be \\(name, factory, example input\\)"):
        as_entries([("a", tiny_zoo.mlp)])


def test_model_specs_default_to_the_models_own_input_size():
    pytest.importorskip("timm")
    assert default_input_shape("timm:vit_tiny_patch16_224") == (1, 3, 224, 224)
    assert default_input_shape("torchvision:vit_b_16") == (1, 3, 224, 224)      # fixed-size positions
    assert default_input_shape("torchvision:inception_v3") == (1, 3, 75, 75)    # declared minimum
    assert default_input_shape("torchvision:resnet18") == (1, 3, 64, 64)
    assert default_input_shape("my.models:net") == (1, 3, 64, 64)


# -- workers --------------------------------------------------------------------------------

def test_parallel_run_equals_serial_run_and_in_process_checks(tiny_baseline):
    entries = zoo(TINY)
    serial = check_zoo(entries, jobs=1)
    assert rows_equal(serial, tiny_baseline.results)                # jobs=1 vs jobs=2
    here = [check_model(e) for e in entries]
    assert rows_equal(serial, here)                                 # a worker vs this process
    assert all(r.status == "ok" and r.coverage == 1.0 for r in serial)
    assert all(r.peak_rss_mb and r.peak_rss_mb > 0 for r in serial)


def test_broken_hanging_and_growing_models_are_reported_and_the_sweep_goes_on():
    seen = []
    results = check_zoo(zoo(TROUBLED, only="mlp,broken,sleeper,residual"), jobs=2, limits=Limits(seconds=5),
                        on_result=lambda r: seen.append(r.model))
    by = {r.model: r for r in results}
    assert [r.model for r in results] == seen == ["mlp", "broken", "sleeper", "residual"]
    assert by["mlp"].status == by["residual"].status == "ok"
    assert by["broken"].status == "error" and "broken on purpose" in by["broken"].error
    assert by["sleeper"].status == "error" and by["sleeper"].error.startswith("time limit")
    # memory_hog touches 1 GiB more than this process holds; the guard stops it first
    limits = Limits(seconds=600, memory_gb=_own_rss_gb() + 0.3)
    [mlp, hog] = check_zoo(zoo(TROUBLED, only="memory_hog,mlp"), jobs=2, limits=limits)
    assert hog.status == "error" and hog.error.startswith("memory limit"), hog.error
    assert mlp.status == "ok"


def _own_rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def test_models_over_the_parameter_limit_are_skipped_without_a_build():
    built = []
    entries = [ZooEntry("small", tiny_zoo.mlp, (2, 8)),
               ZooEntry("big", lambda: built.append(1) or nn.Linear(100, 100), (2, 100))]
    results = check_model(entries[0], max_params=1000), check_model(entries[1], max_params=1000)
    assert results[0].status == "ok" and results[0].n_params == 484
    assert results[1].status == "skipped" and results[1].error == "10,100 parameters (> 1,000)"
    assert built == [1]   # built once, on the meta device, to count


def test_weights_do_not_depend_on_what_ran_before():
    e = zoo(TINY, only="mlp")[0]
    first = check_model(e)
    torch.randn(1000)   # move the global generator
    assert first.outcome() == check_model(e).outcome()


def test_permuting_through_slices_equals_permuting_whole_tensors(monkeypatch):
    """apply_permutations permutes big tensors in place through slices (a float64 proof of VGG
    then fits in 4 GB; grouped weights go one kernel position at a time); with tiny slices it
    must give exactly what whole-tensor transforms give."""
    import copy
    import numpy as np
    import mudsc_fx as mf
    from mudsc_fx.passes import apply
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1, groups=3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(12 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(2, 3, 6, 6)
    pg = mf.infer(model, x)
    perms = apply.random_permutations(pg, np.random.default_rng(0))
    whole = copy.deepcopy(model)
    apply.load_tensors(whole, apply.transform_params(pg, apply.named_tensors(whole), apply.permutation_op(perms)))
    monkeypatch.setattr(apply, "_SLICE_BYTES", 16)
    sliced = apply.apply_permutations(model, pg, perms)
    for (k, a), b in zip(whole.state_dict().items(), sliced.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(sliced[5].weight, model[5].weight)   # the flatten (kron) axis moved
    assert not torch.equal(sliced[2].weight, model[2].weight)   # the grouped conv moved
    assert any(m.groups > 1 for m in pg.members if m.fqn == "2.weight")
    torch.testing.assert_close(sliced(x), model(x))


# -- baselines ------------------------------------------------------------------------------

def test_a_removed_rule_fails_the_baseline_comparison_naming_model_and_space(tiny_baseline, monkeypatch):
    monkeypatch.delitem(RULES, nn.Tanh)      # the mlp's Tanh becomes a barrier
    now = _report(check_zoo(zoo(TINY), jobs=2))
    cmp = compare(tiny_baseline, now)
    assert not cmp.ok
    [reg] = cmp.regressions
    assert reg.model == "mlp" and reg.kind == "coverage drop"
    [lost] = reg.lost
    assert lost.size == 16 and lost.members == ("2.bias[0]", "2.weight[0]")
    assert len(reg.new_barriers) == 1 and "module 3" in reg.new_barriers[0]   # the Tanh, mlp[3]
    text = "\n".join(cmp.lines())
    assert "REGRESSION mlp: coverage drop" in text and "2.weight[0]" in text


def test_a_wrong_rule_is_a_new_equivalence_failure(tiny_baseline, monkeypatch):
    monkeypatch.setitem(RULES, nn.LayerNorm, passthrough)   # claims LayerNorm passes channels unchanged
    now = _report(check_zoo(zoo(TINY, only="layernorm_mlp"), jobs=1))
    assert now.results[0].status == "FAIL"
    cmp = compare(tiny_baseline, now)
    assert [(c.model, c.kind) for c in cmp.regressions] == [("layernorm_mlp", "new FAIL")]
    assert cmp.not_run == ("mlp", "residual", "attention")
    # the same failure in the baseline is known, not new
    assert compare(now, now).ok and compare(now, now).changes[0].kind == "still failing"


def test_a_baseline_claiming_more_coverage_fails(tiny_baseline):
    rows = list(tiny_baseline.results)
    attn = next(i for i, r in enumerate(rows) if r.model == "attention")
    rows[attn] = replace(rows[attn], coverage=rows[attn].coverage + 0.5)   # edited by hand
    cmp = compare(_report(rows), tiny_baseline)
    assert [(c.model, c.kind) for c in cmp.regressions] == [("attention", "coverage drop")]
    assert compare(tiny_baseline, _report(rows)).regressions == ()      # the other way: a gain


def test_cli_baseline_round_trip(tiny_baseline, tmp_path, monkeypatch, capsys):
    base = tmp_path / "zoo.json"
    assert main(["check", "--zoo", TINY, "--jobs", "2", "--baseline", str(base), "--update-baseline"]) == 0
    written = load_report(base)
    assert rows_equal(written.results, tiny_baseline.results)
    assert written.versions["torch"] == torch.__version__

    monkeypatch.delitem(RULES, nn.Tanh)
    junit, md = tmp_path / "zoo.xml", tmp_path / "zoo.md"
    rc = main(["check", "--zoo", TINY, "--jobs", "2", "--baseline", str(base), "--junit", str(junit),
               "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSION mlp: coverage drop" in out and "S1 (unit, size 16: 2.bias[0], 2.weight[0])" in out

    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["mlp", "residual", "attention", "layernorm_mlp"]
    assert cases["mlp"].find("failure").get("type") == "CoverageDrop"
    assert all(cases[m].find("failure") is None for m in ("residual", "attention", "layernorm_mlp"))
    assert suite.get("failures") == "1" and suite.get("tests") == "4"
    text = md.read_text()
    assert "#### Regressions" in text and "**mlp**: coverage drop" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 4   # header + one row per model

    # a run over part of the zoo updates only those rows of the baseline
    assert main(["check", "--zoo", TINY, "--only", "mlp", "--baseline", str(base), "--update-baseline"]) == 0
    updated = load_report(base).by_model()
    assert updated["mlp"].coverage < 1.0 and updated["residual"].coverage == 1.0


def test_exit_codes_without_a_baseline_and_early_errors(tmp_path, monkeypatch, capsys):
    assert main(["check", "--zoo", TINY, "--only", "mlp"]) == 0
    monkeypatch.setitem(RULES, nn.LayerNorm, passthrough)
    assert main(["check", "--zoo", TINY, "--only", "layernorm_mlp"]) == 1
    # a report path in a missing directory is refused before any model is checked
    assert main(["check", "--zoo", TINY, "--junit", str(tmp_path / "no" / "x.xml")]) == 2
    assert main(["check", "--zoo", TINY, "--update-baseline"]) == 2
    assert main(["check", "--zoo", TINY, "--baseline", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "--junit" in err and "does not exist" in err and "needs --baseline" in err and "no zoo report" in err


def test_junit_marks_failures_known_to_the_baseline_as_skipped(monkeypatch):
    monkeypatch.setitem(RULES, nn.LayerNorm, passthrough)
    troubled = _report(check_zoo(zoo(TINY, only="mlp,layernorm_mlp"), jobs=1))
    alone = ET.fromstring(junit_xml(troubled)).find("testsuite")
    assert alone.get("failures") == "1" and alone.get("skipped") == "0"
    known = ET.fromstring(junit_xml(troubled, compare(troubled, troubled))).find("testsuite")
    assert known.get("failures") == "0" and known.get("skipped") == "1"
    case = [c for c in known.iter("testcase") if c.get("name") == "layernorm_mlp"][0]
    assert "known FAIL in the baseline" in case.find("skipped").get("message")
    assert "| layernorm_mlp | FAIL: outputs differ" in markdown(troubled)


def test_report_json_round_trips(tiny_baseline, tmp_path):
    path = tmp_path / "r.json"
    tiny_baseline.write(path)
    back = load_report(path)
    assert back.results == tiny_baseline.results
    assert json.loads(path.read_text())["counts"]["ok"] == 4
    old_style = tmp_path / "old.json"   # the list-of-rows format of earlier versions
    old_style.write_text(json.dumps([{"model": "mlp", "status": "ok", "coverage": 1.0, "barriers": 0}]))
    assert load_report(old_style).results[0].coverage == 1.0
