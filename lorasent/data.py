"""Reviews in, three labelled splits out: train (to fit), validation (to search), test (final evaluation only).

Sources: the embedded offline default (VADER's human-rated Amazon review sentences), `amazon_polarity`
from the Hugging Face hub, or a local .csv / .jsonl / .json / .parquet file. Bad input is refused before
any training starts, with the file, row or column at fault and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from lorasent.assets import vader_amazon_file
from lorasent.config import OFFLINE_DATASET, DataArguments
from lorasent.errors import ConfigError, DataError
from lorasent.hub import load_hub_dataset

SPLITS = ("train", "validation", "test")
AMAZON_POLARITY = "amazon_polarity"
AMAZON_POLARITY_IDS = (AMAZON_POLARITY, "fancyzhx/amazon_polarity")
FILE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_COLUMN = "split"
_SHOWN = 5  # offending rows or values quoted in an error message


def load_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """Load `data_args.dataset` as train / validation / test with columns `text` and `label` (ClassLabel).

    Splits missing from the source are carved out of train (seeded, stratified by label where possible,
    grouped by review for VADER); then each split is subsampled to its max_*_samples (seeded, stratified).
    """
    name = data_args.dataset
    group_column = None
    if name == OFFLINE_DATASET:
        splits, group_column = _vader_splits(data_args), "review_id"
    elif name in AMAZON_POLARITY_IDS:
        splits = _amazon_splits(data_args)
    elif name.startswith("offline:"):
        raise ConfigError(f"Unknown offline dataset {name!r}. The embedded offline dataset is '{OFFLINE_DATASET}'.")
    else:
        splits = _file_splits(Path(name).expanduser(), data_args)
    splits = _complete_splits(splits, data_args, group_column)
    limits = (data_args.max_train_samples, data_args.max_eval_samples, data_args.max_test_samples)
    result = datasets.DatasetDict(
        {split: _subset(splits[split], limit, split, data_args) for split, limit in zip(SPLITS, limits, strict=True)}
    )
    if name in AMAZON_POLARITY_IDS:  # only now, on the subset, not on 3.6M reviews
        result = _amazon_finish(result, data_args)
    for split in SPLITS:
        _require_all_classes(result[split], split, data_args)
    return result


# ---------------------------------------------------------------------------------------------- VADER


_VADER_LINE = re.compile(r"(\d+)_\d+\t(-?\d+(?:\.\d+)?)\t([^\t]*\S[^\t]*)")


def _vader_splits(data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """VADER's Amazon review sentences, binarised from their mean human rating r (-4..+4).

    Rule, with t = neutral_threshold: r >= t is positive, r <= -t is negative, anything in between is
    near-neutral and dropped (with t = 0 only sentences rated exactly 0 are dropped). Ids are
    `<review>_<sentence>`; `review_id` keeps the review so no review is split across train and test.
    """
    _require_binary_labels(data_args, OFFLINE_DATASET)
    path = vader_amazon_file(data_args.cache_dir)
    t = data_args.neutral_threshold
    rows = []
    lines = path.read_bytes().decode("utf-8").removesuffix("\r\n").split("\r\n")
    for number, line in enumerate(lines, start=1):
        match = _VADER_LINE.fullmatch(line)
        if match is None:
            raise DataError(
                f"{path}, line {number}: expected '<review>_<sentence><TAB>rating<TAB>text', got {line!r}. "
                f"Delete {path} so that it is fetched and verified again."
            )
        review_id, rating, text = match[1], float(match[2]), match[3]
        if rating >= t and rating > 0:
            rows.append((text, 1, review_id, rating))
        elif rating <= -t and rating < 0:
            rows.append((text, 0, review_id, rating))
    frame = pd.DataFrame(rows, columns=["text", "label", "review_id", "rating"])
    features = datasets.Features(
        text=datasets.Value("string"),
        label=datasets.ClassLabel(names=data_args.label_names),
        review_id=datasets.Value("string"),
        rating=datasets.Value("float32"),
    )
    return {"train": datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)}


# ------------------------------------------------------------------------------------- amazon_polarity


def _amazon_splits(data_args: DataArguments) -> dict[str, datasets.Dataset]:
    _require_binary_labels(data_args, AMAZON_POLARITY)
    raw = load_hub_dataset(data_args.dataset)
    return {split: raw[split] for split in ("train", "test")}


def _amazon_finish(splits: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    """Build `text` ('title. content', no extra period after ! or ?, or the content alone) and name the labels."""

    def text(title: str, content: str) -> str:
        title, content = title.strip(), content.strip()
        if data_args.amazon_text == "content" or not title:
            return content
        return f"{title} {content}" if title[-1] in ".!?" else f"{title}. {content}"

    features = datasets.Features(label=datasets.ClassLabel(names=data_args.label_names), text=datasets.Value("string"))
    return splits.map(
        lambda batch: {"text": [text(t, c) for t, c in zip(batch["title"], batch["content"], strict=True)]},
        batched=True,
        remove_columns=["title", "content"],
        features=features,
    )


def _require_binary_labels(data_args: DataArguments, source: str) -> None:
    if len(data_args.label_names) != 2:
        raise ConfigError(
            f"{source} has two classes (negative, positive) but label_names is {data_args.label_names}. "
            "Set --label_names to two names, negative first (e.g. --label_names negative positive)."
        )


# ------------------------------------------------------------------------------------------ local files


def _file_splits(path: Path, data_args: DataArguments) -> dict[str, datasets.Dataset]:
    frame = _read_table(path)
    text_col, label_col = data_args.text_column, data_args.label_column
    wanted = (("--text_column", text_col), ("--label_column", label_col))
    missing = [(option, col) for option, col in wanted if col not in frame.columns]
    if missing:
        names = " and ".join(f"'{col}'" for _, col in missing)
        options = " / ".join(f"{option} NAME" for option, _ in missing)
        raise DataError(
            f"{path} has no column {names}; its columns are {list(map(str, frame.columns))}. "
            f"Set {options} to the column(s) holding the text and the label."
        )
    _check_text(frame[text_col], path, text_col)
    table = pd.DataFrame(
        {"text": frame[text_col].to_numpy(), "label": _label_ids(frame[label_col], path, label_col, data_args)}
    )
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=data_args.label_names))
    if SPLIT_COLUMN not in frame.columns:
        return {"train": datasets.Dataset.from_pandas(table, features=features, preserve_index=False)}
    split_of = frame[SPLIT_COLUMN].astype(str).str.strip().str.lower().to_numpy()
    unknown = sorted(set(split_of) - set(SPLITS))
    if unknown:
        rows = _rows(~np.isin(split_of, SPLITS))
        raise DataError(
            f"{path}: column '{SPLIT_COLUMN}' holds {unknown[:_SHOWN]} (rows {rows}); allowed values are "
            f"{list(SPLITS)}. Fix those rows, or drop the column to split randomly by --validation_fraction "
            "and --test_fraction."
        )
    return {
        split: datasets.Dataset.from_pandas(table[split_of == split], features=features, preserve_index=False)
        for split in SPLITS
        if (split_of == split).any()
    }


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(
            f"Data file {path} not found. Check the path, or use --dataset {OFFLINE_DATASET} (offline) or "
            f"--dataset {AMAZON_POLARITY} (Hugging Face hub)."
        )
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in FILE_EXTENSIONS:
        raise DataError(
            f"{path} is not a supported data file: use a file ending in {', '.join(FILE_EXTENSIONS)} "
            "(convert it, or rename it if its content already is one of these formats)."
        )
    if path.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty (0 bytes). Put a header and labelled rows in it.")
    try:
        if suffix == ".csv":
            # Everything as text and empty cells as "", so labels like "01" or "NA" are judged as written.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise _non_utf8_error(path) from None
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise DataError(
            f"{path} could not be parsed as {suffix[1:].upper()}: {e}. Check the file's format "
            "(.jsonl: one JSON object per line; .json: a JSON array of objects)."
        ) from e
    if frame.empty:
        raise DataError(f"Data file {path} has no data rows. Add labelled rows below the header.")
    return frame


def _non_utf8_error(path: Path) -> DataError:
    """Name the first line and byte offset that are not UTF-8, reading line by line (fine for huge files)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(
                    f"{path}, line {number} (byte offset {offset + e.start}): bytes {line[e.start : e.end]!r} are "
                    "not UTF-8. Re-save the file as UTF-8 (e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`) or fix that line."
                )
            offset += len(line)
    return DataError(f"{path} is not valid UTF-8. Re-save it as UTF-8.")


