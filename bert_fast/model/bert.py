"""The thin BERT encoder: embeddings, post-LN layers, pooler, MLM and NSP heads.

Every computation goes through `bert_fast.ops`, which picks eager PyTorch or our kernels; this
file only holds parameters and wiring. GEMMs whose bias a fused op can absorb run without it
(`ops.linear(x, W)`, then `ops.bias_gelu` / `ops.add_layer_norm` with the bias; the FFN's first GEMM
and its GELU are one op, `ops.linear_gelu`); the encoder's four GEMMs per layer run in FP8 once
`bert_fast.ops.fp8.enable` gave the layers their scaling state (`precision.fp8`), and the FFN's
activation then reaches its second GEMM already cast. Parameter names
map one-to-one to Hugging Face `BertForPreTraining` (bert_fast/model/hf.py); Q, K and V are one [3H, H]
GEMM. On the fast backend the encoder unpads the batch once after the embeddings and runs every
layer on the packed real tokens (bert_fast/ops/padding.py), so padding costs no FLOPs.

A module's parameters are read only inside its own forward: a fused op that needs several modules'
parameters runs nested inside their forwards (`Linear`'s epilogue, `LayerNorm` and `Table` calls).
DeepSpeed ZeRO-3 gathers a module's parameters around its own forward (and backward) only, so this
is what lets it train the model without being told of parameters read elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bert_fast import ops
from bert_fast.labels import IGNORE_INDEX
from bert_fast.model.config import BertConfig
from bert_fast.model.inputs import check_batch, check_packed_batch
from bert_fast.ops import padding
from bert_fast.ops.padding import Packing


class LayerNorm(nn.Module):
    """A LayerNorm's weight and bias, which a fused op in bert_fast.ops applies: calling the module
    returns `use(weight, bias)`, run inside its forward (where ZeRO-3 has gathered them)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, use: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
        return use(self.weight, self.bias)


class Table(nn.Embedding):
    """An embedding table that fused ops read whole (the embeddings' gather + LayerNorm, the tied MLM
    decoder): calling the module returns `use(weight)`, run inside its forward (where ZeRO-3 has
    gathered it). An nn.Embedding so that it is built and initialised as before."""

    def forward(self, use: Callable[[torch.Tensor], Any]) -> Any:
        return use(self.weight)


class Linear(nn.Linear):
    """nn.Linear whose GEMM is `ops.linear` (FP8 with a scaling state) and which can leave its bias to
    a fused epilogue: with `epilogue`, returns `epilogue(x @ W^T, bias)`, run inside this forward
    (where ZeRO-3 has gathered the bias; a parent reading `child.bias` would find it partitioned)."""

    def forward(self, x: torch.Tensor, epilogue: Callable[[torch.Tensor, torch.Tensor], Any] | None = None, *,
                fp8=None, record: bool = True, op: Callable[..., Any] | None = None) -> Any:
        if op is not None:  # one fused op over the whole layer, GEMM included: op(x, weight, bias)
            return op(x, self.weight, self.bias)
        if epilogue is None:
            return ops.linear(x, self.weight, self.bias, fp8=fp8, record=record)
        return epilogue(ops.linear(x, self.weight, fp8=fp8, record=record), self.bias)


