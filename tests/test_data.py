"""load_splits on the real VADER data, the hub path and local files, and every bad-input refusal."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import amazon_polarity_repo

from lorasent.config import DataArguments
from lorasent.data import _amazon_finish, _take_rows, load_splits
from lorasent.errors import ConfigError, DataError, HubUnreachableError

SPLITS = ("train", "validation", "test")


def _ratings(vader_file: Path) -> list[tuple[str, float]]:
    """(sentence, mean rating) pairs read straight from the file, independently of lorasent.data."""
    lines = vader_file.read_bytes().decode("utf-8").split("\r\n")
    return [(text, float(rating)) for _, rating, text in (line.split("\t") for line in lines)]


# ------------------------------------------------------------------------------------------------ VADER


def test_vader_binarisation_and_grouped_splits(vader_file: Path) -> None:
    splits = load_splits(DataArguments())
    expected = sorted((text, round(r, 2)) for text, r in _ratings(vader_file) if abs(r) >= 0.5)
    pairs = (zip(splits[s]["text"], splits[s]["rating"], strict=True) for s in SPLITS)
    loaded = [(text, round(r, 2)) for split_pairs in pairs for text, r in split_pairs]
    assert sorted(loaded) == expected  # exactly the sentences with |rating| >= 0.5, each once
    for split in SPLITS:
        ds = splits[split]
        assert ds.features["label"].names == ["negative", "positive"]
        assert ds["label"] == [int(r > 0) for r in ds["rating"]]
    reviews = {split: set(splits[split]["review_id"]) for split in SPLITS}
    assert not reviews["train"] & reviews["validation"]
    assert not reviews["train"] & reviews["test"]
    assert not reviews["validation"] & reviews["test"]
    assert len(reviews["test"]) == round(0.15 * 300)  # fractions count reviews, not sentences


def test_vader_threshold_drops_near_neutral(vader_file: Path) -> None:
    splits = load_splits(DataArguments(neutral_threshold=1.5))
    total = sum(len(splits[s]) for s in SPLITS)
    assert total == sum(abs(r) >= 1.5 for _, r in _ratings(vader_file))
    assert min(abs(r) for s in SPLITS for r in splits[s]["rating"]) >= 1.5


def test_vader_seeded_reproducible_subsets() -> None:
    args = DataArguments(max_train_samples=120, max_eval_samples=40, max_test_samples=30, data_seed=7)
    first, again = load_splits(args), load_splits(args)
    other = load_splits(DataArguments(max_train_samples=120, max_eval_samples=40, max_test_samples=30, data_seed=8))
    assert [len(first[s]) for s in SPLITS] == [120, 40, 30]
    assert all(first[s]["text"] == again[s]["text"] for s in SPLITS)
    assert first["train"]["text"] != other["train"]["text"]
    assert set(first["train"]["label"]) == {0, 1}
    # Tables of their own rows, not indices into a larger one, which everything after reads row by row.
    assert [len(first[s].data) for s in SPLITS] == [120, 40, 30]


def test_rows_taken_from_a_selection_are_the_selected_rows() -> None:
    """A dataset that already maps its rows (a `select`) gives the rows it shows, not its table's."""
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(6)], "label": [i % 2 for i in range(6)]})
    taken = _take_rows(ds.select([5, 2, 4]), np.array([2, 0]))
    assert taken["text"] == ["t4", "t5"] and taken["label"] == [0, 1] and len(taken.data) == 2


def test_vader_needs_two_label_names() -> None:
    with pytest.raises(ConfigError, match="--label_names negative positive"):
        load_splits(DataArguments(label_names=["neg", "neu", "pos"]))


def test_unknown_offline_dataset_names_the_valid_one() -> None:
    with pytest.raises(ConfigError, match="offline:vader-amazon"):
        load_splits(DataArguments(dataset="offline:imdb"))


# ----------------------------------------------------------------------------------------------- hub


def test_amazon_polarity_fails_fast_when_the_hub_is_unreachable(closed_hub: str) -> None:
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        load_splits(DataArguments(dataset="amazon_polarity"))
    assert time.monotonic() - start < 10  # generous: the library's own retries take ~45 s
    assert f"the Hugging Face hub at {closed_hub} is unreachable" in str(err.value)
    assert "--dataset offline:vader-amazon" in str(err.value)