def _rows(mask: np.ndarray) -> str:
    """The first offending rows, 1-based (row 1 is the first data row, after any header)."""
    rows = np.flatnonzero(mask) + 1
    shown = ", ".join(map(str, rows[:_SHOWN]))
    return shown if len(rows) <= _SHOWN else f"{shown} and {len(rows) - _SHOWN} more"


def _check_text(texts: pd.Series, path: Path, column: str) -> None:
    bad = ~texts.map(lambda v: isinstance(v, str) and bool(v.strip())).to_numpy(dtype=bool)
    if bad.any():
        raise DataError(
            f"{path}: column '{column}' has empty, whitespace-only or non-text values in rows {_rows(bad)} "
            "(1-based data rows). Fill in or remove those rows."
        )


def _label_ids(labels: pd.Series, path: Path, column: str, data_args: DataArguments) -> np.ndarray:
    """Map each label to its id: a label name, or an id 0..n-1 written as a number or digits."""
    names = data_args.label_names
    by_name = {name: index for index, name in enumerate(names)}

    def to_id(value: object) -> int:
        if isinstance(value, str):
            value = value.strip()
            if value in by_name:
                return by_name[value]
            if value.isdigit():
                value = int(value)
        numeric = isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, bool)
        if numeric and float(value).is_integer() and 0 <= value < len(names):
            return int(value)
        return -1

    ids = np.fromiter((to_id(v) for v in labels), dtype=np.int64, count=len(labels))
    bad = ids < 0
    if bad.any():
        values = list(dict.fromkeys(map(repr, labels[bad])))
        raise DataError(
            f"{path}: column '{column}' has labels outside label_names {names}: {', '.join(values[:_SHOWN])} "
            f"(rows {_rows(bad)}). Labels must be one of those names or an id 0..{len(names) - 1}. Set "
            "--label_names to every class in id order (e.g. --label_names negative neutral positive), or fix "
            "those rows."
        )
    return ids


