"""The shared benchmark harness: runs on the CPU, measures the baseline beside each provider and
writes JSON + markdown that a reader (and the GPU suite) can load."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402


def _bench(providers, cpu_providers):
    return harness.Benchmark(
        name="toy",
        make_inputs=lambda case, device, dtype: {
            "x": torch.randn(case["n"], device=device, dtype=dtype, requires_grad=True)},
        providers=providers, gpu_cases=[dict(n=1 << 20)], cpu_cases=[dict(n=64), dict(n=256)],
        flops=lambda case, mode: 2.0 * case["n"], bytes=lambda case, mode: 8.0 * case["n"],
        cpu_providers=cpu_providers)


def test_rows_ratios_and_files(tmp_path):
    def unavailable(inputs, case):
        raise harness.Unavailable("peer not installed")

    bench = _bench({"eager": lambda i, c: (i["x"] * 2).sin(), "twice": lambda i, c: i["x"].sin() * 2,
                    "peer": unavailable}, cpu_providers=("eager", "twice", "peer"))
    rows = bench.main(["--out", str(tmp_path), "--modes", "forward,full"])
    assert len(rows) == 2 * 2 * 3  # cases x modes x providers
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 8 and all(r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"] for r in ok)
    assert all(r["x_baseline"] == 1.0 for r in ok if r["provider"] == "eager")
    assert all(r["tflops"] > 0 and r["gbs"] > 0 for r in ok)
    assert {r["status"] for r in rows if r["provider"] == "peer"} == {"unavailable: peer not installed"}
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {"device", "torch", "triton", "commit", "date", "dtype"} <= set(saved["meta"])
    table = (tmp_path / "toy.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)  # header + one line per row


def test_cpu_runs_only_the_reference_providers(tmp_path, capsys):
    bench = _bench({"eager": lambda i, c: i["x"] * 2, "triton": lambda i, c: i["x"] * 2},
                   cpu_providers=("eager",))
    rows = bench.main(["--out", str(tmp_path), "--quick", "--modes", "backward"])
    assert {r["provider"] for r in rows} == {"eager"}
    assert "triton need CUDA" in capsys.readouterr().out


def test_quick_runs_the_first_cases(tmp_path):
    """Two CPU cases; as many GPU cases as the benchmark says (`--cases gpu` runs them here)."""
    bench = _bench({"eager": lambda i, c: i["x"] * 2}, ("eager",))
    bench.cpu_cases = bench.gpu_cases = [dict(n=n) for n in (16, 32, 64, 128)]
    bench.quick_gpu_cases = 3

    def sizes(*args):
        return {r["n"] for r in bench.main(["--out", str(tmp_path), "--modes", "forward", "--quick", *args])}

    assert sizes() == {16, 32}
    assert sizes("--cases", "gpu") == {16, 32, 64}


def test_e2e_quick_keeps_issue_23s_three_cases():
    import e2e

    quick = e2e.bench.gpu_cases[:e2e.bench.quick_gpu_cases]
    assert {(c["seq"], c["lengths"]) for c in quick if c["model"] == "large"} == {
        (128, "full"), (512, "full"), (512, "pipeline")}


def test_errors_are_recorded_or_raised_with_strict(tmp_path):
    def broken(inputs, case):
        raise RuntimeError("kernel exploded")

    bench = _bench({"eager": lambda i, c: i["x"] * 2, "broken": broken}, ("eager", "broken"))
    rows = bench.main(["--out", str(tmp_path), "--modes", "forward", "--quick"])
    assert rows[1]["status"] == "error: RuntimeError: kernel exploded"
    with pytest.raises(RuntimeError, match="kernel exploded"):
        bench.main(["--out", str(tmp_path), "--strict"])
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--out", str(tmp_path), "--providers", "nope"])


def test_compiled_provider_is_cuda_only():
    provider = harness.compiled(lambda x: x * 2)
    with pytest.raises(harness.Unavailable, match="CUDA only"):
        provider({"x": torch.ones(3)}, {"n": 3})


def test_sync_counter_counts_the_reads_a_gpu_would_wait_for():
    x = torch.arange(6.0)
    with harness.SyncCounter(torch.device("cpu")) as counter:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        torch.nonzero(x)
        (x * 2).sum()  # stays on the device
    assert counter.count == 4
    with harness.SyncCounter(torch.device("cpu"), compiled=True) as counter:
        x.tolist()
    assert counter.count is None and torch.Tensor.tolist(x) == x.tolist()


def test_a_provider_row_keeps_its_own_columns(tmp_path):
    def provider(inputs, case):
        inputs["row"] = {"real_tokens": 3}
        return inputs["x"] * 2

    rows = _bench({"eager": provider}, cpu_providers=("eager",)).main(["--out", str(tmp_path), "--modes", "forward"])
    assert all(r["real_tokens"] == 3 for r in rows)


def test_a_gpu_priority_reorders_the_runs_not_the_tables(tmp_path, monkeypatch):
    """On a GPU's default run `gpu_priority` picks what runs first (so a time limit cuts the rows
    that matter least); the tables keep case, mode, provider order and each row's speedup is over
    its own case's baseline, however late that ran."""
    ran = []

    def provider(name, scale):
        def run(inputs, case):
            ran.append((case["n"], name))
            return (inputs["x"] * scale).sin()
        return run

    bench = _bench({"eager": provider("eager", 2), "fast": provider("fast", 3), "other": provider("other", 4)},
                   cpu_providers=("eager", "fast", "other"))
    # "fast" on the second case first, then every eager row, then the rest.
    bench.gpu_priority = lambda case, name: 0 if (name, case["n"]) == ("fast", 256) else 1 if name == "eager" else 2
    args = bench.parser().parse_args(["--out", str(tmp_path), "--modes", "forward"])
    plan = bench._plan(args, torch.device("cuda"), ["eager", "fast", "other"], bench.cpu_cases, ["forward"])
    assert [(case["n"], name) for _, case, _, name in plan] == [
        (256, "fast"), (64, "eager"), (256, "eager"), (64, "fast"), (64, "other"), (256, "other")]
    assert bench._plan(args, torch.device("cpu"), ["eager", "fast"], bench.cpu_cases, ["forward"]) == [
        (0, bench.cpu_cases[0], "forward", "eager"), (0, bench.cpu_cases[0], "forward", "fast"),
        (1, bench.cpu_cases[1], "forward", "eager"), (1, bench.cpu_cases[1], "forward", "fast")]
    # The same order run on the CPU: the first row's baseline comes two rows later.
    monkeypatch.setattr(bench, "_plan", lambda *a: plan)
    rows = bench.main(["--out", str(tmp_path), "--modes", "forward"])
    assert [(n, name) for n, name in dict.fromkeys(ran)] == [(case["n"], name) for _, case, _, name in plan]
    assert [(r["n"], r["provider"]) for r in rows] == [
        (64, "eager"), (64, "fast"), (64, "other"), (256, "eager"), (256, "fast"), (256, "other")]
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["provider"] == "eager")
        assert r["x_baseline"] == base["ms"] / r["ms"]
    assert json.loads((tmp_path / "toy.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_e2e_on_a_gpu_measures_issue_23s_rows_first():
    """bench/e2e.py's default GPU run (about 70 BERT-large/base rows, 150 s in the GPU suite): the
    FP8 and bf16 packed steps at seq 128 and 512 and the graphed FP8 step on the pipeline's seq-512
    lengths come first, every row still runs once."""
    import e2e

    args = e2e.bench.parser().parse_args([])
    names, cases, modes = e2e.bench._selected(args, torch.device("cuda"))
    plan = [(c["seq"], c["lengths"], name) for _, c, _, name in
            e2e.bench._plan(args, torch.device("cuda"), names, cases, modes)]
    assert plan[:7] == [(128, "full", "torch"), (128, "full", "fast_packed"), (128, "full", "fast_packed_fp8"),
                        (512, "full", "torch"), (512, "full", "fast_packed"), (512, "full", "fast_packed_fp8"),
                        (512, "pipeline", "fast_graphed_fp8")]
    everything = e2e.bench._plan(args, torch.device("cuda"), names, cases, modes)
    assert sorted((i, n) for i, _, _, n in everything) == sorted((i, n) for i in range(len(cases)) for n in names)
