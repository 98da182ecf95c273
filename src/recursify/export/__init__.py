"""Exports of recursify checkpoints into other ecosystems' formats.

``FORMATS`` loads without torch (the CLI lists it in ``--help``); the exporters load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recursify.export.transformers_format import export_transformers

FORMATS = ("transformers",)

__all__ = ["FORMATS", "export_transformers"]


def __getattr__(name: str) -> Any:
    if name == "export_transformers":
        from recursify.export.transformers_format import export_transformers

        return export_transformers
    raise AttributeError(f"module 'recursify.export' has no attribute {name!r}")
