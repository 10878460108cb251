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
    assert main(["inspect", CNN, "--input-shape", "1,3,8,8", "--format", "dot", "-o", str(tmp_path / "g.png")]) == 0
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
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("mudsc-fx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mudsc_fx.cli"]
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "inspect" in res.stdout and "demo" in res.stdout
