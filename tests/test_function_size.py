"""The training layer stays readable at once: no function in bert_fast/train over 60 lines."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "bert_fast" / "train"
LIMIT = 60


def test_no_training_function_is_longer_than_the_limit():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(TRAIN.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]
    assert long == []