def _bias_gelu(config: BertConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The epilogue of the MLM transform: `gelu(y + bias)`, one fused op (the FFN's is ops.linear_gelu)."""
    return lambda y, bias: ops.bias_gelu(y, bias, config.gelu_approximate, backend=config.backend)


def _using(holders: tuple[nn.Module, ...], use: Callable[..., Any], taken: tuple = ()) -> Any:
    """`use(*parameters of every holder, in order)`, run inside all their forwards (nested): one
    fused op over several LayerNorm/Table modules' parameters."""
    if not holders:
        return use(*taken)
    return holders[0](lambda *params: _using(holders[1:], use, (*taken, *params)))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word = Table(config.vocab_size, config.hidden_size)
        self.position = Table(config.max_position_embeddings, config.hidden_size)
        self.token_type = Table(config.type_vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size)

    def forward(self, input_ids, token_type_ids, packing: Packing | None = None, seed=None,
                position_ids=None):
        """[B, S, hidden]; with `packing` (the fast path) the real tokens only, [T, hidden]: their
        ids are gathered first, so padding is never embedded. With `position_ids` the ids are
        already packed [T] (a packed batch) and embedded as they are."""
        c = self.config
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            if packing is not None:
                input_ids, token_type_ids, position_ids = (
                    packing.pack(t) for t in (input_ids, token_type_ids, position_ids))
        # Ids were checked on the host by check_batch: no device sync to check them again.
        return _using((self.word, self.position, self.token_type, self.norm), lambda *weights: ops.embeddings(
            input_ids, token_type_ids, position_ids, *weights, c.layer_norm_eps,
            padding_idx=c.pad_token_id, dropout_p=c.hidden_dropout_prob, training=self.training,
            seed=seed, site=dropout_site("embeddings"), check_ids=False, backend=c.backend))


def dropout_site(op: str, layer: int = 0) -> int:
    """Every dropout call of a forward draws from one seed (fast backend) and a site of its own, so
    no two calls share masks: the embeddings, then per layer the attention probabilities and the
    two LayerNorms' inputs."""
    return 0 if op == "embeddings" else 1 + 3 * layer + ("attention", "attention_output", "output").index(op)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, index: int = 0):
        super().__init__()
        self.config = config
        self.index = index  # its dropout sites (dropout_site): layers draw different masks
        h, i = config.hidden_size, config.intermediate_size
        self.qkv = Linear(h, 3 * h)
        self.attn_out = Linear(h, h)
        self.attn_norm = LayerNorm(h)
        self.ffn_in = Linear(h, i)
        self.ffn_out = Linear(i, h)
        self.ffn_norm = LayerNorm(h)
        # None, or one bert_fast.ops.fp8.Fp8State per GEMM (fp8.GEMMS) once `bert_fast.ops.fp8.enable` ran:
        # those four GEMMs then run in FP8 (precision.fp8).
        self.fp8: nn.ModuleDict | None = None

    def forward(self, x, attention_mask, packing: Packing | None = None, seed: torch.Tensor | None = None):
        """x: [B, S, hidden], or packed [T, hidden] when `packing` is given (the fast path, whose
        attention draws its dropout mask from `seed`, the forward's key, and this layer's index)."""
        c = self.config
        record = self.training and torch.is_grad_enabled()

        def gemm(name: str, inputs: torch.Tensor, epilogue=None):
            return getattr(self, name)(inputs, epilogue, fp8=self._fp8(name), record=record)

        # [..., 3, heads, head_dim]: q, k, v are strided views of the one QKV output.
        qkv = gemm("qkv", x).unflatten(-1, (3, c.num_attention_heads, c.head_dim))
        if packing is None:
            q, k, v = qkv.unbind(-3)
            context = ops.attention(q, k, v, attention_mask, dropout_p=c.attention_probs_dropout_prob,
                                    training=self.training, backend=c.backend)
        else:
            context = ops.attention_qkv(qkv, packing.cu_seqlens, packing.max_seqlen,
                                        dropout_p=c.attention_probs_dropout_prob, training=self.training,
                                        seed=seed, site=dropout_site("attention", self.index),
                                        impl=c.attention_impl, backend=c.backend)
        x = gemm("attn_out", context.flatten(-2), self._add_norm(self.attn_norm, x, seed, "attention_output"))
        # Under FP8, `inner` comes cast for ffn_out already (ops.linear_gelu).
        inner = self.ffn_in(x, op=lambda x, weight, bias: ops.linear_gelu(
            x, weight, bias, c.gelu_approximate, fp8=self._fp8("ffn_in"), fp8_next=self._fp8("ffn_out"),
            record=record, backend=c.backend))
        return gemm("ffn_out", inner, self._add_norm(self.ffn_norm, x, seed, "output"))

    def _fp8(self, gemm: str):
        return None if self.fp8 is None else self.fp8[gemm]

    def _add_norm(self, norm: LayerNorm, residual: torch.Tensor, seed, site: str):
        """The epilogue of attn_out and ffn_out: `norm(residual + dropout(y + bias))`, one fused op."""
        c = self.config
        return lambda y, bias: norm(lambda weight, norm_bias: ops.add_layer_norm(
            y, weight, norm_bias, c.layer_norm_eps, x_bias=bias, residual=residual,
            dropout_p=c.hidden_dropout_prob, training=self.training, seed=seed,
            site=dropout_site(site, self.index), backend=c.backend))


class BertModel(nn.Module):
    """Embeddings + encoder + pooler. Returns (sequence output [B, S, H], pooled [B, H])."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = Linear(config.hidden_size, config.hidden_size)
        # Recompute each layer in the backward instead of keeping its activations (seq 512 on
        # small GPUs). Dropout masks replay: checkpoint restores the RNG state, and the attention
        # kernel takes the forward's seed as an input.
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """As BERT: normal(0, initializer_range) weights, zero biases, LayerNorm ones/zeros."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if module is getattr(self, "embeddings", None):
            with torch.no_grad():  # the pad row starts at zero, as in Hugging Face
                module.word.weight[self.config.pad_token_id].zero_()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        check_batch(self.config, self.embeddings.word.weight.device, input_ids, token_type_ids,
                    attention_mask)
        self.fp8_step()
        hidden, pooled, packing = self._encode(input_ids, token_type_ids, attention_mask)
        return (hidden if packing is None else packing.pad(hidden)), pooled

    def fp8_step(self) -> None:
        """Before a training forward: FP8 GEMMs under delayed scaling take the last step's amaxes
        into their histories (bert_fast.ops.fp8.roll). Nothing without FP8 or outside training."""
        if self.training and torch.is_grad_enabled():
            states = [s for layer in self.layers if layer.fp8 is not None for s in layer.fp8.values()]
            if states:
                from bert_fast.ops import fp8

                fp8.roll(states)

    def _encode(self, input_ids, token_type_ids, attention_mask):
        """Forward on a batch `check_batch` has already accepted: (hidden, pooled, packing).

        When attention runs the varlen kernel (the fast backend), the batch is unpadded once,
        before the embeddings, and every layer works on the packed [T, hidden] rows; hidden is
        then packed and `packing` says where its rows belong (padding positions read as zeros).
        Otherwise hidden is [B, S, hidden] and packing is None. One dropout seed is drawn per
        forward on the fast path; each dropout call adds its own site (`dropout_site`)."""
        c = self.config
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        word = self.embeddings.word.weight
        packing = ops.attention_packing(attention_mask, tuple(input_ids.shape), c.head_dim, word.dtype,
                                        word.device, backend=c.backend)
        seed = None
        if packing is not None and self.training and (c.hidden_dropout_prob > 0
                                                      or c.attention_probs_dropout_prob > 0):
            seed = ops.new_dropout_seed(word.device)  # one draw per forward, not per call
        x = self.embeddings(input_ids, token_type_ids, packing, seed)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attention_mask, packing, seed, use_reentrant=False)
            else:
                x = layer(x, attention_mask, packing, seed)
        first = x[:, 0] if packing is None else packing.first_tokens(x)
        return x, self._pool(first), packing

    def _pool(self, first: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(first))

    def _encode_packed(self, input_ids, token_type_ids, cu_seqlens, max_seqlen: int):
        """Forward on a packed batch `check_packed_batch` accepted: (hidden [T, hidden], pooled
        [B, hidden]), with no host sync. The fast path runs every layer on the T rows, the filler
        rows past cu_seqlens[-1] attending only among themselves (`padding.filler_segments`); the
        torch path scatters the sequences into a padded [B, max_seqlen] batch and gathers back."""
        c = self.config
        total = input_ids.shape[0]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        word = self.embeddings.word.weight
        if not ops.varlen_attention_runs(c.head_dim, word.dtype, word.device, backend=c.backend):
            layout = padding.packed_layout(cu_seqlens, total, max_seqlen)
            ids, types, mask = (padding.to_padded(layout, t) for t in (input_ids, token_type_ids,
                                                                      torch.ones_like(input_ids)))
            hidden, pooled, _ = self._encode(ids, types, mask)
            return padding.from_padded(layout, hidden), pooled
        # Every row, filler too, in a sequence of at most max_seqlen rows: positions stay in range.
        packing = padding.packed_layout(padding.filler_segments(cu_seqlens, total, max_seqlen), total,
                                        max_seqlen)
        positions = packing.indices % max_seqlen
        seed = None
        if self.training and (c.hidden_dropout_prob > 0 or c.attention_probs_dropout_prob > 0):
            seed = ops.new_dropout_seed(word.device)
        x = self.embeddings(input_ids, token_type_ids, packing, seed, position_ids=positions)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, None, packing, seed, use_reentrant=False)
            else:
                x = layer(x, None, packing, seed)
        # An empty sequence slot's "first token" may be filler or row T: its NSP label is ignored.
        first = x.index_select(0, cu_seqlens[:-1].long().clamp(max=total - 1))
        return x, self._pool(first)


