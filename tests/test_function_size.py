"""The training and data layers stay readable at once: no function in bert_fast/train or
bert_fast/data (its subpackages included) over 60 lines."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "bert_fast" / "train"
DATA = TRAIN.parent / "data"
LIMIT = 60


def long_functions(paths) -> list[str]:
    return [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(paths) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]


def test_no_training_function_is_longer_than_the_limit():
    assert long_functions(TRAIN.glob("*.py")) == []


def test_no_data_function_is_longer_than_the_limit():
    assert DATA.is_dir() and long_functions(DATA.rglob("*.py")) == []
