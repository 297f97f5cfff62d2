"""BERT pretraining entry point.

    python pretrain.py --config configs/tiny-cpu.yaml [section.key=value ...]

Today it trains on one process (the smoke run of `make pretrain`); the DeepSpeed launcher
(`deepspeed pretrain.py ...`) arrives with the training issue.
"""

import argparse
import sys

from bert_fast.train.config import load_config
from bert_fast.train.loop import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    records = train(config)
    first, last = records[0], records[-1]
    print(f"done: {last['step']} steps, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
          f"MLM accuracy {first['mlm_acc']:.3f} -> {last['mlm_acc']:.3f}, "
          f"NSP accuracy {first['nsp_acc']:.3f} -> {last['nsp_acc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
