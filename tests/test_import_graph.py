"""The package's import graph, read from the source (module-level and function-level imports
alike): no cycle anywhere, and no import from a lower layer to a higher one (DESIGN.md: kernels
and data below the model, the model below training). And at run time: importing a kernel or the
data package loads no model code. IGNORE_INDEX is defined in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import early

ROOT = Path(__file__).resolve().parents[1]
# What the package root gives lazily (bert_fast/__init__.py): the module each name comes from.
LAZY = {"BertConfig": "bert_fast.model.config", "BertForPreTraining": "bert_fast.model",
        "BertModel": "bert_fast.model", "PretrainingOutput": "bert_fast.model"}
# The layers, lowest first (DESIGN.md): kernels, then ops, optim, model, train; data beside the
# kernels, below the model. A layer may import the package-root helpers every layer shares (labels,
# backends, fileio), its own layer and the layers below it; kernels only each other and labels.
SHARED = ("bert_fast.labels", "bert_fast.backends", "bert_fast.fileio")
ALLOWED = {
    "bert_fast.kernels": ("bert_fast.kernels", "bert_fast.labels"),
    "bert_fast.data": ("bert_fast.data", *SHARED),
    "bert_fast.ops": ("bert_fast.ops", "bert_fast.kernels", *SHARED),
    "bert_fast.optim": ("bert_fast.optim", "bert_fast.ops", "bert_fast.kernels", *SHARED),
    "bert_fast.model": ("bert_fast.model", "bert_fast.ops", "bert_fast.kernels", *SHARED),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "bert_fast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):  # installed as bert_fast.kernels
        found["bert_fast.kernels" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods
                           else LAZY.get(alias.name, base) if base == "bert_fast" else base
                           for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t not in (name, "bert_fast")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    edges = graph()  # a few edges known to exist: the reader sees imports at all levels
    assert "bert_fast.ops" in edges["bert_fast.model.bert"]
    assert "bert_fast.kernels.dropout" in edges["bert_fast.kernels.layernorm"]
    assert "bert_fast.data.prepare" in edges["bert_fast.data.corpus"]  # a function-level import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(graph()) == []


def layer(module: str, layers) -> str | None:
    return next((name for name in layers if module == name or module.startswith(name + ".")), None)


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The (module, target) imports that reach a layer the module's layer may not import."""
    return sorted((name, target) for name, targets in edges.items() if layer(name, ALLOWED)
                  for target in targets if not layer(target, ALLOWED[layer(name, ALLOWED)]))


def test_no_lower_layer_imports_a_higher_one():
    edges = graph()
    assert upward(edges) == []
    assert upward({"bert_fast.kernels.x": {"bert_fast.ops.padding", "bert_fast.kernels.y"},
                   "bert_fast.ops.y": {"bert_fast.model.bert"}}) == [
        ("bert_fast.kernels.x", "bert_fast.ops.padding"), ("bert_fast.ops.y", "bert_fast.model.bert")]
    # Every module is in a layer: one of the above, training (bert_fast.train) or a shared helper.
    stray = [name for name in edges if not layer(name, (*ALLOWED, "bert_fast.train", *SHARED))
             and name not in ("bert_fast", "bert_fast.cli", "bert_fast._C", "bert_fast._data")]
    assert stray == []


@early.job
def fresh_imports(folder, threads) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Two fresh interpreters: what importing a kernel and the data package loads, and where the
    package root's lazy BertForPreTraining comes from; an early job (tests/early.py)."""
    loads = ("import sys, bert_fast.kernels.layernorm, bert_fast.data, bert_fast.data.dataset; "
             "print(sorted(m for m in sys.modules if m in ('bert_fast.model', 'bert_fast.ops', "
             "'bert_fast.train')))")
    lazy = "from bert_fast import BertForPreTraining, BertConfig; print(BertForPreTraining.__module__)"
    return tuple(early.each(threads, *(lambda code=code: early.run([sys.executable, "-c", code], cwd=ROOT)
                                       for code in (loads, lazy))))


def test_importing_a_kernel_or_the_data_package_loads_no_model_code(fresh_imports):
    result, lazy = fresh_imports
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert lazy.stdout.strip() == "bert_fast.model.bert", lazy.stderr[-2000:]


def test_ignore_index_is_defined_once():
    defined = [str(path.relative_to(ROOT)) for path in modules().values()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX"
                                                       for t in node.targets)]
    assert defined == ["bert_fast/labels.py"]