def test_amazon_polarity_text_and_label_names() -> None:
    # The hub is unreachable here, so the post-download step runs on rows of amazon_polarity's own schema.
    features = datasets.Features(
        label=datasets.ClassLabel(names=["negative", "positive"]),
        title=datasets.Value("string"),
        content=datasets.Value("string"),
    )
    rows = {"label": [0, 1, 1], "title": ["Broke", "Great!", " "], "content": ["after a week.", "Love it", "No title"]}
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=features))
    joined = _amazon_finish(raw, DataArguments(dataset="amazon_polarity", label_names=["neg", "pos"]))["train"]
    assert joined["text"] == ["Broke. after a week.", "Great! Love it", "No title"]
    assert joined.features["label"].names == ["neg", "pos"] and joined["label"] == [0, 1, 1]
    content = _amazon_finish(raw, DataArguments(dataset="amazon_polarity", amazon_text="content"))["train"]
    assert content["text"] == ["after a week.", "Love it", "No title"]


def test_amazon_polarity_splits_from_its_own_schema(monkeypatch) -> None:
    """The whole load_splits path of amazon_polarity (train and test from the hub, validation carved from train
    while the rows still hold title / content), with the unreachable hub's download replaced by rows of its schema."""
    features = datasets.Features(
        label=datasets.ClassLabel(names=["negative", "positive"]),
        title=datasets.Value("string"),
        content=datasets.Value("string"),
    )

    def split(n: int, offset: int) -> datasets.Dataset:
        rows = {"label": [i % 2 for i in range(n)], "title": [f"Title {offset + i}" for i in range(n)]}
        rows["content"] = [f"review number {offset + i}" for i in range(n)]
        return datasets.Dataset.from_dict(rows, features=features)

    hub = {"train": split(200, 0), "test": split(40, 1000)}
    monkeypatch.setattr("lorasent.data.load_hub_dataset", lambda name: hub)
    splits = load_splits(DataArguments(dataset="amazon_polarity", max_train_samples=50, max_eval_samples=20))
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 50, "validation": 20, "test": 40}
    assert all(set(ds.column_names) == {"label", "text"} for ds in splits.values())
    assert splits["test"][0]["text"].startswith("Title 10")
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])


def test_amazon_polarity_loads_offline_from_the_hub_repository_in_the_cache(hub_cache) -> None:
    """HF_HUB_OFFLINE=1 with the dataset's hub files in the cache (`hf download amazon_polarity --repo-type dataset`,
    or an earlier load whose prepared Arrow files are gone), which datasets offline does not read by itself."""
    hub_cache("dataset", "amazon_polarity", amazon_polarity_repo(train_shards=2))
    splits = load_splits(DataArguments(dataset="amazon_polarity", max_train_samples=50, max_eval_samples=10))
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 50, "validation": 10, "test": 30}
    assert splits["test"]["text"][0] == "test title 0. test review 0"
    assert splits["train"].features["label"].names == ["negative", "positive"]


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("amazon_polarity/train-00001-of-00002.parquet", "amazon_polarity/train-00001-of-00002.parquet"),
        ("amazon_polarity/test-00000-of-00001.parquet", "amazon_polarity/test-*"),
    ],
    ids=["a-shard", "a-split"],
)
def test_a_cut_short_dataset_download_in_the_cache_is_refused_by_its_missing_files(
    missing: str, named: str, hub_cache
) -> None:
    """A cached snapshot that lacks a shard or a split (a download cut short) trains on none of it: the error names
    the missing files and the command that fetches them, instead of a search on a part of the data."""
    files = amazon_polarity_repo(train_shards=2)
    del files[missing]
    snapshot = hub_cache("dataset", "amazon_polarity", files)
    with pytest.raises(HubUnreachableError) as err:
        load_splits(DataArguments(dataset="amazon_polarity"))
    assert f"HF_HUB_OFFLINE=1 is set and the local cache holds it ({snapshot}) without {named};" in str(err.value)
    assert "`hf download amazon_polarity --repo-type dataset` on a connected machine adds it" in str(err.value)


# ---------------------------------------------------------------------------------------- local files


