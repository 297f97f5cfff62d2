"""Checkpoint save and validation of a BERT-large-size run (not a kernel bench): what hashing
every byte costs.

    python bench/checkpoint.py [--repeats 5] [--dir /tmp] [--preset large] [--name checkpoint] [--out DIR]
        [--note TEXT]
    python bench/checkpoint.py --dir /dev/shm --preset base --name checkpoint-tmpfs   # memory-speed writes

The large-phase1 recipe's engine (BERT-large, 335M parameters, bf16, ZeRO-1, LAMB; world of one
on the CPU, gloo) after one step, so the optimizer holds its state: a checkpoint of 4.7 GB
(bf16 module 0.67 GB, fp32 master weights and two moments 4.0 GB). Rows, each the median
(20th-80th percentile) of `--repeats` runs, providers alternating so both see the same disk:

- save, `size only above 64 MiB (main)`: bert_fast.train.checkpoint.save with main's rule:
  DeepSpeed's own torch.save to a path (no HashingWriter), then a sha256 of the files up to
  64 MiB, at the commit, after every file is written and fsynced; every file of this checkpoint
  but the RNG file is larger, so it is checked by size only;
- save, `sha256 of every byte`: this branch (DeepSpeed's torch.save writes through
  checksums.HashingWriter, whose threads hash each 64 MiB block while the same bytes are written;
  the RNG file is hashed while the files are fsynced);
- validate (what resume, init_from and export do first), under the same two rules.

`overhead_pct` = this save's time / main's - 1. This save leaves out the zip records' CRC32
(torch.load never checks it; main's save computes it in the writing thread, ~1 GB/s). Validation
reads the files just written (in the page cache, as a resume right after a save; a cold resume
reads at the disk's speed). Written to bench/results/cpu/<name>.{json,md}; `dir` says where the
checkpoints went (/tmp: this VM's disk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import BENCH_DIR, stamp, write_results

from bert_fast.train import checkpoint, checkpoint_manifest, checksums
from bert_fast.train.config import load_config, model_config
from bert_fast.train.deepspeed_json import deepspeed_config
from bert_fast.train.engine import build, init_distributed

LIMIT = 64 << 20  # main's HASH_LIMIT


class SizeOnlyAbove64MiB(checksums.Hasher):
    """main's rule in the same code path: nothing is hashed while the files are written (used with
    `_plain_deepspeed_save`; a `writer()` of this class would still hash); at the commit, files up
    to 64 MiB are hashed one after another and larger ones recorded by size."""

    def submit(self, path) -> None:
        self._files[Path(os.path.abspath(path))] = (Path(path).stat().st_size, [])

    def digests(self) -> dict:
        return {p: {"size": size, **({"sha256": [checksums._block_sha256(p, 0, self.block)]} if size <= LIMIT
                                     else {})} for p, (size, _) in self._files.items()}


@contextlib.contextmanager
def _plain_deepspeed_save(engine, hasher):
    """main's save: DeepSpeed's checkpoint engine untouched (torch.save to a path, nothing hashed)."""
    yield


def engine_after_one_step(preset: str):
    config = load_config(str(BENCH_DIR.parent / "configs" / "large-phase1.yaml"), [
        f"model.preset={preset}", "data.source=synthetic", "train.micro_batch=1", "train.global_batch=1",
        "data.seq_length=32", "train.threads=0"])
    _, world, device = init_distributed()
    model_cfg = model_config(config)
    engine, _ = build(config, model_cfg, deepspeed_config(config, world), device)
    from bert_fast.data.synthetic import SyntheticBatches

    batch = SyntheticBatches(1, 32, model_cfg.vocab_size, seed=0).next()
    keys = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "next_sentence_label")
    engine.backward(engine(**{k: batch[k] for k in keys}).loss)
    engine.step()
    return engine, config, model_cfg


def _summary(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints are written (the disk measured)")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--name", default="checkpoint", help="results file name")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "cpu")
    parser.add_argument("--note", default="", help="a line about the machine, added to the .md")
    args = parser.parse_args(argv)
    engine, config, model_cfg = engine_after_one_step(args.preset)
    params = sum(p.numel() for p in engine.module.parameters())
    every_byte, hashing_as_written = checksums.Hasher, checkpoint._hashing_as_written
    rules = {"size only above 64 MiB (main)": SizeOnlyAbove64MiB, "sha256 of every byte": every_byte}
    saves = {name: [] for name in rules}
    checks = {name: [] for name in rules}
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    state = {"config": config.to_dict(), "model_config": model_cfg.to_dict()}
    size = 0
    try:  # an untimed save first: a process's first save is seconds slower (its memory is new)
        checkpoint.save(engine, root, 1, {**state, "step": 1}, keep=1)
        for repeat in range(args.repeats):
            for name, hasher in rules.items():
                checkpoint.checksums.Hasher = hasher
                plain = hasher is not every_byte
                checkpoint._hashing_as_written = _plain_deepspeed_save if plain else hashing_as_written
                shutil.rmtree(root, ignore_errors=True)
                os.sync()  # each save starts with the disk's write-back done
                start = time.perf_counter()
                path = checkpoint.save(engine, root, repeat + 1, {**state, "step": repeat + 1}, keep=1)
                saves[name].append(time.perf_counter() - start)
                size = sum(f.stat().st_size for f in path.iterdir())
                start = time.perf_counter()
                if hasher is every_byte:
                    checkpoint_manifest.validate(path)
                else:  # main's validate: sizes, and the sha256 of files up to 64 MiB
                    for f in path.iterdir():
                        f.stat()
                        if f.stat().st_size <= LIMIT:
                            checksums._block_sha256(f, 0, LIMIT)
                checks[name].append(time.perf_counter() - start)
                print(f"repeat {repeat + 1}: {name}: save {saves[name][-1]:.2f} s, validate "
                      f"{checks[name][-1]:.2f} s", file=sys.stderr)
    finally:
        checkpoint.checksums.Hasher, checkpoint._hashing_as_written = every_byte, hashing_as_written
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for mode, times in (("save", saves), ("validate", checks)):
        main_time = statistics.median(times["size only above 64 MiB (main)"])
        for name, runs in times.items():
            med, p20, p80 = _summary(runs)
            rows.append({"mode": mode, "provider": name, "preset": args.preset, "params": params,
                         "checkpoint_gb": round(size / 1e9, 3), "threads": checksums.threads(),
                         "status": "ok",
                         "ms": med * 1e3, "ms_p20": p20 * 1e3, "ms_p80": p80 * 1e3,
                         "GB_s": size / med / 1e9, "dir": str(args.dir),
                         "overhead_pct": round(100 * (med / main_time - 1), 1) if mode == "save" else None,
                         "runs_s": [round(t, 3) for t in runs]})
            overhead = f"{rows[-1]['overhead_pct']:+6.1f} %" if mode == "save" else ""
            print(f"{mode:8s} {name:32s} {med:7.2f} s ({p20:.2f}-{p80:.2f}) {size / med / 1e9:7.2f} GB/s "
                  f"{overhead}")
    write_results(args.out, args.name, stamp(torch.device("cpu"), torch.bfloat16), rows,
                  baseline="size only above 64 MiB (main)")
    md = args.out / f"{args.name}.md"
    given, shown = list(argv if argv is not None else sys.argv[1:]), []
    while given:  # the command without --note, which follows it
        arg = given.pop(0)
        if arg == "--note":
            given.pop(0)
        elif not arg.startswith("--note="):
            shown.append(arg)
    command = shlex.join(["python", "bench/checkpoint.py", *shown])
    md.write_text(md.read_text() + f"\nMade by `{command}`; one untimed save first. "
                  f"{os.cpu_count()} cores. {args.note}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
