"""The training recipe, typed: one frozen dataclass per section of a recipe (configs/*.yaml) and
`Recipe` holding them. Every key a recipe may set is a field here, with its type, default and
meaning; code reads `recipe.precision.min_loss_scale`.

`Recipe.from_dict` maps a nested mapping (a recipe's YAML, a checkpoint's saved run config) onto
these types: each value is checked against its field's type (bool, int, float, str, a fixed-length
list, a Literal's choices), and an unknown key is a ConfigError naming the dotted key and the
closest valid ones. `to_dict` is its inverse, in plain YAML/JSON types. Frozen: a layer reads the
recipe and never changes it (`dataclasses.replace` makes a changed copy). bert_fast/train/config.py
reads YAML files and command-line overrides onto it and validates across fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from bert_fast.model.config import BertConfig


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"  # a BertConfig preset (bert_fast/model/config.py PRESETS)
    # BertConfig fields over the preset's values; a recipe writes them beside `preset`.
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"preset": self.preset, **self.overrides}


@dataclass(frozen=True)
class DataSection:
    # "corpus" (the embedded docstring corpus, bert_fast/data/corpus.py), a folder made by
    # `bert-fast data prepare`, or "synthetic" (bert_fast/data/synthetic.py).
    source: str = "corpus"
    # The rest to whole_word_mask are SampleSettings (bert_fast/data/settings.py).
    seq_length: int = 128
    objective: Literal["nsp", "sop", "none"] = "nsp"  # settings.py OBJECTIVES
    mask_prob: float = 0.15
    max_predictions: int = 0  # 0: ceil(mask_prob x seq_length)
    short_seq_prob: float = 0.1
    whole_word_mask: bool = False
    vocab_size: int = 8192  # of the vocab trained for source "corpus"; a prepared folder has its own
    workers: int = 1  # DataLoader worker processes
    # "heldout" (the last shard of the training corpus, never trained on), "none", or a prepared folder.
    eval_source: str = "heldout"
    buckets: int = 8  # padded batch shapes per run at most (bert_fast/data/packing.py)


@dataclass(frozen=True)
class TrainSection:
    steps: int = 300  # optimizer steps
    micro_batch: int = 32  # sequences per rank per forward
    global_batch: int = 0  # 0: micro_batch x world size (no accumulation)
    seed: int = 0
    max_grad_norm: float = 1.0  # the fused optimizer clips the global norm
    activation_checkpointing: bool = False
    threads: int = 0  # torch's CPU threads; 0: torch's default
    output_dir: str = "runs/default"
    # Steps between the loop's reads of the device (non-finite loss, stop signals); log, eval and
    # checkpoint steps check too.
    check_every: int = 10
    compile: bool = False  # torch.compile(fullgraph=True), one graph per batch shape
    cuda_graphs: bool = False  # the compiled step replayed from CUDA graphs (GPU only)


@dataclass(frozen=True)
class OptimizerSection:
    name: Literal["lamb", "adamw"] = "adamw"
    lr: float = 1e-3  # the peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01


@dataclass(frozen=True)
class ScheduleSection:
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of train.steps; > 0 wins over warmup_steps
    decay: Literal["poly", "linear", "constant"] = "poly"
    power: float = 1.0  # of poly decay; NVIDIA's BERT uses 0.5
    min_lr_ratio: float = 0.0  # the floor, x the peak


@dataclass(frozen=True)
class PrecisionSection:
    bf16: bool = False
    fp16: bool = False  # with dynamic loss scaling (DeepSpeed's)
    initial_scale_power: int = 16  # fp16's first scale is 2**this
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0  # the loop stops a run that overflows at this scale
    # The encoder's four GEMMs per layer in FP8 (bert_fast/ops/fp8.py; CUDA compute capability >= 8.9),
    # e4m3 activations and weights.
    fp8: bool = False
    # Per-tensor scales from the tensor's amax now ("current") or from the largest of the last
    # fp8_amax_history training forwards' (micro-batches') amaxes ("delayed", saved in checkpoints).
    # The choices are bert_fast.ops.fp8.SCALINGS and GRAD_FORMATS (here without importing torch).
    fp8_scaling: Literal["current", "delayed"] = "current"
    fp8_grad_format: Literal["e5m2", "e4m3"] = "e5m2"  # of the gradients
    fp8_amax_history: int = 16
    # The forward GEMMs accumulate in the tensor cores' fast mode (`_scaled_mm(use_fast_accum=True)`,
    # Transformer Engine's and torchao's forward default): faster, less exact sums; gradients never.
    fp8_fast_accum: bool = False


@dataclass(frozen=True)
class ZeroSection:
    stage: int = 0  # DeepSpeed ZeRO stage, 0-3


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 0  # 0: only at the end and on a signal
    keep: int = 3  # how many to leave, newest first; 0 keeps all
    dir: str = ""  # "": <train.output_dir>/checkpoints
    init_from: str = ""  # a phase-1 checkpoint whose weights start this run (fresh optimizer, schedule)


@dataclass(frozen=True)
class EvalSection:
    every: int = 0  # steps between evaluations; 0: none
    batches: int = 20  # held-out batches per evaluation (the same ones every time)


@dataclass(frozen=True)
class LogSection:
    every: int = 20
    tensorboard: bool = True
    peak_tflops: float = 0.0  # for MFU; 0.0: the device's peak from the loop's table


@dataclass(frozen=True)
class ExportSection:
    hf_dir: str = ""  # a Hugging Face folder written from the last checkpoint; "": no export


@dataclass(frozen=True)
class Recipe:
    """A whole run's settings; sections in the order a recipe and --print-config list them."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    export: ExportSection = field(default_factory=ExportSection)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """The defaults with the sections and keys of `data` over them, each of its field's type."""
        return cls._build(merge({}, data))

    @classmethod
    def _build(cls, values: dict) -> Recipe:
        model = dict(values.get("model", {}))
        preset = {"preset": model.pop("preset")} if "preset" in model else {}
        sections = {name: SECTIONS[name](**keys) for name, keys in values.items() if name != "model"}
        return cls(model=ModelSection(**preset, overrides=model), **sections)

    def to_dict(self) -> dict:
        """{section: {key: value}} in YAML/JSON types (lists, not tuples), as a recipe is written."""
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            keys = section.to_dict() if name == "model" else dataclasses.asdict(section)
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in keys.items()}
        return out


# section name -> its dataclass, in the recipe's order
SECTIONS: dict[str, type] = dict(typing.get_type_hints(Recipe))
# Keys that moved sections; named in the error so old recipes and command lines are easy to fix.
MOVED = {"train.lr": "optimizer.lr", "train.warmup_steps": "schedule.warmup_steps",
         "train.weight_decay": "optimizer.weight_decay", "train.log_every": "log.every"}


class ConfigError(ValueError):
    """A bad config key or value; `key` is the dotted key it is about (None for several)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@functools.cache
