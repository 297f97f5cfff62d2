"""Gathers one device's results into a few files that are easy to copy off a borrowed machine.

    python bench/gather.py RESULTS_DIR OUT_DIR [--steps STEPS_TSV] [--log LOG]

OUT_DIR receives at most 8 files: suite.json (every benchmark's rows, the ceilings and the step
statuses), report.md (the step table and every markdown table), suite.log (copied), plots.tar.gz
(the PNGs) and pytest-gpu.xml when the GPU tests wrote one. Safe to run after every step: a suite
cut short by a timeout still leaves what it had measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

from bert_fast.fileio import atomic_path, atomic_write_text


def read_steps(path: Path | None) -> list[dict]:
    """Rows of `name<TAB>status<TAB>seconds` written by gpu_suite.sh."""
    if path is None or not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds = (line.split("\t") + ["", ""])[:3]
        rows.append({"step": name, "status": status, "seconds": seconds})
    return rows


def gather(results: Path, out: Path, steps: list[dict], log: Path | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    benches = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    atomic_write_text(out / "suite.json", json.dumps({"steps": steps, "results": benches}, indent=1))
    report = ["# GPU suite report", "", "| step | status | seconds |", "|---|---|---|"]
    report += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    for md in sorted(results.glob("*.md")):
        report += ["", md.read_text().replace("\n# ", "\n## ", 1).replace("# ", "## ", 1)]
    atomic_write_text(out / "report.md", "\n".join(report) + "\n")
    written = [out / "suite.json", out / "report.md"]
    if log is not None and log.exists() and log.resolve() != (out / "suite.log").resolve():
        shutil.copyfile(log, out / "suite.log")
        written.append(out / "suite.log")
    plots = sorted(results.glob("*.png"))
    if plots:
        with atomic_path(out / "plots.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
            for png in plots:
                tar.add(png, arcname=png.name)
        written.append(out / "plots.tar.gz")
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=Path, default=None)
    p.add_argument("--log", type=Path, default=None)
    args = p.parse_args(argv)
    written = gather(args.results, args.out, read_steps(args.steps), args.log)
    print("gathered: " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
