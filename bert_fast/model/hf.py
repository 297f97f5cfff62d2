"""Hugging Face weights: load a `BertForPreTraining` / `BertModel` checkpoint folder (safetensors
or .bin, sharded or not, offline) and export one `transformers.BertForPreTraining.from_pretrained`
reads. The mapping is one-to-one except Q, K, V, which we keep as one [3H, H] GEMM."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bert_fast.fileio import atomic_path, atomic_write_text
from bert_fast.model.bert import BertForPreTraining
from bert_fast.model.config import BertConfig

log = logging.getLogger(__name__)

# HF config keys that carry no model state we implement, or only their default value.
_HF_DEFAULTS = {"position_embedding_type": "absolute", "is_decoder": False,
                "add_cross_attention": False, "chunk_size_feed_forward": 0}
_HF_ONLY = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
            "gradient_checkpointing", "use_cache", "classifier_dropout", "_name_or_path",
            "bos_token_id", "eos_token_id", "tie_word_embeddings", "output_past"}


# ---- config ------------------------------------------------------------------------------

def config_to_hf(config: BertConfig) -> dict:
    values = config.to_dict()
    values.pop("backend")
    values.pop("attention_impl")
    return {"architectures": ["BertForPreTraining"], "model_type": "bert", **values,
            **{k: v for k, v in _HF_DEFAULTS.items() if k != "chunk_size_feed_forward"}}


def config_from_hf(values: dict, **overrides) -> BertConfig:
    """A BertConfig from a HF config.json dict; refuses settings this model does not implement."""
    values = dict(values)
    if values.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json: model_type is {values['model_type']!r}, expected 'bert'")
    for key, default in _HF_DEFAULTS.items():
        value = values.pop(key, default)
        if value not in (default, None):
            raise ValueError(f"config.json: {key}={value!r} is not supported (only {default!r})")
    known = {k: v for k, v in values.items() if k in BertConfig.__dataclass_fields__}
    ignored = sorted(set(values) - set(known) - _HF_ONLY)
    if ignored:
        log.info("config.json: ignoring keys %s", ignored)
    return BertConfig.from_dict({**known, **overrides})


# ---- state dict mapping ------------------------------------------------------------------

def _one_to_one(config: BertConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every parameter except the fused QKV."""
    pairs = [
        ("bert.embeddings.word.weight", "bert.embeddings.word_embeddings.weight"),
        ("bert.embeddings.position.weight", "bert.embeddings.position_embeddings.weight"),
        ("bert.embeddings.token_type.weight", "bert.embeddings.token_type_embeddings.weight"),
        ("bert.embeddings.norm.weight", "bert.embeddings.LayerNorm.weight"),
        ("bert.embeddings.norm.bias", "bert.embeddings.LayerNorm.bias"),
        ("bert.pooler.weight", "bert.pooler.dense.weight"),
        ("bert.pooler.bias", "bert.pooler.dense.bias"),
        ("mlm_transform.weight", "cls.predictions.transform.dense.weight"),
        ("mlm_transform.bias", "cls.predictions.transform.dense.bias"),
        ("mlm_norm.weight", "cls.predictions.transform.LayerNorm.weight"),
        ("mlm_norm.bias", "cls.predictions.transform.LayerNorm.bias"),
        ("mlm_bias", "cls.predictions.bias"),
        ("nsp.weight", "cls.seq_relationship.weight"),
        ("nsp.bias", "cls.seq_relationship.bias"),
    ]
    sub = {"attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
           "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in sub.items():
            for p in ("weight", "bias"):
                pairs.append((f"bert.layers.{i}.{ours}.{p}", f"bert.encoder.layer.{i}.{theirs}.{p}"))
    return pairs


def _qkv(config: BertConfig) -> list[tuple[str, list[str]]]:
    out = []
    for i in range(config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{i}.attention.self"
        for p in ("weight", "bias"):
            out.append((f"bert.layers.{i}.qkv.{p}", [f"{prefix}.{n}.{p}" for n in ("query", "key", "value")]))
    return out


def to_hf_state_dict(tensors: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names (works for gradients too). The tied decoder weight is left out, as
    HF's own save_pretrained does; the decoder bias is written under both of HF's names."""
    out = {theirs: tensors[ours] for ours, theirs in _one_to_one(config) if ours in tensors}
    for ours, names in _qkv(config):
        if ours in tensors:
            out.update(zip(names, tensors[ours].chunk(3, dim=0)))
    if "mlm_bias" in tensors:
        out["cls.predictions.decoder.bias"] = tensors["mlm_bias"]
    return out


def _normalise_hf_keys(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel checkpoints lack the `bert.` prefix; old TF conversions say gamma/beta."""
    has_prefix = any(k.startswith("bert.") for k in hf)
    out = {}
    for key, value in hf.items():
        if not has_prefix and not key.startswith("cls."):
            key = "bert." + key
        if "LayerNorm" in key:
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[key] = value
    return out


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)      # our params left at initialisation
    unexpected: list[str] = field(default_factory=list)   # checkpoint keys not used


_IGNORED_HF_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids",
                    "cls.predictions.decoder.bias")


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: BertConfig) -> tuple[dict, LoadReport]:
    """HF names -> ours. Heads and pooler may be absent (a BertModel checkpoint); the encoder
    may not. An untied decoder weight cannot be represented and is refused."""
    hf = _normalise_hf_keys(hf)
    used = set(_IGNORED_HF_KEYS)
    ours, report = {}, LoadReport()
    for name, theirs in _one_to_one(config):
        if theirs in hf:
            ours[name] = hf[theirs]
            used.add(theirs)
        else:
            report.missing.append(name)
    for name, parts in _qkv(config):
        if all(p in hf for p in parts):
            ours[name] = torch.cat([hf[p] for p in parts], dim=0)
            used.update(parts)
        else:
            report.missing.append(name)
    decoder = hf.get("cls.predictions.decoder.weight")
    if decoder is not None:
        used.add("cls.predictions.decoder.weight")
        word = ours.get("bert.embeddings.word.weight")
        if word is not None and decoder.data_ptr() != word.data_ptr() and not torch.equal(decoder, word):
            raise ValueError("checkpoint has an MLM decoder weight that differs from the word "
                             "embeddings; bert_fast ties them and cannot load it faithfully")
    report.unexpected = sorted(set(hf) - used)
    encoder_missing = [m for m in report.missing if m.startswith("bert.") and ".pooler." not in m]
    if encoder_missing:
        raise ValueError(f"checkpoint lacks encoder weights: {encoder_missing[:6]}"
                         f"{' ...' if len(encoder_missing) > 6 else ''}")
    return ours, report


