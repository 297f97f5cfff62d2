"""bench/gpu_suite.sh (the one-call GPU run) and bench/gather.py, checked without a GPU: the script
parses, its dry run lists every step, every GPU benchmark is one of them, --only picks steps, and
gathering a results folder yields at most 8 files with valid JSON."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import early
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
# Scripts in bench/ that are not GPU benchmarks of their own.
NOT_GPU_BENCHES = {"harness.py", "gather.py", "ceilings.py", "data.py", "attention_dropout_variants.py",
                   "packing.py", "junit_report.py", "checkpoint.py", "fp8_prediction.py",
                   "kernel_categories.py", "step_profile_report.py"}


def run_suite(*args):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, cwd=ROOT)


def test_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0


def dry_run(*args):
    """(steps that run, steps skipped) of a dry run, in order."""
    done = run_suite("--dry-run", *args)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]
    ran = [line.split()[1] for line in lines if not line.split()[0] == "skip"]
    skipped = [line.split()[1] for line in lines if line.split()[0] == "skip"]
    return ran, skipped, done.stdout


def test_dry_run_lists_every_step_and_benchmark():
    steps, skipped, out = dry_run()
    assert steps[:3] == ["env", "install", "build-start"] and "gpu-tests" in steps
    assert skipped == ["build-sync"] and "skip  build-sync (only with --only)" in out
    # The trainer runs once the extension is built (its fused optimizer needs it).
    assert steps.index("build-wait") < steps.index("bench-e2e") < steps.index("pretrain") \
        < steps.index("pretrain-throughput") < steps.index("gpu-tests-ext")
    # The step profile right after the prediction whose "rest" it breaks down.
    assert steps.index("bench-step_profile") == steps.index("fp8-prediction") + 1
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name not in NOT_GPU_BENCHES:
            assert f"bench/{script.name}" in out, f"{script.name} is not in the GPU suite"
    quick, quick_skipped, quick_out = dry_run("--quick")
    assert "budget 240s" in quick_out and "skip  gpu-tests-ext (--quick)" in quick_out
    assert "bench/attention.py --quick" in quick_out
    assert "pretrain" in quick and "pretrain-throughput" in quick_skipped


def test_only_runs_the_named_steps_in_suite_order():
    # Named out of order; env and install run anyway; --quick skips nothing that is named.
    steps, skipped, out = dry_run("--quick", "--only",
                                  "bench-embeddings,pretrain-throughput,pretrain,bench-e2e,gpu-tests-ext,build-sync")
    assert steps == ["env", "install", "build-sync", "bench-e2e", "pretrain", "pretrain-throughput",
                     "gpu-tests-ext", "bench-embeddings"]
    assert "only build-sync,bench-e2e" not in out and "bench/embeddings.py --quick" in out
    assert "build-start" in skipped and "skip  ceilings (not in --only)" in out
    steps, _, _ = dry_run("--only", "env")
    assert steps == ["env", "install"]


def test_only_unknown_step():
    done = run_suite("--dry-run", "--only", "pretrain,bench-frob")
    assert done.returncode == 2
    assert "unknown step 'bench-frob' in --only" in done.stderr
    assert "known steps: env, install, build-start, build-sync," in done.stderr and "bench-embeddings" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--budget", "soon"], "--budget must be whole seconds"),
    (["--out"], "--out needs a folder"),
    (["--only"], "--only needs step names"),
    (["--only", "build-start,build-sync"], "--only build-sync replaces build-start and build-wait"),
])
def test_bad_arguments(args, message):
    done = run_suite(*args)
    assert done.returncode != 0 and message in done.stderr


def test_gather_makes_few_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "attention.json").write_text(json.dumps({"meta": {"device": "x"}, "rows": [{"ms": 1.0}]}))
    (results / "attention.md").write_text("# attention\n\n| a |\n|---|\n| 1 |\n")
    (results / "attention.png").write_bytes(b"\x89PNG fake")
    (results / "build.log").write_text("g++ ...\ncsrc/optim.cu(12): error: identifier x is undefined\n")
    records = [{"kind": "train", "step": 20, "loss": 10.5, "mlm_acc": 0.0, "seq_per_s": 100.0},
               {"kind": "checkpoint", "step": 30, "checkpoint": "runs/x/step_00000030"},
               {"kind": "train", "step": 40, "loss": 9.25, "mlm_acc": 0.125, "seq_per_s": 120.0}]
    # A kill can cut the last line short: it is left out, the rest is kept.
    (results / "pretrain-run-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    (results / "pretrain-run").mkdir()  # the copy above wins over the run's own file
    (results / "pretrain-run" / "metrics.jsonl").write_text("")
    (results / "pretrain-base").mkdir()  # killed at its limit: no copy, the run's own file is read
    (results / "pretrain-base" / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\tok\t1\ngpu-tests\ttimed out\t100\n")
    log = tmp_path / "suite.log"
    log.write_text("log line\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gather.py"), str(results), str(out),
                    "--steps", str(steps), "--log", str(log)], check=True, capture_output=True)
    files = sorted(p.name for p in out.iterdir())
    # With gpu_suite.sh's pytest-gpu.xml and pytest-gpu-ext.xml: 7 of the 8 files a call returns.
    assert files == ["build.log", "plots.tar.gz", "report.md", "suite.json", "suite.log"]
    assert "error: identifier x" in (out / "build.log").read_text()
    suite = json.loads((out / "suite.json").read_text())
    assert suite["results"]["attention"]["rows"] == [{"ms": 1.0}]
    assert suite["steps"][1] == {"step": "gpu-tests", "status": "timed out", "seconds": "100"}
    assert suite["pretrain"] == {"pretrain-run": records, "pretrain-base": records[:1]}
    report = (out / "report.md").read_text()
    assert "| gpu-tests | timed out | 100 |" in report and "## attention" in report
    assert "## pretrain-run\n" in report and "## pretrain-base\n" in report and "| step | loss | mlm_acc | seq_per_s |" in report
    assert "| 40 | 9.25 | 0.125 | 120 |" in report and "- checkpoint at step 30" in report
    with tarfile.open(out / "plots.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["attention.png", "pretrain-base-metrics.jsonl", "pretrain-run-metrics.jsonl"]


def test_gather_keeps_the_end_of_a_huge_build_log(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gather
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setattr(gather, "BUILD_LOG_LIMIT", 100)
    src = tmp_path / "build.log"
    src.write_text("x" * 1000 + "\nthe error\n")
    gather.copy_build_log(src, tmp_path / "out.log")
    text = (tmp_path / "out.log").read_text()
    assert text.startswith("[build.log: its first 911 bytes left out]") and text.endswith("the error\n")


KERNEL_BENCHES = ["attention", "layernorm", "embeddings", "mlm_loss", "optim", "e2e", "fp8_cast", "fp8_roll",
                  "step_profile"]
# Two queues of about equal length, one core each: e2e alone (34 s at one thread) is about as long as
# the other seven together (30 s, and 7 s of step_profile).
_BENCH_QUEUES = (["e2e"], ["optim", "attention", "mlm_loss", "fp8_cast", "fp8_roll", "embeddings", "layernorm",
                          "step_profile"])


@early.job
def bench_runs(root, threads) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every kernel benchmark's CPU mode (tiny sizes, torch reference only; --strict turns any
    provider error into a failure), one thread each: the timings are not looked at. Started with
    the session, one after another (tests/early.py); in this module's turn, two at a time."""
    env = {**early.environ(), "OMP_NUM_THREADS": "1"}

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        out = root / name
        return early.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--device", "cpu", "--quick",
                          "--strict", "--out", str(out)], cwd=ROOT, env=env), out

    queues = early.each(threads, *(lambda names=names: {n: run(n) for n in names} for names in _BENCH_QUEUES))
    return {name: result for queue in queues for name, result in queue.items()}


