"""Render the torchvision zoo report (the committed baseline) as the README's zoo section,
between the zoo-table markers.

    flock /tmp/mudsc_heavy.lock mudsc-fx check --zoo torchvision --jobs 2 \\
          --baseline benchmarks/results/zoo_torchvision.json --update-baseline
    python benchmarks/zoo_table.py [--timing benchmarks/results/zoo_timing.json]
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mudsc_fx.zoo_check import load_report  # noqa: E402

SRC = ROOT / "benchmarks/results/zoo_torchvision.json"
TIMING = ROOT / "benchmarks/results/zoo_timing.json"
START, END = "<!-- zoo-table -->", "<!-- /zoo-table -->"

COMMANDS = """```bash
mudsc-fx check --zoo torchvision --jobs 2 --json zoo.json          # every model, 2 worker processes
mudsc-fx check --zoo torchvision --jobs 2 --baseline benchmarks/results/zoo_torchvision.json \\
               --junit zoo.xml --markdown summary.md               # CI: exit 1 on any regression
mudsc-fx check --zoo "timm:convnext*" --jobs 2                     # a pattern over timm
mudsc-fx check --zoo my_models/zoo.py:ZOO --baseline zoo.json      # your own zoo (a dict or a function)
mudsc-fx check timm:vit_tiny_patch16_224                           # one model, at its own input size
```"""

SAMPLE = """```
$ mudsc-fx check --zoo torchvision --only mobilenet_v3_small --jobs 2 \\
      --baseline benchmarks/results/zoo_torchvision.json      # with nn.Hardswish's row deleted from the rule table
model                           spaces        free    coverage max_abs_err    barriers      status     seconds     peak_MB
mobilenet_v3_small                  37          16       0.148    4.34e-19          19          ok         1.5       477.3

1 checked, 1 ok, 0 failed, 0 skipped (2 s, 2 jobs)
compared with the baseline: 1 regression, 0 improvements, 79 baseline models not in this run
  REGRESSION mobilenet_v3_small: coverage drop: coverage 1.0000 -> 0.1485 (-0.8515); free spaces 27 -> 16
      free spaces that became fixed:
        S0 (unit, size 16: features.0.0.weight[0], features.0.1.bias[0], features.0.1.running_mean[0], +9 more)
        S6 (unit, size 96: features.4.block.0.0.weight[0], features.4.block.0.1.bias[0], features.4.block.0.1.running_mean[0], +9 more)
        ... (9 more spaces)
        S26 (unit, size 1024: classifier.0.bias[0], classifier.0.weight[0])
      new barriers: features_0_2 (module features.0.2); features_4_block_0_2 (module features.4.block.0.2); ... +11 more
$ echo $?
1
```"""


def render(report, timing=None) -> str:
    rows = report.results
    c = report.counts()
    ok = [r for r in rows if r.status == "ok"]
    full = sum(1 for r in ok if r.coverage >= 0.999)
    lines = [
        "## The torchvision zoo, and zoo CI",
        "",
        "`mudsc-fx check --zoo` proves every model of a zoo in worker processes (one torch thread each, "
        "a time limit and a memory guard per model), compares the run with a baseline (exit 1 on a new "
        "equivalence failure, a new error or a coverage drop, naming the model and the spaces that became "
        "fixed) and writes JSON, JUnit XML and Markdown. Zoos: `torchvision`, `timm` (or `timm:PATTERN`), "
        "`hf`, or your own `module:attr` / `file.py:attr`. The project's CI runs the torchvision sweep "
        "below against this committed baseline. Workflow and pre-commit snippets: `docs/zoo-ci.md`.",
        "",
        COMMANDS,
        "",
        "A regression, as CI prints it (a rule removed on purpose: `tests/test_zoo_sweep.py` does the same "
        "against the committed baseline):",
        "",
        SAMPLE,
        "",
        f"Every classification model of torchvision (random weights seeded per model, eval mode; inputs "
        f"64x64 or the model's declared minimum: 224 for ViT/Swin/MaxViT, 256 for Swin V2, 75 for "
        f"Inception v3): **{len(ok)} checked, {c['FAIL'] + c['error']} failures, {c['skipped']} skipped** "
        f"(over 250M parameters: a proof holds the model and its float64 copy, ~12 bytes per parameter, "
        f"and each worker stays under 4 GB); {full} of {len(ok)} with coverage 1.0. Max error is the largest absolute output "
        f"difference in float64 between the model and a copy with every free space randomly permuted.",
    ]
    if timing:
        lines += ["", timing_line(timing)]
    lines += [
        "",
        "| model | spaces | free | coverage | max abs err | barriers | input | status |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.status == "skipped":
            lines.append(f"| {r.model} | | | | | | {r.input} | skipped: {r.error} |")
        elif r.status == "error":
            lines.append(f"| {r.model} | | | | | | {r.input} | error: {r.error[:80]} |")
        else:
            lines.append(f"| {r.model} | {r.spaces} | {r.free} | {r.coverage:.3f} | {r.max_abs_err:.1e} | "
                         f"{len(r.barriers)} | {r.input} | {r.status} |")
    return "\n".join(lines)


def timing_line(t: dict) -> str:
    return (f"Wall time of the whole sweep on this shared 2-core machine ({t['date']}, under "
            f"`flock /tmp/mudsc_heavy.lock`, back to back): `--jobs 1` {t['serial_s']:.0f} s, `--jobs 2` "
            f"{t['parallel_s']:.0f} s (**{t['parallel_s'] / t['serial_s']:.2f}x**; median of {t['runs']} "
            f"pairs); peak RSS of a worker {t['peak_rss_mb'] / 1024:.2f} GB ({t['peak_model']}); identical "
            f"rows: {t['identical']}.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(SRC))
    ap.add_argument("--timing", default=str(TIMING))
    args = ap.parse_args()
    timing = json.loads(Path(args.timing).read_text()) if Path(args.timing).exists() else None
    table = render(load_report(args.report), timing)
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table}\n{END}"
    if END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.replace(START, block)
    readme.write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
