"""bench/step_profile.py's markdown: a summary row per case and provider, then per row its
categories (with idle), its longest kernels and its longest unmatched kernel names."""

from __future__ import annotations

SUMMARY = ("model", "seq", "batch", "lengths", "provider", "status", "ms", "wall_ms", "busy_ms", "idle_ms",
           "launches", "gemm_ms", "non_gemm_ms")
NAME_WIDTH = 100  # C++ template names run to thousands of characters; the JSON keeps them whole


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _name(name: str) -> str:
    short = name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 1] + "…"
    return "`" + short.replace("|", "\\|").replace("`", "'") + "`"


def _cell(row: dict, col: str) -> str:
    v = row.get(col)
    if v is None:
        return ""
    if col == "ms":
        return f"{_ms(v)} ({_ms(row['ms_p20'])}-{_ms(row['ms_p80'])})"
    if col == "launches":
        return f"{v:g}"
    return _ms(v) if isinstance(v, float) else str(v)


def title(row: dict) -> str:
    return (f"{row['model']}, seq {row['seq']} x batch {row['batch']} ({row['lengths']} lengths): "
            f"{row['provider']}")


def breakdown(row: dict) -> list[str]:
    """The row's category table (longest first, then idle and the wall), its longest kernels and
    its unmatched ones."""
    cats = sorted(((n, c) for n, c in row["categories"].items() if c["launches"]),
                  key=lambda nc: -nc[1]["ms"])
    lines = ["| category | ms | % of step | launches |", "|---|---|---|---|"]
    lines += [f"| {n} | {_ms(c['ms'])} | {c['pct']:.1f}% | {c['launches']:g} |" for n, c in cats]
    lines += [f"| idle (gaps) | {_ms(row['idle_ms'])} | {row['idle_pct']:.1f}% | |",
              f"| wall | {_ms(row['wall_ms'])} | | {row['launches']:g} |", "",
              f"Busy {_ms(row['busy_ms'])} ms; kernels overlapping on other streams: "
              f"{_ms(row['overlap_ms'])} ms. Longest kernels:", "",
              "| kernel | category | ms | % | launches |", "|---|---|---|---|---|"]
    lines += [f"| {_name(k['name'])} | {k['category']} | {_ms(k['ms'])} | {k['pct']:.1f}% | "
              f"{k['launches']:g} |" for k in row["top_kernels"]]
    if row["unmatched"]:
        lines += ["", "Unmatched (`other`), longest first:", "", "| kernel | ms | launches |",
                  "|---|---|---|"]
        lines += [f"| {_name(k['name'])} | {_ms(k['ms'])} | {k['launches']:g} |" for k in row["unmatched"]]
    return lines


def describe(row: dict) -> str:
    """What the console shows of a row: its breakdown, or why it did not run."""
    if row["status"] != "ok":
        return f"[step_profile] {title(row)} -> {row['status']}"
    return "\n".join([f"[step_profile] {title(row)}: {_ms(row['ms'])} ms a step unprofiled", "",
                      *breakdown(row), ""])


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# step_profile", "",
             f"Device: {meta['device']} · dtype {meta['dtype']} · torch {meta['torch']} · "
             f"triton {meta['triton']} · commit {meta['commit']} · {meta['date']} · {meta['warmup']} "
             f"warm-up steps, then {meta['steps']} timed and {meta['steps']} profiled", "",
             "Per step. `ms`: unprofiled, median (20th-80th percentile). From the profiled steps: `wall_ms`, "
             "`busy_ms` (the union of the kernels' intervals), `idle_ms` (wall - busy), `launches`, "
             "`gemm_ms` (GEMM kernels) and `non_gemm_ms` (wall - GEMM kernels: bench/fp8_prediction.py's "
             "rest). A category's % is of kernel time + idle, the wall when no kernels overlap.", "",
             "| " + " | ".join(SUMMARY) + " |", "|" + "---|" * len(SUMMARY)]
    lines += ["| " + " | ".join(_cell(r, c) for c in SUMMARY) + " |" for r in rows]
    for row in rows:
        if row["status"] == "ok":
            lines += ["", f"### {title(row)}", "", *breakdown(row)]
    return "\n".join(lines) + "\n"
