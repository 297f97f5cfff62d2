"""Run configuration: a YAML recipe plus dotted `key=value` overrides from the command line.

Sections: `model` (a preset name + BertConfig overrides), `data`, `train`. Unknown keys are
errors naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bert_fast.config import BertConfig

DEFAULTS = {
    "model": {"preset": "tiny"},
    # source: "corpus" (the embedded docstring corpus, bert_fast/data/corpus.py), a folder made by
    # `bert-fast data prepare`, or "synthetic" (bert_fast/data/synthetic.py). The other keys are
    # SampleSettings (bert_fast/data/settings.py); vocab_size is that of the vocab trained for "corpus".
    "data": {"source": "corpus", "seq_length": 128, "objective": "nsp", "mask_prob": 0.15,
             "max_predictions": 0, "short_seq_prob": 0.1, "whole_word_mask": False, "vocab_size": 8192,
             "workers": 1},
    "train": {"steps": 300, "micro_batch": 32, "lr": 1e-3, "warmup_steps": 30,
              "weight_decay": 0.01, "seed": 0, "log_every": 20, "threads": 0},
}


def _merge(base: dict, update: dict, where: str) -> dict:
    out = dict(base)
    for key, value in update.items():
        if where == "model" and key != "preset":
            if key not in BertConfig.__dataclass_fields__:
                raise ValueError(f"unknown config key {where}.{key}")
            out[key] = value
        elif key not in base:
            raise ValueError(f"unknown config key {where + '.' if where else ''}{key}")
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where + '.' if where else ''}{key} must be a mapping")
            out[key] = _merge(base[key], value, key if not where else f"{where}.{key}")
        else:
            out[key] = _coerce(value, base[key], f"{where + '.' if where else ''}{key}")
    return out


def _coerce(value, default, name: str):
    """Match the default's type; YAML reads `1e-3` (no dot) as a string, so accept that too."""
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, type(default)) or default is None
    elif isinstance(default, float):
        try:
            return float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            ok = False
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"config key {name} must be a {type(default).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> dict:
    """`train.lr=3e-4` -> {"train": {"lr": 0.0003}} (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like section.key=value")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    config = DEFAULTS
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(recipe, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
        config = _merge(config, recipe, "")
    for text in overrides:
        config = _merge(config, parse_override(text), "")
    model_config(config)  # validate the model and data sections now, not after data loading
    data_settings(config)
    return config


def data_settings(config: dict):
    """The sample settings of the data section (validated; vocab and special ids come later)."""
    from bert_fast.data.settings import SampleSettings

    d = config["data"]
    if d["workers"] < 0:
        raise ValueError(f"config key data.workers must be >= 0, got {d['workers']}")
    return SampleSettings(max_seq_length=d["seq_length"], objective=d["objective"], mask_prob=d["mask_prob"],
                          max_predictions=d["max_predictions"], short_seq_prob=d["short_seq_prob"],
                          whole_word_mask=d["whole_word_mask"], seed=config["train"]["seed"])


def model_config(config: dict) -> BertConfig:
    values = dict(config["model"])
    return BertConfig.from_preset(values.pop("preset"), **values)
