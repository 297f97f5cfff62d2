"""DeepSpeed's JSON config, derived from the recipe: batch sizes, precision and ZeRO stage come from
the recipe alone. `merge_deepspeed_config` lays a user's `--deepspeed_config` over it and refuses a
value that disagrees with the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from bert_fast.train.config import batch_plan
from bert_fast.train.recipe import Recipe


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """DeepSpeed's JSON for this run. Gradient clipping is 0: FusedLAMB/FusedAdamW clip with the
    global norm themselves (bert_fast/optim/zero.py check_config refuses clipping twice)."""
    micro, accumulation, total = batch_plan(recipe, world_size)
    p = recipe.precision
    zero = {"stage": recipe.zero.stage}
    if zero["stage"] == 3:  # we export full weights ourselves; gathering 16-bit copies costs memory
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "bf16": {"enabled": p.bf16},
        "fp16": {"enabled": p.fp16, "loss_scale": 0, "initial_scale_power": p.initial_scale_power,
                 "loss_scale_window": p.loss_scale_window, "hysteresis": p.hysteresis,
                 "min_loss_scale": p.min_loss_scale},
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
