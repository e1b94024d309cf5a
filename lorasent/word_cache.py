"""Printable-ASCII texts -> BERT WordPiece ids by one dictionary lookup per word, for large splits.

The Rust encoder builds a full `Encoding` for every text (a string, type id, word id and mask per token, then the
post-processor's merge): ~75 us for a 100-token review on one core even without BERT's normaliser. Most words of a
large corpus repeat, and WordPiece splits each word on its own, so a word's pieces never depend on its neighbours:
`tokenizers` caches them for BPE but not for WordPiece. Here the words of printable ASCII (split off exactly as
BertPreTokenizer splits them: runs of letters and digits, every other non-space character alone) are looked up in
a dictionary; the words it lacks are encoded by the backend's own WordPiece and added. Special tokens and right
truncation are placed with numpy. 3.4-5.5x the texts per core of the Rust encoder (bench/RESULTS.md, C16); the
ids are the backend's (tests/test_tokenize.py compares them on random and real texts).

It holds the GIL throughout, so it runs in encoder processes (one per core), not in threads.
"""

from __future__ import annotations

import itertools
import json
import re
from array import array
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

MAX_WORDS = 500_000  # distinct words kept (up to ~90 MB a process); past this the cache starts over
_MISSING = np.iinfo(np.int64).min  # code of a word not in the cache yet
_TEXT_END = -1  # code of the separator between the texts of a call
# Codes >= 0 are a one-piece word's token id; code -2 - k is word k of the several-pieces table.


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices start, start + 1, ..., start + length - 1 of every range, end to end."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