def _reviews(n: int = 40) -> list[dict]:
    return [
        {"review": f"review number {i} was {'great' if i % 2 else 'awful'}", "stars": ["neg", "pos"][i % 2]}
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["data.csv", "data.jsonl", "data.json", "data.parquet"])
def test_local_formats_with_named_columns_and_labels(write_data: Callable[..., Path], name: str) -> None:
    path = write_data(_reviews(), name)
    args = DataArguments(dataset=str(path), text_column="review", label_column="stars", label_names=["neg", "pos"])
    splits = load_splits(args)
    assert sum(len(splits[s]) for s in SPLITS) == 40
    for split in SPLITS:
        assert set(splits[split]["label"]) == {0, 1}  # stratified
        pairs = zip(splits[split]["text"], splits[split]["label"], strict=True)
        assert all(text.endswith("great" if label else "awful") for text, label in pairs)


def test_integer_label_ids_and_split_column(write_data: Callable[..., Path]) -> None:
    split_of = ["train"] * 6 + ["validation", "validation", "test", "test"]
    rows = [{"text": f"text {i}", "label": i % 2, "split": split} for i, split in enumerate(split_of)]
    splits = load_splits(DataArguments(dataset=str(write_data(rows, "data.jsonl"))))
    assert [len(splits[s]) for s in SPLITS] == [6, 2, 2]
    assert splits["test"]["text"] == ["text 8", "text 9"] and splits["test"]["label"] == [0, 1]


def test_missing_test_rows_are_carved_from_train(write_data: Callable[..., Path]) -> None:
    rows = [{"text": f"t {i}", "label": i % 2, "split": "validation" if i < 4 else "train"} for i in range(24)]
    splits = load_splits(DataArguments(dataset=str(write_data(rows)), test_fraction=0.25))
    assert [len(splits[s]) for s in SPLITS] == [15, 4, 5]


def test_a_fraction_for_a_split_the_split_column_gives_is_refused(write_data: Callable[..., Path]) -> None:
    """The column's validation rows would silently replace the asked-for share; a fraction it leaves to carve acts."""
    rows = [{"text": f"t {i}", "label": i % 2, "split": "validation" if i < 4 else "train"} for i in range(24)]
    path = write_data(rows)
    with pytest.raises(ConfigError, match=r"--validation_fraction 0.3 has no effect: .*'split' column gives the valid"):
        load_splits(DataArguments(dataset=str(path), validation_fraction=0.3))
    splits = load_splits(DataArguments(dataset=str(path), test_fraction=0.25))  # test is carved: its share is read
    assert [len(splits[s]) for s in SPLITS] == [15, 4, 5]


def test_large_file_loads(write_data: Callable[..., Path]) -> None:
    n = 100_000
    frame = pd.DataFrame({"text": [f"review {i} " * 5 for i in range(n)], "label": [i % 2 for i in range(n)]})
    path = write_data(frame, "big.parquet")
    splits = load_splits(DataArguments(dataset=str(path), max_train_samples=1000, max_test_samples=1000))
    assert len(splits["train"]) == 1000 and len(splits["validation"]) == 15_000


# ---------------------------------------------------------------------------------------- bad data


def _refused(path: Path, **kwargs: object) -> str:
    with pytest.raises(DataError) as err:
        load_splits(DataArguments(dataset=str(path), **kwargs))
    return str(err.value)


def test_file_not_found(tmp_path: Path) -> None:
    message = _refused(tmp_path / "nope.csv")
    assert "not found" in message and "--dataset offline:vader-amazon" in message


def test_wrong_extension(write_data: Callable[..., Path]) -> None:
    message = _refused(write_data(raw=b"text,label\na,0\n", name="data.txt"))
    assert ".csv, .jsonl, .json, .parquet" in message


def test_empty_file(write_data: Callable[..., Path]) -> None:
    assert "is empty (0 bytes)" in _refused(write_data(raw=b"", name="data.csv"))


def test_header_only_file(write_data: Callable[..., Path]) -> None:
    assert "has no data rows" in _refused(write_data(raw=b"text,label\n", name="data.csv"))


def test_missing_columns_list_present_ones_and_the_option(write_data: Callable[..., Path]) -> None:
    message = _refused(write_data(_reviews()))
    assert "no column 'text' and 'label'" in message and "['review', 'stars']" in message
    assert "--text_column NAME / --label_column NAME" in message


def test_empty_or_whitespace_text_names_rows(write_data: Callable[..., Path]) -> None:
    rows = [{"text": t, "label": 0} for t in ["fine", "", "ok", "   \t", "good"]]
    message = _refused(write_data(rows))
    assert "rows 2, 4" in message and "whitespace-only" in message


