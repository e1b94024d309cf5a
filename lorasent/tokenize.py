"""Tokenise once, reuse everywhere: many trials on one node share one on-disk, memory-mapped tokenisation.

Texts are truncated but never padded here; `make_collator` pads each batch to its own longest text
(dynamic padding), which with length-grouped batches pads far less than padding everything to 512.
The cache key covers everything that changes the tokens: the data arguments and source, the tokenizer
itself (its full serialisation, not just its name), the effective max length and the lorasent version.

Chunks of texts are encoded on every core (threads; for large splits, processes with a word cache: see
lorasent/encoding.py) straight into flat numpy buffers, whose Arrow arrays are streamed to disk. This skips what
`datasets.map` + `tokenizer(...)` cost on top of the Rust encoder (BatchEncoding dicts of Python lists, hashing the
mapped function for a fingerprint, worker processes that each import transformers and get a pickled shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase, TokenizersBackend
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER, TruncationStrategy
from transformers.utils import PaddingStrategy

import lorasent
from lorasent import encoding
from lorasent.assets import VADER_FILE_SHA256, resolve_model_path
from lorasent.config import OFFLINE_DATASET, DataArguments, ModelArguments
from lorasent.cpus import usable_cpus
from lorasent.data import load_splits
from lorasent.errors import ConfigError
from lorasent.paths import atomic_dir, cache_root, cache_writes, remove_leftovers, unwritable_cache

logger = logging.getLogger(__name__)

_SPLITS = "the tokenised splits"  # what the cache folder takes, in its errors

CACHE_FORMAT = 1  # bump when the stored columns or their types change
ENCODE_ROWS = 1_000  # texts per encoder call: amortises the call, yet spreads a split over every thread
# From this many texts on, encoder processes instead of threads: each encodes by its own word cache, which holds the
# GIL (see lorasent/word_cache.py): 1.9-4.5x the threads' rate on 2 cores at 20k-200k reviews. Smaller splits take
# a few seconds at most in threads, and forking from a driver that runs Ray is kept to where it pays.
PROCESS_MIN_ROWS = 50_000


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The model's fast (Rust) tokenizer; slow Python tokenizers are refused as too slow for large data."""
    path = resolve_model_path(model_args.model_name_or_path)
    fix = (
        "A model folder needs its tokenizer files (tokenizer.json, or vocab.txt with tokenizer_config.json), as "
        "written by tokenizer.save_pretrained()."
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Could not load a tokenizer from {path}: {e}. {fix}") from e
    # transformers builds an empty tokenizer (special tokens only) when the files are missing: refuse it.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ConfigError(f"{path} holds no tokenizer vocabulary (only special tokens were found). {fix}")
    if not tokenizer.is_fast:
        raise ConfigError(
            f"{model_args.model_name_or_path!r} only has a slow Python tokenizer ({type(tokenizer).__name__}). "
            "Use a model that ships tokenizer.json (a fast tokenizer), or convert it with "
            "`AutoTokenizer.from_pretrained(..., from_slow=True).save_pretrained(folder)`."
        )
    if tokenizer.model_max_length >= VERY_LARGE_INTEGER:  # unset in tokenizer_config.json: the model's own limit
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", None) or VERY_LARGE_INTEGER
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialisation, minus the truncation/padding state that calls change, plus the
    settings a call reads from the tokenizer itself, which that serialisation lacks: the side it truncates (a call
    sets it on the backend) and whether special tokens in the text are split like any text.

    Every trial computes it: the copy's state is reset and serialised in Rust (~20 ms for a 30k vocabulary, where
    re-encoding the parsed JSON in Python took ~0.3 s).
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    identity = json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                           "truncation_side": tokenizer.truncation_side,
                           "split_special_tokens": tokenizer.split_special_tokens}, sort_keys=True,
                          default=str)  # fmt: skip
    return hashlib.sha256(f"{identity}\n{backend.to_str()}".encode()).hexdigest()


