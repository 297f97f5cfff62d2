"""Run configuration: a YAML recipe plus dotted `key=value` overrides from the command line, read
onto the typed `Recipe` (bert_fast/train/recipe.py, where every section and key is listed with its
type, default and meaning), checked across fields, and printed back as YAML.

Unknown keys and values of the wrong type are errors naming the dotted key and where it was set:
the recipe's file and line, or the command-line override, so a typo never silently falls back to a
default. The recipe is the single source of truth for batch sizes, precision and ZeRO stage
(bert_fast/train/deepspeed_json.py derives DeepSpeed's JSON from it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bert_fast.model.config import BertConfig
from bert_fast.train.recipe import ConfigError, Recipe, merge


def parse_override(text: str) -> dict:
    """`optimizer.lr=3e-4` -> {"optimizer": {"lr": 0.0003}} (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like section.key=value")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _read_recipe(path: Path) -> tuple[dict, dict[str, int]]:
    """(the recipe, the line of every dotted key in it)."""
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        recipe = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    finally:
        loader.dispose()
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections")
    lines: dict[str, int] = {}

    def walk(mapping: yaml.MappingNode, where: str) -> None:
        for key_node, value_node in mapping.value:
            name = f"{where}.{key_node.value}" if where else str(key_node.value)
            line = key_node.start_mark.line + 1
            if name in lines:  # YAML would silently keep the last one
                raise ConfigError(f"{path}:{line}: config key {name} is set twice (also on line "
                                  f"{lines[name]})", name)
            lines[name] = line
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, name)

    if node is not None:
        walk(node, "")
    return recipe, lines


def _placed(err: ConfigError, origins: dict[str, tuple[str, str]]) -> ConfigError:
    """`err` saying where its key, the section above it, or (for a bad section) the last key
    below it was set."""
    key = err.key or ""
    while key and key not in origins:
        key = key.rpartition(".")[0]
    if key:
        before, after = origins[key]
    else:
        below = [where for k, where in origins.items() if err.key and k.startswith(err.key + ".")]
        before, after = below[-1] if below else ("", "")
    return ConfigError(f"{before}{err}{after}", err.key)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """The defaults, then the recipe at `path`, then the dotted `overrides`, validated. An error
    names where its key was set: the recipe's file and line (unless an override replaced it), or
    the override."""
    values: dict = {}
    # dotted key -> what its errors say before and after: "<file>:<line>: " or " (override <text>)"
    origins: dict[str, tuple[str, str]] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        recipe, lines = _read_recipe(path)
        origins = {key: (f"{path}:{line}: ", "") for key, line in lines.items()}
        try:
            values = merge(values, recipe)
        except ConfigError as err:
            raise _placed(err, origins) from None
    for text in overrides:
        override = parse_override(text)
        key = text.partition("=")[0]
        origins = {k: v for k, v in origins.items() if k != key and not k.startswith(key + ".")}
        origins[key] = ("", f" (override {text})")
        try:
            values = merge(values, override)
        except ConfigError as err:
            raise _placed(err, origins) from None
    recipe = Recipe.from_dict(values)
    try:
        validate_config(recipe)  # now, not after minutes of data loading or on rank 37
    except ConfigError as err:
        raise _placed(err, origins) from None
    return recipe


def saved_recipe(saved: dict, where: str | Path) -> Recipe:
    """The recipe a checkpoint saved (`Recipe.to_dict()` in its client_state; keys it lacks take
    today's defaults). `where` (the checkpoint) starts the message of an error."""
    try:
        return Recipe.from_dict(saved)
    except ConfigError as err:
        raise ConfigError(f"{where}: the run config it saved: {err}", err.key) from None


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`betas: [0.9, 0.999]`), as recipes are written."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_config(recipe: Recipe) -> str:
    """The resolved recipe as YAML; load_config reads it back to an equal Recipe."""
    return yaml.dump(recipe.to_dict(), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)


