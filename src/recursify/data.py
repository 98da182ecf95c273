"""Text for training and evaluation: document sources, a stable held-out split, tokenisation, packing.

A ``--data`` spec is one of:

- a local file: ``.txt`` (split at blank lines into paragraphs; consecutive paragraphs are grouped
  into documents of at least ``TXT_DOC_CHARS`` characters, so one long book still has enough
  documents for a held-out split), ``.jsonl`` (one JSON object per line with a ``text`` field) or
  ``.parquet`` (a ``text`` column);
- a directory: every such file below it, recursively, in sorted path order;
- ``teacher:N`` (N tokens, suffixes k/M/G allowed): a corpus sampled from the teacher model itself at
  temperature 1 from short seed phrases, generated once and cached under
  ``cache_root()/data/`` keyed by the teacher's weights, N, the split and the seed;
- ``hf:NAME[:CONFIG]`` or a hub id ``owner/name[:config]``: a Hugging Face dataset, streamed.

Splits: a document belongs to ``heldout`` when a hash of its text falls in one of ``HELDOUT_BUCKETS``
buckets (~5%), independently of the seed, the order and the file layout, so no training run ever sees a
held-out document. ``teacher:N`` has no documents to hash: its held-out split is a separately seeded
generation of ceil(N / HELDOUT_BUCKETS) tokens, but at least min(N, MIN_HELDOUT_TOKENS) so that an
evaluation on it is not dominated by noise.

Order: local documents of a split are shuffled by ``seed``; hub datasets use a seeded shuffle buffer.

``split="all"`` (local files only) is for scoring a test file as published perplexities are: every file
whole, in its own order (sorted paths for a directory), nothing held out, shuffled or re-joined. A
``.txt`` file is one document with its text exactly as written; ``.jsonl``/``.parquet`` records are
documents in file order. ``load_tokens`` separates documents by EOS but adds none after the last one, so
one ``.txt`` file gives exactly its tokenisation.

Processes: ``rank``/``world_size`` give process ``rank`` of ``world_size`` a disjoint share of a split's
documents; the shares together are exactly the single-process split (data-parallel training reads its
own share, streamed, with ``stream_rows``). Local and ``teacher:N`` documents are dealt round-robin from
the seeded order; a hub dataset is split by ``datasets.distributed.split_dataset_by_node`` after its
seeded shuffle (whole shards per process when the shard count is a multiple of ``world_size``, else
every ``world_size``-th document). The held-out split is decided per document by its hash, so it is the
same whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recursify.errors import ConfigError, DataError
from recursify.files import write_text

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel

SPLITS = ("train", "heldout")
ALL = "all"  # every document of local files, in file order (see the module doc)
HELDOUT_BUCKETS = 20
TXT_DOC_CHARS = 2000
MIN_HELDOUT_TOKENS = 4096
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEACHER_PREFIX = "teacher:"
HUB_PREFIX = "hf:"
# Short, topic-diverse openings; temperature-1 sampling does the rest.
SEED_PHRASES = (
    "The",
    "In",
    "Once upon a time",
    "A",
    "It was",
    "Scientists",
    "The history of",
    "How to",
    "Dear",
    "When",
    "If you",
    "Today",
    "One of the",
    "There are",
    "My",
    "This",
    "We",
    "According to",
    "Why",
    "The first",
    "After",
    "In the year",
    "Chapter",
    "Many people",
    "Recent",
    "What is",
    "Here is",
    "I think",
    "Water",
    "The city",
    "Music",
    "During",
    "Learning",
    "Every",
    "Although",
    "She",
    "He",
    "They",
    "Our",
    "def ",
    "Q:",
    "1.",
)
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_TOKENIZE_BATCH = 64


def parse_count(text: str) -> int:
    """``"2M"`` -> 2_000_000, ``"16k"`` -> 16_000, ``"512"`` -> 512 (decimal multipliers)."""
    match = _COUNT.match(text.strip())
    if not match:
        raise ConfigError(f"expected a positive count like 512, 16k or 2M, got {text!r}")
    value = float(match.group(1)) * _MULTIPLIERS[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise ConfigError(f"expected a positive whole count like 512, 16k or 2M, got {text!r}")
    return int(value)


def is_heldout(text: str) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its text, ~5% of documents."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_BUCKETS == 0


def read_documents(
    spec: str,
    split: str = "train",
    seed: int = 0,
    teacher: RecursiveModel | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[str]:
    """The documents (strings) of one split of a ``--data`` source, in a deterministic seeded order.

    Args:
        spec: file, directory, ``teacher:N``, ``hf:NAME[:CONFIG]`` or hub id (see the module doc).
        split: ``"train"`` or ``"heldout"`` (the two never share a document), or ``"all"``: local files
            whole and in order (see the module doc).
        seed: order of local documents, shuffle buffer of hub datasets, sampling of ``teacher:N``.
        teacher: the model that samples ``teacher:N`` (its tokenizer decodes the samples).
        rank, world_size: read only process ``rank``'s share of ``world_size`` disjoint shares
            (see the module doc); the default is the whole split.

    Raises:
        DataError: the spec names nothing readable; raised here, before iteration starts.
        ConfigError: ``rank`` is not in ``[0, world_size)``.
    """
    if split not in (*SPLITS, ALL):
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join((*SPLITS, ALL))}")
    check_shard(rank, world_size)
    if split == ALL:
        return itertools.islice(_whole_files(spec), rank, None, world_size)
    if spec.startswith(TEACHER_PREFIX):
        return itertools.islice(teacher_documents(teacher, _teacher_count(spec), split, seed), rank, None, world_size)
    path = Path(spec).expanduser()
    if path.exists():
        files = _data_files(path)
        return itertools.islice(_local_documents(files, split, seed), rank, None, world_size)
    if spec.startswith(HUB_PREFIX) or (_HUB_ID.match(spec) and not spec.endswith(FILE_SUFFIXES)):
        return _hub_documents(spec.removeprefix(HUB_PREFIX), split, seed, rank, world_size)
    raise DataError(
        f"--data {spec!r} is not an existing file or directory, 'teacher:N' (e.g. teacher:2M) or a Hugging Face "
        "dataset ('hf:NAME[:CONFIG]' or 'owner/name'); check the path"
    )


def check_shard(rank: int, world_size: int) -> None:
    """Refuse a process index outside ``[0, world_size)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"process rank {rank} of world size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


