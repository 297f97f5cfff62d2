"""The GPU suite keeps every failed test's error text (an H200 run once came back with "1 failed:
torch.compile of the attention op" and no error): bench/junit_report.py on pytest's real junit XML,
its stand-in for a pytest that died without one, and gpu_suite.sh run on the CPU over fake GPU
tests in a copy of bench/, through to the gathered report.md."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import early
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import junit_report
finally:
    sys.path.remove(str(ROOT / "bench"))

FAKE_TESTS = '''
import os
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def broken():
    raise RuntimeError("fixture | broke")


def test_passes():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1, "n is not one"


def test_setup_error(broken):
    pass


def test_skipped():
    pytest.skip("needs DeepSpeed")


class TestCompile:
    def test_deep(self):
        def deep(i):
            if i == 0:
                raise RuntimeError("compile failed: line one\\nline two\\nline three\\nline four")
            deep(i - 1)
        deep(60)  # two traceback lines a frame: the report cuts the middle
'''
FAKE = "tests/gpu/test_fake.py"


def fake_tree(tmp_path: Path, tests: str) -> Path:
    tree = tmp_path / "repo"
    (tree / "tests" / "gpu").mkdir(parents=True)
    (tree / FAKE).write_text(tests)
    return tree


def run_pytest(tree: Path, results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    xml = results / "pytest-gpu.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-m", "gpu",
                    "tests/gpu", f"--junitxml={xml}"], cwd=tree, capture_output=True, text=True)
    assert xml.exists()
    return xml


def test_report_keeps_every_failure_with_its_error(tmp_path):
    tree = fake_tree(tmp_path, FAKE_TESTS)
    results = tmp_path / "results"
    run_pytest(tree, results)
    [run] = junit_report.report(results, root=tree)
    assert (run["passed"], run["failed"], run["errors"], run["skipped"]) == (2, 2, 1, 1)
    ids = [f["id"] for f in run["failures"]]
    assert ids == [f"{FAKE}::test_param[2]", f"{FAKE}::test_setup_error", f"{FAKE}::TestCompile::test_deep"]
    md = (results / "gpu-tests.md").read_text()
    assert "| pytest-gpu | 2 | 2 | 1 | 1 |" in md
    # The table: each failure's first lines (a cell's | escaped); then each whole traceback.
    assert (f"| pytest-gpu | `{FAKE}::TestCompile::test_deep` | failed | RuntimeError: compile failed: "
            "line one<br>line two<br>line three<br>... |") in md
    assert 'failed on setup with "RuntimeError: fixture \\| broke"' in md
    deep = md.split(f"#### {FAKE}::TestCompile::test_deep (failed, pytest-gpu)")[1]
    assert "lines left out" in deep and deep.split("```")[1].rstrip().endswith("E   line four")
    assert "- 1 x needs DeepSpeed" in md
    saved = json.loads((results / "gpu-tests.json").read_text())["runs"][0]["failures"][2]
    assert saved["text"].count("in deep") == 61 and "E   line four" in saved["text"]


def test_node_id_without_the_file_keeps_junit_names(tmp_path):
    assert junit_report.node_id("tests.gpu.test_gone.TestX", "test_y[1]", tmp_path) == \
        "tests.gpu.test_gone.TestX::test_y[1]"


def test_stand_in_for_a_run_that_wrote_no_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    log = tmp_path / "suite.log"
    log.write_text("=== gpu-tests (limit 100s) ===\nan earlier step's line\n"
                   "Fatal Python error: Segmentation fault\n  File \"tests/gpu/ext/test_x.py\", line 9 in test_y\n")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "junit_report.py"), str(results),
                           "--xml", "pytest-gpu-ext.xml", "--rc", "139", "--log", str(log), "--log-from", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "pytest-gpu-ext: 0 passed, 0 failed, 1 errors, 0 skipped in 0.0s",
        "  ERROR pytest-gpu-ext (no report): pytest ended without writing pytest-gpu-ext.xml (killed by signal 11)"]
    md = (results / "gpu-tests.md").read_text()
    assert "Fatal Python error: Segmentation fault" in md and "an earlier step's line" not in md
    assert (results / "pytest-gpu-ext.xml").exists()  # gathered with the others


def test_a_report_cut_short_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "pytest-gpu.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest"><testc')
    [run] = junit_report.report(tmp_path)
    assert run["errors"] == 1 and run["failures"][0]["message"].startswith("unreadable: ")
    assert "| pytest-gpu | 0 | 0 | 1 | 0 |" in (tmp_path / "gpu-tests.md").read_text()


CRASH_TESTS = '''
import os
import pytest


@pytest.mark.gpu
def test_crashes():
    os.abort()
'''


def _suite_run(root: Path, tests: str) -> tuple[subprocess.CompletedProcess, Path]:
    """gpu_suite.sh --only gpu-tests over `tests` in a copy of bench/: (the process, its --out)."""
    tree = fake_tree(root, tests)
    (tree / "bench").mkdir()
    for name in ("gpu_suite.sh", "junit_report.py", "gather.py", "harness.py"):
        shutil.copy(ROOT / "bench" / name, tree / "bench" / name)
    out = root / "out"
    env = dict(early.environ(), PYTHON=sys.executable)
    done = early.run(["bash", "bench/gpu_suite.sh", "--only", "gpu-tests", "--budget", "200", "--out", str(out)],
                     cwd=tree, env=env)
    return done, out


SUITE_CASES = {"failures": FAKE_TESTS, "crash": CRASH_TESTS}


@early.job
def suite_runs(root, threads) -> dict:
    """Case -> _suite_run of it; the cases (one core each, seconds) are an early job (tests/early.py),
    one after the other there, at once in this module's turn."""
    roots = {case: root / case for case in SUITE_CASES}
    done = early.each(threads, *(lambda case=case: _suite_run(roots[case], SUITE_CASES[case])
                                 for case in SUITE_CASES))
    return dict(zip(SUITE_CASES, done))


@pytest.mark.slow
@pytest.mark.parametrize("case, status, console, in_report", [
    ("failures", "failed (exit 1)", f"  FAILED {FAKE}::test_param[2]: AssertionError: n is not one",
     "E   line four"),
    ("crash", "failed (exit 134)",
     "  ERROR pytest-gpu (no report): pytest ended without writing pytest-gpu.xml (killed by signal 6)",
     "Fatal Python error: Aborted"),
], ids=["failures", "crash"])
def test_suite_shows_and_gathers_the_errors(suite_runs, case, status, console, in_report):
    """gpu_suite.sh --only gpu-tests on the CPU, over fake GPU tests in a copy of bench/: the
    console names each failure, and report.md (what comes back from a GPU machine) holds the error
    text right after the step table."""
    done, out = suite_runs[case]
    assert done.returncode == 1, done.stdout + done.stderr
    assert console in done.stdout.splitlines(), done.stdout
    report = (out / "report.md").read_text()
    assert f"| gpu-tests | {status} |" in report, report
    steps_end = report.index("## gpu-tests")
    assert in_report in report[steps_end:] and "| pytest-gpu |" in report[steps_end:]
    assert (out / "pytest-gpu.xml").exists()
    tests_json = json.loads((out / "suite.json").read_text())["results"]["gpu-tests"]
    assert tests_json["runs"][0]["failures"], tests_json
