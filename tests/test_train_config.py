"""Run configuration: YAML recipes, dotted overrides, errors that name the key or line, the batch
plan and the DeepSpeed JSON derived from a recipe (no DeepSpeed launch)."""

from pathlib import Path

import pytest

from bert_fast.train.config import (
    batch_plan,
    checkpoint_dir,
    dump_config,
    load_config,
    model_config,
    parse_override,
    warmup_steps,
)
from bert_fast.train.deepspeed_json import deepspeed_config, load_deepspeed_config, merge_deepspeed_config
from bert_fast.train.recipe import known_keys

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: mini\n  hidden_dropout_prob: 0.0\ntrain:\n  steps: 7\n")
    config = load_config(recipe, ["optimizer.lr=3e-4", "model.num_hidden_layers=2", "data.seq_length=64",
                                  "optimizer.betas=[0.9, 0.98]"])
    assert config.train.steps == 7 and config.optimizer.lr == pytest.approx(3e-4)
    assert config.optimizer.betas == (0.9, 0.98)
    assert config.train.micro_batch == 32 and config.zero.stage == 0  # defaults survive
    model = model_config(config)
    assert (model.hidden_size, model.num_hidden_layers, model.hidden_dropout_prob) == (256, 2, 0.0)


def test_make_pretrain_recipe_keeps_its_meaning():
    c = load_config(ROOT / "configs/tiny-cpu.yaml")
    assert model_config(c).hidden_size == 128 and c.data.source == "corpus"
    assert (c.data.seq_length, c.train.steps, c.train.micro_batch) == (64, 800, 32)
    assert c.optimizer.name == "adamw" and c.optimizer.lr == pytest.approx(1e-3)
    assert (warmup_steps(c), c.schedule.decay, c.log.every) == (100, "linear", 100)
    assert not c.precision.bf16 and not c.precision.fp16 and c.zero.stage == 0
    assert (c.eval.every, c.eval.batches) == (200, 10)
    assert (c.checkpoint.every, c.checkpoint.keep) == (400, 2)
    assert checkpoint_dir(c) == Path("runs/tiny-cpu/checkpoints")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("world_size", [1, 8])
