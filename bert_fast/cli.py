"""The `bert-fast` console script: `bert-fast data prepare ...` (bert_fast/data/cli.py) and
`bert-fast export ...` (a training checkpoint to a Hugging Face folder, bert_fast/train/export.py)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-fast", description="BERT pretraining tools")
    parser.add_argument("group", choices=("data", "export"),
                        help="data: prepare pretraining data; export: a checkpoint to Hugging Face")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the group's command")
    args = parser.parse_args(argv)
    if args.group == "export":  # imported here: `bert-fast data` never loads the model or torch's CUDA
        from bert_fast.train.export import main as export_main

        return export_main(args.args, prog="bert-fast export")
    from bert_fast.data.cli import main as data_main

    return data_main(args.args, prog="bert-fast data")


if __name__ == "__main__":
    sys.exit(main())
