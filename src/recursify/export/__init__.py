"""Exports of recursify checkpoints into other ecosystems' formats."""

from recursify.export.transformers_format import export_transformers

FORMATS = ("transformers",)

__all__ = ["FORMATS", "export_transformers"]
