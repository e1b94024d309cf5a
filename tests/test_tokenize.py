"""Tokenisation: unpadded, truncated, cached once on disk and reused, safe under concurrent writers."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer
from transformers import DataCollatorWithPadding

import lorasent.tokenize as tokenize
from lorasent import encoding, word_cache
from lorasent.assets import resolve_model_path
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments
from lorasent.data import load_splits
from lorasent.errors import ConfigError, DataError
from lorasent.tokenize import PackedSplit, load_tokenizer, make_collator, tokenized_cache_dir, tokenized_splits

TINY = ModelArguments(model_name_or_path=TINY_MODEL)
COLUMNS = ["input_ids", "attention_mask", "label", "length"]


@pytest.fixture
def data_args(write_data: Callable[..., Path], tmp_path: Path) -> DataArguments:
    sentence = "the product was great and i loved it but the battery broke after two weeks"
    words = sentence.split()
    rows = [{"text": " ".join(words[: 2 + i % len(words)]), "label": i % 2} for i in range(60)]
    return DataArguments(dataset=str(write_data(rows)), cache_dir=str(tmp_path / "cache"), max_length=12)


def test_splits_are_unpadded_and_truncated(data_args: DataArguments) -> None:
    splits = tokenized_splits(data_args, TINY)
    assert list(splits) == ["train", "validation", "test"]
    lengths = []
    for split in splits.values():
        assert split.column_names == COLUMNS
        for row in split:
            assert len(row["input_ids"]) == len(row["attention_mask"]) == row["length"] <= 12
            assert all(row["attention_mask"])  # no padding stored
        lengths += split["length"]
    assert min(lengths) < max(lengths) == 12  # varied lengths, the longest truncated at max_length


TRICKY_TEXTS = [
    "Café crème, naïve façade: ÉTÉ",
    "great 👍👍 but 电池 broke",
    "literal [SEP] and [CLS] and [UNK] markers",
    "tabs\tand\nnewlines   and   spaces",
    "LOUD, Mixed-Case review: 5/5 STARS!!! Wouldn't buy #again",  # printable ASCII: the encoder's twin
    "BELL\x07 VT\x0b DEL\x7f Control Characters",  # ASCII, not printable: the full normaliser
    "x" * 300,  # one long word
    "the battery broke after two weeks " * 40,  # truncated
]


def _edited_tiny_model(tiny_model_dir: Path, folder: Path, **settings: object) -> Path:
    """A copy of the tiny model whose tokenizer_config.json also holds `settings` (None: lacks that key), as a user
    edits a model folder."""
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "tokenizer_config.json"
    edited = {**json.loads(config.read_text("utf-8")), **settings}
    config.write_text(json.dumps({key: value for key, value in edited.items() if value is not None}), "utf-8")
    return folder


@pytest.fixture
def split_special_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with `split_special_tokens`: a "[SEP]" in a review is text, not the separator."""
    return _edited_tiny_model(tiny_model_dir, tmp_path / "split-special", split_special_tokens=True)