# ---- folders -----------------------------------------------------------------------------

def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(loader(str(folder / shard)))
            return tensors
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return _load_bin(str(folder / "pytorch_model.bin"))
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or index file")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf(folder: str | Path, **config_overrides) -> tuple[BertForPreTraining, LoadReport]:
    """A BertForPreTraining from a HF folder (config.json + weights). Missing heads keep their
    initialisation and are listed in the report (and a warning)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}:{err.lineno}: invalid JSON ({err.msg})") from None
    config = config_from_hf(hf_config, **config_overrides)
    model = BertForPreTraining(config)
    state, report = from_hf_state_dict(_read_weights(folder), config)
    current = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != current[name].shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(current[name].shape)}")
    model.load_state_dict(state, strict=False)
    if report.missing or report.unexpected:
        warnings.warn(f"load_hf({folder}): initialised {report.missing or 'nothing'}; "
                      f"unused checkpoint keys {report.unexpected or 'none'}", stacklevel=2)
    return model, report


def export_hf(model: BertForPreTraining, folder: str | Path) -> Path:
    """Write config.json + model.safetensors that `BertForPreTraining.from_pretrained` reads.
    Each file is written to a temporary name and renamed, and readable as a plain write makes it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model.state_dict(), model.config)
    # safetensors refuses views and shared storage: give every tensor its own contiguous copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(config_to_hf(model.config), indent=2) + "\n")
    return folder