def test_invisible_text_names_rows(write_data: Callable[..., Path]) -> None:
    """Texts of control or zero-width characters only: every tokenizer's normaliser leaves them empty."""
    texts = ["fine", "\u200b", "ok", "\x07", "\ufeff \u200d", "\x7f", "good\u200b", "\u00a0\u3000"]
    message = _refused(write_data([{"text": t, "label": i % 2} for i, t in enumerate(texts)]))
    assert "rows 2, 4, 5, 6, 8 " in message and "invisible (control or zero-width characters only)" in message


def test_non_utf8_names_line_and_byte_offset(write_data: Callable[..., Path]) -> None:
    path = write_data(raw=b"text,label\ngood,0\ncaf\xe9 au lait,1\n", name="data.csv")
    message = _refused(path)
    assert "line 3 (byte offset 21)" in message and "not UTF-8" in message and "iconv" in message


def test_a_label_named_like_the_macro_averages_is_refused() -> None:
    """Per-class scores are keyed f1_<name>: a class named 'macro' would overwrite f1_macro, the macro average."""
    with pytest.raises(ConfigError, match="may not be named 'macro'"):
        DataArguments(label_names=["macro", "micro"])


def test_labels_outside_label_names(write_data: Callable[..., Path]) -> None:
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["positive", "neutral", "2", "negative"])]
    message = _refused(write_data(rows))
    assert "'neutral', '2'" in message and "rows 2, 3" in message
    assert "['negative', 'positive']" in message and "--label_names" in message


def test_unknown_split_values(write_data: Callable[..., Path]) -> None:
    rows = [{"text": "t", "label": 0, "split": s} for s in ["train", "dev", "test"]]
    message = _refused(write_data(rows))
    assert "['dev']" in message and "row" in message and "['train', 'validation', 'test']" in message


def test_split_too_small_for_requested_size(write_data: Callable[..., Path]) -> None:
    message = _refused(
        write_data(_reviews(), "data.jsonl"),
        text_column="review",
        label_column="stars",
        label_names=["neg", "pos"],
        max_train_samples=500,
    )
    assert "max_train_samples=500" in message and "--max_train_samples to at most" in message


def test_empty_split(write_data: Callable[..., Path]) -> None:
    message = _refused(write_data([{"text": f"t{i}", "label": i % 2} for i in range(10)]), test_fraction=0.0)
    assert "test split is empty" in message and "--test_fraction" in message


def test_single_class_train_split(write_data: Callable[..., Path]) -> None:
    rows = [{"text": f"t{i}", "label": "positive", "split": "train"} for i in range(6)]
    rows += [{"text": f"e{i}", "label": ["negative", "positive"][i % 2], "split": "test"} for i in range(4)]
    message = _refused(write_data(rows), validation_fraction=0.3)
    assert "train split" in message and "single class ('positive'" in message


def test_non_text_values_in_parquet(write_data: Callable[..., Path]) -> None:
    path = write_data(pd.DataFrame({"text": [b"\xff\xfe", b"ok"], "label": [0, 1]}), "data.parquet")
    assert "non-text values in rows 1, 2" in _refused(path)


# ------------------------------------------------------------------------------------ the user's own data


def _labels_of(path: Path, **kwargs: object) -> dict[str, int]:
    """text -> label id over all three splits."""
    splits = load_splits(DataArguments(dataset=str(path), **kwargs))
    return {text: label for s in SPLITS for text, label in zip(splits[s]["text"], splits[s]["label"], strict=True)}


def test_a_label_reads_the_same_from_every_format(write_data: Callable[..., Path]) -> None:
    """'Positive ', ' NEGATIVE', pandas' 1.0 (a column with a NaN once) and Parquet's integer stars all name their
    class, whichever format carries them."""
    texts = [f"review {i}" for i in range(40)]
    names = write_data([{"text": t, "label": [" NEGATIVE", "Positive "][i % 2]} for i, t in enumerate(texts)])
    assert _labels_of(names) == {t: i % 2 for i, t in enumerate(texts)}
    floats = [{"text": t, "label": float(i % 2)} for i, t in enumerate(texts)]
    for name in ("floats.csv", "floats.jsonl", "floats.parquet"):
        assert _labels_of(write_data(floats, name)) == {t: i % 2 for i, t in enumerate(texts)}, name
    stars = [{"text": t, "label": 1 + i % 5} for i, t in enumerate(texts)]
    for name in ("stars.csv", "stars.jsonl", "stars.parquet"):
        got = _labels_of(write_data(stars, name), label_names=["1", "2", "3", "4", "5"])
        assert got == {t: i % 5 for i, t in enumerate(texts)}, name  # star s is class 's', id s - 1
    flags = write_data(pd.DataFrame({"text": texts, "label": [bool(i % 2) for i in range(40)]}), "flags.parquet")
    assert _labels_of(flags, label_names=["False", "True"]) == {t: i % 2 for i, t in enumerate(texts)}