@pytest.mark.parametrize(
    ("model", "workers"),
    [(model, workers) for model in ("tiny", "minilm", "split_special") for workers in ("threads", "processes")],
)
def test_tokens_equal_the_tokenizer_call(
    model: str,
    workers: str,
    write_data: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Rust path, in threads or encoder processes, stores exactly what `tokenizer(texts, truncation=True,
    max_length=...)` returns."""
    fixture = {"minilm": "offline_model_dir", "split_special": "split_special_model"}.get(model)
    folder = str(request.getfixturevalue(fixture)) if fixture else TINY_MODEL
    model_args = ModelArguments(model_name_or_path=folder)
    monkeypatch.setattr(tokenize, "ENCODE_ROWS", 7)  # many chunks on several workers: their order must hold
    if workers == "processes":  # what a large split on a many-core node gets
        monkeypatch.setattr(tokenize, "PROCESS_MIN_ROWS", 0)
    rows = [{"text": f"{TRICKY_TEXTS[i % len(TRICKY_TEXTS)]} #{i}", "label": i % 2} for i in range(90)]
    data_args = DataArguments(dataset=str(write_data(rows)), cache_dir=str(tmp_path / "cache"), max_length=40)
    with caplog.at_level(logging.INFO, logger=tokenize.__name__):
        splits = tokenized_splits(data_args, model_args)
    assert f" {workers} into the cache" in caplog.text
    texts = load_splits(data_args)
    tokenizer = load_tokenizer(model_args)
    for name, split in splits.items():
        expected = tokenizer(list(texts[name]["text"]), truncation=True, max_length=40)
        assert list(split["input_ids"]) == expected["input_ids"]
        assert list(split["attention_mask"]) == expected["attention_mask"]
        assert list(split["length"]) == [len(ids) for ids in expected["input_ids"]]
        assert list(split["label"]) == list(texts[name]["label"])
    assert max(splits["train"]["length"]) == 40


@pytest.mark.parametrize("lowercase", [True, False])
def test_printable_ascii_twin_encodes_to_the_same_ids(lowercase: bool, offline_model_dir: Path) -> None:
    """Every printable ASCII character, in random strings and in real sentences, upper-cased too: the twin (lower
    case only) gives BERT's normaliser's ids, for an uncased and a cased vocabulary."""
    config = json.loads(
        load_tokenizer(ModelArguments(model_name_or_path=str(offline_model_dir))).backend_tokenizer.to_str()
    )
    config["normalizer"]["lowercase"] = lowercase
    backend = Tokenizer.from_str(json.dumps(config))
    twin = encoding.printable_ascii_twin(backend)
    assert twin is not None
    assert (twin.normalizer is not None) == lowercase  # Lowercase, or no normaliser at all for a cased model
    rng = random.Random(0)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    sentence = "The [SEP] battery's life: GREAT, 10/10 -- wouldn't buy again ##ing un-believable!"
    texts = ["".join(rng.choices(printable, k=rng.randint(0, 80))) for _ in range(3000)]
    texts += [sentence, sentence.upper(), sentence.swapcase(), "".join(printable)]
    assert all(text.isascii() and text.isprintable() for text in texts)
    assert [e.ids for e in twin.encode_batch_fast(texts)] == [e.ids for e in backend.encode_batch_fast(texts)]
    config["normalizer"] = {"type": "NFC"}  # another normaliser: no twin
    assert encoding.printable_ascii_twin(Tokenizer.from_str(json.dumps(config))) is None


def _minilm_backend(offline_model_dir: Path, lowercase: bool = True, max_length: int | None = None) -> Tokenizer:
    config = json.loads(
        load_tokenizer(ModelArguments(model_name_or_path=str(offline_model_dir))).backend_tokenizer.to_str()
    )
    config["normalizer"]["lowercase"] = lowercase
    backend = Tokenizer.from_str(json.dumps(config))
    backend.no_padding()  # the model's tokenizer.json pads and truncates at 128; tokenisation sets its own
    backend.no_truncation()
    if max_length is not None:
        backend.enable_truncation(max_length)
    return backend


@pytest.mark.parametrize(("lowercase", "max_length"), [(True, None), (True, 3), (True, 40), (False, 40)])
def test_word_cache_encodes_to_the_backends_ids(
    lowercase: bool, max_length: int | None, offline_model_dir: Path, vader_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder process's word cache stores what the backend encodes, chunk after chunk and when it starts over:
    random printable ASCII, word salad with long words ([UNK]), added tokens in any case, "##" and digits, real
    sentences, and texts that are not printable ASCII (the backend's own path, in the same chunks)."""
    monkeypatch.setattr(word_cache, "MAX_WORDS", 300)  # starts over several times over these texts
    backend = _minilm_backend(offline_model_dir, lowercase, max_length)
    rng = random.Random(0)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    words = ["the", "Battery", "unbelievable", "x" * 101, "[SEP]", "[sep]", "##ing", "42", "don't", "Great!!!", ""]
    texts = ["".join(rng.choices(printable, k=rng.randint(0, 80))) for _ in range(1500)]
    texts += [" ".join(rng.choices(words, k=rng.randint(0, 60))) for _ in range(1500)]
    texts += [line.split("\t")[-1] for line in vader_file.read_text("utf-8").splitlines()[:1500]]
    texts += TRICKY_TEXTS
    rng.shuffle(texts)
    cache = word_cache.WordPieceByWord.for_backend(backend, encoding.printable_ascii_twin(backend))
    assert cache is not None
    taken = cache.accepts(texts, [text.isascii() and text.isprintable() for text in texts])
    assert len(texts) / 2 < sum(taken) < len(texts)  # most by the cache, the rest (added tokens too) by the backend
    encode = encoding.backend_encoder(backend, by_word=True)
    chunks = [encode(texts[i : i + 250]) for i in range(0, len(texts), 250)]
    expected = backend.encode_batch_fast(texts)
    assert [n for lengths, _ in chunks for n in lengths.tolist()] == [len(e.ids) for e in expected]
    assert [i for _, ids in chunks for i in ids.tolist()] == [i for e in expected for i in e.ids]
    assert [len(column) for column in encode([])] == [0, 0]


def test_word_cache_is_refused_where_it_would_not_be_exact(offline_model_dir: Path) -> None:
    """Left truncation, padding, or another pre-tokenizer than BERT's: no word cache (the backend encodes all)."""
    twin = encoding.printable_ascii_twin(_minilm_backend(offline_model_dir))
    left = _minilm_backend(offline_model_dir, max_length=8)
    left.enable_truncation(8, direction="left")
    padded = _minilm_backend(offline_model_dir)
    padded.enable_padding()
    config = json.loads(_minilm_backend(offline_model_dir).to_str())
    config["pre_tokenizer"] = {"type": "Whitespace"}
    for backend in (left, padded, Tokenizer.from_str(json.dumps(config))):
        assert word_cache.WordPieceByWord.for_backend(backend, twin) is None
    assert word_cache.WordPieceByWord.for_backend(_minilm_backend(offline_model_dir, max_length=8), twin) is not None


def test_macos_tokenises_large_splits_in_threads(
    data_args: DataArguments, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """macOS offers fork, but its system libraries may have started threads that a forked child lacks: no encoder
    processes there, whatever the split's size."""
    monkeypatch.setattr(tokenize, "PROCESS_MIN_ROWS", 0)
    monkeypatch.setattr(sys, "platform", "darwin")
    with caplog.at_level(logging.INFO, logger=tokenize.__name__):
        tokenized_splits(data_args, TINY)
    assert " threads into the cache" in caplog.text


def test_truncation_side_and_python_level_tokenizers_are_honoured() -> None:
    """Left truncation goes through the fast path; a class that changes encoding in Python keeps its own call."""
    texts = TRICKY_TEXTS
    left = load_tokenizer(TINY)
    left.truncation_side = "left"

    class Prefixed(type(left)):  # type: ignore[misc]
        def _encode_plus(self, text: object, *args: object, **kwargs: object) -> object:
            return super()._encode_plus([f"review : {t}" for t in text], *args, **kwargs)  # type: ignore[attr-defined]

    prefixed = Prefixed.from_pretrained(resolve_model_path(TINY_MODEL))
    for tokenizer in (left, prefixed):
        expected = tokenizer(texts, truncation=True, max_length=12)["input_ids"]
        encode, _ = tokenize._batch_encoder(tokenizer, 12)
        lengths, ids = encode(texts)
        assert lengths.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]
    plain = load_tokenizer(TINY)(texts, truncation=True, max_length=12)["input_ids"]
    assert prefixed(texts, truncation=True, max_length=12)["input_ids"] != plain  # the override does change ids
    assert left(texts, truncation=True, max_length=12)["input_ids"] != plain


def test_writing_the_cache_prints_no_progress_bar(data_args: DataArguments, capsys: pytest.CaptureFixture[str]) -> None:
    """datasets' 'Saving the dataset' bars (three, one a split) were the only bars of a search's or a run's start:
    the cache is lorasent's own business, and in a log file a bar is noise."""
    tokenized_splits(data_args, TINY)
    assert "Saving the dataset" not in capsys.readouterr().err
    assert not datasets.utils.are_progress_bars_disabled()  # for the caller's own datasets work, as it was


def test_second_call_reuses_the_cache_without_reading_or_tokenising(
    data_args: DataArguments, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tokenized_splits(data_args, TINY)
    folder = tokenized_cache_dir(data_args, load_tokenizer(TINY))
    assert (folder / "dataset_dict.json").is_file()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached tokenisation was redone")

    monkeypatch.setattr(tokenize, "load_splits", forbidden)
    monkeypatch.setattr(tokenize, "_tokenize", forbidden)
    again = tokenized_splits(data_args, TINY)
    for name in first:
        assert again[name]["input_ids"] == first[name]["input_ids"]
        assert all(Path(f["filename"]).is_relative_to(folder) for f in again[name].cache_files)  # memory-mapped


def test_cache_key_follows_what_changes_the_tokens(
    data_args: DataArguments, offline_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny, minilm = load_tokenizer(TINY), load_tokenizer(ModelArguments())
    base = tokenized_cache_dir(data_args, tiny)
    assert tokenized_cache_dir(data_args, load_tokenizer(TINY)) == base
    tiny(["truncate me please"], truncation=True, max_length=2)  # call state must not change the key
    assert tokenized_cache_dir(data_args, tiny) == base
    assert tokenized_cache_dir(data_args, minilm) != base
    longer = DataArguments(**{**vars(data_args), "max_length": 64})
    assert tokenized_cache_dir(longer, tiny) != base
    with monkeypatch.context() as patch:  # an environment with another datasets shares the cache folder
        patch.setattr(datasets, "__version__", "3.0.0")
        assert tokenized_cache_dir(data_args, tiny) != base
    Path(data_args.dataset).write_text("text,label\nchanged,0\n", encoding="utf-8")
    assert tokenized_cache_dir(data_args, tiny) != base


@pytest.mark.parametrize("setting", [{"truncation_side": "left"}, {"split_special_tokens": True}])
def test_cache_key_follows_tokenizer_settings_a_call_reads(
    setting: dict[str, object], write_data: Callable[..., Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A model folder whose tokenizer_config.json truncates on the left, or splits special tokens, encodes the same
    texts to other ids with the same vocabulary: it must not read the splits another folder's tokenizer stored."""
    rows = [{"text": f"review {i}: [SEP] the battery broke after two weeks, sadly", "label": i % 2} for i in range(30)]
    data_args = DataArguments(dataset=str(write_data(rows)), cache_dir=str(tmp_path / "cache"), max_length=12)
    edited = ModelArguments(model_name_or_path=str(_edited_tiny_model(tiny_model_dir, tmp_path / "edited", **setting)))
    tokenized_splits(data_args, TINY)
    splits = tokenized_splits(data_args, edited)
    texts = list(load_splits(data_args)["train"]["text"])
    expected = load_tokenizer(edited)(texts, truncation=True, max_length=data_args.max_length)["input_ids"]
    assert splits["train"]["input_ids"] == expected
    assert expected != load_tokenizer(TINY)(texts, truncation=True, max_length=data_args.max_length)["input_ids"]


def test_new_content_with_the_old_size_and_mtime_is_tokenised_again(
    write_data: Callable[..., Path], tmp_path: Path
) -> None:
    """A new version copied over the file with `cp -p` or `rsync -a` keeps its size and mtime: it must not hit the
    old cache, whose labels it contradicts."""
    path = write_data([{"text": f"review number {i}", "label": i % 2} for i in range(30)])
    data_args = DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache"))

    def pairs() -> set[tuple[tuple[int, ...], int]]:
        splits = tokenized_splits(data_args, TINY)
        return {(tuple(row["input_ids"]), row["label"]) for split in splits.values() for row in split}

    before, stat = pairs(), path.stat()
    write_data([{"text": f"review number {i}", "label": 1 - i % 2} for i in range(30)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert pairs() == {(ids, 1 - label) for ids, label in before}


def test_concurrent_writers_both_succeed(data_args: DataArguments) -> None:
    results: list[datasets.DatasetDict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(tokenized_splits(data_args, TINY))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 2
    assert results[0]["train"]["input_ids"] == results[1]["train"]["input_ids"]
    tokenized = Path(data_args.cache_dir) / "tokenized"
    assert len(list(tokenized.iterdir())) == 1  # one folder, no temporary leftovers


def test_damaged_cache_is_rebuilt(data_args: DataArguments) -> None:
    first = tokenized_splits(data_args, TINY)
    for arrow in (tokenized_cache_dir(data_args, load_tokenizer(TINY)) / "train").glob("*.arrow"):
        arrow.unlink()
    assert tokenized_splits(data_args, TINY)["train"]["input_ids"] == first["train"]["input_ids"]


def test_a_tokenizer_without_a_length_limit_is_capped_at_the_models_positions(
    write_data: Callable[..., Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer_config.json without model_max_length leaves the tokenizer unlimited: texts longer than the model's
    512 position embeddings would be stored, and training would fail on its first long batch."""
    folder = _edited_tiny_model(tiny_model_dir, tmp_path / "no-limit", model_max_length=None)
    rows = [{"text": f"review {i}: " + "the battery broke after two weeks " * 100, "label": i % 2} for i in range(30)]
    data_args = DataArguments(dataset=str(write_data(rows)), cache_dir=str(tmp_path / "cache"), max_length=1024)
    splits = tokenized_splits(data_args, ModelArguments(model_name_or_path=str(folder)))
    assert {length for split in splits.values() for length in split["length"]} == {512}


def test_a_cache_that_cannot_be_locked_is_read_or_refused_by_name(data_args: DataArguments) -> None:
    """A cache this process cannot write (read-only, shared): splits it holds are read without the lock, which
    cannot be taken; splits it lacks are refused with the folder and the fix, not an OSError from the lock file."""
    first = tokenized_splits(data_args, TINY)
    locks = Path(data_args.cache_dir) / "locks"
    shutil.rmtree(locks)
    locks.write_text("")  # no lock can be made there
    assert tokenized_splits(data_args, TINY)["train"]["input_ids"] == first["train"]["input_ids"]
    with pytest.raises(ConfigError, match=r"Cannot write the tokenised splits to .*LORASENT_CACHE \(or --cache_dir\)"):
        tokenized_splits(DataArguments(**{**vars(data_args), "max_length": 13}), TINY)


FULL_CACHE = """
import resource, signal, sys
# Python ignores SIGXFSZ: a write past the limit fails with EFBIG, as on a full disk; by default, it kills the writer.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[3] == "fail" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
import lorasent.tokenize as tokenize
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments
data_args = DataArguments(dataset=sys.argv[1], cache_dir=sys.argv[2])
tokenize.tokenized_splits(data_args, ModelArguments(model_name_or_path=TINY_MODEL))
"""


@pytest.mark.usefixtures("tiny_model_dir")  # built first: its files exceed the size limit
def test_a_cache_without_room_is_refused_by_name(write_data: Callable[..., Path], tmp_path: Path) -> None:
    """Splits that do not fit where the cache lives (a full disk, a file size limit) end in an error naming the
    folder and the fix, and leave no partial folder behind."""
    rows = [{"text": f"review {i}: " + "the battery broke after two weeks " * 5, "label": i % 2} for i in range(3000)]
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", FULL_CACHE, str(write_data(rows)), str(cache), "fail"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ConfigError: Cannot write the tokenised splits to" in result.stderr, result.stderr[-2000:]
    assert "File too large. Point LORASENT_CACHE (or --cache_dir) at a writable folder" in result.stderr
    assert not any((cache / "tokenized").iterdir())


@pytest.mark.usefixtures("tiny_model_dir")  # built first: its files exceed the size limit
def test_the_next_writer_removes_what_a_killed_writer_left(write_data: Callable[..., Path], tmp_path: Path) -> None:
    """A writer killed mid-write leaves its partial folder (gigabytes for a large split); the next writer of the key,
    which holds the lock, deletes it."""
    rows = [{"text": f"review {i}: " + "the battery broke after two weeks " * 5, "label": i % 2} for i in range(3000)]
    data_args = DataArguments(dataset=str(write_data(rows)), cache_dir=str(tmp_path / "cache"))
    command = [sys.executable, "-c", FULL_CACHE, data_args.dataset, data_args.cache_dir, "die"]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == -signal.SIGXFSZ
    tokenized = tmp_path / "cache" / "tokenized"
    assert [path.name.startswith(".") for path in tokenized.iterdir()] == [True]  # the killed writer's folder
    tokenized_splits(data_args, TINY)
    assert [path.name for path in tokenized.iterdir()] == [tokenized_cache_dir(data_args, load_tokenizer(TINY)).name]


def test_refused_data_leaves_no_cache(write_data: Callable[..., Path], tmp_path: Path) -> None:
    path = write_data([{"text": "fine", "label": 0}, {"text": " ", "label": 1}])
    with pytest.raises(DataError, match="row"):
        tokenized_splits(DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache")), TINY)
    assert not (tmp_path / "cache" / "tokenized").exists() or not any((tmp_path / "cache" / "tokenized").iterdir())


def test_collator_pads_each_batch_to_its_longest(data_args: DataArguments) -> None:
    train = tokenized_splits(data_args, TINY)["train"].remove_columns("length")
    features = [train[i] for i in range(4)]
    longest = max(len(f["input_ids"]) for f in features)
    batch = make_collator(load_tokenizer(TINY))(features)
    assert batch["input_ids"].shape == (4, longest) and batch["labels"].shape == (4,)
    assert make_collator(load_tokenizer(TINY), pad_to_multiple_of=8)(features)["input_ids"].shape[1] % 8 == 0


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_gives_what_transformers_collator_gives(
    side: str, multiple: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The numpy collator is a faster DataCollatorWithPadding: the same tensors, key for key, from rows or gathered
    from a stored split's flat arrays."""
    tokenizer = load_tokenizer(TINY)
    tokenizer.padding_side = side
    texts = [text * (1 + i % 3) for i, text in enumerate(TRICKY_TEXTS)]
    encoded = tokenizer(texts, truncation=True, max_length=30, return_token_type_ids=True)
    rows = [{**{key: encoded[key][i] for key in encoded}, "label": i % 2} for i in range(len(TRICKY_TEXTS))]
    assert "token_type_ids" in rows[0]  # padded with the tokenizer's own pad type id
    expected = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")(rows)
    collate = make_collator(tokenizer, pad_to_multiple_of=multiple)
    got = collate(rows)
    assert sorted(got) == sorted(expected) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key

    # gathered from a stored split's arrays: joined into one chunk (a small split), or chunk by chunk (a large one),
    # and through a `select` (an indices mapping)
    parts = (rows[:3], rows[3:5], rows[5:])
    chunked = datasets.concatenate_datasets([datasets.Dataset.from_list(part) for part in parts])
    reverse = list(reversed(range(len(rows))))
    selected = datasets.Dataset.from_list([rows[i] for i in reverse]).select(reverse)  # back in the rows' order
    for join_below, chunks in ((tokenize.JOIN_BELOW_BYTES, 1), (0, len(parts))):
        monkeypatch.setattr(tokenize, "JOIN_BELOW_BYTES", join_below)
        assert len(PackedSplit.of(chunked).chunks) == chunks
        for stored in (chunked, selected):
            for wanted in ([5, 0, 7, 2, 3], [4], list(range(len(rows)))):
                gathered = collate.gather(PackedSplit.of(stored), wanted)
                expected = collate([rows[i] for i in wanted])
                assert sorted(gathered) == sorted(expected)
                for key in expected:
                    assert gathered[key].dtype == expected[key].dtype, key
                    assert torch.equal(gathered[key], expected[key]), key


def test_model_folder_without_tokenizer_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="tokenizer files"):
        load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path)))


@pytest.mark.ray
def test_encoder_processes_fork_from_a_ray_worker(data_args: DataArguments) -> None:
    """A trial that is first on its node tokenises inside a Ray worker: its encoder processes fork from there."""
    import ray

    def tokenise_in_worker(data_args: DataArguments) -> tuple[dict[str, list[list[int]]], str]:
        import io
        import logging

        import lorasent.tokenize as tokenize

        tokenize.PROCESS_MIN_ROWS = 0
        log = io.StringIO()
        logging.getLogger(tokenize.__name__).addHandler(logging.StreamHandler(log))
        logging.getLogger(tokenize.__name__).setLevel(logging.INFO)
        splits = tokenize.tokenized_splits(data_args, ModelArguments(model_name_or_path=TINY_MODEL))
        return {name: list(split["input_ids"]) for name, split in splits.items()}, log.getvalue()

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        ids, log = ray.get(ray.remote(tokenise_in_worker).remote(data_args), timeout=120)
    finally:
        ray.shutdown()
    assert " processes into the cache" in log
    tokenizer = load_tokenizer(TINY)
    texts = load_splits(data_args)
    for name, split_ids in ids.items():
        expected = tokenizer(list(texts[name]["text"]), truncation=True, max_length=data_args.max_length)
        assert split_ids == expected["input_ids"]


FORK_AFTER_PARALLEL_USE = """
import sys
import lorasent.tokenize as tokenize
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments

model_args = ModelArguments(model_name_or_path=TINY_MODEL)
backend = tokenize.load_tokenizer(model_args).backend_tokenizer
backend.encode_batch(["the battery broke after two weeks"] * 2000)  # the Rust thread pool now runs
tokenize.PROCESS_MIN_ROWS = 0
splits = tokenize.tokenized_splits(DataArguments(dataset=sys.argv[1], cache_dir=sys.argv[2], max_length=12), model_args)
print(sum(len(split) for split in splits.values()))
"""


def test_encoder_processes_finish_after_the_parent_used_rust_threads(
    data_args: DataArguments, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOKENIZERS_PARALLELISM=true (a common way to silence tokenizers' fork warning) and a parent whose Rust
    thread pool already ran: forked encoders must not wait on the pool's threads, which a child does not have."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    command = [sys.executable, "-c", FORK_AFTER_PARALLEL_USE, data_args.dataset, data_args.cache_dir]
    # Its own process group, so a hang (as before the fix) leaves no encoder processes behind.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("tokenisation in encoder processes hung after the parent had used the Rust thread pool")
    assert proc.returncode == 0, err[-2000:]
    assert out.split()[-1] == "60"
