"""The FP8 GEMMs' scaling state (`precision.fp8`; the casts and GEMMs: bert_fast/ops/fp8.py, which
re-exports what is public here): the recipe, each GEMM's `Fp8State`, and what the model and the
training loop do with all of them (enable, roll, reduce across ranks, follow the fp16 loss scale,
check the device).

Scaling (`precision.fp8_scaling`), per tensor role (input, weight, gradient) and per GEMM:
- `current`: scale = fp8_max / amax(tensor now). Never overflows; one reduction before each cast.
- `delayed` (Transformer Engine's recipe): scale = fp8_max / max(amax history of the last
  `precision.fp8_amax_history` training forwards, i.e. micro-batches); the amax seen now (forward
  and backward) is recorded and enters the history at the next training forward (`roll`), after
  the training loop has max-reduced it across data-parallel ranks (`reduce_amaxes`, after each
  backward), so every rank scales alike and the checkpoint rank 0 writes is every rank's. Values
  past the stale scale saturate to +-fp8_max. An empty
  history (the first step) falls back to the current amax; once the history has taken in a step
  that could record (from the second training forward on), an empty one (every amax 0 or not
  finite) scales by 1, Transformer Engine's initial scale. So from then on every scale is known
  before its cast, and the casts skip the amax pass (kernels/fp8_cast.py) that current scaling
  needs: the host knows it by counting the rolls (`Fp8State.primed`), without reading the device.
  (What scale 1 costs: kernels/fp8_roll.py.)
  The history, scales and roll count are module buffers (`*.fp8.<gemm>.amax_history`,
  `.amax_now`, `.scale`, `.rolls`, float32 whatever the model's dtype), so DeepSpeed's
  checkpoints save and restore them and a resumed run is bit-exact.
Non-finite values: a NaN or inf input gives a NaN output (its amax makes the scale NaN; a plain
cast would saturate inf to 448 on the CPU, hiding it), so the loop's non-finite-loss check still
fires; its amax is left out of the history, so one bad step does not poison the steps after it.

Also here, as the state's load moves it on: the weights' generation, which every optimizer step
and state-dict load advances and the FP8 weight-cast cache (bert_fast/ops/fp8.py) keys on; and
the switch between the Triton kernels (CUDA) and the eager ops that the casts and the roll share.

References: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433); NVIDIA
Transformer Engine's DelayedScaling recipe
(https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/api/common.html).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRAD_FORMATS = {"e5m2": E5M2, "e4m3": E4M3}
SCALINGS = ("current", "delayed")
EMULATE_ENV = "BERT_FAST_FP8_EMULATE"  # test-only: lets a training run use FP8 on the CPU
_INPUT, _WEIGHT, _GRAD = 0, 1, 2  # rows of an Fp8State's buffers
# The four encoder GEMMs of a layer that run in FP8 (BertLayer's Linear children of these names).
GEMMS = ("qkv", "attn_out", "ffn_in", "ffn_out")


# The weights' generation: every optimizer step (a global torch.optim hook: DeepSpeed writes the
# updated weights through other views of its flat buffers, which a version counter misses) and
# every state-dict load moves it on; bert_fast/ops/fp8.py's weight-cast cache keys on it.
_generation = 0
_hooked = False


def generation() -> int:
    return _generation


def weights_changed() -> None:
    """Drops every cached FP8 weight cast: call after writing weights other than through an
    optimizer step, a state-dict load or in-place ops on the parameters themselves."""
    global _generation
    _generation += 1


def _watch_optimizers() -> None:
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *args: weights_changed())
        _hooked = True


def _use_kernels(device: torch.device) -> bool:
    """Whether the casts and the roll run their Triton kernels (kernels/fp8_cast.py,
    kernels/fp8_roll.py): CUDA; tests turn it on under the interpreter."""
    return device.type == "cuda"


@dataclass(frozen=True)
class Fp8Recipe:
    """The `precision.fp8_*` settings: scaling 'current' or 'delayed', the gradients' format
    ('e5m2' or 'e4m3'), the delayed amax history's length and whether the forward GEMMs use the
    tensor cores' fast accumulation (CUDA only: the CPU's emulation sums exactly in float32)."""

    scaling: str = "current"
    grad_format: str = "e5m2"
    amax_history: int = 16
    fast_accum: bool = False

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.grad_format not in GRAD_FORMATS:
            raise ValueError(f"fp8 grad_format must be one of {tuple(GRAD_FORMATS)}, "
                             f"got {self.grad_format!r}")
        length = self.amax_history
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"fp8 amax_history must be an int >= 1, got {self.amax_history!r}")
        if not isinstance(self.fast_accum, bool):
            raise ValueError(f"fp8 fast_accum must be true or false, got {self.fast_accum!r}")

    @property
    def grad_dtype(self) -> torch.dtype:
        return GRAD_FORMATS[self.grad_format]

    @classmethod
    def from_config(cls, recipe) -> Fp8Recipe:
        """From the training recipe's precision section (bert_fast/train/recipe.py Recipe)."""
        p = recipe.precision
        return cls(p.fp8_scaling, p.fp8_grad_format, p.fp8_amax_history, p.fp8_fast_accum)


