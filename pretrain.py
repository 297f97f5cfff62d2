"""BERT pretraining (masked LM + next-sentence prediction) with DeepSpeed.

    deepspeed pretrain.py --config configs/base-phase1.yaml [section.key=value ...]
    deepspeed --num_gpus 8 pretrain.py --config configs/large-phase1.yaml --resume auto
    deepspeed --hostfile hosts pretrain.py --config configs/large-phase2.yaml
    python pretrain.py --config configs/tiny-cpu.yaml          # one process (make pretrain)

The recipe (configs/*.yaml) holds every setting; dotted overrides change any of them. The DeepSpeed
config is generated from it, or merged with --deepspeed_config (conflicting settings are errors).
Exit status: 0 when the steps are done or a SIGTERM/SIGINT stopped the run after saving a
checkpoint; 1 when training stopped (non-finite loss, collapsed fp16 loss scale, a checkpoint that
could not be written, a full disk, any other error during the run); 2 on a bad config or
checkpoint; 130 on a second SIGINT. Every error is one line on stderr naming its cause (an
unexpected one follows its traceback), and the process exits at once: DataLoader workers, the
process group and open files are released on every way out.
"""

import argparse
import logging
import os
import sys
import threading
import traceback

from bert_fast.train.checkpoint_manifest import CheckpointError
from bert_fast.train.config import dump_config, load_config
from bert_fast.train.engine import shutdown
from bert_fast.train.loop import TrainingStopped, train

SETTINGS = """\
settings: a recipe (--config) sets keys in sections (model, data, train, optimizer, schedule,
precision, zero, checkpoint, eval, log, export); `section.key=value` overrides any of them.
--print-config prints the resolved recipe, every section and key; their types, defaults and
meanings are the dataclasses in bert_fast/train/recipe.py; `model` takes `preset` and any field of
BertConfig (bert_fast/model/config.py). README.md, section Training, describes them."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=SETTINGS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe under configs/")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (the config and overrides) as YAML and exit")
    parser.add_argument("--resume", default=None,
                        help="'auto' (the newest valid checkpoint of the run, if any) or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a train.output_dir that holds an earlier one, moving that "
                             "one aside to <output_dir>.old-<time> (nothing is deleted)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="a DeepSpeed JSON merged into the generated one")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the DeepSpeed launcher (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--overwrite starts a new run and --resume continues one: choose one")
    try:
        recipe = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.print_config:
        print(dump_config(recipe), end="", flush=True)
        return 0
    try:
        outcome = train(recipe, resume=args.resume, deepspeed_config_path=args.deepspeed_config,
                        overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"pretrain.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"pretrain.py: training stopped: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second SIGINT: the first one's checkpoint did not finish
        print("pretrain.py: interrupted by a second SIGINT; the checkpoints already written stay valid",
              file=sys.stderr)
        return 130
    except OSError as err:  # a full disk (DiskFullError names the path and the sizes), an I/O error
        print(f"pretrain.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, or a failure nobody foresaw: it ends the run as quickly
        traceback.print_exc()
        print(f"pretrain.py: error: {type(err).__name__}: {one_line(err)} (unexpected: the traceback above "
              "shows where)", file=sys.stderr)
        return 1
    finally:
        release_process_group()
    if outcome.records:
        print(done_report(outcome), flush=True)
    return 0


def done_report(outcome) -> str:
    """What the run did and where its results are, for the person who started it."""
    first, last = outcome.records[0], outcome.records[-1]
    saved = outcome.checkpoint
    if outcome.export is not None:
        export = str(outcome.export)
    elif saved is not None:
        export = f"none (set export.hf_dir, or run: bert-fast export {saved} <folder>)"
    else:
        export = "none"
    return (f"done: step {last['step']}, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
            f"MLM accuracy {first['mlm_acc']:.3f} -> {last['mlm_acc']:.3f}, "
            f"NSP accuracy {first['nsp_acc']:.3f} -> {last['nsp_acc']:.3f}\n"
            f"  output folder:   {outcome.output_dir} (metrics.jsonl, config.yaml"
            f"{', tensorboard' if (outcome.output_dir / 'tensorboard').is_dir() else ''})\n"
            f"  last checkpoint: {saved or 'none'}\n"
            f"  export:          {export}")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def release_process_group(timeout: float = 10.0) -> None:
    """Destroys the process group, waiting at most `timeout` seconds: with a peer gone, a
    backend may block there, and the process must still end."""
    worker = threading.Thread(target=shutdown, daemon=True, name="destroy_process_group")
    worker.start()
    worker.join(timeout)


def end_process(code: int) -> None:
    """Exits with `code` once output is flushed, skipping the interpreter's teardown. DeepSpeed keeps
    its process groups referenced, so their gloo threads still run at teardown, which can abort a
    run that has finished and saved ("terminate called without an active exception", seen once
    on a ZeRO-3 bf16 CPU run, exit -6). Checkpoints, metrics and exports are written and closed by
    now, and the process group was destroyed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    end_process(main())
