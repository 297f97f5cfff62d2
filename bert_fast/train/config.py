"""Run configuration: a YAML recipe plus dotted `key=value` overrides from the command line, and
the DeepSpeed JSON derived from it.

Sections: `model` (a preset name + BertConfig overrides), `data`, `train`, `optimizer`, `schedule`,
`precision`, `zero`, `checkpoint`, `eval`, `log`, `export`. Unknown keys are errors naming the
dotted key, so a typo never silently falls back to a default. The recipe is the single source of
truth for batch sizes, precision and ZeRO stage: `deepspeed_config` derives DeepSpeed's JSON from
it, and `merge_deepspeed_config` refuses a user `--deepspeed_config` that disagrees.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import yaml

from bert_fast.model.config import BertConfig

DEFAULTS = {
    "model": {"preset": "tiny"},
    # source: "corpus" (the embedded docstring corpus, bert_fast/data/corpus.py), a folder made by
    # `bert-fast data prepare`, or "synthetic" (bert_fast/data/synthetic.py). The other keys are
    # SampleSettings (bert_fast/data/settings.py); vocab_size is that of the vocab trained for "corpus".
    # eval_source: "heldout" (the last shard of the training corpus, never trained on), "none", or
    # a prepared folder.
    "data": {"source": "corpus", "seq_length": 128, "objective": "nsp", "mask_prob": 0.15,
             "max_predictions": 0, "short_seq_prob": 0.1, "whole_word_mask": False, "vocab_size": 8192,
             "workers": 1, "eval_source": "heldout", "buckets": 8},
    # global_batch 0: micro_batch x world size (no accumulation). threads 0: torch's default.
    # check_every: steps between the loop's reads of the device (non-finite loss, stop signals);
    # log, eval and checkpoint steps check too. compile: torch.compile(fullgraph=True), one graph
    # per batch shape. cuda_graphs: the compiled step replayed from CUDA graphs (GPU only).
    "train": {"steps": 300, "micro_batch": 32, "global_batch": 0, "seed": 0, "max_grad_norm": 1.0,
              "activation_checkpointing": False, "threads": 0, "output_dir": "runs/default",
              "check_every": 10, "compile": False, "cuda_graphs": False},
    "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01},
    # warmup_ratio > 0 wins over warmup_steps; power 1.0 is linear-like poly, NVIDIA's BERT uses 0.5.
    "schedule": {"warmup_steps": 0, "warmup_ratio": 0.0, "decay": "poly", "power": 1.0,
                 "min_lr_ratio": 0.0},
    # fp16 uses dynamic loss scaling; the loop stops a run that overflows at min_loss_scale.
    # fp8: the encoder's four GEMMs per layer in FP8 (bert_fast/ops/fp8.py; CUDA compute capability >= 8.9),
    # e4m3 activations and weights, gradients in fp8_grad_format ("e5m2" or "e4m3"), per-tensor
    # scales from the tensor's amax now (fp8_scaling "current") or from the largest of the last
    # fp8_amax_history training forwards' (micro-batches') amaxes ("delayed", saved in checkpoints).
    "precision": {"bf16": False, "fp16": False, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1.0, "fp8": False, "fp8_scaling": "current",
                  "fp8_grad_format": "e5m2", "fp8_amax_history": 16},
    "zero": {"stage": 0},
    # every 0: only at the end and on a signal. keep: how many to leave, newest first (0 keeps all).
    # dir "": <train.output_dir>/checkpoints.
    # init_from: a phase-1 checkpoint whose weights start this run (fresh optimizer and schedule).
    "checkpoint": {"every": 0, "keep": 3, "dir": "", "init_from": ""},
    "eval": {"every": 0, "batches": 20},
    # peak_tflops 0.0: the device's peak from the loop's table (for MFU).
    "log": {"every": 20, "tensorboard": True, "peak_tflops": 0.0},
    "export": {"hf_dir": ""},
}
OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("poly", "linear", "constant")
FP8_SCALINGS = ("current", "delayed")  # bert_fast.ops.fp8.SCALINGS and GRAD_FORMATS, without importing torch
FP8_GRAD_FORMATS = ("e5m2", "e4m3")
# Keys that moved sections; named in the error so old recipes and command lines are easy to fix.
MOVED = {"train.lr": "optimizer.lr", "train.warmup_steps": "schedule.warmup_steps",
         "train.weight_decay": "optimizer.weight_decay", "train.log_every": "log.every"}


class ConfigError(ValueError):
    """A bad config key or value; `key` is the dotted key it is about (None for several)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def known_keys() -> list[str]:
    """Every dotted key a recipe may set (model: `preset` and every BertConfig field)."""
    keys = [f"{section}.{key}" for section, keys in DEFAULTS.items() if section != "model" for key in keys]
    return keys + [f"model.{key}" for key in ("preset", *BertConfig.__dataclass_fields__)]