def load_tokens(
    spec: str,
    tokenizer: Any,
    split: str = "train",
    max_tokens: int | None = None,
    seed: int = 0,
    teacher: RecursiveModel | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The split's documents tokenised with ``tokenizer`` and joined with EOS: 1-D int64.

    Each document is followed by the tokenizer's EOS token (with ``split="all"``: documents are
    separated by EOS, none follows the last); the result is cut at ``max_tokens`` (documents are read
    only as far as needed). ``rank``/``world_size``: this process's share only.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    ids: list[int] = []
    for doc_ids in _document_ids(read_documents(spec, split, seed, teacher, rank, world_size), tokenizer):
        ids.extend(doc_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    else:  # every document read
        if split == ALL and ids:
            ids.pop()  # the EOS after the last document: nothing to score there in a test file
    if not ids:
        raise DataError(
            f"--data {spec!r} has no {split} documents{_share(rank, world_size)}; give more text (about 5% of documents are held out)"
        )
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def stream_rows(
    spec: str,
    tokenizer: Any,
    seq_len: int,
    split: str = "train",
    seed: int = 0,
    teacher: RecursiveModel | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Rows [seq_len] (int64) of process ``rank``'s share of a split, packed as it is read.

    The packing is ``pack(load_tokens(...), seq_len)``'s (documents followed by EOS, joined, cut into
    rows, the last partial row dropped) without holding the corpus: memory stays at one tokenised batch
    of documents, so a streamed hub dataset of any size can feed training. With the defaults the rows
    are exactly ``pack(load_tokens(spec, tokenizer, split, seed=seed, teacher=teacher), seq_len)``;
    with ``world_size`` > 1 every process packs its own disjoint documents (rows never straddle two
    processes' documents) and the processes' rows together hold every document once.

    Raises:
        DataError: the share holds no document (e.g. fewer documents or shards than processes).
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    documents = read_documents(spec, split, seed, teacher, rank, world_size)  # raises here, not at the first row
    empty = f"--data {spec!r} has no {split} documents{_share(rank, world_size)}; give more text or use fewer processes"
    return _packed_rows(_document_ids(documents, tokenizer), seq_len, empty)


def _packed_rows(documents: Iterator[list[int]], seq_len: int, empty: str) -> Iterator[torch.Tensor]:
    pending: list[int] = []
    read_any = False
    for doc_ids in documents:
        read_any = True
        pending.extend(doc_ids)
        whole = len(pending) // seq_len * seq_len
        for start in range(0, whole, seq_len):
            yield torch.tensor(pending[start : start + seq_len], dtype=torch.long)
        del pending[:whole]
    if not read_any:
        raise DataError(empty)


def _document_ids(documents: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Each document's token ids followed by EOS, tokenised in batches (a missing EOS is refused at once)."""
    return _tokenised(documents, tokenizer, _eos(tokenizer))


def _tokenised(documents: Iterable[str], tokenizer: Any, eos: int) -> Iterator[list[int]]:
    for batch in _batches(documents, _TOKENIZE_BATCH):
        for doc_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield [*doc_ids, eos]


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; use a model whose tokenizer defines one")
    return int(eos)


def _share(rank: int, world_size: int) -> str:
    return f" in process {rank}'s share of {world_size}" if world_size > 1 else ""


def pack(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into rows [num_sequences, seq_len], dropping the remainder."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    rows = tokens.numel() // seq_len
    return tokens[: rows * seq_len].reshape(rows, seq_len)


def teacher_documents(teacher: RecursiveModel | None, num_tokens: int, split: str, seed: int, progress: bool = True) -> list[str]:
    """The cached ``teacher:N`` corpus of one split, generated on first use.

    The train split holds ``num_tokens`` sampled tokens; the held-out split is an independent
    generation (different seed stream) of ceil(num_tokens / HELDOUT_BUCKETS) tokens, at least
    min(num_tokens, MIN_HELDOUT_TOKENS).
    """
    if teacher is None:
        raise DataError("--data teacher:N samples text from the teacher model; pass --teacher (or teacher=) as well")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    target = num_tokens if split == "train" else max(math.ceil(num_tokens / HELDOUT_BUCKETS), min(num_tokens, MIN_HELDOUT_TOKENS))
    path = teacher_cache_path(teacher, num_tokens, split, seed)
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    docs = sample_corpus(teacher, target, _derived_seed(split, seed), progress=progress)
    write_text(path, "".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return docs


def teacher_cache_path(teacher: RecursiveModel, num_tokens: int, split: str, seed: int) -> Path:
    """Where a ``teacher:N`` split is cached: one directory per teacher fingerprint."""
    from recursify.sources import cache_root

    return cache_root() / "data" / f"teacher-{model_fingerprint(teacher)}" / f"{split}-n{num_tokens}-seed{seed}.jsonl"


FUNCTION_FIELDS = ("loops", "strategy", "norms", "relax")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: architecture plus a strided sample of every tensor."""
    digest = hashlib.sha256()
    arch, recursion_config = getattr(model, "arch", None), getattr(model, "recursion", None)
    if arch is not None:
        digest.update(json.dumps(asdict(arch), sort_keys=True, default=str).encode())
    if recursion_config is not None:  # only what changes the function; how the weights were made (seed, init, ...) is in them
        recursion = asdict(recursion_config)
        digest.update(json.dumps({k: recursion.get(k) for k in FUNCTION_FIELDS}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_corpus(
    model: RecursiveModel,
    num_tokens: int,
    seed: int,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    precision: str = "fp32",
    progress: bool = True,
) -> list[str]:
    """Documents sampled from ``model`` at temperature 1 until they hold ``num_tokens`` tokens.

    Each row starts from a seed phrase drawn from ``SEED_PHRASES`` and samples ``max_new_tokens``
    tokens without stopping at EOS: an EOS ends one document and the model goes on writing the next
    one (as in packed pretraining data), so no decode step is wasted on finished rows. The last
    batch is shortened so the corpus barely overshoots. fp32 by default: one-token decode steps are
    dominated by autocast's per-step weight casts, which made bf16 sampling ~2.5x slower on CPU.
    """
    from tqdm.auto import tqdm

    from recursify.config import SamplingConfig
    from recursify.text import encode_prompts, precision_context, require_tokenizer

    tokenizer = require_tokenizer(model)
    eos = set(model.arch.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    rng = random.Random(seed)
    docs: list[str] = []
    produced = 0
    was_training = model.training
    model.eval()
    with tqdm(total=num_tokens, unit="tok", desc="sampling teacher corpus", disable=not progress) as bar:
        while produced < num_tokens:
            prompts = [rng.choice(SEED_PHRASES) for _ in range(batch_size)]
            input_ids, mask = encode_prompts(tokenizer, prompts)
            new_tokens = min(max_new_tokens, math.ceil((num_tokens - produced) / batch_size))
            sampling = SamplingConfig(temperature=1.0, seed=rng.randrange(2**63))
            with torch.no_grad(), precision_context(precision, model.device):
                generated = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, sampling=sampling, eos_token_ids=[])
            for prompt_ids, prompt_mask, row in zip(
                input_ids.tolist(), mask.tolist(), generated[:, input_ids.shape[1] :].tolist(), strict=True
            ):
                prompt = [t for t, m in zip(prompt_ids, prompt_mask, strict=True) if m]
                pieces = _split_at(row, eos)
                pieces[0] = prompt + pieces[0]
                docs.extend(text for text in (tokenizer.decode(p, skip_special_tokens=True) for p in pieces) if text.strip())
                produced += sum(map(len, pieces)) - len(prompt)
            bar.update(new_tokens * batch_size)
    model.train(was_training)
    return docs


def _split_at(row: list[int], separators: set[int]) -> list[list[int]]:
    """Split a token row at separator tokens (dropped); always at least one (possibly empty) piece."""
    pieces: list[list[int]] = [[]]
    for token in row:
        if token in separators:
            pieces.append([])
        else:
            pieces[-1].append(token)
    return pieces


def _teacher_count(spec: str) -> int:
    try:
        return parse_count(spec.removeprefix(TEACHER_PREFIX))
    except ConfigError as err:
        raise DataError(f"--data {spec!r}: {err} (e.g. teacher:2M)") from err


def _derived_seed(split: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{split}:{seed}".encode()).digest()[:8], "little")


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"{path} has an unsupported extension; use one of {', '.join(FILE_SUFFIXES)} or a directory of them")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"directory {path} holds no {', '.join(FILE_SUFFIXES)} files")
    return files


def _whole_files(spec: str) -> Iterator[str]:
    """The documents of ``split="all"``: every local file whole (a .txt verbatim), in sorted path order."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--split all scores local files in their own order; {spec!r} is not an existing file or directory")
    files = _data_files(path)
    return (doc for file in files for doc in ([_read_text(file)] if file.suffix == ".txt" else _file_documents(file)) if doc)


def _local_documents(files: list[Path], split: str, seed: int) -> Iterator[str]:
    docs = [doc for file in files for doc in _file_documents(file) if is_heldout(doc) == (split == "heldout")]
    random.Random(seed).shuffle(docs)
    return iter(docs)


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        return _txt_documents(path)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return _parquet_documents(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); re-encode it as UTF-8") from err


def _txt_documents(path: Path) -> Iterator[str]:
    group: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", _read_text(path)):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        group.append(paragraph)
        size += len(paragraph)
        if size >= TXT_DOC_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
    if group:
        yield "\n\n".join(group)


def _jsonl_documents(path: Path) -> Iterator[str]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}:{number} is not valid JSON ({err}); each line must be an object with a 'text' field") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number} has no string \'text\' field; each line must look like {{"text": "..."}}')
        if record["text"]:
            yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable parquet file ({err})") from err
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=["text"]):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _hub_documents(name: str, split: str, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"reading the Hugging Face dataset {name!r} needs the 'datasets' package: pip install datasets") from err
    dataset_name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset_name, config or None, split="train", streaming=True)
    except Exception as err:  # the hub raises many unrelated types (HTTP, FileNotFound, ValueError, ...)
        raise DataError(f"could not open Hugging Face dataset {name!r} ({err}); check the name and network access") from err
    stream = stream.shuffle(seed=seed, buffer_size=10_000)  # same seed on every process: the same shard order to split
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return _hub_texts(stream, name, split)


def _hub_texts(stream: Iterable[dict[str, Any]], name: str, split: str) -> Iterator[str]:
    for row in stream:
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"Hugging Face dataset {name!r} has no string 'text' field (fields: {', '.join(row)})")
        if text and is_heldout(text) == (split == "heldout"):
            yield text


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
