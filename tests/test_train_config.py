"""Run configuration: YAML recipes, dotted overrides, errors that name the key or line."""

import pytest

from bert_fast.train.config import load_config, model_config, parse_override


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: mini\n  hidden_dropout_prob: 0.0\ntrain:\n  steps: 7\n")
    config = load_config(recipe, ["train.lr=3e-4", "model.num_hidden_layers=2", "data.seq_length=64"])
    assert config["train"]["steps"] == 7 and config["train"]["lr"] == pytest.approx(3e-4)
    assert config["train"]["micro_batch"] == 32  # defaults survive
    model = model_config(config)
    assert (model.hidden_size, model.num_hidden_layers, model.hidden_dropout_prob) == (256, 2, 0.0)


def test_shipped_recipe_loads():
    config = load_config("configs/tiny-cpu.yaml")
    assert model_config(config).hidden_size == 128


@pytest.mark.parametrize("override, match", [
    ("train.stpes=5", "unknown config key train.stpes"),
    ("model.hiden_size=5", "unknown config key model.hiden_size"),
    ("train.steps=many", "config key train.steps must be a int, got 'many'"),
    ("train.lr=fast", "config key train.lr must be a float"),
    ("train=3", "config key train must be a mapping"),
    ("model.num_attention_heads=5", "must be divisible by num_attention_heads"),
    ("steps", "must look like section.key=value"),
    ("data.objective=mlm", "objective must be one of"),
    ("data.mask_prob=1.5", "mask_prob must be in"),
    ("data.seq_length=4", "max_seq_length must be an int >= 5"),
    ("data.workers=-1", "data.workers must be >= 0"),
])
def test_bad_override(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  preset: tiny\ntrain: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(recipe)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