def test_mixed_json_labels_are_read_one_by_one(write_data: Callable[..., Path]) -> None:
    """JSON's 1 and true are equal as Python keys, yet true is no class of negative/positive: it is refused, not read
    as the 1 that came before it."""
    lines = [json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(40)]
    lines[7] = json.dumps({"text": "review 7", "label": True})
    message = _refused(write_data(raw="\n".join(lines).encode(), name="mixed.jsonl"))
    assert "True" in message and "(rows 8)" in message


def test_integer_label_names_are_never_read_as_ids(write_data: Callable[..., Path]) -> None:
    """With stars as names, a 0 is no star: read as id 0 it would silently join class '1'."""
    rows = [{"text": f"review {i}", "label": i % 6} for i in range(36)]
    message = _refused(write_data(rows), label_names=["1", "2", "3", "4", "5"])
    assert "'0'" in message and "never read as ids" in message and "--label_names 0 1 2 3 4 5" in message


def test_unknown_labels_spell_out_the_label_names_fix(write_data: Callable[..., Path]) -> None:
    rows = [{"text": f"review {i}", "label": [1, -1][i % 2]} for i in range(20)]
    assert "e.g. --label_names -1 1." in _refused(write_data(rows, "data.parquet"))
    rows = [{"text": f"review {i}", "label": f"class {i}"} for i in range(20)]
    assert "too many to be classes" in _refused(write_data(rows))


@pytest.mark.parametrize("name", ["data.csv", "data.jsonl", "data.parquet"])
def test_missing_labels_name_their_rows(write_data: Callable[..., Path], name: str) -> None:
    rows = [{"text": f"review {i}", "label": None if i in (3, 7) else float(i % 2)} for i in range(20)]
    message = _refused(write_data(rows, name))
    assert "no label (empty or NaN) in rows 4, 8" in message and "remove them" in message


def test_label_names_must_differ_beyond_case_and_spelling() -> None:
    for names in (["pos", "POS "], ["1", "1.0"], ["neg", " "]):
        with pytest.raises(ConfigError, match="distinct, non-blank"):
            DataArguments(label_names=names)
    assert DataArguments(label_names=[1, 2, 3]).label_names == ["1", "2", "3"]  # a YAML list of numbers


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_byte_order_mark_and_json_lines_in_a_json_file(write_data: Callable[..., Path], name: str) -> None:
    """Windows tools start files with a UTF-8 byte-order mark; `Dataset.to_json` writes JSON Lines to a .json."""
    lines = "".join(f'{{"text": "review {i}", "label": {i % 2}}}\n' for i in range(20))
    path = write_data(raw=b"\xef\xbb\xbf" + lines.encode(), name=name)
    assert _labels_of(path) == {f"review {i}": i % 2 for i in range(20)}


def test_folder_names_the_data_file_inside(tmp_path: Path) -> None:
    folder = tmp_path / "reviews.csv"  # a folder named like a file, as Spark writes them
    folder.mkdir()
    (folder / "part-0.csv").write_text("text,label\ngood,1\n", encoding="utf-8")
    message = _refused(folder)
    assert "is a folder" in message and str(folder / "part-0.csv") in message


def test_semicolon_separated_csv_names_the_separator(write_data: Callable[..., Path]) -> None:
    message = _refused(write_data(raw=b"text;label\ngood;1\nbad;0\n", name="data.csv"))
    assert "['text;label']" in message and "split by ';'" in message and "comma-separated" in message


