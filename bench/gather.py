"""Gathers one device's results into a few files that are easy to copy off a borrowed machine.

    python bench/gather.py RESULTS_DIR OUT_DIR [--steps STEPS_TSV] [--log LOG]

OUT_DIR receives at most 8 files: suite.json (every benchmark's rows, the ceilings, the GPU tests'
outcomes with each failure's error text, the step statuses and the pretraining runs' metrics
records), report.md (the step table, the GPU tests' counts and failures, a table per pretraining
run and every markdown table), suite.log (copied), build.log (the extension build's
whole log, when there is one; its end only past 8 MiB), plots.tar.gz (the PNGs and the pretraining
runs' `RUN-metrics.jsonl`, else `RUN/metrics.jsonl`); gpu_suite.sh adds pytest-gpu*.xml (two at
most). Safe to run after every step: a suite cut short by a timeout still leaves what it had
measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

from bert_fast.fileio import atomic_path, atomic_write_text

BUILD_LOG_LIMIT = 8 << 20  # bytes; a device call returns files of at most 16 MiB
# Columns of a pretraining run's table in report.md (train records of metrics.jsonl).
PRETRAIN_COLUMNS = ["step", "loss", "mlm_acc", "nsp_acc", "lr", "grad_norm", "seq_per_s", "tokens_per_s",
                    "tflops", "mfu_pct", "peak_memory_gb"]


def read_steps(path: Path | None) -> list[dict]:
    """Rows of `name<TAB>status<TAB>seconds` written by gpu_suite.sh."""
    if path is None or not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds = (line.split("\t") + ["", ""])[:3]
        rows.append({"step": name, "status": status, "seconds": seconds})
    return rows


def read_metrics(path: Path) -> list[dict]:
    """The records of a pretraining run's metrics.jsonl; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def pretrain_table(name: str, records: list[dict]) -> list[str]:
    train = [r for r in records if r.get("kind") == "train"]
    lines = ["", f"## {name}", ""]
    if not train:
        return lines + ["No train records."]
    columns = [c for c in PRETRAIN_COLUMNS if any(c in r for r in train)]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in train]
    others = [r for r in records if r.get("kind") in ("checkpoint", "ranks")]
    lines += [""] if others else []
    for r in others:
        details = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kind", "step"))
        lines.append(f"- {r['kind']} at step {r.get('step')}: {details}")
    return lines


def copy_build_log(src: Path, dst: Path) -> None:
    """Whole, or its end past BUILD_LOG_LIMIT (compiler errors stop a build, so they are near it)."""
    data = src.read_bytes()
    if len(data) > BUILD_LOG_LIMIT:
        cut = len(data) - BUILD_LOG_LIMIT
        data = f"[build.log: its first {cut} bytes left out]\n".encode() + data[cut:]
    with atomic_path(dst) as tmp:
        Path(tmp).write_bytes(data)


def gather(results: Path, out: Path, steps: list[dict], log: Path | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    benches = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    # RUN-metrics.jsonl, the copy gpu_suite.sh makes of RUN/metrics.jsonl once the run ends; a run
    # killed at its limit left only RUN/metrics.jsonl.
    found = {p.name.removesuffix("-metrics.jsonl"): p for p in results.glob("*-metrics.jsonl")}
    for p in results.glob("*/metrics.jsonl"):
        found.setdefault(p.parent.name, p)
    metrics = [found[name] for name in sorted(found)]
    runs = {name: read_metrics(found[name]) for name in sorted(found)}
    atomic_write_text(out / "suite.json", json.dumps({"steps": steps, "results": benches, "pretrain": runs},
                                                     indent=1))
    report = ["# GPU suite report", "", "| step | status | seconds |", "|---|---|---|"]
    report += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    # The GPU tests right after the steps (junit_report.py's gpu-tests.md): their failures, with
    # the errors, are what a reader must not miss.
    tests = results / "gpu-tests.md"
    if tests.exists():
        report += ["", tests.read_text().replace("# ", "## ", 1)]
    for name, records in runs.items():
        report += pretrain_table(name, records)
    for md in sorted(results.glob("*.md")):
        if md != tests:
            report += ["", md.read_text().replace("\n# ", "\n## ", 1).replace("# ", "## ", 1)]
    atomic_write_text(out / "report.md", "\n".join(report) + "\n")
    written = [out / "suite.json", out / "report.md"]
    if log is not None and log.exists() and log.resolve() != (out / "suite.log").resolve():
        shutil.copyfile(log, out / "suite.log")
        written.append(out / "suite.log")
    if (results / "build.log").exists():
        copy_build_log(results / "build.log", out / "build.log")
        written.append(out / "build.log")
    packed = sorted(results.glob("*.png")) + metrics
    if packed:
        with atomic_path(out / "plots.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
            for path in packed:
                own = path.name == "metrics.jsonl"  # RUN/metrics.jsonl -> RUN-metrics.jsonl
                tar.add(path, arcname=f"{path.parent.name}-{path.name}" if own else path.name)
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
