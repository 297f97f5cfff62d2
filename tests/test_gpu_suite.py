"""bench/gpu_suite.sh (the one-call GPU run) and bench/gather.py, checked without a GPU: the script
parses, its dry run lists every step, every GPU benchmark is one of them, and gathering a results
folder yields at most 8 files with valid JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
# Scripts in bench/ that are not GPU benchmarks of their own.
NOT_GPU_BENCHES = {"harness.py", "gather.py", "ceilings.py", "data.py"}


def run_suite(*args):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, cwd=ROOT)


def test_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0


def test_dry_run_lists_every_step_and_benchmark():
    full = run_suite("--dry-run")
    assert full.returncode == 0, full.stderr
    steps = [line.split()[1] for line in full.stdout.splitlines()[1:]]
    assert steps[:3] == ["env", "install", "build-start"] and "gpu-tests" in steps
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name not in NOT_GPU_BENCHES:
            assert f"bench/{script.name}" in full.stdout, f"{script.name} is not in the GPU suite"
    quick = run_suite("--dry-run", "--quick")
    assert "budget 240s" in quick.stdout and "skip  gpu-tests-ext" in quick.stdout
    assert "bench/attention.py --quick" in quick.stdout


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--budget", "soon"], "--budget must be whole seconds"),
    (["--out"], "--out needs a folder"),
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
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\tok\t1\ngpu-tests\ttimed out\t100\n")
    log = tmp_path / "suite.log"
    log.write_text("log line\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gather.py"), str(results), str(out),
                    "--steps", str(steps), "--log", str(log)], check=True, capture_output=True)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["plots.tar.gz", "report.md", "suite.json", "suite.log"]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["results"]["attention"]["rows"] == [{"ms": 1.0}]
    assert suite["steps"][1] == {"step": "gpu-tests", "status": "timed out", "seconds": "100"}
    report = (out / "report.md").read_text()
    assert "| gpu-tests | timed out | 100 |" in report and "## attention" in report


KERNEL_BENCHES = ["attention", "layernorm", "embeddings", "mlm_loss", "optim", "e2e"]


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_bench_cpu_mode_writes_valid_json(name, tmp_path):
    # The CPU mode: tiny sizes, torch reference only; --strict turns any provider error into a failure.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--device", "cpu",
                           "--quick", "--strict", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    ok = [r for r in saved["rows"] if r["status"] == "ok"]
    assert ok and all(r["ms"] > 0 for r in ok), saved["rows"]
    assert saved["meta"]["device"].startswith("cpu")
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")


def test_every_kernel_bench_is_checked():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {p[:-3] for p in NOT_GPU_BENCHES}
    assert scripts == set(KERNEL_BENCHES)


def test_ceilings_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ceilings.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "ceilings.json").read_text())
    assert saved["copy_gbs"] is None and "nothing to measure" in done.stdout
