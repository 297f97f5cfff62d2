"""The GPU tests' outcomes, and every failure's error text, from pytest's junit XML.

    python bench/junit_report.py RESULTS_DIR [--xml NAME --rc N --log LOG --log-from LINE]

Reads every RESULTS_DIR/pytest-gpu*.xml and writes RESULTS_DIR/gpu-tests.md (a row of counts per
pytest run, a row per failed or erroring test with the first lines of its error, then each one's
traceback) and gpu-tests.json (the same with whole texts), which gather.py puts at the top of
report.md and into suite.json. A GPU run once came back with "1 failed" and no error: the text
now travels with the tables. Prints the counts and one line per failure (gpu_suite.sh shows them).

--xml NAME: the run gpu_suite.sh just finished. If it ended without writing NAME (killed past its
limit, crashed), a stand-in NAME is written first: one error holding the exit code and the last
lines that run printed to LOG after line --log-from.
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

ROOT = Path(__file__).resolve().parents[1]
TEXT_LIMIT = 20_000  # characters of one failure's text kept in gpu-tests.json
HEAD, TAIL = 20, 60  # traceback lines shown in gpu-tests.md: its start (the test) and end (the error)
STAND_IN_LINES = 80  # lines of a run's output in a stand-in report


def atomic_write_text(path: Path, text: str) -> None:
    """Stdlib only (bert_fast.fileio would import torch): a step's report must not cost seconds."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def node_id(classname: str, name: str, root: Path = ROOT) -> str:
    """pytest's node id (`tests/gpu/test_x.py::Class::test[param]`) from junit's dotted classname."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).exists():
            return "::".join([path, *parts[i:], name])
    return "::".join([p for p in (classname, name) if p])


def read_run(xml: Path, root: Path = ROOT) -> dict:
    """Counts, failures (id, outcome, message, text) and skip reasons of one junit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, reasons = [], {}
    tree = ET.parse(xml).getroot()
    suites = [tree] if tree.tag == "testsuite" else tree.findall("testsuite")
    seconds = sum(float(s.get("time", 0) or 0) for s in suites)
    for case in tree.iter("testcase"):
        test = node_id(case.get("classname", ""), case.get("name", ""), root)
        bad = [(child.tag, child) for child in case if child.tag in ("failure", "error")]
        for tag, child in bad:
            counts["failed" if tag == "failure" else "errors"] += 1
            failures.append({"id": test, "outcome": "failed" if tag == "failure" else "error",
                             "message": child.get("message", ""), "text": (child.text or "")[:TEXT_LIMIT]})
        skip = case.find("skipped")
        if skip is not None and not bad:
            counts["skipped"] += 1
            reason = skip.get("message", "")
            reasons[reason] = reasons.get(reason, 0) + 1
        elif not bad:
            counts["passed"] += 1
    return {"run": xml.stem, "seconds": round(seconds, 1), **counts, "failures": failures,
            "skip_reasons": reasons}


def first_lines(text: str, n: int = 3, width: int = 200) -> list[str]:
    lines = [line.rstrip()[:width] for line in text.strip().splitlines() if line.strip()]
    return lines[:n] + (["..."] if len(lines) > n else [])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def excerpt(text: str) -> str:
    """The traceback's first HEAD lines (the test's own code) and last TAIL (the error)."""
    lines = text.rstrip().splitlines()
    if len(lines) > HEAD + TAIL + 1:
        lines = lines[:HEAD] + [f"... {len(lines) - HEAD - TAIL} lines left out ..."] + lines[-TAIL:]
    return "\n".join(lines).replace("```", "'''")


def render(runs: list[dict]) -> str:
    lines = ["# gpu-tests", "", "| run | passed | failed | errors | skipped | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} "
              f"| {r['seconds']} |" for r in runs]
    failures = [(r["run"], f) for r in runs for f in r["failures"]]
    if failures:
        lines += ["", "### Failures", "", "| run | test | outcome | error (first lines) |",
                  "|---|---|---|---|"]
        for run, f in failures:
            error = "<br>".join(_cell(line) for line in first_lines(f["message"] or f["text"]))
            lines.append(f"| {run} | `{f['id']}` | {f['outcome']} | {error} |")
        for run, f in failures:
            lines += ["", f"#### {f['id']} ({f['outcome']}, {run})", "", "```text",
                      excerpt(f["text"] or f["message"]), "```"]
    skipped = [(reason, count) for r in runs for reason, count in r["skip_reasons"].items()]
    if skipped:
        lines += ["", "### Skipped", ""] + [f"- {count} x {reason}" for reason, count in skipped]
    return "\n".join(lines) + "\n"


def summary(run: dict) -> list[str]:
    """What the suite's console shows of one run: the counts, then each failure's first line."""
    head = (f"{run['run']}: {run['passed']} passed, {run['failed']} failed, {run['errors']} errors, "
            f"{run['skipped']} skipped in {run['seconds']}s")
    lines = [head]
    for f in run["failures"]:
        error = (first_lines(f["message"] or f["text"], 1) + [""])[0]
        lines.append(f"  {f['outcome'].upper()} {f['id']}: {error}")
    return lines


def ended(rc: int) -> str:
    """How a step's command ended, from gpu_suite.sh's exit code (`timeout` gives 124 and 137)."""
    return {124: "stopped at its step's time limit", 137: "killed at its step's time limit"}.get(
        rc, f"killed by signal {rc - 128}" if rc > 128 else f"exit {rc}")


def write_stand_in(xml: Path, rc: int, output: str) -> None:
    """A junit XML with one error, for a run that wrote none: how it ended and its last output."""
    message = f"pytest ended without writing {xml.name} ({ended(rc)})"
    tail = "\n".join(output.splitlines()[-STAND_IN_LINES:])
    atomic_write_text(xml, (
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" errors="1" '
        f'failures="0" skipped="0" tests="1" time="0"><testcase classname="" name="{xml.stem} (no report)">'
        f"<error message={quoteattr(message)}>{escape(message + chr(10) + tail)}</error>"
        "</testcase></testsuite></testsuites>\n"))


def report(results: Path, root: Path = ROOT) -> list[dict]:
    runs = []
    for xml in sorted(results.glob("pytest-gpu*.xml")):
        try:
            runs.append(read_run(xml, root))
        except ET.ParseError as err:  # cut short as it was written: say so rather than hide the run
            runs.append({"run": xml.stem, "seconds": 0, "passed": 0, "failed": 0, "errors": 1, "skipped": 0,
                         "skip_reasons": {},
                         "failures": [{"id": xml.name, "outcome": "error", "message": f"unreadable: {err}",
                                       "text": ""}]})
    if runs:
        atomic_write_text(results / "gpu-tests.md", render(runs))
        atomic_write_text(results / "gpu-tests.json", json.dumps({"runs": runs}, indent=1))
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--xml", help="the run just finished (a file name in RESULTS)")
    p.add_argument("--rc", type=int, default=0, help="its exit code")
    p.add_argument("--log", type=Path, help="the suite's log, for a stand-in report")
    p.add_argument("--log-from", type=int, default=0, help="the log's line count before the run")
    args = p.parse_args(argv)
    if args.xml and not (args.results / args.xml).exists():
        output = ""
        if args.log is not None and args.log.exists():
            output = "\n".join(args.log.read_text(errors="replace").splitlines()[args.log_from:])
        write_stand_in(args.results / args.xml, args.rc, output)
    for run in report(args.results):
        if not args.xml or run["run"] == Path(args.xml).stem:
            print("\n".join(summary(run)))


if __name__ == "__main__":
    main()
