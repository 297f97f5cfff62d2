"""The `bert-fast` console script: `bert-fast data prepare ...` (see bert_fast/data/cli.py)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-fast", description="BERT pretraining tools")
    parser.add_argument("group", choices=("data",), help="data: prepare pretraining data")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the group's command")
    args = parser.parse_args(argv)
    from bert_fast.data.cli import main as data_main

    return data_main(args.args, prog="bert-fast data")


if __name__ == "__main__":
    sys.exit(main())