def key_types(section: str) -> dict[str, Any]:
    """Each key of `section` and its type (model: `preset`, then every BertConfig field)."""
    if section == "model":
        hints = typing.get_type_hints(BertConfig)
        return {"preset": str, **{f.name: hints[f.name] for f in dataclasses.fields(BertConfig)}}
    hints = typing.get_type_hints(SECTIONS[section])
    return {f.name: hints[f.name] for f in dataclasses.fields(SECTIONS[section])}


def known_keys() -> list[str]:
    """Every dotted key a recipe may set (model's last)."""
    return [f"{s}.{k}" for s in (*(s for s in SECTIONS if s != "model"), "model") for k in key_types(s)]


def _suggestions(name: str) -> list[str]:
    """The valid keys a mistyped `name` most likely meant: close spellings in its section, else
    the same or a close key in another section (a section name for a bad section)."""
    section, _, leaf = name.rpartition(".")
    if not section:
        return difflib.get_close_matches(leaf, list(SECTIONS), n=3, cutoff=0.6)
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
        keys = list(key_types(section)) if section in SECTIONS else []
        hint = f" ({section} takes {', '.join(keys)})" if keys else f" (sections: {', '.join(SECTIONS)})"
    return ConfigError(f"unknown config key {name}{hint}", name)


def coerce(value, kind, name: str):
    """`value` as the field type `kind`, or a ConfigError naming the dotted key `name`. YAML reads
    `1e-3` (no dot) as a string, so a float may come as one."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"config key {name} must be one of {choices}, got {value!r}", name)
        return value
    if typing.get_origin(kind) is tuple:  # a fixed-length list of one type (optimizer.betas)
        items = typing.get_args(kind)
        try:
            if isinstance(value, (list, tuple)) and len(value) == len(items):
                return tuple(coerce(v, t, name) for v, t in zip(value, items))
        except ConfigError:
            pass
        raise ConfigError(f"config key {name} must be a list of {len(items)} {items[0].__name__}s, "
                          f"got {value!r}", name)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is Any or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"config key {name} must be {article} {kind.__name__}, got {value!r}", name)


def merge(values: dict, update: dict) -> dict:
    """`values` ({section: {key: value}}, the keys set so far) with the mapping `update` over them,
    each value checked against its field's type; a new dict, `values` is left as it was."""
    out = {section: dict(keys) for section, keys in values.items()}
    for section, keys in update.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if not isinstance(keys, dict):
            raise ConfigError(f"config key {section} must be a mapping", section)
        types = key_types(section)
        for key, value in keys.items():
            name = f"{section}.{key}"
            if key not in types:
                raise _unknown(name)
            out.setdefault(section, {})[key] = coerce(value, types[key], name)
    return out
