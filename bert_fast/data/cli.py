"""`bert-fast data ...` / `python -m bert_fast.data ...`: prepare a corpus, inspect samples."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bert_fast.data.prepare import PrepareSettings, prepare


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="text/JSONL -> WordPiece shards + manifest.json")
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files, or folders of them")
    p.add_argument("--output", required=True, help="folder for vocab.txt, shards and manifest.json")
    p.add_argument("--vocab", help="a WordPiece vocab.txt; trained on the input when absent")
    p.add_argument("--vocab-size", type=int, default=PrepareSettings.vocab_size, help="of a trained vocab")
    p.add_argument("--format", default="auto", choices=("auto", "text", "jsonl"))
    p.add_argument("--shard-tokens", type=int, default=PrepareSettings.shard_tokens)
    p.add_argument("--max-line-chars", type=int, default=PrepareSettings.max_line_chars)
    p.add_argument("--min-sentences", type=int, default=PrepareSettings.min_sentences)
    p.add_argument("--cased", action="store_true", help="keep case (default: lowercase, as uncased BERT)")
    p.add_argument("--max-non-utf8-share", type=float, default=PrepareSettings.max_non_utf8_share,
                   help="refuse a file with a larger share of lines that are not UTF-8 (default "
                        "%(default)s); a file with a NUL byte is always refused")
    p.add_argument("--workers", type=int, default=PrepareSettings.workers,
                   help="tokenizing processes (default 0: all cores); the output does not depend on it")
    p.set_defaults(run=_prepare)


def _prepare(args) -> int:
    settings = PrepareSettings(shard_tokens=args.shard_tokens, max_line_chars=args.max_line_chars,
                               min_sentences=args.min_sentences, lowercase=not args.cased,
                               vocab_size=args.vocab_size, workers=args.workers,
                               max_non_utf8_share=args.max_non_utf8_share)
    manifest = prepare(args.input, args.output, vocab=args.vocab, fmt=args.format, settings=settings)
    print(json.dumps({"output": args.output, "shards": len(manifest["shards"]), **manifest["totals"],
                      "skipped": manifest["skipped"]}))
    return 0


def main(argv=None, prog: str = "python -m bert_fast.data") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