# (dotted key, lowest allowed, highest allowed or None, whether the low end is included)
_RANGES = [
    ("train.steps", 1, None, True), ("train.micro_batch", 1, None, True),
    ("train.global_batch", 0, None, True), ("train.max_grad_norm", 0, None, True),
    ("train.threads", 0, None, True), ("data.workers", 0, None, True),
    ("train.check_every", 1, None, True), ("data.buckets", 1, 64, True),
    ("optimizer.lr", 0, None, True), ("optimizer.eps", 0, None, False),
    ("optimizer.weight_decay", 0, None, True),
    ("schedule.warmup_steps", 0, None, True), ("schedule.power", 0, None, False),
    ("schedule.min_lr_ratio", 0, 1, True),
    ("precision.initial_scale_power", 0, None, True), ("precision.loss_scale_window", 1, None, True),
    ("precision.hysteresis", 1, None, True), ("precision.min_loss_scale", 0, None, False),
    ("precision.fp8_amax_history", 1, None, True),
    ("checkpoint.every", 0, None, True), ("checkpoint.keep", 0, None, True),
    ("eval.every", 0, None, True), ("eval.batches", 1, None, True),
    ("log.every", 1, None, True), ("log.peak_tflops", 0, None, True),
]


def validate_config(recipe: Recipe) -> None:
    """Raises ValueError naming the key of the first bad value (load_config calls it)."""
    Recipe.from_dict(recipe.to_dict())  # every value of its field's type, for a Recipe built in code
    for name, low, high, closed in _RANGES:
        section, key = name.split(".")
        value = getattr(getattr(recipe, section), key)
        if value < low or (value == low and not closed) or (high is not None and value > high):
            bound = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ConfigError(f"config key {name} must be {bound}, got {value!r}", name)
    betas = recipe.optimizer.betas
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config key optimizer.betas must be in [0, 1), got {list(betas)}",
                          "optimizer.betas")
    ratio = recipe.schedule.warmup_ratio
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"config key schedule.warmup_ratio must be in [0, 1), got {ratio!r}",
                          "schedule.warmup_ratio")
    if recipe.precision.bf16 and recipe.precision.fp16:
        raise ValueError("config keys precision.bf16 and precision.fp16 are both true; choose one")
    if recipe.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key zero.stage must be 0, 1, 2 or 3, got {recipe.zero.stage!r}",
                          "zero.stage")
    model = model_config(recipe)
    if recipe.data.seq_length > model.max_position_embeddings:
        raise ConfigError(f"config key data.seq_length={recipe.data.seq_length} exceeds the model's "
                          f"max_position_embeddings={model.max_position_embeddings}", "data.seq_length")
    data_settings(recipe)


def data_settings(recipe: Recipe):
    """The sample settings of the data section (validated; vocab and special ids come later)."""
    from bert_fast.data.settings import SampleSettings

    d = recipe.data
    return SampleSettings(max_seq_length=d.seq_length, objective=d.objective, mask_prob=d.mask_prob,
                          max_predictions=d.max_predictions, short_seq_prob=d.short_seq_prob,
                          whole_word_mask=d.whole_word_mask, seed=recipe.train.seed)


def model_config(recipe: Recipe) -> BertConfig:
    """The model section's BertConfig: its preset with the overrides (before the data's vocab:
    bert_fast/train/batches.py model_for_data)."""
    return BertConfig.from_preset(recipe.model.preset, **recipe.model.overrides)


def warmup_steps(recipe: Recipe) -> int:
    """schedule.warmup_ratio x train.steps when the ratio is set, else schedule.warmup_steps."""
    s = recipe.schedule
    return round(s.warmup_ratio * recipe.train.steps) if s.warmup_ratio > 0 else s.warmup_steps


def checkpoint_dir(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.dir or Path(recipe.train.output_dir) / "checkpoints")


def batch_plan(recipe: Recipe, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, accumulation_steps, global_batch); global_batch 0 means micro_batch x world size."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    micro = recipe.train.micro_batch
    per_step = micro * world_size
    total = recipe.train.global_batch or per_step
    if total % per_step:
        raise ValueError(f"train.global_batch={total} is not divisible by train.micro_batch x world size = "
                         f"{per_step} ({micro} x {world_size})")
    return micro, total // per_step, total

