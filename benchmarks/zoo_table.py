"""Render the torchvision zoo sweep (``mudsc-fx check --zoo torchvision --json ...``) as a
markdown table and put it into README.md between the zoo-table markers.

    mudsc-fx check --zoo torchvision --json benchmarks/results/zoo_torchvision.json
    python benchmarks/zoo_table.py
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "benchmarks/results/zoo_torchvision.json"
START, END = "<!-- zoo-table -->", "<!-- /zoo-table -->"


def render(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    full = sum(1 for r in ok if r["coverage"] >= 0.999)
    lines = [
        "## The torchvision zoo",
        "",
        f"Every classification model of torchvision (random weights, eval mode; 64x64 inputs, 96x96 for "
        f"Inception, 224x224 for ViT/MaxViT), proven by `mudsc-fx check --zoo torchvision`: "
        f"**{len(ok)} checked, {len(bad)} equivalence failures, {len(skipped)} skipped**; "
        f"{full} of {len(ok)} with coverage 1.0. Max error is the largest absolute output difference in "
        f"float64 between the model and a copy with every free space randomly permuted.",
        "",
        "| model | spaces | free | coverage | max abs err | barriers | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"| {r['model']} | | | | | | skipped: {r['reason']} |")
        elif r["status"] == "error":
            lines.append(f"| {r['model']} | | | | | | error: {r['error'][:80]} |")
        else:
            lines.append(f"| {r['model']} | {r['spaces']} | {r['free']} | {r['coverage']:.3f} | "
                         f"{r['max_abs_err']:.1e} | {r['barriers']} | {r['status']} |")
    return "\n".join(lines)


def main() -> int:
    rows = json.loads(SRC.read_text())
    table = render(rows)
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
