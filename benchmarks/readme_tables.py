"""Regenerate the README's demo and quality tables from result files (never by hand).

    python benchmarks/readme_tables.py            # results/demo.json and results/quality.json
    mudsc-fx demo --out /tmp/demo && cp /tmp/demo/results.json benchmarks/results/demo.json

Each table lives between HTML-comment markers in README.md (``<!-- demo-table -->`` ...
``<!-- /demo-table -->``, ``<!-- quality-table -->`` ... ``<!-- /quality-table -->``,
``<!-- partial-table -->`` ... from ``results/partial.json``); only the
text between the markers is replaced.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import RESULTS, ROOT, arch_label

import quality_report as report


def demo_section(result: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from mudsc_fx.demo import format_table
    t = result["timings"]
    tasks = result["tasks"]
    lines = [f"`mudsc-fx demo --dataset {result['dataset']} --seed {result.get('seed', 0)}` "
             f"({result['dataset']}, {arch_label(result['arch'], result.get('kw', {}))}, classes {tasks[0]} vs "
             f"{tasks[1]}, shared frozen class-embedding head, 4 x 256 calibration images; one run on the shared "
             f"2-core machine: {t['total']:.0f} s in all, of which {t['train (or load cached)']:.0f} s training or "
             "loading the two models). `(auto)` rows choose alpha without labels (the alpha they chose is in the "
             "row); merge s includes the whole alpha search for them.", "", format_table(result["rows"])]
    return "\n".join(lines)


def quality_section(data: dict) -> str:
    records, settings = data["records"], data["settings"]
    runs = settings.get("shards") or [settings]
    lines = ["Regime 1 (disjoint halves of the classes, models from different inits), Joint / Avg accuracy, mean "
             f"over {settings['pairs']} pairs (`benchmarks/results/quality.md`, git "
             f"{', '.join(sorted({r.get('git', 'unknown') for r in runs}))}; the auto rows choose alpha from "
             "0, 0.1, ..., 1, label-free on the calibration data or labelled on 1,024 training images):", ""]
    lines += report.regime1_summary(records) + ["", "Targets of this round (figures: Joint, mean over pairs):", ""]
    lines += report.targets_report(records)
    return "\n".join(lines)


def replace_between(text: str, tag: str, body: str) -> str:
    pat = re.compile(rf"(<!-- {tag} -->\n)(.*?)(<!-- /{tag} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"README.md has no <!-- {tag} --> ... <!-- /{tag} --> markers")
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(3), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default=str(RESULTS / "demo.json"))
    ap.add_argument("--quality", default=str(RESULTS / "quality.json"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    if Path(args.demo).exists():
        text = replace_between(text, "demo-table", demo_section(json.loads(Path(args.demo).read_text())))
    partial = Path(args.quality).with_name("partial.json")
    if partial.exists():
        data = json.loads(partial.read_text())
        text = replace_between(text, "partial-table", "\n".join(report.partial_section(data["summary"], data["seconds"])))
    if Path(args.quality).exists():
        text = replace_between(text, "quality-table", quality_section(json.loads(Path(args.quality).read_text())))
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
