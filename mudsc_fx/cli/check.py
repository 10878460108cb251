"""``mudsc-fx check``: prove the permutation graphs of models or a whole zoo, in worker
processes, optionally against a baseline, with JSON / JUnit XML / Markdown reports."""
from __future__ import annotations

import time
from pathlib import Path

from ..zoo_check.run import Limits
from .common import parse_shape

_COLS = ["model", "spaces", "free", "coverage", "max_abs_err", "barriers", "status", "seconds", "peak_MB"]


def add_parser(sub) -> None:
    s = sub.add_parser("check", help="prove the permutation graph by a functional-equivalence check")
    s.add_argument("models", nargs="*", help="torchvision:NAME, timm:NAME, file.py:factory or package.module:factory")
    s.add_argument("--zoo", help="torchvision, timm, hf (NAME:PATTERN keeps matching models, e.g. "
                                 "timm:convnext*), or module:attr / file.py:attr naming your own zoo: a dict "
                                 "{name: (factory, example input)} or a function yielding (name, factory, example)")
    s.add_argument("--only", help="comma-separated model names or globs to keep")
    s.add_argument("--input-shape", type=parse_shape,
                   help="example input for MODEL specs (default: the model's own input size where its "
                        "library declares one, else 1,3,64,64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    s.add_argument("--time-limit", type=float, default=Limits.seconds, metavar="S", help="seconds per model")
    s.add_argument("--max-memory", type=float, default=Limits.memory_gb, metavar="GB",
                   help="resident memory per worker; a model above it is stopped and reported")
    s.add_argument("--max-params", type=float, default=Limits.max_params / 1e6, metavar="MILLIONS",
                   help="larger models are skipped without being built")
    s.add_argument("--baseline", metavar="REPORT.json", help="compare with this report; exit 1 on a "
                   "new FAIL, a new error or a coverage drop of any model")
    s.add_argument("--update-baseline", action="store_true", help="write this run into --baseline "
                   "(models not in this run keep their rows)")
    s.add_argument("--json", metavar="PATH", help="write the report as JSON (usable as a baseline)")
    s.add_argument("--junit", metavar="PATH", help="write JUnit XML, one test case per model")
    s.add_argument("--markdown", metavar="PATH", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..zoo_check import ZooReport, check_zoo, load_report
    from ..zoo_check.baseline import compare
    from ..zoo_check.result import library_versions
    entries, zoo_name = _entries(args)
    limits = Limits(seconds=args.time_limit, memory_gb=args.max_memory, max_params=int(args.max_params * 1e6))
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    _check_outputs(args)
    baseline = None
    if args.baseline and (Path(args.baseline).exists() or not args.update_baseline):
        baseline = load_report(args.baseline)
    cost = {r.model: r.seconds for r in baseline.results} if baseline else None

    _print_header()
    t0 = time.perf_counter()
    results = check_zoo(entries, jobs=args.jobs, seed=args.seed, limits=limits, cost=cost,
                        on_result=lambda r: _print_row(r))
    report = ZooReport(zoo_name, results, args.seed, library_versions(), args.jobs, time.perf_counter() - t0)
    comparison = compare(baseline, report) if baseline else None

    _print_summary(report)
    if comparison:
        print("\n".join(comparison.lines()))
    _write_reports(args, report, comparison)
    if args.update_baseline:
        (report.merged_into(baseline) if baseline else report).write(args.baseline)
        print(f"wrote baseline {args.baseline}")
        return 0
    if comparison is not None:
        return 0 if comparison.ok else 1
    return 1 if any(r.failed for r in results) else 0


def _entries(args):
    from ..sources import ZooEntry, default_example, load_model, zoo
    if args.zoo and args.models:
        raise ValueError("give MODEL specs or --zoo, not both")
    if args.zoo:
        return zoo(args.zoo, only=args.only), args.zoo
    if not args.models:
        raise ValueError("give MODEL specs (torchvision:NAME, timm:NAME, file.py:factory, package.module:factory) "
                         "or --zoo torchvision|timm|hf|module:attr")
    return [ZooEntry(m, (lambda m=m: load_model(m)), args.input_shape or default_example(m))
            for m in args.models], "models"


def _check_outputs(args) -> None:
    """Refuse unwritable report paths before the sweep, not after it."""
    if args.update_baseline and not args.baseline:
        raise ValueError("--update-baseline needs --baseline PATH (the file to write)")
    for opt in ("json", "junit", "markdown", "baseline"):
        path = getattr(args, opt)
        if path and not Path(path).parent.is_dir():
            raise FileNotFoundError(f"--{opt} {path}: directory {Path(path).parent} does not exist")


def _write_reports(args, report, comparison) -> None:
    from ..zoo_check.reports import junit_xml, markdown
    if args.json:
        report.write(args.json)
    if args.junit:
        Path(args.junit).write_text(junit_xml(report, comparison))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report, comparison))


def _print_header() -> None:
    print(" ".join(f"{c:>11}" if c != "model" else f"{c:<26}" for c in _COLS), flush=True)


def _print_row(r) -> None:
    values = {"model": r.model, "spaces": r.spaces, "free": r.free, "coverage": r.coverage,
              "max_abs_err": r.max_abs_err, "barriers": len(r.barriers) if r.status == "ok" else None,
              "status": r.status, "seconds": r.seconds, "peak_MB": r.peak_rss_mb}
    cells = []
    for c in _COLS:
        v = values[c]
        if c == "model":
            cells.append(f"{v:<26}")
        elif v is None:
            cells.append(f"{'':>11}")
        elif c == "max_abs_err":
            cells.append(f"{v:>11.3g}")
        elif c in ("coverage",):
            cells.append(f"{v:>11.3f}")
        elif c in ("seconds", "peak_MB"):
            cells.append(f"{v:>11.1f}")
        else:
            cells.append(f"{v!s:>11}")
    print(" ".join(cells), flush=True)


def _print_summary(report) -> None:
    c = report.counts()
    checked = c["ok"] + c["FAIL"] + c["error"]
    print(f"\n{checked} checked, {c['ok']} ok, {c['FAIL'] + c['error']} failed, {c['skipped']} skipped "
          f"({report.seconds:.0f} s, {report.jobs} job{'s' * (report.jobs != 1)})")
    for r in report.results:
        if r.status == "skipped":
            print(f"  skipped {r.model}: {r.error}")
    for r in report.results:
        if r.failed:
            print(f"  {r.status} {r.model}: {r.failure()}")
