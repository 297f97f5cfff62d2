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
    ("train.steps=many", "config key train.steps must be an int, got 'many'"),
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


# ---- the typed recipe -------------------------------------------------------------------------

# A value for every key of every section, none of them its default but precision.bf16 (bf16 and
# fp16 exclude each other), that validates together (an independent list: a key added to the
# recipe without a line here fails the coverage check).
EVERY_KEY = {
    "model": {"preset": "mini", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 96, "hidden_act": "gelu_new",
              "hidden_dropout_prob": 0.05, "attention_probs_dropout_prob": 0.02,
              "max_position_embeddings": 256, "type_vocab_size": 3, "layer_norm_eps": 1e-6,
              "initializer_range": 0.01, "pad_token_id": 1, "backend": "torch", "attention_impl": "triton"},
    "data": {"source": "synthetic", "seq_length": 96, "objective": "sop", "mask_prob": 0.2,
             "max_predictions": 12, "short_seq_prob": 0.05, "whole_word_mask": True, "vocab_size": 4096,
             "workers": 3, "eval_source": "none", "buckets": 4},
    "train": {"steps": 77, "micro_batch": 6, "global_batch": 48, "seed": 5, "max_grad_norm": 0.5,
              "activation_checkpointing": True, "threads": 2, "output_dir": "runs/every-key",
              "check_every": 3, "compile": True, "cuda_graphs": True},
    "optimizer": {"name": "lamb", "lr": 0.0025, "betas": [0.8, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    "schedule": {"warmup_steps": 7, "warmup_ratio": 0.25, "decay": "constant", "power": 0.5,
                 "min_lr_ratio": 0.1},
    "precision": {"bf16": False, "fp16": True, "initial_scale_power": 12, "loss_scale_window": 500,
                  "hysteresis": 3, "min_loss_scale": 0.5, "fp8": True, "fp8_scaling": "delayed",
                  "fp8_grad_format": "e4m3", "fp8_amax_history": 8, "fp8_fast_accum": True},
    "zero": {"stage": 2},
    "checkpoint": {"every": 25, "keep": 1, "dir": "elsewhere/ckpts", "init_from": "runs/phase1/checkpoints"},
    "eval": {"every": 11, "batches": 4},
    "log": {"every": 9, "tensorboard": False, "peak_tflops": 989.5},
    "export": {"hf_dir": "runs/every-key/hf"},
}


def test_every_key_round_trips_yaml_recipe_yaml(tmp_path):
    import yaml

    from bert_fast.train.recipe import Recipe

    written = {f"{s}.{k}" for s, keys in EVERY_KEY.items() for k in keys}
    assert written == set(known_keys())
    (tmp_path / "every.yaml").write_text(yaml.safe_dump(EVERY_KEY, sort_keys=False))
    recipe = load_config(tmp_path / "every.yaml")
    default = Recipe()
    for section, keys in EVERY_KEY.items():
        for key, value in keys.items():
            if section == "model" and key != "preset":
                got, was = recipe.model.overrides[key], None
            else:
                got, was = getattr(getattr(recipe, section), key), getattr(getattr(default, section), key)
            want = tuple(value) if isinstance(value, list) else value
            assert got == want and type(got) is type(want), (section, key, got)
            assert got != was or f"{section}.{key}" == "precision.bf16", (section, key)
    printed = dump_config(recipe)
    assert yaml.safe_load(printed) == EVERY_KEY  # every key, its value and its section's order
    assert list(yaml.safe_load(printed)) == list(EVERY_KEY)
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == recipe
    bf16 = load_config(tmp_path / "printed.yaml", ["precision.fp16=false", "precision.bf16=true"])
    assert bf16.precision.bf16 and yaml.safe_load(dump_config(bf16))["precision"]["bf16"] is True


def test_the_recipe_is_frozen_and_int_to_float_is_coerced(tmp_path):
    import dataclasses

    recipe = load_config(None, ["optimizer.lr=1", "log.peak_tflops=400", "optimizer.betas=[0, 0.5]"])
    assert (recipe.optimizer.lr, recipe.log.peak_tflops, recipe.optimizer.betas) == (1.0, 400.0, (0.0, 0.5))
    assert all(type(v) is float for v in (recipe.optimizer.lr, recipe.log.peak_tflops, *recipe.optimizer.betas))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.steps = 3


@pytest.mark.parametrize("text, line, match", [
    ("train:\n  steps: 7\n  micro_batch: many\n", 3, "config key train.micro_batch must be an int, got 'many'"),
    ("train:\n  compile: 1\n", 2, "config key train.compile must be a bool, got 1"),
    ("data:\n  source: 3\n", 2, "config key data.source must be a str, got 3"),
    ("schedule:\n  power: 0.5\n  decay: cosine\n", 3,
     r"config key schedule.decay must be one of \('poly', 'linear', 'constant'\), got 'cosine'"),
    ("precision:\n\n  fp8_grad_format: e3m4\n", 3, "config key precision.fp8_grad_format must be one of"),
    ("optimizer:\n  betas: [0.9, yes]\n", 2, "config key optimizer.betas must be a list of 2 floats"),
    ("model:\n  preset: tiny\n  hidden_size: big\n", 3, "config key model.hidden_size must be an int"),
    ("eval: 5\n", 1, "config key eval must be a mapping"),
    ("data:\n  objective: mlm\n", 2, r"config key data.objective must be one of \('nsp', 'sop', 'none'\)"),
])
def test_a_wrong_type_in_a_recipe_names_key_file_and_line(tmp_path, text, line, match):
    from bert_fast.train.recipe import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{recipe}:{line}: {match}") as err:
        load_config(recipe)
    assert err.value.key == match.split()[2].rstrip(",")


@pytest.mark.parametrize("text, line, match", [
    ("optimizer:\n  lr: 0.1\n  weight_decy: 0.1\n", 3,
     r"unknown config key optimizer.weight_decy \(did you mean optimizer.weight_decay\?\)"),
    ("log:\n  tensorbord: false\n", 2, r"unknown config key log.tensorbord \(did you mean log.tensorboard\?\)"),
    ("train:\n  warmup_ratio: 0.1\n", 2, r"unknown config key train.warmup_ratio \(did you mean "
                                         r"schedule.warmup_ratio"),
    ("precison:\n  bf16: true\n", 1, r"unknown config key precison \(did you mean precision\?\)"),
    ("train:\n  log_every: 5\n", 2, r"unknown config key train.log_every \(moved to log.every\)"),
])
def test_an_unknown_key_in_a_recipe_suggests_the_closest(tmp_path, text, line, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=rf"^{recipe}:{line}: {match}"):
        load_config(recipe)


def test_an_override_of_a_wrong_type_names_the_override_not_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer:\n  lr: 0.1\ntrain:\n  steps: 7\n")
    for override, match in (
            ("optimizer.lr=fast", r"^config key optimizer.lr must be a float, got 'fast' "
                                  r"\(override optimizer.lr=fast\)$"),
            ("train.steps=[1, 2]", r"^config key train.steps must be an int, got \[1, 2\] \(override train.steps=\[1, 2\]\)$"),
            ("optimizer.name=sgd", r"^config key optimizer.name must be one of .* \(override optimizer.name=sgd\)$"),
            ("train.steps=0", r"^config key train.steps must be >= 1, got 0 \(override train.steps=0\)$"),
            ("train={steps: 0}", r"^config key train.steps must be >= 1, got 0 \(override train=\{steps: 0\}\)$"),
            ("optimizer.lr_max=1", r"^unknown config key optimizer.lr_max .* \(override optimizer.lr_max=1\)$"),
            ("trian.steps=5", r"^unknown config key trian \(did you mean train\?\) \(override trian.steps=5\)$")):
        with pytest.raises(ValueError, match=match):
            load_config(recipe, [override])
    # the recipe's own value, where no override replaced it, still names its line
    recipe.write_text("optimizer:\n  lr: 0.1\ntrain:\n  steps: 0\n")
    with pytest.raises(ValueError, match=rf"^{recipe}:4: config key train.steps must be >= 1"):
        load_config(recipe, ["optimizer.lr=0.2"])


def test_a_recipe_built_in_code_is_checked_like_a_loaded_one():
    import dataclasses

    from bert_fast.train.config import validate_config
    from bert_fast.train.recipe import ConfigError, OptimizerSection, Recipe

    validate_config(Recipe())
    with pytest.raises(ConfigError, match=r"optimizer.name must be one of \('lamb', 'adamw'\), got 'sgd'"):
        validate_config(Recipe(optimizer=OptimizerSection(name="sgd")))
    with pytest.raises(ConfigError, match="config key train.steps must be an int, got 2.5"):
        validate_config(Recipe(train=dataclasses.replace(Recipe().train, steps=2.5)))


def test_choices_are_those_of_the_modules_that_use_them():
    import typing

    from bert_fast.data.settings import OBJECTIVES
    from bert_fast.ops import fp8
    from bert_fast.train.recipe import DataSection, PrecisionSection

    hints = typing.get_type_hints(PrecisionSection)
    assert typing.get_args(hints["fp8_scaling"]) == tuple(fp8.SCALINGS)
    assert typing.get_args(hints["fp8_grad_format"]) == tuple(fp8.GRAD_FORMATS)
    assert typing.get_args(typing.get_type_hints(DataSection)["objective"]) == OBJECTIVES


# The run config a checkpoint saved before the recipe was typed (the dict DEFAULTS of
# bert_fast/train/config.py, with the tiny-cpu recipe's values), as its manifest's JSON holds it.
SAVED_BEFORE = {
    "model": {"preset": "tiny", "backend": "auto"},
    "data": {"source": "corpus", "seq_length": 64, "objective": "nsp", "mask_prob": 0.15, "max_predictions": 0,
             "short_seq_prob": 0.1, "whole_word_mask": False, "vocab_size": 8192, "workers": 1,
             "eval_source": "heldout", "buckets": 8},
    "train": {"steps": 800, "micro_batch": 32, "global_batch": 0, "seed": 0, "max_grad_norm": 1.0,
              "activation_checkpointing": False, "threads": 0, "output_dir": "runs/tiny-cpu",
              "check_every": 10, "compile": False, "cuda_graphs": False},
    "optimizer": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-06, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 100, "warmup_ratio": 0.0, "decay": "linear", "power": 1.0, "min_lr_ratio": 0.0},
    "precision": {"bf16": False, "fp16": False, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1.0, "fp8": False, "fp8_scaling": "current",
                  "fp8_grad_format": "e5m2", "fp8_amax_history": 16, "fp8_fast_accum": False},
    "zero": {"stage": 0},
    "checkpoint": {"every": 400, "keep": 2, "dir": "", "init_from": ""},
    "eval": {"every": 200, "batches": 10},
    "log": {"every": 100, "tensorboard": True, "peak_tflops": 0.0},
    "export": {"hf_dir": ""},
}


def test_a_run_config_saved_in_the_dict_format_still_loads(tmp_path):
    import json

    from bert_fast.model.config import BertConfig
    from bert_fast.train.checkpoint import CheckpointError
    from bert_fast.train.config import saved_recipe
    from bert_fast.train.export import checkpoint_model_config
    from bert_fast.train.preflight import check_start

    saved = json.loads(json.dumps(SAVED_BEFORE))  # as read back from a manifest
    recipe = saved_recipe(saved, tmp_path)
    assert recipe == load_config(ROOT / "configs/tiny-cpu.yaml")
    assert recipe.to_dict() == SAVED_BEFORE  # and today's saves are the same JSON
    assert checkpoint_model_config({"client_state": {"config": saved}}, tmp_path) == BertConfig.from_preset("tiny")
    model = BertConfig.from_preset("tiny")
    meta = {"step": 40, "client_state": {"model_config": model.to_dict(), "global_batch": 32, "config": saved}}
    check_start("resume", tmp_path, meta, model, 800, 32, recipe.precision)
    delayed = load_config(None, ["precision.fp8=true", "precision.fp8_scaling=delayed"]).precision
    with pytest.raises(CheckpointError, match="saved with no FP8 scaling state, this run has precision.fp8"):
        check_start("resume", tmp_path, meta, model, 800, 32, delayed)
    # an older save without the fp8 keys: they take their defaults
    older = {**saved, "precision": {k: v for k, v in saved["precision"].items() if not k.startswith("fp8")}}
    assert saved_recipe(older, tmp_path).precision == recipe.precision
    with pytest.raises(ValueError, match=rf"^{tmp_path}: the run config it saved: config key train.steps must be"):
        saved_recipe({**saved, "train": {"steps": "many"}}, tmp_path)