class PretrainingOutput(dict):
    """Losses and metrics are None when the matching labels were not given.

    mlm_logits: [N, V] on the N predicted positions (row-major order of `mlm_labels != -100`)
    when mlm_labels is given and return_mlm_logits is set; [B, S, V] when mlm_labels is None;
    otherwise None (the loss never needs them on the fast path).

    A dict with attribute access, as transformers' ModelOutput: wrappers that walk a module's
    outputs to hook their tensors (DeepSpeed ZeRO-3 re-gathers parameters for the backward that
    way) see through dicts, not through dataclasses."""

    FIELDS = ("nsp_logits", "mlm_logits", "loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy",
              "mlm_predictions")

    def __init__(self, nsp_logits: torch.Tensor, **values):
        unknown = sorted(set(values) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"PretrainingOutput has no field(s) {unknown}")
        super().__init__({name: None for name in self.FIELDS}, nsp_logits=nsp_logits)
        self.update(values)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        if name not in self.FIELDS:
            raise AttributeError(f"PretrainingOutput has no field {name!r}")
        self[name] = value


class BertForPreTraining(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.bert = BertModel(config)
        self.mlm_transform = Linear(h, h)
        self.mlm_norm = LayerNorm(h)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp = Linear(h, 2)
        for module in (self.mlm_transform, self.mlm_norm, self.nsp):
            self.bert._init_weights(module)

    @property
    def decoder_weight(self) -> torch.Tensor:
        """The MLM decoder is tied to the word embeddings."""
        return self.bert.embeddings.word.weight

    def _decode(self, use: Callable[[torch.Tensor], Any]) -> Any:
        """`use(decoder weight)`, run inside the word table's forward (the decoder is tied to it)."""
        return self.bert.embeddings.word(use)

    def _mlm_logits(self, mlm_hidden: torch.Tensor) -> torch.Tensor:
        return self._decode(lambda weight: F.linear(mlm_hidden, weight, self.mlm_bias))

    def _mlm_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.mlm_transform(hidden, _bias_gelu(c))
        return self.mlm_norm(lambda weight, bias: ops.add_layer_norm(h, weight, bias, c.layer_norm_eps,
                                                                     backend=c.backend))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None,
                next_sentence_label=None, return_mlm_logits: bool = False, *, cu_seqlens=None,
                max_seqlen: int | None = None, mlm_positions=None,
                validate: bool = True) -> PretrainingOutput:
        """A padded batch: input_ids [B, S] and the rest as in DESIGN.md (checked, with one
        device->host copy; the fast path then unpads). Or a packed batch, given `cu_seqlens`
        (what the training loader builds: `inputs.check_packed_batch` says the form): input_ids
        [T], mlm_positions/mlm_labels [N], and no host sync at all with `validate=False`, for
        batches checked on the host where they were built."""
        self.bert.fp8_step()
        if cu_seqlens is not None:
            return self._forward_packed(input_ids, token_type_ids, cu_seqlens, max_seqlen, mlm_positions,
                                        mlm_labels, next_sentence_label, return_mlm_logits, validate)
        if mlm_positions is not None or max_seqlen is not None:
            raise ValueError("mlm_positions and max_seqlen belong to a packed batch: give cu_seqlens too")
        check_batch(self.config, self.decoder_weight.device, input_ids, token_type_ids,
                    attention_mask, mlm_labels, next_sentence_label)
        hidden, pooled, packing = self.bert._encode(input_ids, token_type_ids, attention_mask)
        out = PretrainingOutput(nsp_logits=self.nsp(pooled))

        if mlm_labels is None:
            if packing is not None:
                hidden = packing.pad(hidden)
            out.mlm_logits = self._mlm_logits(self._mlm_hidden(hidden))
        else:
            # The head runs on the predicted positions only (~15% of tokens).
            predicted = mlm_labels != IGNORE_INDEX
            labels = mlm_labels[predicted].long()
            if packing is None:
                chosen = hidden[predicted]
            else:
                chosen = packing.gather(hidden, predicted.flatten().nonzero().squeeze(1))
            self._mlm(out, self._mlm_hidden(chosen), labels, predicted.sum(), return_mlm_logits)

        if next_sentence_label is not None:
            self._nsp(out, next_sentence_label)
        return out

    def _mlm(self, out: PretrainingOutput, mlm_hidden, labels, predictions, return_mlm_logits: bool,
             check_labels: bool = True) -> None:
        """The MLM loss, accuracy and (when asked) logits of the head's output at the predicted
        positions (`predictions` of them; ignored labels drop out of both)."""
        out.mlm_loss, correct = self._decode(lambda weight: ops.mlm_loss(
            mlm_hidden, weight, self.mlm_bias, labels, check_labels=check_labels,
            backend=self.config.backend))
        out.mlm_predictions = predictions
        out.mlm_accuracy = correct / predictions.clamp(min=1)
        if return_mlm_logits:
            out.mlm_logits = self._mlm_logits(mlm_hidden)
        out.loss = out.mlm_loss

    @staticmethod
    def _nsp(out: PretrainingOutput, next_sentence_label: torch.Tensor) -> None:
        labels = next_sentence_label.long()
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)  # an all-ignored batch gives 0, not NaN, as the MLM loss
        out.nsp_loss = F.cross_entropy(out.nsp_logits.float(), labels, ignore_index=IGNORE_INDEX,
                                       reduction="sum") / count
        out.nsp_accuracy = ((out.nsp_logits.argmax(-1) == labels) & valid).sum() / count
        out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss

    def _forward_packed(self, input_ids, token_type_ids, cu_seqlens, max_seqlen, mlm_positions, mlm_labels,
                        next_sentence_label, return_mlm_logits: bool, validate: bool) -> PretrainingOutput:
        c = self.config
        check_packed_batch(c, self.decoder_weight.device, input_ids, token_type_ids, cu_seqlens, max_seqlen,
                           mlm_positions, mlm_labels, next_sentence_label, validate=validate)
        hidden, pooled = self.bert._encode_packed(input_ids, token_type_ids, cu_seqlens, max_seqlen)
        out = PretrainingOutput(nsp_logits=self.nsp(pooled))
        if mlm_labels is None:
            out.mlm_logits = self._mlm_logits(self._mlm_hidden(hidden))
        else:
            # Every slot runs the head (a fixed count per batch, so shapes stay static); unused
            # slots carry -100 and drop out of the loss and the accuracy.
            self._mlm(out, self._mlm_hidden(hidden.index_select(0, mlm_positions)), mlm_labels,
                      (mlm_labels != IGNORE_INDEX).sum(), return_mlm_logits, check_labels=validate)
        if next_sentence_label is not None:
            self._nsp(out, next_sentence_label)
        return out