def _suggestions(name: str) -> list[str]:
    """The valid keys a mistyped `name` most likely meant: close spellings in its section, else
    the same or a close key in another section (a section name for a bad section)."""
    section, _, leaf = name.rpartition(".")
    if not section:
        return difflib.get_close_matches(leaf, list(DEFAULTS), n=3, cutoff=0.6)
    keys = known_keys()
    ours = [k.rpartition(".")[2] for k in keys if k.startswith(section + ".")]
    others = {k.rpartition(".")[2]: k for k in keys if not k.startswith(section + ".")}
    near = [f"{section}.{k}" for k in difflib.get_close_matches(leaf, ours, n=3, cutoff=0.6)]
    return near or [others[k] for k in difflib.get_close_matches(leaf, list(others), n=3, cutoff=0.6)]


def _unknown(name: str) -> ConfigError:
    if name in MOVED:
        hint = f" (moved to {MOVED[name]})"
    elif near := _suggestions(name):
        hint = f" (did you mean {' or '.join(near)}?)"
    else:
        section = name.rpartition(".")[0]
        keys = [k.rpartition(".")[2] for k in known_keys() if k.startswith(section + ".")]
        hint = f" ({section} takes {', '.join(keys)})" if section else f" (sections: {', '.join(DEFAULTS)})"
    return ConfigError(f"unknown config key {name}{hint}", name)


def _merge(base: dict, update: dict, where: str) -> dict:
    out = dict(base)
    for key, value in update.items():
        name = f"{where}.{key}" if where else str(key)
        if where == "model" and key != "preset":
            if key not in BertConfig.__dataclass_fields__:
                raise _unknown(name)
            out[key] = value
        elif key not in base:
            raise _unknown(name)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping", name)
            out[key] = _merge(base[key], value, name)
        else:
            out[key] = _coerce(value, base[key], name)
    return out


def _coerce(value, default, name: str):
    """Match the default's type; YAML reads `1e-3` (no dot) as a string, so accept that too."""
    if isinstance(default, list):  # betas: a fixed-length list of floats
        if (not isinstance(value, list) or len(value) != len(default)
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"config key {name} must be a list of {len(default)} floats, got {value!r}",
                              name)
        return [float(v) for v in value]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        ok = False
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {name} must be a {type(default).__name__}, got {value!r}", name)
    return value


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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, then the recipe at `path`, then the dotted `overrides`, validated. An error about
    a key the recipe sets (and no override replaced) starts with the recipe's file and line."""
    config, lines = DEFAULTS, {}
    try:
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"config file {path} does not exist")
            recipe, lines = _read_recipe(path)
            config = _merge(config, recipe, "")
        for text in overrides:
            override = parse_override(text)
            config = _merge(config, override, "")
            key = text.partition("=")[0]
            lines = {k: v for k, v in lines.items() if k != key and not k.startswith(key + ".")}
        validate_config(config)  # now, not after minutes of data loading or on rank 37
    except ConfigError as err:
        if err.key in lines and not str(err).startswith(f"{path}:"):
            raise ConfigError(f"{path}:{lines[err.key]}: {err}", err.key) from None
        raise
    return config


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`betas: [0.9, 0.999]`), as recipes are written."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_config(config: dict) -> str:
    """The resolved recipe as YAML; load_config reads it back to the same config."""
    return yaml.dump(config, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)


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


def _get(config: dict, dotted: str):
    section, key = dotted.split(".")
    return config[section][key]


def validate_config(config: dict) -> None:
    """Raises ValueError naming the key of the first bad value (load_config calls it)."""
    for name, low, high, closed in _RANGES:
        value = _get(config, name)
        if value < low or (value == low and not closed) or (high is not None and value > high):
            bound = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ConfigError(f"config key {name} must be {bound}, got {value!r}", name)
    if not all(0.0 <= b < 1.0 for b in config["optimizer"]["betas"]):
        raise ConfigError(f"config key optimizer.betas must be in [0, 1), got {config['optimizer']['betas']}",
                          "optimizer.betas")
    if config["optimizer"]["name"] not in OPTIMIZERS:
        raise ConfigError(f"config key optimizer.name must be one of {OPTIMIZERS}, "
                          f"got {config['optimizer']['name']!r}", "optimizer.name")
    if config["schedule"]["decay"] not in DECAYS:
        raise ConfigError(f"config key schedule.decay must be one of {DECAYS}, "
                          f"got {config['schedule']['decay']!r}", "schedule.decay")
    ratio = config["schedule"]["warmup_ratio"]
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"config key schedule.warmup_ratio must be in [0, 1), got {ratio!r}",
                          "schedule.warmup_ratio")
    if config["precision"]["bf16"] and config["precision"]["fp16"]:
        raise ValueError("config keys precision.bf16 and precision.fp16 are both true; choose one")
    for key, choices in (("fp8_scaling", FP8_SCALINGS), ("fp8_grad_format", FP8_GRAD_FORMATS)):
        if config["precision"][key] not in choices:
            raise ConfigError(f"config key precision.{key} must be one of {choices}, "
                              f"got {config['precision'][key]!r}", f"precision.{key}")
    if config["zero"]["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"config key zero.stage must be 0, 1, 2 or 3, got {config['zero']['stage']!r}",
                          "zero.stage")
    model = model_config(config)
    if config["data"]["seq_length"] > model.max_position_embeddings:
        raise ConfigError(f"config key data.seq_length={config['data']['seq_length']} exceeds the model's "
                          f"max_position_embeddings={model.max_position_embeddings}", "data.seq_length")
    data_settings(config)


