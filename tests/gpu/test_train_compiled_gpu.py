"""pretrain.py on a GPU with train.compile and train.cuda_graphs: five bf16 steps on the corpus's
packed batches (two micro batches per step, several bucket shapes) log the eager run's losses.
Dropout is off: a compiled graph draws its random numbers differently from eager."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def losses(tmp_path: Path, *overrides: str) -> list[float]:
    out = tmp_path / "_".join(o.replace("=", "-") for o in overrides or ("eager",))
    result = subprocess.run(
        [sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml", f"train.output_dir={out}",
         "train.steps=5", "log.every=1", "eval.every=0", "checkpoint.every=0", "precision.bf16=true",
         "model.backend=fast", "train.micro_batch=16", "train.global_batch=32",
         "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_and_graphed_runs_log_the_eager_losses(tmp_path):
    eager = losses(tmp_path)
    compiled = losses(tmp_path, "train.compile=true")
    graphed = losses(tmp_path, "train.cuda_graphs=true")
    assert len(eager) == len(compiled) == len(graphed) == 5
    # bf16: Inductor fuses and orders differently from eager; the graphs replay the compiled code.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(compiled), rtol=1e-3, atol=1e-3)