# ------------------------------------------------------------------------------- splitting and subsets


def _complete_splits(
    splits: dict[str, datasets.Dataset], data_args: DataArguments, group_column: str | None
) -> dict[str, datasets.Dataset]:
    """Carve test, then validation, out of train where the source lacks them."""
    if "train" not in splits:
        raise DataError(
            f"{data_args.dataset} has no training rows. Mark training rows with split=train, or drop the "
            f"'{SPLIT_COLUMN}' column to split randomly."
        )
    splits = dict(splits)
    test_share = 0.0 if "test" in splits else data_args.test_fraction
    for split, share in (("test", test_share), ("validation", data_args.validation_fraction)):
        if split in splits:
            continue
        fraction = share / (1 - test_share) if split == "validation" else share
        option = f"--{split}_fraction"
        if fraction <= 0:
            raise DataError(f"The {split} split is empty because {option} is 0. Set {option} > 0.")
        splits["train"], splits[split] = _carve(splits["train"], fraction, data_args.data_seed, group_column, split)
    return splits


def _carve(
    ds: datasets.Dataset, fraction: float, seed: int, group_column: str | None, split: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off `fraction` of `ds`: of whole groups if `group_column`, else of rows, stratified where possible."""
    if len(ds) < 2:
        raise DataError(
            f"Only {len(ds)} row(s) left to carve the {split} split from. Provide more data or a '{SPLIT_COLUMN}' "
            "column."
        )
    if group_column is None:
        return _stratified_split(ds, max(1, round(fraction * len(ds))), seed)
    groups = _column(ds, group_column)
    if len(set(groups)) < 2:
        raise DataError(f"Only one {group_column} left: cannot carve a {split} split without sharing it.")
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    keep, carved = next(splitter.split(groups, groups=groups))
    return ds.select(np.sort(keep)), ds.select(np.sort(carved))


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read as a single Arrow batch (row-wise access is far slower)."""
    return np.asarray(ds.with_format("numpy", columns=[name])[:][name])


def _stratified_split(ds: datasets.Dataset, size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, picked) with `size` rows picked at random, keeping class shares where the counts allow it."""
    rows = np.arange(len(ds))
    try:
        rest, picked = train_test_split(rows, test_size=size, random_state=seed, stratify=_column(ds, "label"))
    except ValueError:  # a class too small to stratify on: a plain random split is the best we can do
        rest, picked = train_test_split(rows, test_size=size, random_state=seed)
    return ds.select(rest), ds.select(picked)


def _subset(ds: datasets.Dataset, limit: int | None, split: str, data_args: DataArguments) -> datasets.Dataset:
    option = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_test_samples"}[split]
    if len(ds) == 0:
        raise DataError(
            f"The {split} split of {data_args.dataset} is empty. Add rows to it, or raise the fraction carved for it."
        )
    if limit is None or limit == len(ds):
        return ds
    if limit > len(ds):
        raise DataError(
            f"{option}={limit} but the {split} split of {data_args.dataset} has only {len(ds)} rows. Lower "
            f"--{option} to at most {len(ds)}, or --{option} none to use every row."
        )
    return _stratified_split(ds, limit, data_args.data_seed)[1]


def _require_all_classes(ds: datasets.Dataset, split: str, data_args: DataArguments) -> None:
    present = set(np.unique(_column(ds, "label")).tolist())
    if len(present) < 2:
        only = data_args.label_names[present.pop()] if present else "none"
        raise DataError(
            f"The {split} split of {data_args.dataset} holds a single class ('{only}', {len(ds)} rows); a classifier "
            "needs at least two. Include examples of every class, and check --label_column and --label_names."
        )