def effective_max_length(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> int:
    """data_args.max_length, capped at the model's own limit (its position embeddings hold no more)."""
    check_room_for_text(data_args.max_length, tokenizer)
    return min(data_args.max_length, tokenizer.model_max_length)


def check_room_for_text(max_length: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a max_length the tokenizer's special tokens fill: at their count every text is [CLS] [SEP] (a model that
    learns nothing, with no error), and below it the tokenizer stops truncating at all."""
    special = tokenizer.num_special_tokens_to_add()
    if max_length <= special:
        raise ConfigError(
            f"max_length {max_length} leaves no room for text: the tokenizer adds {special} special token(s) to "
            f"every text. Use at least {special + 1} (reviews need 128-512)."
        )


def source_identity(dataset: str) -> dict[str, Any]:
    """What identifies the data's content: the asset hash, the file's sha256, or the hub name.

    A file is hashed, not stat-ed: a new version copied over it with `cp -p`, `rsync -a` or out of an archive keeps
    its size and mtime, and a stale cache would then train on the old labels (about 1 s per GB, once per trial).
    """
    if dataset == OFFLINE_DATASET:
        return {"sha256": VADER_FILE_SHA256}
    path = Path(dataset).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return {"sha256": digest.hexdigest()}
    return {"name": dataset}


def tokenized_cache_dir(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, source: dict[str, Any] | None = None
) -> Path:
    """The cache folder of these data arguments tokenised by this tokenizer (it may not exist yet). `source` is the
    data's `source_identity`, where the caller has it already (a file's is its sha256: ~1 s a GB)."""
    fields = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "cache_dir"}
    key = {
        "data": fields,
        "source": source or source_identity(data_args.dataset),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": effective_max_length(data_args, tokenizer),
        "lorasent": lorasent.__version__,
        "format": CACHE_FORMAT,
        # the files' format: another major version may not read them (datasets 3 fails on 5's with a TypeError), and
        # environments that share the cache folder each keep their own
        "datasets": datasets.__version__.split(".")[0],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root(data_args.cache_dir) / "tokenized" / digest


def tokenized_splits(
    data_args: DataArguments,
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source: dict[str, Any] | None = None,
) -> datasets.DatasetDict:
    """train / validation / test as input_ids, attention_mask, label, length (tokens), unpadded.

    The first call tokenises and saves atomically; every later call with the same key (in any process)
    memory-maps the saved splits and neither reads the source data nor tokenises again. Pass the model's
    `tokenizer` when the caller already loaded it (`load_tokenizer(model_args)`), so it is not loaded twice, and
    the data's `source_identity` when the caller needs it too, so the data is not hashed twice.
    """
    tokenizer = tokenizer or load_tokenizer(model_args)
    folder = tokenized_cache_dir(data_args, tokenizer, source)
    # One tokeniser per node: trials that start together wait for the first instead of all tokenising.
    locks = folder.parent.parent / "locks"
    lock = FileLock(str(locks / f"tokenized-{folder.name}.lock"))
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:  # a read-only cache: what it holds is complete (writes are atomic), so read it unlocked
        if (splits := _cached(folder)) is not None:
            return splits
        raise unwritable_cache(folder, _SPLITS, e) from e
    try:
        return _load_or_build(folder, tokenizer, data_args, model_args)
    finally:
        lock.release()


def _cached(folder: Path) -> datasets.DatasetDict | None:
    """The splits saved in `folder`, memory-mapped; None where there are none or they are damaged."""
    if not (folder / "dataset_dict.json").is_file():
        return None
    try:
        splits = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        logger.warning("Tokenised cache %s is unreadable (%s).", folder, e)
        return None
    logger.info("Using the tokenised splits cached in %s.", folder)
    return splits


def _load_or_build(
    folder: Path, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, model_args: ModelArguments
) -> datasets.DatasetDict:
    if (splits := _cached(folder)) is not None:
        return splits  # else missing, or damaged: rebuilt in place
    max_length = effective_max_length(data_args, tokenizer)
    if max_length < data_args.max_length:
        logger.warning("max_length %d exceeds the model's limit; truncating at %d.", data_args.max_length, max_length)
    splits = load_splits(data_args)
    remove_leftovers(folder)  # of writers killed before us: we hold the lock
    # A healthy folder another writer committed first wins (same key, same content); a damaged one is replaced.
    with cache_writes(folder, _SPLITS), atomic_dir(folder, replace=folder.exists()) as tmp:
        staging = tmp / ".staging"  # streamed Arrow files, copied into save_to_disk's layout, then deleted
        with _no_progress_bars():
            _tokenize(splits, tokenizer, max_length, staging).save_to_disk(str(tmp))
        shutil.rmtree(staging)
        (tmp / "lorasent_source.json").write_text(json.dumps(_describe(data_args, model_args), indent=1), "utf-8")
    logger.info("Tokenised splits cached in %s.", folder)
    return datasets.load_from_disk(str(folder))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' bars off while the cache is written: its 'Saving the dataset' bars were the only ones of a run's or a
    search's start, and they speak of a dataset of lorasent's, not the user's. As they were afterwards."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _describe(data_args: DataArguments, model_args: ModelArguments) -> dict[str, Any]:
    """A human-readable note of what a cache folder holds (the key itself is a hash)."""
    return {"data_args": dataclasses.asdict(data_args), "model_name_or_path": model_args.model_name_or_path}


def _tokenize(
    splits: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    staging: Path,
) -> datasets.DatasetDict:
    """Each split as input_ids, attention_mask, label, length, written to `staging` and memory-mapped from there."""
    encode, backend = _batch_encoder(tokenizer, max_length)
    workers = usable_cpus()  # one per core this process may use, within its container's CPU limit
    rows = sum(len(split) for split in splits.values())
    # Forked processes start at once and import nothing; spawned ones would re-run the caller's main script (which
    # then needs an `if __name__ == "__main__"` guard), so where fork is missing (Windows) or unsafe (macOS: system
    # libraries may have started threads, which a forked child lacks) threads it is.
    # A Python-level tokenizer class keeps its own call, in threads.
    can_fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    processes = rows >= PROCESS_MIN_ROWS and backend is not None and can_fork
    pool: Executor
    if processes:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=encoding.start_encoder_process,
            initargs=(backend.to_str(), backend.encode_special_tokens),
        )
        encode_chunk: Callable[[Any], Any] = encoding.encode_chunk_in_process
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lorasent-tokenize")
        encode_chunk = functools.partial(encoding.encode_chunk, encode=encode)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    kind = "processes" if processes else "threads"
    logger.info("Tokenising %d texts in %d %s into the cache (once per node and key).", rows, workers, kind)
    result = {}
    # Unset, tokenizers would warn in each forked child that its parent used threads (the children encode on one
    # thread whatever the variable says: see encoding.start_encoder_process).
    with pool, _environ_default("TOKENIZERS_PARALLELISM", "false" if processes else None):
        for name, split in splits.items():
            # Sequence, not List (datasets 4 on): over a Value, datasets 4 on makes it the same List feature.
            features = datasets.Features(
                input_ids=datasets.Sequence(datasets.Value("int32")),
                attention_mask=datasets.Sequence(datasets.Value("int8")),
                label=split.features["label"],
                length=datasets.Value("int32"),
            )
            path = staging / f"{name}.arrow"
            chunks = split.select_columns(["text", "label"]).with_format("arrow").iter(batch_size=ENCODE_ROWS)
            if processes:
                chunks = map(encoding.compact, chunks)
            with ArrowWriter(features=features, path=str(path)) as writer:
                for table in _in_order(pool, encode_chunk, chunks, ahead=4 * workers):
                    writer.write_table(table)
                writer.finalize()
            result[name] = datasets.Dataset.from_file(str(path))
    seconds = time.perf_counter() - started
    logger.info("Tokenised %d texts in %.1f s (%.0f/s, %d %s).", rows, seconds, rows / seconds, workers, kind)
    return datasets.DatasetDict(result)


@contextlib.contextmanager
def _environ_default(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable the user left unset, for the duration of the block."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _batch_encoder(tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[encoding.Encode, Any]:
    """(texts -> (tokens per text, all token ids end to end), the Rust backend it uses or None): the ids exactly
    those of `tokenizer(texts, truncation=True, max_length=max_length)`.

    A plain fast tokenizer goes straight to its Rust backend's `encode_batch_fast` (no offsets, no
    BatchEncoding), configured by transformers' own `set_truncation_and_padding` as a call would configure it;
    a tokenizer class that changes encoding in Python (it overrides `__call__` or `_encode_plus`) keeps its call.
    """
    kind = type(tokenizer)
    plain = kind.__call__ is PreTrainedTokenizerBase.__call__ and kind._encode_plus is TokenizersBackend._encode_plus
    if not (isinstance(tokenizer, TokenizersBackend) and plain):

        def encode_by_call(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]  # fmt: skip
            return encoding.flatten(ids, ids)

        return encode_by_call, None
    tokenizer.set_truncation_and_padding(
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.LONGEST_FIRST,
        max_length=max_length,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
    )
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = tokenizer.split_special_tokens  # as a call sets it
    return encoding.backend_encoder(backend), backend


def _in_order(pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """fn over items on the pool, results in input order, at most `ahead` in flight (memory stays bounded)."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_LABELS = {"label": "labels"}  # the stored column, and the name the models' forward takes it by


