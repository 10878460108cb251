"""Reports CI systems read: JUnit XML (one test case per model) and a Markdown table (for a
job summary or a pull-request comment). JSON is :meth:`ZooReport.to_json`."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Optional

from .baseline import Comparison
from .result import ModelResult, ZooReport


def junit_xml(report: ZooReport, comparison: Optional[Comparison] = None) -> str:
    """One ``<testcase>`` per model: FAIL is a failure, error an error, skipped skipped; with a
    comparison, a coverage drop is a failure and a failure already in the baseline is reported
    as skipped (known), so the XML fails exactly when the exit code does."""
    suite = ET.Element("testsuite", name=f"mudsc-fx check {report.zoo}".strip())
    classname = "mudsc_fx.zoo." + (re.sub(r"[^A-Za-z0-9_]+", "_", report.zoo).strip("_") or "models")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=classname,
                             name=r.model, time=f"{r.seconds:.2f}")
        counts["tests"] += 1
        changes = comparison.for_model(r.model) if comparison else ()
        regressions = [c for c in changes if c.regression]
        known = comparison is not None and r.failed and not regressions
        if r.status == "skipped" or known:
            why = f"known {r.status} in the baseline: {r.failure()}" if known else r.error or ""
            ET.SubElement(case, "skipped", message=_short(why))
            counts["skipped"] += 1
        elif r.status == "error":
            el = ET.SubElement(case, "error", message=_short(r.error or "error"), type="CheckError")
            el.text = r.error
            counts["errors"] += 1
        elif r.status == "FAIL" or regressions:
            kind = "EquivalenceFailure" if r.status == "FAIL" else "CoverageDrop"
            text = r.failure() if r.status == "FAIL" else "\n".join(c.line() for c in regressions)
            el = ET.SubElement(case, "failure", message=_short(text.splitlines()[0]), type=kind)
            el.text = text
            counts["failures"] += 1
        if r.status == "ok":
            ET.SubElement(case, "system-out").text = _ok_text(r)
    suite.set("time", f"{report.seconds:.1f}")
    for k, v in counts.items():
        suite.set(k, str(v))
    root = ET.Element("testsuites", name="mudsc-fx check", **{k: str(v) for k, v in counts.items()})
    root.append(suite)
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown(report: ZooReport, comparison: Optional[Comparison] = None, title: Optional[str] = None) -> str:
    """A summary line, the regressions (if a baseline was given) and one row per model."""
    c = report.counts()
    checked = c["ok"] + c["FAIL"] + c["error"]
    lines = [f"### {title or f'mudsc-fx check --zoo {report.zoo}'}", "",
             f"**{checked} checked: {c['ok']} ok, {c['FAIL']} FAIL, {c['error']} error; {c['skipped']} skipped** "
             f"({report.jobs} job{'s' * (report.jobs != 1)}, {report.seconds:.0f} s)"]
    if comparison is not None:
        lines[-1] += f"; against the baseline: {comparison.summary()}"
        if comparison.regressions:
            lines += ["", "#### Regressions", ""]
            lines += [f"- **{ch.model}**: {ch.kind}: {_md(ch.detail)}"
                      + "".join(f"<br>fixed now: `{s.label()}`" for s in ch.lost[:5]) for ch in comparison.regressions]
    delta = comparison is not None
    lines += ["", "| model | status | coverage |" + (" change |" if delta else "")
              + " spaces | free | barriers | max abs err | input | s |",
              "|---|---|---:|" + ("---|" if delta else "") + "---:|---:|---:|---:|---|---:|"]
    for r in report.results:
        status = r.status if r.status == "ok" else f"{r.status}: {_md(_short(r.failure(), 60))}"
        change = ""
        if delta:
            change = "; ".join(ch.kind for ch in comparison.for_model(r.model))
        cells = [r.model, status, _num(r.coverage, ".3f")] + ([change] if delta else []) + [
            _num(r.spaces, "d"), _num(r.free, "d"), str(len(r.barriers)) if r.status == "ok" else "",
            _num(r.max_abs_err, ".1e"), r.input, f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ok_text(r: ModelResult) -> str:
    return (f"coverage {r.coverage:.4f}, {r.spaces} spaces ({r.free} free), {len(r.barriers)} barriers, "
            f"max abs err {r.max_abs_err:.2e}, input {r.input}")


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)