class WordPieceByWord:
    """Encodes printable ASCII texts that hold no added token as `backend.encode_batch_fast` would (ids only).

    Build it with `for_backend`, which refuses (None) a tokenizer that is not BERT's normaliser + pre-tokenizer +
    WordPiece with special tokens around the text, or that pads or truncates on the left.
    """

    def __init__(
        self,
        words: Tokenizer,
        lowercase: bool,
        prefix: list[int],
        suffix: list[int],
        budget: int | None,
        added_tokens: list[str],
    ) -> None:
        self._words = words  # the twin without truncation or special tokens: pieces of the words it is given
        self._lowercase = lowercase
        letters = "a-z0-9" if lowercase else "A-Za-z0-9"
        self._split = re.compile(f"[{letters}]+|[^{letters} ]")  # "\n", between texts, comes out alone too
        self._prefix, self._suffix = np.array(prefix, np.int32), np.array(suffix, np.int32)
        self._budget = budget  # content tokens a text keeps (max_length minus special tokens), None: all
        # A text that holds an added token ("[SEP]", any case) takes the backend's own path, which matches them.
        self._added = re.compile("|".join(map(re.escape, added_tokens)), re.IGNORECASE) if added_tokens else None
        self._codes: dict[str, int] = {}
        self._pieces, self._piece_starts, self._piece_counts = array("i"), array("q"), array("q")
        self._start_over()

    @classmethod
    def for_backend(cls, backend: Tokenizer, twin: Tokenizer) -> WordPieceByWord | None:
        """The word cache of `backend`, whose `printable_ascii_twin` is `twin`; None where it would not be exact."""
        config = json.loads(backend.to_str())
        if (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            return None
        if (config.get("model") or {}).get("type") != "WordPiece" or backend.padding is not None:
            return None
        truncation = backend.truncation
        if truncation is not None and truncation["direction"] != "right":
            return None
        words = Tokenizer.from_str(twin.to_str())
        words.no_truncation()
        probe = words.encode("a")  # where the post-processor puts its special tokens
        content = words.encode("a", add_special_tokens=False).ids
        inside = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        if not inside or probe.ids[inside[0] : inside[-1] + 1] != content:
            return None
        prefix, suffix = probe.ids[: inside[0]], probe.ids[inside[-1] + 1 :]
        budget = None if truncation is None else truncation["max_length"] - len(prefix) - len(suffix)
        if budget is not None and budget < 0:
            return None
        added = [token.content for token in backend.get_added_tokens_decoder().values() if token.content]
        return cls(words, twin.normalizer is not None, prefix, suffix, budget, added)

    def accepts(self, texts: Sequence[str], printable_ascii: list[bool]) -> list[bool]:
        """Which texts this encodes: the printable ASCII ones (as marked) that hold no added token."""
        if self._added is None or not self._added.search("\n".join(itertools.compress(texts, printable_ascii))):
            return printable_ascii
        return [simple and not self._added.search(text) for simple, text in zip(printable_ascii, texts, strict=True)]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens per text, all ids end to end) of texts it `accepts`."""
        if not texts:
            return np.empty(0, np.int32), np.empty(0, np.int32)
        if len(self._codes) > MAX_WORDS:
            self._start_over()
        joined = "\n".join(texts)
        words = self._split.findall(joined.lower() if self._lowercase else joined)
        codes = np.fromiter(map(self._codes.get, words, itertools.repeat(_MISSING)), np.int64, len(words))
        missing = np.flatnonzero(codes == _MISSING)
        if len(missing):
            self._learn({words[i] for i in missing.tolist()})
            codes[missing] = [self._codes[words[i]] for i in missing.tolist()]
        return self._assemble(codes)

    def _start_over(self) -> None:
        self._codes.clear()
        self._codes["\n"] = _TEXT_END
        del self._pieces[:], self._piece_starts[:], self._piece_counts[:]

    def _learn(self, new_words: set[str]) -> None:
        """Encode the words the cache lacks in one backend call (one word per pre-token) and remember their pieces."""
        new = list(new_words)
        encoded = self._words.encode(" ".join(new), add_special_tokens=False)
        word_ids = np.array(encoded.word_ids, np.int64)
        bounds = [0, *(np.flatnonzero(np.diff(word_ids)) + 1).tolist(), len(word_ids)]
        if len(bounds) - 1 != len(new):
            raise RuntimeError(f"WordPiece gave pieces for {len(bounds) - 1} of {len(new)} words.")
        ids = encoded.ids
        for word, start, end in zip(new, bounds[:-1], bounds[1:], strict=True):
            if end - start == 1:
                self._codes[word] = ids[start]
            else:
                self._codes[word] = -2 - len(self._piece_starts)
                self._piece_starts.append(len(self._pieces))
                self._piece_counts.append(end - start)
                self._pieces.extend(ids[start:end])

    def _assemble(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Word codes (texts separated by _TEXT_END) -> special tokens around each text's pieces, truncated."""
        several = np.flatnonzero(codes <= -2)
        table = -2 - codes[several]
        piece_counts = np.frombuffer(self._piece_counts, np.int64)[table] if len(several) else np.empty(0, np.int64)
        counts = (codes >= 0).astype(np.int64)  # tokens per word; 0 for the separators
        counts[several] = piece_counts
        word_starts = np.zeros(len(codes) + 1, np.int64)
        np.cumsum(counts, out=word_starts[1:])
        pieces = np.empty(word_starts[-1], np.int32)
        one = np.flatnonzero(codes >= 0)
        pieces[word_starts[one]] = codes[one]
        if len(several):
            source = np.frombuffer(self._piece_starts, np.int64)[table]
            pieces[concatenated_ranges(word_starts[several], piece_counts)] = np.frombuffer(self._pieces, np.int32)[
                concatenated_ranges(source, piece_counts)
            ]
        ends = np.append(np.flatnonzero(codes == _TEXT_END), len(codes))  # each text's words end at a separator
        starts = np.concatenate(([0], ends[:-1] + 1))
        content_starts = word_starts[starts]
        kept = word_starts[ends] - content_starts
        if self._budget is not None:
            kept = np.minimum(kept, self._budget)
        n_prefix, n_suffix = len(self._prefix), len(self._suffix)
        lengths = (kept + n_prefix + n_suffix).astype(np.int32)
        out_starts = np.cumsum(lengths, dtype=np.int64) - lengths
        ids = np.empty(int(lengths.sum()), np.int32)
        ids[concatenated_ranges(out_starts + n_prefix, kept)] = pieces[concatenated_ranges(content_starts, kept)]
        for k, token in enumerate(self._prefix):
            ids[out_starts + k] = token
        for k, token in enumerate(self._suffix):
            ids[out_starts + n_prefix + kept + k] = token
        return lengths, ids