def test_shipped_recipes_give_consistent_deepspeed_configs(recipe, world_size):
    config = load_config(recipe)
    try:
        micro, accumulation, total = batch_plan(config, world_size)
    except ValueError:
        pytest.skip(f"global batch not divisible at world size {world_size}")
    ds = deepspeed_config(config, world_size)
    assert ds["train_batch_size"] == total == micro * accumulation * world_size
    assert ds["train_micro_batch_size_per_gpu"] == micro == config.train.micro_batch
    assert ds["gradient_accumulation_steps"] == accumulation >= 1
    assert not (ds["bf16"]["enabled"] and ds["fp16"]["enabled"])
    assert ds["zero_optimization"]["stage"] == config.zero.stage
    assert ds["gradient_clipping"] == 0.0 and ds["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("size", ["base", "large"])
def test_two_phase_recipes_follow_nvidia(size):
    one, two = (load_config(ROOT / f"configs/{size}-phase{p}.yaml") for p in (1, 2))
    for c in (one, two):
        assert c.optimizer.name == "lamb" and c.precision.bf16 and c.zero.stage == 1
        assert c.schedule.decay == "poly" and c.schedule.power == 0.5
        assert model_config(c).hidden_size == (768 if size == "base" else 1024)
    assert (one.data.seq_length, one.train.global_batch, one.train.steps) == (128, 65536, 7038)
    assert (two.data.seq_length, two.train.global_batch, two.train.steps) == (512, 32768, 1563)
    assert (warmup_steps(one), warmup_steps(two)) == (round(0.2843 * 7038), round(0.128 * 1563))
    assert (one.data.max_predictions, two.data.max_predictions) == (20, 80)
    assert Path(two.checkpoint.init_from) == checkpoint_dir(one)


@pytest.mark.parametrize("override, match", [
    ("train.stpes=5", r"unknown config key train.stpes \(did you mean train.steps\?\)"),
    ("train.step=5", r"unknown config key train.step \(did you mean train.steps\?\)"),
    ("trian.steps=5", r"unknown config key trian \(did you mean train\?\)"),
    ("eval.batch=5", r"did you mean eval.batches\?"),
    ("train.warmup=5", r"did you mean schedule.warmup_steps or schedule.warmup_ratio\?"),
    ("train.bf16=true", r"did you mean precision.bf16"),
    ("model.hiden_size=5", r"did you mean model.hidden_size"),
    ("optimizer.momentum=0.9", r"optimizer.momentum \(optimizer takes name, lr, betas, eps, weight_decay\)"),
    ("colour=red", r"unknown config key colour \(sections: model, data, train,"),
    ("model.hiden_size=5", "unknown config key model.hiden_size"),
    ("optimizer.momentum=0.9", "unknown config key optimizer.momentum"),
    ("train.lr=1e-4", r"unknown config key train.lr \(moved to optimizer.lr\)"),
    ("train.log_every=5", r"unknown config key train.log_every \(moved to log.every\)"),
    ("train.steps=many", "config key train.steps must be a int, got 'many'"),
    ("optimizer.lr=fast", "config key optimizer.lr must be a float"),
    ("optimizer.lr=true", "config key optimizer.lr must be a float"),
    ("optimizer.betas=0.9", "config key optimizer.betas must be a list of 2 floats"),
    ("optimizer.betas=[0.9, 0.99, 0.999]", "config key optimizer.betas must be a list of 2 floats"),
    ("optimizer.betas=[0.9, 1.5]", r"config key optimizer.betas must be in \[0, 1\)"),
    ("train=3", "config key train must be a mapping"),
    ("model.num_attention_heads=5", "must be divisible by num_attention_heads"),
    ("steps", "must look like section.key=value"),
    ("data.objective=mlm", "objective must be one of"),
    ("data.mask_prob=1.5", "mask_prob must be in"),
    ("data.seq_length=4", "max_seq_length must be an int >= 5"),
    ("data.seq_length=1024", "data.seq_length=1024 exceeds the model's max_position_embeddings=512"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("optimizer.name=sgd", "optimizer.name must be one of"),
    ("optimizer.lr=-1e-3", "optimizer.lr must be >= 0"),
    ("schedule.decay=cosine", "schedule.decay must be one of"),
    ("schedule.warmup_ratio=1.0", r"schedule.warmup_ratio must be in \[0, 1\)"),
    ("schedule.warmup_ratio=-0.1", r"schedule.warmup_ratio must be in \[0, 1\)"),
    ("zero.stage=4", "zero.stage must be 0, 1, 2 or 3"),
    ("zero.stage=-1", "zero.stage must be 0, 1, 2 or 3"),
    ("checkpoint.keep=-1", "checkpoint.keep must be >= 0"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("precision.min_loss_scale=0", "precision.min_loss_scale must be > 0"),
])
def test_bad_override(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_recipe_errors_name_the_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\ntrain:\n  steps: 7\n  step: 5\n")
    with pytest.raises(ValueError, match=r"r.yaml:5: unknown config key train.step \(did you mean train.steps\?\)"):
        load_config(recipe)
    recipe.write_text("optimizer:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"r.yaml:2: config key optimizer.lr must be a float"):
        load_config(recipe)
    recipe.write_text("train:\n  steps: 7\n\n  micro_batch: 0\n")
    with pytest.raises(ValueError, match=r"r.yaml:4: config key train.micro_batch must be >= 1"):
        load_config(recipe)
    with pytest.raises(ValueError, match=r"^config key train.micro_batch must be >= 1, got -1"):  # set here
        load_config(recipe, ["train.micro_batch=-1"])
    recipe.write_text("train:\n  steps: 7\nschedule:\n  power: 1.0\ntrain:\n  seed: 3\n")
    with pytest.raises(ValueError, match=r"r.yaml:5: config key train is set twice \(also on line 1\)"):
        load_config(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_printed_config_reads_back_the_same(recipe, tmp_path):
    config = load_config(recipe, ["train.steps=11", "optimizer.betas=[0.8, 0.9]"])
    printed = dump_config(config)
    assert "betas: [0.8, 0.9]" in printed and "steps: 11" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == config
    sections = {key.partition(".")[0] for key in known_keys()}
    assert sections == set(config.to_dict())


def test_fp16_and_bf16_together_is_an_error():
    with pytest.raises(ValueError, match="precision.bf16 and precision.fp16 are both true"):
        load_config(None, ["precision.bf16=true", "precision.fp16=true"])


@pytest.mark.parametrize("micro, total, world, plan", [
    (32, 0, 1, (32, 1, 32)),        # 0: one micro batch per rank, no accumulation
    (32, 0, 8, (32, 1, 256)),
    (32, 256, 1, (32, 8, 256)),
    (32, 256, 8, (32, 1, 256)),
    (128, 65536, 8, (128, 64, 65536)),
    (32, 96, 3, (32, 1, 96)),
])
def test_batch_plan(micro, total, world, plan):
    config = load_config(None, [f"train.micro_batch={micro}", f"train.global_batch={total}"])
    assert batch_plan(config, world) == plan


@pytest.mark.parametrize("micro, total, world", [(32, 100, 1), (32, 256, 3), (64, 32, 1)])
def test_batch_plan_not_divisible(micro, total, world):
    config = load_config(None, [f"train.micro_batch={micro}", f"train.global_batch={total}"])
    with pytest.raises(ValueError, match=rf"train.global_batch={total} is not divisible by train.micro_batch "
                                         rf"x world size = {micro * world}"):
        batch_plan(config, world)
    with pytest.raises(ValueError, match="world_size"):
        batch_plan(config, 0)


def test_deepspeed_config_precision_and_zero3():
    config = load_config(None, ["precision.fp16=true", "precision.initial_scale_power=12", "zero.stage=3",
                                "train.global_batch=128"])
    ds = deepspeed_config(config, 2)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (128, 2)
    assert ds["zero_allow_untested_optimizer"] and ds["steps_per_print"] == 10**9
    assert deepspeed_config(load_config(None), 1)["zero_optimization"] == {"stage": 0}


def _generated(*overrides, world_size=2):
    return deepspeed_config(load_config(None, ["train.global_batch=128", "zero.stage=2", *overrides]),
                            world_size)


def test_merge_keeps_non_conflicting_user_keys():
    generated = _generated("precision.bf16=true")
    user = {"train_batch_size": 128, "bf16": {"enabled": True}, "bfloat16": {"immediate_grad_update": True},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8},
            "fp16": {"loss_scale_window": 500}, "gradient_accumulation_steps": "auto",
            "steps_per_print": 100, "flops_profiler": {"enabled": False}}
    merged = merge_deepspeed_config(generated, user)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8}
    assert merged["bf16"] == {"enabled": True, "immediate_grad_update": True} and "bfloat16" not in merged
    assert merged["fp16"]["loss_scale_window"] == 500 and merged["fp16"]["initial_scale_power"] == 16
    assert merged["gradient_accumulation_steps"] == 2  # "auto" takes the recipe's value
    assert merged["steps_per_print"] == 100 and merged["flops_profiler"] == {"enabled": False}
    assert merged["train_micro_batch_size_per_gpu"] == 32
    assert generated["zero_optimization"] == {"stage": 2}  # inputs untouched


@pytest.mark.parametrize("user, match", [
    ({"zero_optimization": {"stage": 3}},
     r"--deepspeed_config sets zero_optimization.stage=3 but the config has zero.stage=2"),
    ({"train_batch_size": 256}, "sets train_batch_size=256 but the config has train.global_batch=128"),
    ({"train_micro_batch_size_per_gpu": 16},
     "sets train_micro_batch_size_per_gpu=16 but the config has train.micro_batch=32"),
    ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps=4 but the config has accumulation=2"),
    ({"bf16": {"enabled": True}}, "sets bf16.enabled=True but the config has precision.bf16=False"),
    ({"bfloat16": {"enabled": True}}, "sets bf16.enabled=True but the config has precision.bf16=False"),
    ({"fp16": {"enabled": True}}, "sets fp16.enabled=True but the config has precision.fp16=False"),
    ({"gradient_clipping": 1.0}, "sets gradient_clipping=1.0 but the config has gradient_clipping=0.0"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both fp16 and bf16"),
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
])
def test_merge_conflicts_name_the_key_and_both_values(user, match):
    with pytest.raises(ValueError, match=match):
        merge_deepspeed_config(_generated(), user)


def test_bad_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  preset: tiny\ntrain: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(recipe)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_json_loads_and_bad_json_names_file_and_line(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"stage": 1}}\n')
    assert load_deepspeed_config(good) == {"zero_optimization": {"stage": 1}}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ValueError, match=r"bad.json:3: invalid JSON"):
        load_deepspeed_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: top level must be a JSON object"):
        load_deepspeed_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_deepspeed_config(tmp_path / "missing.json")


def test_parse_override_types():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}