@dataclass
class PadToLongest:
    """Collates tokenised rows into tensors padded to the batch's longest row, as `DataCollatorWithPadding` does
    (same tensors, `label` renamed `labels`), but with numpy instead of per-row Python: 1.1 ms instead of 8.7 ms for
    256 reviews of ~100 tokens on a 2-core CPU. On a GPU that host time sits between two steps; at batch 256 it held
    an H100 epoch to 359k tokens/s, 532k after this change (bench/RESULTS.md, runs G3 / G4)."""

    pad_token_id: int
    pad_token_type_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> BatchEncoding:
        lengths = np.fromiter((len(row["input_ids"]) for row in rows), np.int64, len(rows))
        filled = self._filled(lengths)
        batch = {}
        for key, first in rows[0].items():
            if isinstance(first, (list, tuple, np.ndarray)):
                tokens = np.fromiter(
                    itertools.chain.from_iterable(row[key] for row in rows), np.int64, int(lengths.sum())
                )
                batch[key] = self._padded(key, filled, tokens)
            else:
                batch[_LABELS.get(key, key)] = torch.tensor([row[key] for row in rows])
        return BatchEncoding(batch)

    def gather(self, split: PackedSplit, rows: Sequence[int]) -> BatchEncoding:
        """The same batch as `self([split's rows])`, from the split's arrays with a few numpy calls."""
        lengths, tokens, scalars = split.take(rows)
        filled = self._filled(lengths)
        batch = {key: self._padded(key, filled, values) for key, values in tokens.items()}
        batch.update({_LABELS.get(key, key): torch.from_numpy(values) for key, values in scalars.items()})
        return BatchEncoding(batch)

    def _filled(self, lengths: np.ndarray) -> np.ndarray:
        """[rows, width] True where a token goes: the batch's longest row (rounded up), padded on padding_side."""
        width = int(lengths.max(initial=0))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        positions = np.arange(width)
        starts = np.zeros_like(lengths) if self.padding_side == "right" else width - lengths
        return (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])

    def _padded(self, key: str, filled: np.ndarray, tokens: np.ndarray) -> torch.Tensor:
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self.pad_token_type_id}
        padded = np.full(filled.shape, pad_values.get(key, 0), np.int64)
        padded[filled] = tokens
        return torch.from_numpy(padded)


