"""The command line: inspect, check, merge (presets and task vectors)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mudsc_fx.cli import main

HERE = Path(__file__).parent
CNN = f"{HERE / 'cli_models.py'}:small_cnn"


def test_inspect_text_json_dot(tmp_path, capsys):
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "PermutationGraph" in out and "coverage 1.000" in out
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--format", "json", "-o", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["coverage"] == 1.0 and any(s["free"] for s in data["spaces"])
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--format", "dot", "-o", str(tmp_path / "g.dot")]) == 0
    assert (tmp_path / "g.dot").read_text().startswith("graph")
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "-o", str(tmp_path / "g.png")]) == 0  # format from the suffix
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_check_prints_table_and_fails_on_error(capsys, tmp_path):
    assert main(["check", CNN, "--input-shape", "1,3,8,8", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "coverage" in out and "1 checked, 1 ok, 0 failed" in out
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["status"] == "ok"
    assert main(["check", CNN, f"{HERE / 'cli_models.py'}:broken", "--input-shape", "1,3,8,8"]) == 1
    out = capsys.readouterr().out
    assert "2 checked, 1 ok, 1 failed" in out and "could not trace" in out


def test_bad_model_spec_is_a_clear_error(capsys):
    assert main(["inspect", "nonsense", "--input-shape", "1,3,8,8"]) == 2
    assert "torchvision:NAME" in capsys.readouterr().err
    assert main(["inspect", "torchvision:no_such_net"]) == 2
    assert "no model 'no_such_net'" in capsys.readouterr().err


def _checkpoints(tmp_path, n=2, suffix=".pt"):
    from safetensors.torch import save_file
    sys.path.insert(0, str(HERE))
    from cli_models import small_cnn
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        m = small_cnn()
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        p = tmp_path / f"m{i}{suffix}"
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file(sd, str(p)) if suffix == ".safetensors" else torch.save(sd, p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_merge_checkpoints(tmp_path, suffix, capsys):
    ck = _checkpoints(tmp_path, 2, suffix)
    out = tmp_path / f"merged{suffix}"
    rc = main(["merge", "--arch", CNN, "--checkpoints", *ck, "--data", "cli_models:calibration",
               "--method", "zipit", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert "merged 2 models with zipit" in capsys.readouterr().out


def test_merge_alpha_auto_prints_the_search(tmp_path, capsys):
    ck = _checkpoints(tmp_path, 2)
    out = tmp_path / "auto.pt"
    rc = main(["merge", "--arch", CNN, "--checkpoints", *ck, "--data", "cli_models:calibration",
               "--method", "mudsc_zip", "--alpha", "auto", "--alpha-grid", "0,0.5,1", "--alpha-proxy", "ensemble_accuracy",
               "-o", str(out)])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("alpha search"))
    assert "0: " in line and "0.5: " in line and "1: " in line and "chose" in line
    chosen = float(line.rsplit("chose ", 1)[1])
    assert f"(alpha {chosen:g})" in text
    base = ["merge", "--arch", CNN, "--checkpoints", *ck, "--data", "cli_models:calibration", "-o", str(out)]
    for argv, message in [
        (base + ["--method", "zipit", "--alpha", "auto"], "--alpha auto chooses alpha for the dual-space methods"),
        (base + ["--method", "mudsc_zip", "--alpha-grid", "0,1"], "--alpha-grid applies to --alpha auto only"),
        (base + ["--method", "mudsc_zip", "--alpha", "auto", "--alpha-grid", "0,2"], "alpha_grid values must be"),
        (base + ["--method", "mudsc_zip", "--alpha-proxy", "ensemble_ce"], "--alpha-proxy applies to --alpha auto only"),
        (base + ["--method", "mudsc_zip", "--alpha", "auto", "--alpha-proxy", "vibes"],
         "unknown alpha_proxy 'vibes'; choose one of"),
    ]:
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(base + ["--method", "mudsc_zip", "--alpha", "often"])
    assert "expected a number in [0, 1] or 'auto'" in capsys.readouterr().err


def test_merge_data_free_and_task_vectors(tmp_path, capsys):
    ck = _checkpoints(tmp_path, 3)
    out = tmp_path / "r.pt"
    assert main(["merge", "--arch", CNN, "--checkpoints", *ck[:2], "--method", "rebasin",
                 "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(torch.load(ck[0], weights_only=True))
    for method in ("task_arithmetic", "ties"):
        assert main(["merge", "--arch", CNN, "--base", ck[2], "--checkpoints", *ck[:2], "--method", method,
                     "--input-shape", "1,3,8,8", "-o", str(tmp_path / f"{method}.pt")]) == 0
    assert main(["merge", "--arch", CNN, "--base", ck[2], "--checkpoints", *ck[:2], "--method", "emr",
                 "--input-shape", "1,3,8,8", "-o", str(tmp_path / "emr.safetensors")]) == 0
    assert "EMR artifact with 2 tasks" in capsys.readouterr().out
    assert main(["merge", "--arch", CNN, "--checkpoints", *ck[:2], "--method", "emr", "-o", "x.pt"]) == 2


def test_merge_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["merge", "--arch", CNN, "--checkpoints", str(tmp_path / "nope.pt"), str(tmp_path / "nope2.pt"),
                 "--method", "average", "-o", str(tmp_path / "o.pt")]) == 2
    assert "nope.pt): no such file" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("mudsc-fx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mudsc_fx.cli"]
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "inspect" in res.stdout and "demo" in res.stdout


# ------------------------------------------------------------------ merge: bad input, one clear line


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mudsc-fx: error: "), err
    return err.strip()


class _Evil:
    """Unpickling this would create MARKER: a stand-in for a malicious checkpoint."""
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoints(tmp_path) -> dict:
    import pickle
    good = _checkpoints(tmp_path, 1, ".safetensors")[0]
    data = Path(good).read_bytes()
    files = {"empty.safetensors": b"", "garbage.safetensors": b"not a safetensors file at all",
             "truncated.safetensors": data[:-16], "empty.pt": b""}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    _Evil.marker = str(tmp_path / "PWNED")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    return {"empty.safetensors": "not a valid safetensors file: the file is empty",
            "garbage.safetensors": "not a valid safetensors file",
            "truncated.safetensors": "not a valid safetensors file: the tensors cover",
            "empty.pt": "not a PyTorch file: it is empty or truncated",
            "evil.pt": "refused by the weights-only loader .* nothing in the file was executed"}


@pytest.mark.parametrize("method", ["average", "ties", "emr"])
def test_merge_corrupt_empty_and_malicious_checkpoints_are_one_line(tmp_path, capsys, method):
    import re
    expected = _bad_checkpoints(tmp_path)
    good = _checkpoints(tmp_path, 2, ".safetensors")
    for name, message in expected.items():
        argv = ["merge", "--arch", CNN, "--checkpoints", good[0], str(tmp_path / name), "--method", method,
                "--input-shape", "1,3,8,8", "-o", str(tmp_path / "out.safetensors")]
        if method != "average":
            argv += ["--base", good[1]]
        assert main(argv) == 2, name
        line = _one_error_line(capsys)
        assert re.search(rf"checkpoint 1 \(.*{re.escape(name)}\): {message}", line), line
        assert not (tmp_path / "PWNED").exists()
        assert not (tmp_path / "out.safetensors").exists()


def test_merge_checks_the_output_before_anything_else(tmp_path, capsys):
    missing = str(tmp_path / "no_such_dir" / "merged.safetensors")
    absent = str(tmp_path / "absent.safetensors")  # never opened: the output is checked first
    argvs = [["merge", "--arch", CNN, "--checkpoints", absent, absent, "--method", "zipit", "-o", missing]]
    argvs += [["merge", "--arch", CNN, "--base", absent, "--checkpoints", absent, absent, "--method", method,
               "-o", missing] for method in ("task_arithmetic", "emr")]
    for argv in argvs:
        assert main(argv) == 2
        assert f"-o {missing}: the folder {tmp_path / 'no_such_dir'} does not exist" in _one_error_line(capsys)
    ck = _checkpoints(tmp_path, 3, ".safetensors")
    assert main(["merge", "--base", ck[2], "--checkpoints", *ck[:2], "--method", "emr", "--heads", "none",
                 "-o", str(tmp_path / "emr.pt")]) == 2
    assert "emr.pt: the suffix must be one of ('.safetensors',)" in _one_error_line(capsys)


def test_merge_meaningless_options_are_errors(tmp_path, capsys):
    ck = _checkpoints(tmp_path, 3, ".safetensors")
    tv = ["merge", "--arch", CNN, "--base", ck[2], "--checkpoints", *ck[:2], "--input-shape", "1,3,8,8",
          "-o", str(tmp_path / "o.safetensors")]
    cases = [
        (tv + ["--method", "ties", "--lam", "nan"], "ties: lam scales the task vectors and must be a finite number >= 0, got nan"),
        (tv + ["--method", "task_arithmetic", "--lam", "-1"], "must be a finite number >= 0, got -1.0"),
        (tv + ["--method", "ties", "--k", "20"], "ties: k is the kept fraction of each task vector and must be in (0, 1], got 20.0"),
        (tv + ["--method", "emr", "--lam", "0.3"], "--lam does not apply to --method emr (its options: --rescale)"),
        (tv + ["--method", "task_arithmetic", "--per-tensor"], "--per-tensor does not apply to --method task_arithmetic"),
        (tv + ["--method", "ties", "--alpha", "0.5"], "--alpha applies to the matching methods, not --method ties"),
        (["merge", "--checkpoints", *ck[:2], "--method", "ties", "-o", str(tmp_path / "o.pt")], "--method ties needs --base"),
        (["merge", "--base", ck[2], "--checkpoints", *ck[:2], "--method", "ties", "-o", str(tmp_path / "o.pt")],
         "--heads auto finds the output layers from --arch"),
        (["merge", "--arch", CNN, "--base", ck[2], "--checkpoints", *ck[:2], "-o", str(tmp_path / "o.pt")],
         "--base applies to the task-vector methods, not --method mudsc_zip"),
        (["merge", "--checkpoints", *ck[:2], "--method", "zipit", "-o", str(tmp_path / "o.pt")], "--method zipit needs --arch"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_error_line(capsys)


def test_merge_reads_numpy_calibration_data_and_names_the_formats(tmp_path, capsys, monkeypatch):
    import numpy as np
    ck = _checkpoints(tmp_path, 2)
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8))  # float64, as numpy makes it
    np.save(tmp_path / "calib.npy", x)
    np.savez(tmp_path / "calib.npz", x=x, labels=np.arange(32))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    merge = ["merge", "--arch", CNN, "--checkpoints", *ck, "--method", "zipit"]
    for data in ("calib.npy", "calib.npz"):
        assert main(merge + ["--data", str(tmp_path / data), "-o", str(tmp_path / f"{data}.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "calib.npy.pt")["0.weight"], torch.load(tmp_path / "calib.npz.pt")["0.weight"])
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    cases = [("two.npz", "holds arrays ['a', 'b']; give one array, or name the inputs 'x'"),
             ("objects.npy", "not a readable .npy file without pickled objects"),
             ("missing.npy", "--data missing.npy: no such file"),
             ("calib.csv", "--data calib.csv: expected a .pt/.npy/.npz file of inputs or module:function"),
             ("calib:nothing", "--data calib:nothing: cannot import 'calib'")]
    for data, message in cases:
        assert main(merge + ["--data", data, "-o", "o.pt"]) == 2
        assert message in _one_error_line(capsys)


def test_merged_files_have_ordinary_permissions(tmp_path):
    ck = _checkpoints(tmp_path, 3, ".safetensors")
    old = os.umask(0o022)
    try:
        outputs = {"ties": "t.safetensors", "task_arithmetic": "ta.pt", "emr": "e.safetensors", "average": "a.safetensors"}
        for method, name in outputs.items():
            extra = [] if method == "average" else ["--base", ck[2]]
            assert main(["merge", "--arch", CNN, "--checkpoints", *ck[:2], *extra, "--method", method,
                         "--input-shape", "1,3,8,8", "-o", str(tmp_path / name)]) == 0
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)


def test_cli_task_vector_defaults_are_the_library_defaults(tmp_path):
    import mudsc_fx as mf
    from mudsc_fx.checkpoints import read_state_dict
    from cli_models import small_cnn
    ck = _checkpoints(tmp_path, 3, ".safetensors")

    def module(path):
        model = small_cnn()
        model.load_state_dict(read_state_dict(path))
        return model
    base, models = module(ck[2]), [module(p) for p in ck[:2]]
    heads = mf.infer(base.eval(), torch.randn(1, 3, 8, 8)).output_params()
    for method, library in (("task_arithmetic", mf.task_arithmetic), ("ties", mf.ties_merge)):
        out = tmp_path / f"{method}.safetensors"
        assert main(["merge", "--arch", CNN, "--base", ck[2], "--checkpoints", *ck[:2], "--method", method,
                     "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
        merged, expected = read_state_dict(out), library(base, models, keep=heads).state_dict()
        assert all(torch.equal(merged[n], t) for n, t in expected.items()), method
    assert set(heads) == {"7.weight", "7.bias"}
    for spec, keep in (("^7\\.", r"^7\."), ("none", None)):  # --heads REGEX / none: no --arch needed
        out = tmp_path / f"heads_{keep is None}.safetensors"
        assert main(["merge", "--base", ck[2], "--checkpoints", *ck[:2], "--method", "ties", "--heads", spec,
                     "--k", "0.5", "-o", str(out)]) == 0
        merged, expected = read_state_dict(out), mf.ties_merge(base, models, k=0.5, keep=keep).state_dict()
        assert all(torch.equal(merged[n], t) for n, t in expected.items()), spec