def test_the_bench_queues_hold_every_kernel_bench_once():
    assert sorted(n for queue in _BENCH_QUEUES for n in queue) == sorted(KERNEL_BENCHES)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_bench_cpu_mode_writes_valid_json(name, bench_runs):
    done, out = bench_runs[name]
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / f"{name}.json").read_text())
    ok = [r for r in saved["rows"] if r["status"] == "ok"]
    assert ok and all(r["ms"] > 0 for r in ok), saved["rows"]
    assert saved["meta"]["device"].startswith("cpu")
    assert (out / f"{name}.md").read_text().startswith(f"# {name}")


def test_every_kernel_bench_is_checked():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {p[:-3] for p in NOT_GPU_BENCHES}
    assert scripts == set(KERNEL_BENCHES)


def test_ceilings_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ceilings.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "ceilings.json").read_text())
    assert saved["copy_gbs"] is None and "nothing to measure" in done.stdout
    # No FP8 tensor cores on the CPU: the key is there, null, with the reason beside it.
    assert saved["fp8_matmul_tflops"] is None and "compute capability >= 8.9" in saved["fp8_matmul_unavailable"]
    assert saved["fp8_fast_accum_matmul_tflops"] is None
    assert "fp8: no FP8 tensor cores" in (tmp_path / "ceilings.md").read_text()
