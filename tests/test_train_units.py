"""Pieces of the training loop checked against independent references: the schedule against its
formula, the FLOP count against torch's FlopCounterMode, activation checkpointing against the
plain backward, the fp16 loss-scale watch, and the model's ZeRO-3 parameter registrations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.train.flops import peak_tflops, step_flops
from bert_fast.train.loop import LossScaleWatch, TrainingStopped
from bert_fast.train.schedule import lr_factor

# FlopCounterMode knows SDPA's CUDA kernels, not the CPU one the torch backend runs here; give it
# torch's own SDPA formula for that op.
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def test_schedule_warmup_then_poly_decay():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    for step in (10, 37, 99):
        progress = (step - warmup) / (total - warmup)
        assert lr_factor(step, total, warmup, "poly", 0.5) == pytest.approx(math.sqrt(1 - progress))
        assert lr_factor(step, total, warmup, "linear") == pytest.approx(1 - progress)
        assert lr_factor(step, total, warmup, "poly", 0.5, 0.1) == pytest.approx(0.1 + 0.9 * math.sqrt(1 - progress))
        assert lr_factor(step, total, warmup, "constant") == 1.0
    assert lr_factor(100, total, warmup) == 0.0 and lr_factor(500, total, warmup) == 0.0
    with pytest.raises(ValueError, match="schedule.decay"):
        lr_factor(50, total, warmup, "cosine")


@pytest.mark.parametrize("lengths", [[16, 16], [16, 9, 3]])
def test_step_flops_match_torch_flop_counter(lengths):
    """Our formula == what torch counts for the torch backend's forward, times 3 for the step
    (padding-free batches: the torch backend computes on padding, which the formula must not count)."""
    config = BertConfig.from_preset("mini", vocab_size=1000, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, backend="torch")
    model = BertForPreTraining(config).eval()
    g = torch.Generator().manual_seed(0)
    flops = 0.0
    predictions = 0
    for n in lengths:  # one sequence at a time: no padding anywhere
        ids = torch.randint(5, 1000, (1, n), generator=g)
        labels = torch.full((1, n), -100)
        labels[0, 1:n:4] = ids[0, 1:n:4]
        predictions += int((labels != -100).sum())
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.no_grad():
            model(input_ids=ids, mlm_labels=labels, next_sentence_label=torch.zeros(1, dtype=torch.long))
        flops += counter.get_total_flops()
    ours = step_flops(config, lengths, predictions)
    # FlopCounterMode also counts the NSP head's [1, H] x [H, 2] (4H per sequence, in ours too).
    assert ours == pytest.approx(3 * flops, rel=1e-9)
    assert step_flops(config, torch.tensor(lengths), predictions) == ours


def test_peak_table():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=123.0) == 123.0


def test_activation_checkpointing_gives_the_same_gradients():
    config = BertConfig.from_preset("tiny", vocab_size=500, backend="torch")  # dropout on
    model = BertForPreTraining(config).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (3, 20), generator=g)
    labels = torch.where(torch.rand(3, 20, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels[2, 12:] = -100
    nsp = torch.tensor([0, 1, 0])

    def grads(checkpointing: bool):
        model.bert.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same dropout draws
        model(input_ids=ids, attention_mask=mask, mlm_labels=labels, next_sentence_label=nsp).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)


def test_loss_scale_watch_stops_at_the_floor():
    watch = LossScaleWatch(floor=1.0, patience=2)
    watch.update(1, overflowed=True, scale=1024.0, last_saved=None)   # above the floor: DeepSpeed lowers it
    watch.update(2, overflowed=True, scale=1.0, last_saved=None)      # at the floor, once
    watch.update(3, overflowed=False, scale=1.0, last_saved=None)     # a good step resets
    watch.update(4, overflowed=True, scale=1.0, last_saved=None)
    with pytest.raises(TrainingStopped, match="precision.min_loss_scale=1.0.*step_00000040"):
        watch.update(5, overflowed=True, scale=1.0, last_saved="runs/x/checkpoints/step_00000040")
    LossScaleWatch(1.0, 1).update(1, overflowed=True, scale=None, last_saved=None)  # bf16: no scale


def test_window_rates_are_job_totals_and_mfu_is_per_gpu(monkeypatch):
    """Every rank's FLOPs are summed (the job's rate), but the peak is one device's: MFU divides
    by the world size too. Excluded time (eval, checkpoints) is not part of the rate."""
    import types

    from bert_fast.train import metrics
    from bert_fast.train.metrics import HOST_SUMS, Window

    # A fixed clock: 3 s since the window started (the real one moves on under a loaded machine).
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: 103.0))
    window = Window(torch.device("cpu"))
    window.host_sums[HOST_SUMS.index("flops")] = 8e12  # as after the all-reduce over 4 ranks
    window.start = 100.0
    window.exclude(1.0)
    s = window.summary(world_size=4, peak_tflops=2.0)
    assert s["tflops"] == pytest.approx(4.0, rel=1e-3)          # 8e12 FLOPs in 2 s of training
    assert s["tflops_per_gpu"] == pytest.approx(1.0, rel=1e-3)
    assert s["mfu_pct"] == pytest.approx(50.0, rel=1e-3)        # not 200 %
    assert "mfu_pct" not in window.summary(world_size=4)


def test_metrics_jsonl_has_no_nan_and_resume_drops_later_steps(tmp_path):
    import json

    from bert_fast.train.metrics import Reporter, repair_for_resume

    reporter = Reporter(tmp_path, 0, 10, 0, tensorboard=False)
    for step in (1, 2, 3):
        reporter.record({"step": step, "loss": float("nan") if step == 2 else 1.0, "mlm_acc": 0.1,
                         "seq_per_s": float("inf"), "fingerprints": [float("-inf")]})
    reporter.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[1]["loss"] is None and records[0]["seq_per_s"] is None and records[0]["fingerprints"] == [None]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by a crash
    repair_for_resume(tmp_path, 2, None)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoints_that_do_not_fit_the_run_are_refused_by_name(tmp_path):
    from bert_fast.train.checkpoint_manifest import CheckpointError
    from bert_fast.train.preflight import check_export_dir, check_start

    config = BertConfig.from_preset("tiny", vocab_size=500)
    meta = {"step": 40, "client_state": {"model_config": config.to_dict(), "global_batch": 64}}
    check_start("resume", tmp_path, meta, config, steps=100, global_batch=64)
    check_start("init_from", tmp_path, meta, config, steps=10, global_batch=32)  # phase 2: new batch, steps
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*hidden_size: checkpoint 128, this run 256"):
        check_start("init_from", tmp_path, meta, BertConfig.from_preset("tiny", vocab_size=500, hidden_size=256,
                                                                        intermediate_size=1024), 10, 64)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*global batch 64.*train.global_batch is 128"):
        check_start("resume", tmp_path, meta, config, steps=100, global_batch=128)
    check_start("resume", tmp_path, meta, config, steps=40, global_batch=64)  # the final one: finishes the run
    with pytest.raises(ValueError, match="step 40, past train.steps=39"):
        check_start("resume", tmp_path, meta, config, steps=39, global_batch=64)

    check_export_dir("")
    check_export_dir(str(tmp_path / "new"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    check_export_dir(str(tmp_path / "old"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="export.hf_dir=.*other"):
        check_export_dir(str(tmp_path / "other"))


def test_stop_flags_without_a_process_group_are_local():
    from bert_fast.train.dist import any_rank

    assert any_rank([True, False], torch.device("cpu")) == [True, False]  # no process group: as is
    assert any_rank([False, True], torch.device("cpu")) == [False, True]


def test_dataloader_workers_ignore_stop_signals():
    import signal

    from bert_fast.data.dataset import ignore_stop_signals

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in old)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _agree_worker(rank, result):
    from bert_fast.train.dist import any_rank

    # A NaN on rank 1 only, a signal on rank 0 only: both ranks learn both.
    cpu = torch.device("cpu")
    result["seen"] = [any_rank([rank == 1, False], cpu), any_rank([False, rank == 0], cpu),
                      any_rank([False, False], cpu)]


def test_stop_flags_agree_across_ranks(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")
    from ranks import run_ranks

    for rank, r in enumerate(run_ranks(_agree_worker, 2, tmp_path).finished_results()):
        seen = r["seen"]
        assert seen == [[True, False], [False, True], [False, False]], (rank, seen)


def test_eval_source_folder_uses_the_training_sample_settings():
    from bert_fast.data.corpus import default_prepared
    from bert_fast.train.batches import make_batches
    from bert_fast.train.config import load_config, model_config

    folder = default_prepared(8192)
    config = load_config("configs/tiny-cpu.yaml", [f"data.eval_source={folder}", "data.seq_length=48",
                                                   "data.max_predictions=7", "eval.every=5"])
    batches = make_batches(config, model_config(config))
    train, held_out = batches.train.dataset.settings, batches.eval.dataset.settings
    assert held_out == train and held_out.max_seq_length == 48 and held_out.max_predictions == 7
    assert len(batches.eval.dataset.shards) == batches.eval.dataset.corpus.num_shards  # a whole other corpus


def test_deepspeed_is_told_it_runs_on_the_cpu_without_a_gpu(monkeypatch):
    """DeepSpeed picks its accelerator when first imported; without DS_ACCELERATOR and a GPU it
    searches, finds none and warns on every start. A value the user set is kept."""
    import os

    from bert_fast.train.engine import use_cpu_accelerator_without_gpu

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    use_cpu_accelerator_without_gpu()
    assert "DS_ACCELERATOR" not in os.environ  # a GPU: DeepSpeed finds CUDA itself
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    use_cpu_accelerator_without_gpu()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    use_cpu_accelerator_without_gpu()
    assert os.environ["DS_ACCELERATOR"] == "xpu"


def test_terminal_records_are_rounded_and_the_file_keeps_every_digit(tmp_path):
    import io
    import json

    from bert_fast.train.metrics import Reporter

    shown = io.StringIO()
    reporter = Reporter(tmp_path, 0, 10, 0, tensorboard=False, stream=shown)
    reporter.record({"step": 1, "loss": 7.980727877616882, "mlm_acc": 0.03640062342876913, "seq_per_s": 200.92191})
    reporter.record({"step": 1, "fingerprints": [22985.367820904306], "agree": True}, kind="ranks")
    reporter.close()
    lines = [json.loads(line) for line in shown.getvalue().splitlines() if line.startswith("{")]
    assert lines == [{"kind": "train", "step": 1, "loss": 7.981, "mlm_acc": 0.0364, "seq_per_s": 200.9}]
    saved = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert saved[0]["loss"] == 7.980727877616882 and saved[1]["fingerprints"] == [22985.367820904306]


def test_the_model_takes_its_vocab_from_the_data_and_the_data_changes_no_model_config():
    import dataclasses

    from bert_fast.data.corpus import default_prepared
    from bert_fast.data.shards import PreparedCorpus
    from bert_fast.train.batches import make_batches, model_for_data
    from bert_fast.train.config import load_config, model_config

    corpus = PreparedCorpus(default_prepared(8192))
    recipe = load_config("configs/tiny-cpu.yaml", ["eval.every=0", "data.workers=0"])
    model_cfg = model_config(recipe)
    assert model_cfg.vocab_size != corpus.vocab_size  # the preset's 30522, not the corpus's
    batches = make_batches(recipe, model_cfg)
    assert model_cfg == model_config(recipe)
    fitted = model_for_data(model_cfg, batches)
    assert (fitted.vocab_size, fitted.pad_token_id) == (corpus.vocab_size, corpus.special["pad_id"])
    assert dataclasses.replace(fitted, vocab_size=model_cfg.vocab_size,
                               pad_token_id=model_cfg.pad_token_id) == model_cfg  # nothing else changed
    assert int(next(iter(batches.train))["input_ids"].max()) < fitted.vocab_size
    synthetic = make_batches(load_config(None, ["data.source=synthetic"]), model_cfg)
    assert model_for_data(model_cfg, synthetic) == model_cfg  # synthetic ids: the model's own vocab
