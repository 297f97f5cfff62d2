"""The names of the implementations `bert_fast.ops` switches between, which `BertConfig` accepts:
below both (no torch import), so the model's config and the ops agree without importing each other."""

BACKENDS = ("auto", "torch", "fast")
# The fast backend's attention kernel (bert_fast.ops.attention_impl says what "auto" picks).
ATTENTION_IMPLS = ("auto", "triton", "torch_flash")