def test_identical_texts_stay_in_one_split(write_data: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    """Short reviews repeat ('Great product!'): one copy in train and one in test would be a test seen in training.
    Carved splits keep every text in one split, stratified and seeded like any other split."""
    rows = [{"text": f"short review {i % 40}", "label": (i % 40) % 2} for i in range(200)]
    args = DataArguments(dataset=str(write_data(rows)))
    splits, again = load_splits(args), load_splits(args)
    texts = {s: set(splits[s]["text"]) for s in SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert [len(texts[s]) for s in SPLITS] == [28, 6, 6]  # fractions count distinct texts
    assert all(set(splits[s]["label"]) == {0, 1} for s in SPLITS)
    assert all(splits[s]["text"] == again[s]["text"] for s in SPLITS)
    assert "200 rows repeat another row's text (0 texts have rows with different labels)" in caplog.text


def test_split_column_that_parts_identical_texts_warns(
    write_data: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"text": f"t{i % 8}", "label": i % 2, "split": ["train", "validation", "test"][i % 3]} for i in range(24)]
    load_splits(DataArguments(dataset=str(write_data(rows))))
    assert "8 of those texts appear in more than one value of column 'split'" in caplog.text


def test_a_named_class_without_training_rows_is_refused(write_data: Callable[..., Path]) -> None:
    """A class in --label_names with no training rows would get a head output that can never be predicted."""
    rows = [{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(30)]
    message = _refused(write_data(rows), label_names=["negative", "neutral", "positive"])
    assert "train split" in message and "no rows of 'neutral'" in message
    assert "Drop it from --label_names, or add training rows labelled with it." in message
    # Rows of it only in the test split teach the model nothing either.
    split_of = ["train"] * 30 + ["test"] * 3
    rows += [{"text": f"so-so {i}", "label": "neutral"} for i in range(3)]
    rows = [{**row, "split": split} for row, split in zip(rows, split_of, strict=True)]
    message = _refused(write_data(rows), label_names=["negative", "neutral", "positive"], max_train_samples=10)
    assert "no rows of 'neutral'" in message and "--max_train_samples 10 subset" in message


def test_split_fractions_too_large_for_a_tiny_file(write_data: Callable[..., Path]) -> None:
    """Where the carved splits would take every row (or text) left, the error names the fractions and the rows."""
    three = write_data([{"text": t, "label": label} for t, label in (("good", 1), ("bad", 0), ("fine", 1))])
    message = _refused(three, validation_fraction=0.8, test_fraction=0.1)
    assert "its 3 rows" in message and "--validation_fraction 0.8 and --test_fraction 0.1" in message
    assert "the validation split would take 2 of the 2 distinct texts left" in message
    # Repeated texts are carved whole (the stratified split of groups); a source's own test split leaves validation.
    rows = [{"text": f"review {i % 2}", "label": i % 2, "split": "test" if i >= 9 else "train"} for i in range(12)]
    message = _refused(write_data(rows, "repeated.csv"), validation_fraction=0.8)
    assert "its 9 rows" in message and "too few for --validation_fraction 0.8:" in message
    assert "would take 2 of the 2 distinct texts left" in message


@pytest.mark.parametrize(
    ("name", "raw", "format_hint"),
    [
        ("data.csv", b"text,label\ngood,1\nbad,0,extra,cells\n", "a .csv file holds comma-separated values"),
        ("data.parquet", b"not a parquet file", "a .parquet file holds a Parquet table"),
        ("data.jsonl", b'{"text": "good", "label": 1\n', "a .jsonl file holds one JSON object per line"),
    ],
)
def test_a_file_that_cannot_be_parsed_gets_its_own_formats_hint(
    write_data: Callable[..., Path], name: str, raw: bytes, format_hint: str
) -> None:
    message = _refused(write_data(raw=raw, name=name))
    assert "could not be parsed" in message and format_hint in message
    assert "(.jsonl:" not in message  # the JSON formats' hint, once given to every format


def test_gzipped_or_utf16_files_are_named_as_such(write_data: Callable[..., Path]) -> None:
    """Read as UTF-8 both fail at their first bytes, where converting from latin1 would be wrong advice."""
    text = "text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20))
    message = _refused(write_data(raw=gzip.compress(text.encode()), name="data.csv"))
    assert "is gzip-compressed" in message and "gunzip -c data.csv" in message and "latin1" not in message
    for encoding in ("utf-16", "utf-16-be"):
        raw = text.encode(encoding) if encoding == "utf-16" else b"\xfe\xff" + text.encode(encoding)
        message = _refused(write_data(raw=raw, name="data.csv"))
        assert "is UTF-16" in message and "iconv -f UTF-16 -t UTF-8 data.csv" in message and "latin1" not in message
