"""bert_fast/train/deepspeed_compat: the one place that touches DeepSpeed's internals, and the one
DeepSpeed version range. Read from the source: no other module of the package names an internal
attribute or imports from inside DeepSpeed; setup.py, constraints.txt and the adapter agree on the
versions; an unsupported DeepSpeed is refused by name before anything starts. No DeepSpeed needed."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest
import torch

from bert_fast.train import deepspeed_compat

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "bert_fast" / "train" / "deepspeed_compat"

# Attributes of DeepSpeed's engine, optimizer wrappers and ZeRO parameters that are not its public
# API (any `ds_*` counts too, and any private attribute of an engine, wrapper or optimizer).
INTERNALS = {
    "_optimizer_step", "_global_grad_norm", "_hp_mapping", "fp16_groups", "fp32_groups",
    "fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
    "bf16_groups", "bf16_partitioned_groups", "single_partition_of_fp32_groups",
    "parallel_partitioned_bit16_groups", "round_robin_bit16_groups", "round_robin_bit16_offsets",
    "round_robin_bit16_meta", "real_dp_process_group", "dp_process_group", "sub_group_process_groups",
    "sub_group_to_group_id", "partition_numel", "partition_padding", "checkpoint_engine",
    "zipfile_serialization", "cur_scale", "loss_scaler", "loss_scale_config", "refresh_fp32_params",
    "cpu_offload", "offload_optimizer", "register_external_parameter",
}
# Names that are internal as attributes of an engine or wrapper only (torch.optim.lr_scheduler is not).
OWNED_INTERNALS = {"lr_scheduler"}
# What the package may use of DeepSpeed outside the adapter: `import deepspeed` and these.
PUBLIC = {"deepspeed.initialize", "deepspeed.init_distributed", "deepspeed.zero.GatheredParameters",
          "deepspeed.__version__"}
_OWNERS = {"engine", "wrapper", "optimizer"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _internal(name: str) -> bool:
    return name in INTERNALS or name.startswith("ds_")


def uses_of_internals(source: str) -> list[str]:
    """What a module's source names of DeepSpeed's internals, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.startswith("deepspeed.")]
        elif isinstance(node, ast.Attribute):
            base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            owned = (node.attr.startswith("_") and not node.attr.startswith("__")) or node.attr in OWNED_INTERNALS
            private = owned and base in _OWNERS
            dotted = _dotted(node)
            if _internal(node.attr) or private:
                found.append(f"{line}: .{node.attr}")
            elif dotted and dotted.startswith("deepspeed.") and not any(
                    dotted == p or p.startswith(dotted + ".") for p in PUBLIC):
                found.append(f"{line}: {dotted}")
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _internal(node.args[1].value)):
            found.append(f"{line}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def _package_modules() -> list[Path]:
    return sorted([*(ROOT / "bert_fast").rglob("*.py"), ROOT / "pretrain.py", *(ROOT / "kernels").glob("*.py")])


def test_the_reader_finds_every_kind_of_use():
    source = '''
import deepspeed
import deepspeed.comm
from deepspeed.utils import safe_set_full_fp32_param
engine.optimizer._optimizer_step = step
held = p.ds_numel
n = getattr(p, "partition_numel", None)
rank = deepspeed.comm.get_rank()
x = wrapper._secret
engine.lr_scheduler = s
with deepspeed.zero.GatheredParameters(ps):
    deepspeed.initialize(model=m)
'''
    assert sorted({int(use.split(":")[0]) for use in uses_of_internals(source)}) == [
        3, 4, 5, 6, 7, 8, 9, 10], uses_of_internals(source)


def test_only_the_adapter_names_deepspeed_internals():
    outside = {str(path.relative_to(ROOT)): uses for path in _package_modules()
               if ADAPTER not in path.parents and (uses := uses_of_internals(path.read_text()))}
    assert outside == {}
    inside = [use for path in ADAPTER.glob("*.py") for use in uses_of_internals(path.read_text())]
    for expected in (".fp32_partitioned_groups_flat", "._optimizer_step", ".ds_numel", ".lr_scheduler",
                     "from deepspeed.utils.zero_to_fp32 import ..."):
        assert any(use.endswith(expected) for use in inside), expected  # the walk reads the adapter too


def _setup_requirement() -> str:
    """setup.py's `deepspeed...` requirement string, read from its source."""
    found = [node.value for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and node.value.replace(" ", "").startswith("deepspeed") and node.value[9:10] in "<>=!~"]
    assert len(found) == 1, found
    return found[0].replace(" ", "")


def _clauses(specifier: str) -> set[str]:
    return {clause.strip() for clause in specifier.split(",")}


def test_setup_constraints_and_the_adapter_state_one_version_range():
    from packaging.specifiers import SpecifierSet

    required = _setup_requirement()[len("deepspeed"):]
    assert _clauses(required) == _clauses(deepspeed_compat.SUPPORTED)
    pins = [line.split("==")[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.replace(" ", "").startswith("deepspeed==")]
    assert len(pins) == 1 and SpecifierSet(required).contains(pins[0]), (pins, required)
    assert deepspeed_compat.supports(pins[0])


@pytest.mark.parametrize("version", ["0.16.4", "0.18.9", "0.19", "0.19.0", "0.19.8", "0.19.8+cu124", "0.19.12",
                                     "0.20.0", "0.20", "1.0.0"])
def test_supports_agrees_with_packaging(version):
    from packaging.specifiers import SpecifierSet

    for specifier in (deepspeed_compat.SUPPORTED, ">0.19.2,<=0.19.8", "==0.19.8", "!=0.19.0,>=0.19"):
        assert deepspeed_compat.supports(version, specifier) == SpecifierSet(specifier).contains(version), (
            version, specifier)


def test_an_unsupported_deepspeed_is_refused_before_it_starts(monkeypatch):
    from bert_fast.optim import FusedLAMB

    started = []
    fake = types.SimpleNamespace(__version__="0.18.1", initialize=lambda **kwargs: started.append(kwargs))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError) as err:
        deepspeed_compat.initialize(model, FusedLAMB(model.parameters()), {"zero_optimization": {"stage": 1}})
    assert "DeepSpeed 0.18.1 is installed" in str(err.value)
    assert f"deepspeed{deepspeed_compat.SUPPORTED}" in str(err.value) and not started
    deepspeed_compat.check_version("0.19.8")  # the pinned one passes
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.20\.0 is installed.*supports deepspeed>=0\.19,<0\.20"):
        deepspeed_compat.check_version("0.20.0")
