"""bert_fast: BERT pretraining (masked LM + next-sentence prediction) on fused kernels."""

import os as _os

# An installed package (regular or editable) maps the repository's kernels/ to bert_fast.kernels
# (setup.py package_dir). A plain source checkout on PYTHONPATH, as the GPU suite runs it on
# machines where nothing may be installed, finds it here instead.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_checkout, "kernels", "aot.py")):
    __path__.append(_checkout)

from bert_fast.config import BertConfig  # noqa: E402
from bert_fast.model import BertForPreTraining, BertModel, PretrainingOutput  # noqa: E402

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "PretrainingOutput"]
__version__ = "0.1.0"
