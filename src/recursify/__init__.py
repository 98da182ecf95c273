"""recursify: turn a pretrained decoder LLM into a (Relaxed) Recursive Transformer and run it fast.

The package root is lazy: ``import recursify`` (and the CLI's argument parsing) does not import
torch; the public names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from recursify.errors import RecursifyError

if TYPE_CHECKING:
    from recursify.conversion.convert import convert
    from recursify.loading import load
    from recursify.modeling.model import ModelOutput, RecursiveModel

__version__ = "0.1.0"
__all__ = ["ModelOutput", "RecursiveModel", "RecursifyError", "__version__", "convert", "load"]

_LAZY = {
    "convert": "recursify.conversion.convert",
    "load": "recursify.loading",
    "ModelOutput": "recursify.modeling.model",
    "RecursiveModel": "recursify.modeling.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recursify' has no attribute {name!r}")
