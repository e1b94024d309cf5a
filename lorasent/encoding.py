"""Chunks of texts -> Arrow columns of token ids, in a thread or in an encoder process.

The Rust encoder itself releases the GIL, but handing it a chunk of Python strings and reading back one id list
per text do not. On one core that is a few percent of the work (ids read back at ~240k texts/s, texts encoded at
~8k/s on a 2-core AMD EPYC); on 16 cores threads of one process reached only 39-47k reviews/s. Large splits are
therefore encoded by forked processes that each run `encode_chunk_in_process` (see lorasent/tokenize.py); with
the GIL to itself, each encodes printable ASCII by a word cache (lorasent/word_cache.py), 3.4-5.5x the Rust rate.

BERT's normalizer (control characters, CJK spacing, accents, lower case: NFD and Unicode tables on every text)
was a third of the encoder's time. On printable ASCII it changes nothing but the case, so such texts, most
English reviews, are encoded by a twin tokenizer that only lower-cases: the same ids, 1.3-1.4x as fast.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Sized

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from lorasent.word_cache import WordPieceByWord, concatenated_ranges

Encode = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]

_process_encoder: Encode | None = None  # set once per encoder process by start_encoder_process


def flatten(sequences: Sized, ids: Iterable[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and concatenated ids as int32 arrays, without an intermediate list of lists."""
    lengths = np.fromiter(map(len, sequences), np.int32, len(sequences))
    return lengths, np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))


def printable_ascii_twin(backend: Tokenizer) -> Tokenizer | None:
    """A copy of `backend` that encodes printable ASCII text to the same ids with less work, or None.

    `BertNormalizer` removes control characters, maps whitespace to spaces, spaces out CJK characters, strips
    accents and lower-cases. Printable ASCII (U+0020..U+007E) has none of those but case, so for it the normalizer
    equals `Lowercase` (or nothing, for a cased model) and everything after it sees the same string.
    """
    config = json.loads(backend.to_str())
    normalizer = config.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        return None
    config["normalizer"] = {"type": "Lowercase"} if normalizer.get("lowercase", True) else None
    twin = Tokenizer.from_str(json.dumps(config))
    twin.encode_special_tokens = backend.encode_special_tokens  # not serialised: "[SEP]" in a text stays text
    return twin


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _rust_encoder(tokenizer: Tokenizer) -> Encode:
    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = tokenizer.encode_batch_fast(texts)
        return flatten(encodings, (encoding.ids for encoding in encodings))

    return encode


def backend_encoder(backend: Tokenizer, by_word: bool = False) -> Encode:
    """texts -> (tokens per text, all ids end to end) by the Rust backend's `encode_batch_fast` (no offsets), with
    the truncation the backend is configured with; printable ASCII texts by its `printable_ascii_twin`, and with
    `by_word` (an encoder process's single thread) by its word cache where that applies."""
    twin = printable_ascii_twin(backend)
    cache = WordPieceByWord.for_backend(backend, twin) if by_word and twin is not None else None
    encoders: list[Encode] = [_rust_encoder(backend)]  # indexed by a text's kind: 0, 1 or 2 (see `kinds`)
    encoders += [_rust_encoder(twin)] if twin is not None else []
    encoders += [cache] if cache is not None else []

    def kinds(texts: list[str]) -> np.ndarray:
        printable = [_printable_ascii(text) for text in texts] if twin is not None else [False] * len(texts)
        kind = np.array(printable, np.int8)
        if cache is not None:
            kind += np.array(cache.accepts(texts, printable), np.int8)
        return kind

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        kind = kinds(texts)
        present = np.unique(kind)
        if len(present) <= 1:
            return encoders[int(present[0]) if len(present) else 0](texts)
        lengths, parts = np.empty(len(texts), np.int32), []
        for k in present.tolist():  # each text by the encoder it needs, back in the chunk's order
            rows = np.flatnonzero(kind == k)
            rows_lengths, ids = encoders[k]([texts[i] for i in rows.tolist()])
            lengths[rows] = rows_lengths
            parts.append((rows, rows_lengths, ids))
        starts = np.cumsum(lengths, dtype=np.int64) - lengths
        ids = np.empty(int(lengths.sum()), np.int32)
        for rows, rows_lengths, part in parts:
            ids[concatenated_ranges(starts[rows], rows_lengths)] = part
        return lengths, ids

    return encode


def encode_chunk(chunk: pa.Table, encode: Encode) -> pa.Table:
    """One chunk of text + label rows as the stored columns; the attention mask is ones over each text's tokens."""
    lengths, ids = encode(chunk.column("text").to_pylist())
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    bounds = pa.array(offsets)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(bounds, pa.array(ids)),
            "attention_mask": pa.ListArray.from_arrays(bounds, pa.array(np.ones(len(ids), np.int8))),
            "label": chunk.column("label"),
            "length": pa.array(lengths),
        }
    )


def compact(chunk: pa.Table) -> pa.Table:
    """A copy of just the chunk's rows, to send to an encoder process: a pickled slice carries (pyarrow 26) the whole
    buffers of the table it was sliced from."""
    return chunk.take(np.arange(len(chunk)))


def start_encoder_process(tokenizer_json: str, encode_special_tokens: bool) -> None:
    """Initializer of an encoder process: the serialised backend tokenizer, truncation settings included, and its
    `encode_special_tokens` (a tokenizer's `split_special_tokens`), which the serialisation lacks.

    The process encodes on its one thread. Whatever TOKENIZERS_PARALLELISM the user set: a forked child whose parent
    had already used the Rust thread pool inherits that pool without its threads, and waits on it forever.
    """
    global _process_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust side on every call
    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = encode_special_tokens
    _process_encoder = backend_encoder(backend, by_word=True)


def encode_chunk_in_process(chunk: pa.Table) -> pa.Table:
    """`encode_chunk` with this process's encoder; chunks and results cross the pipe as Arrow buffers."""
    if _process_encoder is None:
        raise RuntimeError("encode_chunk_in_process runs in a process started by start_encoder_process.")
    return encode_chunk(chunk, _process_encoder)
