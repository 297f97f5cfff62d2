"""bert_fast: BERT pretraining (masked LM + next-sentence prediction) on fused kernels."""

import os as _os

# An installed package (regular or editable) maps the repository's kernels/ to bert_fast.kernels
# (setup.py package_dir). A plain source checkout on PYTHONPATH, as the GPU suite runs it on
# machines where nothing may be installed, finds it here instead.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_checkout, "kernels", "aot.py")):
    __path__.append(_checkout)

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "PretrainingOutput"]
__version__ = "0.1.0"

# Loaded on first use (PEP 562), so importing a kernel, the data package or the extension's
# wrappers never loads the model (DESIGN.md: kernels and data sit below it).
_LAZY = {"BertConfig": "bert_fast.model.config", "BertForPreTraining": "bert_fast.model",
         "BertModel": "bert_fast.model", "PretrainingOutput": "bert_fast.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bert_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
