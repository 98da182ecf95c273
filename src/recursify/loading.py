"""``recursify.load``: the one way to open any model, whatever the user points at.

A recursify checkpoint directory opens as saved (``RecursiveModel.from_pretrained``); anything else
that ``--model`` accepts (a Hugging Face directory, a ``.gguf`` file, a hub id or a registry alias
such as ``smollm2-135m``) opens as the original model, i.e. converted with ``loops=1``, which is
exactly the source model in recursify's own decoder. Every command and library entry point that
takes "a checkpoint or a source" goes through here, so they all accept the same things.
"""

from __future__ import annotations

import os

import torch

from recursify.checkpoint import is_checkpoint
from recursify.modeling.model import RecursiveModel


def load(source: str | os.PathLike[str], device: str | torch.device = "cpu") -> RecursiveModel:
    """Open a checkpoint directory as saved, or any model source as the original (loops=1), in eval mode.

    Raises:
        CheckpointError: a recursify checkpoint that is incomplete or corrupt.
        SourceError / UnsupportedModelError: a source that cannot be resolved or is not supported.
    """
    if is_checkpoint(source):
        return RecursiveModel.from_pretrained(source, device)
    from recursify.conversion.convert import convert

    return convert(source, loops=1, progress=False).to(device).eval()
