"""Training after conversion: uptraining (KD, early exits) and local healing.

Lazy like the package root: ``recursify.training.config`` (the options) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recursify.training.config import HealConfig
    from recursify.training.healing import HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal"]

_LAZY = {"HealConfig": "recursify.training.config", "HealReport": "recursify.training.healing", "heal": "recursify.training.healing"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recursify.training' has no attribute {name!r}")