def data_settings(config: dict):
    """The sample settings of the data section (validated; vocab and special ids come later)."""
    from bert_fast.data.settings import SampleSettings

    d = config["data"]
    return SampleSettings(max_seq_length=d["seq_length"], objective=d["objective"], mask_prob=d["mask_prob"],
                          max_predictions=d["max_predictions"], short_seq_prob=d["short_seq_prob"],
                          whole_word_mask=d["whole_word_mask"], seed=config["train"]["seed"])


def model_config(config: dict) -> BertConfig:
    values = dict(config["model"])
    return BertConfig.from_preset(values.pop("preset"), **values)


def warmup_steps(config: dict) -> int:
    """schedule.warmup_ratio x train.steps when the ratio is set, else schedule.warmup_steps."""
    s = config["schedule"]
    return round(s["warmup_ratio"] * config["train"]["steps"]) if s["warmup_ratio"] > 0 else s["warmup_steps"]


def checkpoint_dir(config: dict) -> Path:
    return Path(config["checkpoint"]["dir"] or Path(config["train"]["output_dir"]) / "checkpoints")


def batch_plan(config: dict, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, accumulation_steps, global_batch); global_batch 0 means micro_batch x world size."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    micro = config["train"]["micro_batch"]
    per_step = micro * world_size
    total = config["train"]["global_batch"] or per_step
    if total % per_step:
        raise ValueError(f"train.global_batch={total} is not divisible by train.micro_batch x world size = "
                         f"{per_step} ({micro} x {world_size})")
    return micro, total // per_step, total


def deepspeed_config(config: dict, world_size: int) -> dict:
    """DeepSpeed's JSON for this run. Gradient clipping is 0: FusedLAMB/FusedAdamW clip with the
    global norm themselves (bert_fast/optim/zero.py check_config refuses clipping twice)."""
    micro, accumulation, total = batch_plan(config, world_size)
    p = config["precision"]
    zero = {"stage": config["zero"]["stage"]}
    if zero["stage"] == 3:  # we export full weights ourselves; gathering 16-bit copies costs memory
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "bf16": {"enabled": p["bf16"]},
        "fp16": {"enabled": p["fp16"], "loss_scale": 0, "initial_scale_power": p["initial_scale_power"],
                 "loss_scale_window": p["loss_scale_window"], "hysteresis": p["hysteresis"],
                 "min_loss_scale": p["min_loss_scale"]},
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }


# DeepSpeed keys the recipe owns, and the recipe key each comes from (for the error message).
_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "accumulation",
    "bf16.enabled": "precision.bf16",
    "fp16.enabled": "precision.fp16",
    "zero_optimization.stage": "zero.stage",
    "gradient_clipping": "gradient_clipping",
}
_WHY = {"gradient_accumulation_steps": " (train.global_batch / (train.micro_batch x world size))",
        "gradient_clipping": " (the fused optimizer clips with train.max_grad_norm)"}


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def merge_deepspeed_config(generated: dict, user: dict) -> dict:
    """A user's `--deepspeed_config` over `deepspeed_config(...)`: user keys win unless they contradict
    a setting the recipe owns (batch sizes, precision, ZeRO stage, clipping), which raises."""
    if not isinstance(user, dict):
        raise ValueError(f"--deepspeed_config must be a JSON object, got {type(user).__name__}")
    user = dict(user)
    if "bfloat16" in user:  # DeepSpeed's older spelling of "bf16"
        user["bf16"] = _deep_merge(user.get("bf16", {}), user.pop("bfloat16"))
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ValueError(f"--deepspeed_config sets {key!r}; the optimizer and schedule come from the "
                             "config's optimizer and schedule sections")
    if _lookup(user, "bf16.enabled") is True and _lookup(user, "fp16.enabled") is True:
        raise ValueError("--deepspeed_config enables both fp16 and bf16; choose one")
    for key, ours in _OWNED.items():
        theirs = _lookup(user, key)
        # "auto" (the Hugging Face convention) means "take the recipe's value".
        if theirs is None or theirs == "auto":
            continue
        if isinstance(theirs, bool) or isinstance(_lookup(generated, key), bool):
            same = bool(theirs) == bool(_lookup(generated, key))
        else:
            same = theirs == _lookup(generated, key)
        if not same:
            raise ValueError(f"--deepspeed_config sets {key}={theirs!r} but the config has "
                             f"{ours}={_lookup(generated, key)!r}{_WHY.get(key, '')}")
    merged = _deep_merge(generated, user)
    for key in _OWNED:  # replace any "auto" with the recipe's value
        if _lookup(user, key) == "auto":
            *parents, leaf = key.split(".")
            node = merged
            for part in parents:
                node = node[part]
            node[leaf] = _lookup(generated, key)
    return merged


def load_deepspeed_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config file {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    return config