JOIN_BELOW_BYTES = 128 * 2**20  # PackedSplit: smaller splits are copied into one chunk (~25M tokens)


@dataclass(frozen=True)
class PackedChunk:
    """One stored chunk (record batch) of a tokenised split as numpy arrays over its Arrow buffers."""

    offsets: np.ndarray  # row i's tokens are values[offsets[i] : offsets[i + 1]] in every sequence column
    sequences: dict[str, np.ndarray]  # per-token columns (input_ids, attention_mask, ...): flat values
    scalars: dict[str, np.ndarray]  # per-row columns (label)

    @classmethod
    def of(cls, batch: pa.RecordBatch) -> PackedChunk:
        offsets, sequences, scalars = None, {}, {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if not pa.types.is_list(column.type):
                scalars[name] = column.to_numpy()
                continue
            column_offsets = column.offsets.to_numpy().astype(np.int64)
            column_offsets -= column_offsets[0]  # a sliced array's offsets start past 0
            if offsets is not None and not np.array_equal(offsets, column_offsets):
                raise ValueError(f"Column {name} has other row lengths than input_ids; it was not tokenised with it.")
            offsets = column_offsets
            sequences[name] = column.flatten().to_numpy()  # flatten() respects a slice, .values would not
        if offsets is None:
            raise ValueError(f"No tokenised column in {batch.schema.names}: tokenise the split first.")
        return cls(offsets, sequences, scalars)


@dataclass(frozen=True)
class PackedSplit:
    """A tokenised split as numpy arrays over its Arrow buffers, chunk by chunk: no copy of a memory-mapped split.

    `take` gathers any rows' tokens with a few numpy calls per chunk they lie in. Indexing the `Dataset` builds a
    Python list per row and column: 2.0 of the 3.9 ms that collating 128 rows of 100 tokens took on a 2-core CPU, host
    time a GPU step of trials sharing a base (`lorasent.fused`) waits on. A split of up to JOIN_BELOW_BYTES is joined
    into one chunk (a copy), so each batch is one gather; a larger one stays in its memory-mapped chunks, as a copy of
    it in each process would cost far more (1.8 GB for the 3.6M reviews of the `full` preset). Arrow's own `take`
    joins chunked list columns on every call.
    """

    chunks: list[PackedChunk]
    first_rows: np.ndarray  # chunk c holds rows first_rows[c] to first_rows[c + 1] - 1

    @classmethod
    def of(cls, split: datasets.Dataset) -> PackedSplit:
        table = split.with_format("arrow")[:]  # applies an indices mapping (a `select`), if any
        if table.nbytes <= JOIN_BELOW_BYTES:
            table = table.combine_chunks()
        chunks = [PackedChunk.of(batch) for batch in table.to_batches() if batch.num_rows]
        if not chunks:
            raise ValueError("The split has no rows.")
        return cls(chunks, np.cumsum([0, *(len(chunk.offsets) - 1 for chunk in chunks)]))

    def __len__(self) -> int:
        return int(self.first_rows[-1])

    def take(self, rows: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(lengths, tokens, scalars) of `rows`: each sequence column's tokens flat in row order, each scalar column's
        values."""
        rows = np.asarray(rows, np.int64)
        chunk_of = np.searchsorted(self.first_rows, rows, side="right") - 1
        local = rows - self.first_rows[chunk_of]
        parts = [(self.chunks[c], np.flatnonzero(chunk_of == c)) for c in np.unique(chunk_of)]
        starts, lengths = np.empty_like(rows), np.empty_like(rows)
        for chunk, at in parts:
            starts[at] = chunk.offsets[local[at]]
            lengths[at] = chunk.offsets[local[at] + 1] - starts[at]
        first = self.chunks[0]
        tokens = {key: np.empty(int(lengths.sum()), values.dtype) for key, values in first.sequences.items()}
        scalars = {key: np.empty(len(rows), values.dtype) for key, values in first.scalars.items()}
        row_starts = np.cumsum(lengths) - lengths  # where each row's tokens go in the flat result
        for chunk, at in parts:
            n = lengths[at]
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            source, target = np.repeat(starts[at], n) + within, np.repeat(row_starts[at], n) + within
            for key, values in chunk.sequences.items():
                tokens[key][target] = values[source]
            for key, values in chunk.scalars.items():
                scalars[key][at] = values[local[at]]
        return lengths, tokens, scalars


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> PadToLongest:
    """Pads each batch to its longest text; pass pad_to_multiple_of=8 on CUDA for tensor-core friendly shapes.

    The `length` column is for length-grouped sampling; Trainer drops it before collation
    (remove_unused_columns), a hand-written loop must drop it too.
    """
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"The tokenizer of this model ({type(tokenizer).__name__}) has no padding token, so batches cannot be "
            "padded. Use a model whose tokenizer defines pad_token, or add one to its tokenizer files."
        )
    return PadToLongest(tokenizer.pad_token_id, tokenizer.pad_token_type_id, tokenizer.padding_side, pad_to_multiple_of)
