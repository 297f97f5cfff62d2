"""The DeepSpeed engine of a run: process group, device, model, fused optimizer, schedule.

Launched by `deepspeed pretrain.py` (RANK/WORLD_SIZE/LOCAL_RANK set by the launcher), or by plain
`python pretrain.py`, which runs as a world of one. GPUs use NCCL; the CPU uses gloo (tests and
`make pretrain`). The optimizer is ours (bert_fast.optim, fused in csrc/), made exact under every
ZeRO stage by bert_fast.train.deepspeed_compat; the schedule is a LambdaLR that DeepSpeed steps,
saves and restores with the engine.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from bert_fast.model import BertForPreTraining
from bert_fast.ops import fp8
from bert_fast.optim import FusedAdamW, FusedLAMB, param_groups
from bert_fast.train import deepspeed_compat, schedule
from bert_fast.train.partitions import zero_padding
from bert_fast.train.recipe import Recipe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed prints this on every CPU start, when it loads its shared-memory all-reduce op (built
# once, then cached): nothing a user acts on.
_BUILT = re.compile(r"^DeepSpeed \S+ built successfully$")


@contextlib.contextmanager
def _dropping_stdout(line: re.Pattern):
    """Passes on what the block prints to stdout, less the lines that match `line`."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        sys.stdout.write("".join(text for text in printed.getvalue().splitlines(keepends=True)
                                 if not line.match(text.rstrip("\n"))))


def use_cpu_accelerator_without_gpu() -> None:
    """Without a CUDA device the trainer runs on the CPU (init_distributed): tells DeepSpeed so,
    before it is first imported. Searching for an accelerator and finding none, it warned on
    every start that it "was unable to detect" one. A DS_ACCELERATOR the user set is kept."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group (a world of one without a launcher)."""
    use_cpu_accelerator_without_gpu()
    import deepspeed

    if "RANK" not in os.environ:  # plain `python pretrain.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    # DeepSpeed's collectives call torch APIs that torch deprecates, once per call site and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # DeepSpeed builds its CPU shm op through torch.utils.cpp_extension, whose import logs "No
        # CUDA runtime is found" under a CUDA build of torch on a machine without a GPU: not ours.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with _dropping_stdout(_BUILT):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cpu":
        unlink_shm_buffer(rank)
    return rank, world, device


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce op keeps this rank's 69 MB workspace."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_buffer(rank: int) -> None:
    """Removes this rank's /dev/shm workspace name. DeepSpeed creates one per rank when all ranks are
    on one machine and never removes it, so every CPU launch left 69 MB of RAM per rank behind for
    good. Each rank maps its peers' workspaces inside init_distributed, before this barrier, so the
    names can go: the mappings stay valid and the memory is freed when the ranks exit."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # on every rank alike, whether or not the file exists
    shm_buffer_path(rank).unlink(missing_ok=True)


def shutdown() -> None:
    """Destroys the process group, so ranks exit without tearing connections under their peers."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optimizer
    cls = FusedLAMB if o.name == "lamb" else FusedAdamW
    return cls(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
               weight_decay=o.weight_decay, max_grad_norm=recipe.train.max_grad_norm)


def build(recipe: Recipe, model_cfg, ds_config: dict, device: torch.device):
    """(engine, lr scheduler). The model is built in float32 on `device`; DeepSpeed casts it for
    bf16/fp16 and keeps float32 master weights."""
    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
    model = BertForPreTraining(model_cfg).to(device)
    model.bert.gradient_checkpointing = recipe.train.activation_checkpointing
    if recipe.precision.fp8:  # its scaling state is part of the module DeepSpeed checkpoints
        fp8.enable(model, fp8.Fp8Recipe.from_config(recipe))
    optimizer = make_optimizer(model, recipe)
    # Weights are equal on every rank; dropout and other draws from here on differ per rank.
    seed = recipe.train.seed + 1 + int(os.environ.get("RANK", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    engine, *_ = deepspeed_compat.initialize(model, optimizer, ds_config)
    zero_padding(engine)
    # Built on our optimizer once DeepSpeed has wrapped it (its param groups carry the lr under
    # every wrapper); the engine steps it at accumulation boundaries and checkpoints it.
    lr_scheduler = schedule.scheduler(optimizer, recipe)
    deepspeed_compat.use_lr_scheduler(engine, lr_scheduler)
    return engine, lr_scheduler
