"""Tokenise once, reuse everywhere: many trials on one node share one on-disk, memory-mapped tokenisation.

Texts are truncated but never padded here; `make_collator` pads each batch to its own longest text
(dynamic padding), which with length-grouped batches pads far less than padding everything to 512.
The cache key covers everything that changes the tokens: the data arguments and source, the tokenizer
itself (its full serialisation, not just its name), the effective max length and the lorasent version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

import lorasent
from lorasent.assets import VADER_FILE_SHA256, resolve_model_path
from lorasent.config import OFFLINE_DATASET, DataArguments, ModelArguments
from lorasent.data import load_splits
from lorasent.errors import ConfigError
from lorasent.paths import atomic_dir, cache_root

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored columns or their types change
PARALLEL_ROWS = 50_000  # splits at least this long are tokenised by several processes


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
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialisation, minus the truncation/padding state that calls change."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    identity = {"class": type(tokenizer).__name__, "spec": spec, "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def effective_max_length(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> int:
    """data_args.max_length, capped at the model's own limit (its position embeddings hold no more)."""
    return min(data_args.max_length, tokenizer.model_max_length)


def _source_identity(dataset: str) -> dict[str, Any]:
    """What identifies the data's content: the asset hash, the file's size and mtime, or the hub name."""
    if dataset == OFFLINE_DATASET:
        return {"sha256": VADER_FILE_SHA256}
    path = Path(dataset).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"name": dataset}


def tokenized_cache_dir(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> Path:
    """The cache folder of these data arguments tokenised by this tokenizer (it may not exist yet)."""
    fields = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "cache_dir"}
    key = {
        "data": fields,
        "source": _source_identity(data_args.dataset),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": effective_max_length(data_args, tokenizer),
        "lorasent": lorasent.__version__,
        "format": CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root(data_args.cache_dir) / "tokenized" / digest


def tokenized_splits(data_args: DataArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """train / validation / test as input_ids, attention_mask, label, length (tokens), unpadded.

    The first call tokenises and saves atomically; every later call with the same key (in any process)
    memory-maps the saved splits and neither reads the source data nor tokenises again.
    """
    tokenizer = load_tokenizer(model_args)
    folder = tokenized_cache_dir(data_args, tokenizer)
    # One tokeniser per node: trials that start together wait for the first instead of all tokenising.
    locks = folder.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"tokenized-{folder.name}.lock")):
        return _load_or_build(folder, tokenizer, data_args, model_args)


def _load_or_build(
    folder: Path, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, model_args: ModelArguments
) -> datasets.DatasetDict:
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = datasets.load_from_disk(str(folder))
            logger.info("Using the tokenised splits cached in %s.", folder)
            return splits
        except (OSError, ValueError) as e:  # only a damaged cache gets here: rebuild it in place
            logger.warning("Tokenised cache %s is unreadable (%s); rebuilding it.", folder, e)
    max_length = effective_max_length(data_args, tokenizer)
    if max_length < data_args.max_length:
        logger.warning("max_length %d exceeds the model's limit; truncating at %d.", data_args.max_length, max_length)
    encoded = _tokenize(load_splits(data_args), tokenizer, max_length)
    # A healthy folder another writer committed first wins (same key, same content); a damaged one is replaced.
    with atomic_dir(folder, replace=folder.exists()) as tmp:
        encoded.save_to_disk(str(tmp))
        (tmp / "lorasent_source.json").write_text(json.dumps(_describe(data_args, model_args), indent=1), "utf-8")
    logger.info("Tokenised splits cached in %s.", folder)
    return datasets.load_from_disk(str(folder))


def _describe(data_args: DataArguments, model_args: ModelArguments) -> dict[str, Any]:
    """A human-readable note of what a cache folder holds (the key itself is a hash)."""
    return {"data_args": dataclasses.asdict(data_args), "model_name_or_path": model_args.model_name_or_path}


def _tokenize(
    splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.DatasetDict:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    result = {}
    for name, split in splits.items():
        features = datasets.Features(
            input_ids=datasets.List(datasets.Value("int32")),
            attention_mask=datasets.List(datasets.Value("int8")),
            label=split.features["label"],
            length=datasets.Value("int32"),
        )
        workers = min(8, len(os.sched_getaffinity(0))) if len(split) >= PARALLEL_ROWS else None
        result[name] = split.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=[c for c in split.column_names if c != "label"],
            features=features,
            num_proc=workers,
            desc=f"Tokenising {name}",
        )
    return datasets.DatasetDict(result)


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorWithPadding:
    """Pads each batch to its longest text; pass pad_to_multiple_of=8 on CUDA for tensor-core friendly shapes.

    The `length` column is for length-grouped sampling; Trainer drops it before collation
    (remove_unused_columns), a hand-written loop must drop it too.
    """
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
