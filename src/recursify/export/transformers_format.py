"""``recursify export --format transformers``: a directory ``AutoModelForCausalLM`` opens with ``trust_remote_code``.

OUT holds ``config.json`` (model_type ``recursify``, recursify's architecture/recursion, ``auto_map`` to the
two shim files), ``model.safetensors`` (the RecursiveModel's tensors under the wrapper's ``model.``
prefix), ``generation_config.json``, the tokenizer, and the shim files from ``recursify/export/hf/``
copied verbatim. The shims import the installed recursify, so the export runs wherever recursify is
installed and its logits are recursify's own.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from recursify.checkpoint import check_writable
from recursify.errors import CheckpointError
from recursify.files import staged_directory
from recursify.modeling.model import RecursiveModel

SHIM_DIR = Path(__file__).resolve().parent / "hf"
SHIM_FILES = ("configuration_recursify.py", "modeling_recursify.py")
AUTO_MAP = {
    "AutoConfig": "configuration_recursify.RecursifyConfig",
    "AutoModelForCausalLM": "modeling_recursify.RecursifyForCausalLM",
}
WEIGHTS_FILE = "model.safetensors"


def export_transformers(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (a recursify checkpoint dir) to ``out`` in the transformers remote-code layout; returns ``out``.

    Raises:
        CheckpointError: ``checkpoint`` is not a loadable recursify checkpoint, or ``out`` exists without ``overwrite``.
    """
    from transformers import GenerationConfig

    from recursify import __version__
    from recursify.export.hf.configuration_recursify import RecursifyConfig

    target = check_writable(out, overwrite)
    if Path(checkpoint).resolve() == target.resolve():
        raise CheckpointError(f"--out {target} is the checkpoint itself; choose another directory")
    model = RecursiveModel.from_pretrained(checkpoint)
    arch, source = model.arch, model.source.hf_config
    config = RecursifyConfig(
        architecture=dataclasses.asdict(model.arch),
        recursion=dataclasses.asdict(model.recursion),
        architectures=["RecursifyForCausalLM"],
        auto_map=dict(AUTO_MAP),
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,  # depths: what a per-layer cache would index
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=source.get("max_position_embeddings", 2048),
        bos_token_id=arch.bos_token_id,
        eos_token_id=_single_or_list(arch.eos_token_ids),
        pad_token_id=arch.pad_token_id,
        tie_word_embeddings=False,  # the model ties its head to the embedding itself; nothing for transformers to tie
        recursify_version=__version__,
        recursify_source=model.source.spec,
    )
    config.dtype = "float32"
    generation = GenerationConfig(
        bos_token_id=arch.bos_token_id, eos_token_id=_single_or_list(arch.eos_token_ids), pad_token_id=arch.pad_token_id
    )
    with staged_directory(target) as staging:
        config.save_pretrained(str(staging))
        generation.save_pretrained(str(staging))
        tensors = {f"model.{name}": tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        for name in SHIM_FILES:
            shutil.copyfile(SHIM_DIR / name, staging / name)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(staging))
    return target


def _single_or_list(ids: list[int]) -> Any:
    return ids[0] if len(ids) == 1 else (list(ids) or None)
