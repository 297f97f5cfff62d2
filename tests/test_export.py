"""`python -m bert_fast.export`: a ZeRO-3 checkpoint (from the 2-rank launch in test_checkpoint.py)
exported as a Hugging Face folder loads in transformers with no missing or unexpected keys and
gives our model's outputs; bad paths and invalid checkpoints fail with one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_checkpoint import MODEL, _fake, launch

from bert_fast import export
from bert_fast.config import BertConfig
from bert_fast.model import BertForPreTraining
from bert_fast.train import checkpoint as ckpt


@pytest.fixture
def zero_run(tmp_path_factory):
    return launch(tmp_path_factory)


@pytest.mark.slow
def test_zero3_export_loads_in_transformers_and_matches(zero_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out, _ = zero_run
    hf_dir = tmp_path / "hf"
    assert export.main([str(out / "z3"), str(hf_dir)]) == 0  # a root: exports what `latest` names
    assert capsys.readouterr().out.strip() == str(hf_dir)
    hf, info = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = BertForPreTraining(BertConfig.from_preset("tiny", **MODEL))
    ours.load_state_dict(ckpt.model_state_dict(out / "z3" / "step_00000003"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MODEL["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = (torch.arange(10) >= 5).long().expand(3, 10)
    with torch.no_grad():
        a = ours.eval()(ids, types, mask)
        b = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(a.mlm_logits[keep], b.prediction_logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_dtype_and_replacing_an_earlier_export(zero_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = zero_run
    hf_dir = tmp_path / "hf"
    export.export_checkpoint(out / "z3" / "step_00000002", hf_dir)
    export.export_checkpoint(out / "z3", hf_dir, dtype="bfloat16")  # replaces the earlier export
    weights = load_file(hf_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert '"step": 3' in (hf_dir / "bert_fast_export.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folders left behind


def test_cli_missing_path_fails_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bert_fast.export", str(tmp_path / "nope"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nope does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_invalid_checkpoint_fails_cleanly(tmp_path, capsys):
    path = _fake(tmp_path / "ckpts", 4)
    (path / "rng_rank00000.pt").write_bytes(b"")
    assert export.main([str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "step_00000004" in err and "rng_rank00000.pt" in err
    assert not (tmp_path / "hf").exists()
    (path / ckpt.MANIFEST).unlink()
    assert export.main([str(tmp_path / "ckpts"), str(tmp_path / "hf")]) == 2  # root -> latest -> partial
    assert "partial" in capsys.readouterr().err


def test_export_refuses_to_replace_other_folders(tmp_path):
    path = _fake(tmp_path / "ckpts", 4)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="not an earlier export"):
        export.export_checkpoint(path, other)
    assert (other / "keep.txt").read_text() == "mine"