class Fp8State(nn.Module):
    """One FP8 GEMM's recipe and, under delayed scaling, its scaling state in float32 buffers
    (rows: input, weight, gradient): `amax_history` [3, L] of past steps (newest first),
    `amax_now` [3] of this step so far, `scale` [3] from the history (0 while it is empty and
    the state not primed, see `primed`), `rolls` [1] the rolls so far, counted up to
    kernels/fp8_roll.py's PRIMED; and the delayed casts' arrival ticket (kernels/fp8_cast.py:
    int32, 0 between casts)."""

    def __init__(self, recipe: Fp8Recipe):
        super().__init__()
        self.recipe = recipe
        self._cached_weight = None  # bert_fast/ops/fp8.py `_cast_weight`'s
        self._host_rolls = 0  # the rolls the host has seen, not capped as `rolls` is
        self._primed = False  # `primed`: a bool, so a compiled graph's guard on it never fails again
        if recipe.scaling == "delayed":
            self.register_buffer("amax_history", torch.zeros(3, recipe.amax_history))
            self.register_buffer("amax_now", torch.zeros(3))
            self.register_buffer("scale", torch.zeros(3))
            self.register_buffer("rolls", torch.zeros(1))
            # The roles' format maxima on the state's device, so a roll inside a CUDA graph makes
            # no tensor from host data (not saved: they follow from the recipe).
            self.register_buffer("format_max", torch.tensor([fp8_max(d) for d in self.dtypes]),
                                 persistent=False)
            self.register_buffer("ticket", torch.zeros(1, dtype=torch.int32), persistent=False)
        _watch_optimizers()

    @property
    def delayed(self) -> bool:
        return self.recipe.scaling == "delayed"

    @property
    def primed(self) -> bool:
        """Whether every scale is positive (rolled PRIMED times: the history has taken in a step
        that could record), so the casts need no amax pass. Counted on the host, never read from
        the device. Neither a compiled forward nor a replayed CUDA graph counts its roll (a graph
        runs no Python; a count traced by Dynamo would be guarded on and recompile at every step):
        torch.compile records the value it traces with (bert_fast/train/compiled.py runs the first
        forwards eagerly until the states are primed, then compiles), and
        bert_fast/train/cuda_graphs.py counts its replays with `count_rolls`. Behind the device at
        worst, never ahead: where it is behind, an amax pass runs that reads nothing."""
        return self.delayed and self._primed

    def _set_host_rolls(self, count: int) -> None:
        """The host's count of the rolls, and `primed` with it."""
        from bert_fast.kernels.fp8_roll import PRIMED

        self._host_rolls = count
        self._primed = count >= PRIMED

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """The FP8 formats of the roles (input, weight, gradient)."""
        return E4M3, E4M3, self.recipe.grad_dtype

    def _apply(self, fn, recurse=True):
        # DeepSpeed's bf16/fp16 cast (module.bfloat16()) converts every floating buffer: the scaling
        # state stays float32 (moves between devices still apply).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args,
                              **kwargs):
        weights_changed()  # a model's load writes its weights too: no cached cast survives it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args,
                                      **kwargs)
        if self.delayed:
            if prefix + "rolls" in missing_keys:  # saved before the count existed: count afresh
                missing_keys.remove(prefix + "rolls")
                self.rolls.zero_()  # (its loaded scales may be 0: never count past them)
            self._set_host_rolls(int(self.rolls.item()))  # a load may read the device
            self.ticket.zero_()  # whatever happened to the last cast, the next one counts from 0

    @torch.no_grad()
    def roll(self) -> None:
        """The step's amaxes (`amax_now`, reduced across ranks by `reduce_amaxes` before) enter
        the history; the scales follow from the new history; the next step's amaxes start at 0;
        the roll count moves on. On CUDA one launch (kernels/fp8_roll.py) instead of the 21 of
        its eager ops (`roll_reference`, the CPU's path): every training forward rolls every state."""
        from bert_fast.kernels import fp8_roll

        run = fp8_roll.roll if _use_kernels(self.amax_now.device) else fp8_roll.roll_reference
        run(self.amax_history, self.amax_now, self.scale, self.format_max, self.rolls)
        if not torch.compiler.is_compiling():
            self._set_host_rolls(self._host_rolls + 1)

    def _update_scale(self) -> None:
        from bert_fast.kernels import fp8_roll

        self.scale.copy_(fp8_roll.scales_of(self.amax_history, self.format_max, self.rolls))

    @torch.no_grad()
    def record(self, role: int, amax: torch.Tensor) -> None:
        """Keeps the largest finite amax of this step (a NaN or inf one is left out, see module
        docstring); recomputed forwards (activation checkpointing) record the same value again."""
        finite = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        self.amax_now[role] = torch.maximum(self.amax_now[role], finite)


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8_max / amax (float32, finite), 1 where amax is 0 or not finite: current scaling's scale
    (a delayed state's from its history: kernels/fp8_roll.py `scales_of`)."""
    from bert_fast.kernels.fp8_roll import scale_from_amax

    return scale_from_amax(amax, fp8_max(dtype), 1.0)


def enable(model: nn.Module, recipe: Fp8Recipe) -> list[Fp8State]:
    """Gives every encoder layer of `model` (each module with an `fp8` slot: model.BertLayer,
    found by the slot so this layer below the model never imports it) an `fp8` ModuleDict of one
    Fp8State per GEMM (GEMMS); the layers' forwards then run those GEMMs in FP8. Returns the states."""
    states = []
    for module in list(model.modules()):
        if hasattr(module, "fp8") and not isinstance(module, (Fp8State, nn.ModuleDict)):
            module.fp8 = nn.ModuleDict({name: Fp8State(recipe) for name in GEMMS})
            states += list(module.fp8.values())
    if not states:
        raise ValueError("fp8.enable: the model has no encoder layers")
    return states


def states_of(model: nn.Module) -> list[Fp8State]:
    return [m for m in model.modules() if isinstance(m, Fp8State)]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def reduce_amaxes(states: list[Fp8State]) -> None:
    """Max-reduces every delayed state's step amaxes (`amax_now`) across data-parallel ranks in
    place: one all-reduce when torch.distributed runs with more than one rank, nothing otherwise;
    idempotent. The training loop calls it after each backward, eagerly (outside any compiled or
    captured graph, which then hold no collective), so the next forward's `roll` takes every
    rank's amaxes; checkpoint.save calls it too, so the file rank 0 writes holds them."""
    delayed = [s for s in states if s.delayed]
    if not delayed or _world_size() == 1:
        return
    now = torch.stack([s.amax_now for s in delayed])
    dist = torch.distributed
    dist.all_reduce(now, op=dist.ReduceOp.MAX)
    torch._foreach_copy_([s.amax_now for s in delayed], list(now))  # one launch, not one per state


@torch.no_grad()
def roll(states: list[Fp8State]) -> None:
    """Moves every delayed state's step amaxes into its history. No host sync, no collective: on
    several ranks, `reduce_amaxes` must have run since the last backward (the training loop's)."""
    for s in states:
        if s.delayed:
            s.roll()


def host_rolls(states: list[Fp8State]) -> list[int]:
    """The host's count of each state's rolls (`Fp8State.primed`): for callers that run a forward
    they then undo (bert_fast/train/cuda_graphs.py's warm-ups), with `set_host_rolls`."""
    return [s._host_rolls for s in states]


def set_host_rolls(states: list[Fp8State], counts: list[int]) -> None:
    for s, count in zip(states, counts, strict=True):
        s._set_host_rolls(count)


def primed_after_roll(states: list[Fp8State]) -> bool:
    """Whether a training forward's casts would skip their amax passes (`Fp8State.primed`) after
    its roll: a CUDA graph records the decision (bert_fast/train/cuda_graphs.py keys on it)."""
    from bert_fast.kernels.fp8_roll import PRIMED

    delayed = [s for s in states if s.delayed]
    return bool(delayed) and all(s._host_rolls + 1 >= PRIMED for s in delayed)


def count_rolls(states: list[Fp8State]) -> None:
    """A roll ran on the device that the host did not see (a replayed CUDA graph's): counts it."""
    for s in states:
        if s.delayed:
            s._set_host_rolls(s._host_rolls + 1)


@torch.no_grad()
def rescale_gradients(states: list[Fp8State], factor: float) -> None:
    """precision.fp16: the loss scale changed by `factor` (new / old). The gradients reaching the
    FP8 GEMMs carry the loss scale, so the gradient row of every delayed state (its history, this
    step's amax and its scale) follows it: after a rise the next casts would otherwise scale twice
    as large gradients by the old history and clip their largest values at the format's max,
    silently (saturation is no overflow: nothing turns inf for the loss scaler to see); after a
    fall they would waste a binade of range. Powers of two (DeepSpeed's scaler) rescale exactly.
    No host sync."""
    for s in states:
        if s.delayed:
            s.amax_history[_GRAD].mul_(factor)
            s.amax_now[_GRAD].mul_(factor)
            s._update_scale()


class LossScaleFollower:
    """Calls `rescale_gradients` when the fp16 loss scale moves: `update(scale)` after every
    optimizer step with the scaler's scale (None without fp16), which the training loop reads
    anyway."""

    def __init__(self, states: list[Fp8State], scale: float | None):
        self.states = [s for s in states if s.delayed]
        self.scale = scale

    def update(self, scale: float | None) -> None:
        if self.states and scale is not None and self.scale is not None and scale != self.scale:
            rescale_gradients(self.states, scale / self.scale)
        self.scale = scale


def is_state_key(name: str) -> bool:
    """Whether a state_dict key belongs to FP8 scaling state (not a weight: exports and init_from
    leave it out)."""
    return ".fp8." in f".{name}"


def check_device(device: torch.device) -> None:
    """Refuses, naming precision.fp8, a device that has no FP8 GEMMs: a CUDA GPU below compute
    capability 8.9, or the CPU (unless BERT_FAST_FP8_EMULATE=1, for tests: the GEMMs are emulated
    in float32 there and no faster than float32)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"precision.fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
                             f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}. "
                             "Set precision.fp8=false")
        return
    if os.environ.get(EMULATE_ENV) != "1":
        raise ValueError(f"precision.fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on "
                         f"{device.type}. Set precision.fp8=false ({EMULATE_ENV}=1 emulates FP8 on the CPU, "
                         "for tests only)")
