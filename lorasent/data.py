"""Reviews in, three labelled splits out: train (to fit), validation (to search), test (final evaluation only).

Sources: the embedded offline default (VADER's human-rated Amazon review sentences), `amazon_polarity`
from the Hugging Face hub, or a local .csv / .jsonl / .json / .parquet file. Bad input is refused before
any training starts, with the file, row or column at fault and the fix.
"""

from __future__ import annotations

import logging
import re
import shlex
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from lorasent.assets import vader_amazon_file
from lorasent.config import (
    AMAZON_POLARITY,
    AMAZON_POLARITY_IDS,
    INTEGER_LABEL,
    OFFLINE_DATASET,
    DataArguments,
    differs_from_default,
    label_key,
)
from lorasent.errors import ConfigError, DataError
from lorasent.hub import load_hub_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SUBSET_OPTIONS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_test_samples"}
_FORMATS = {  # each file type, and what a file of it holds (named when one cannot be parsed)
    ".csv": "comma-separated values under a header row; a cell holding a comma, quote or line break is quoted",
    ".jsonl": "one JSON object per line",
    ".json": "a JSON array of objects, or one object per line",
    ".parquet": "a Parquet table, as pandas' DataFrame.to_parquet writes it",
}
FILE_EXTENSIONS = tuple(_FORMATS)
SPLIT_COLUMN = "split"
_SHOWN = 5  # offending rows or values quoted in an error message


def load_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """Load `data_args.dataset` as train / validation / test with columns `text` and `label` (ClassLabel).

    Splits missing from the source are carved out of train (seeded, stratified by label where possible,
    grouped by review for VADER and by identical text for a local file; amazon_polarity's 3.6M are split by row);
    then each split is subsampled to its max_*_samples (seeded, stratified).
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
        splits, group_column = _file_splits(Path(name).expanduser(), data_args), "text"
    splits = _complete_splits(splits, data_args, group_column)
    result = datasets.DatasetDict({split: _subset(splits[split], split, data_args) for split in SPLITS})
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


def labelled_rows(path: Path, data_args: DataArguments) -> datasets.Dataset:
    """Every row of a local file (text, label), read, checked and labelled as training reads it; a split column is
    not read. For scoring a model on new labelled data."""
    _, table = _labelled_table(path, data_args)
    return datasets.Dataset.from_pandas(table, features=_features(data_args), preserve_index=False)


def _features(data_args: DataArguments) -> datasets.Features:
    return datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=data_args.label_names))


def _labelled_table(path: Path, data_args: DataArguments) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the file as read, its rows as text and label id), the columns and texts checked."""
    frame = read_table(path)
    text_col, label_col = data_args.text_column, data_args.label_column
    wanted = (("--text_column", text_col), ("--label_column", label_col))
    missing = [(option, col) for option, col in wanted if col not in frame.columns]
    if missing:
        names = " and ".join(f"'{col}'" for _, col in missing)
        options = " / ".join(f"{option} NAME" for option, _ in missing)
        raise DataError(
            f"{path} has no column {names}; its columns are {list(map(str, frame.columns))}. "
            f"Set {options} to the column(s) holding the text and the label.{_separator_hint(frame)}"
        )
    _check_text(frame[text_col], path, text_col)
    table = pd.DataFrame(
        {"text": frame[text_col].to_numpy(), "label": _label_ids(frame[label_col], path, label_col, data_args)}
    )
    return frame, table


def _file_splits(path: Path, data_args: DataArguments) -> dict[str, datasets.Dataset]:
    frame, table = _labelled_table(path, data_args)
    features = _features(data_args)
    if SPLIT_COLUMN not in frame.columns:
        _warn_about_duplicates(table, path, None)
        return {"train": datasets.Dataset.from_pandas(table, features=features, preserve_index=False)}
    split_of = frame[SPLIT_COLUMN].astype(str).str.strip().str.lower().to_numpy()
    _warn_about_duplicates(table, path, split_of)
    unknown = sorted(set(split_of) - set(SPLITS))
    if unknown:
        rows = _rows(~np.isin(split_of, SPLITS))
        raise DataError(
            f"{path}: column '{SPLIT_COLUMN}' holds {unknown[:_SHOWN]} (rows {rows}); allowed values are "
            f"{list(SPLITS)}. Fix those rows, or drop the column to split randomly by --validation_fraction "
            "and --test_fraction."
        )
    given = set(split_of)
    _refuse_unread_fractions(path, data_args, [split for split in SPLITS if split in given])
    return {
        split: datasets.Dataset.from_pandas(table[split_of == split], features=features, preserve_index=False)
        for split in SPLITS
        if split in given
    }


def _refuse_unread_fractions(path: Path, data_args: DataArguments, given: list[str]) -> None:
    """A --validation_fraction or --test_fraction set away from its default for a split the file's split column
    already gives would be ignored (the README's rule: an option that has no effect is refused, not ignored)."""
    for split in ("validation", "test"):
        option = f"{split}_fraction"
        if split in given and differs_from_default(data_args, option):
            raise ConfigError(
                f"--{option} {getattr(data_args, option):g} has no effect: {path}'s '{SPLIT_COLUMN}' column gives "
                f"the {split} rows. Drop --{option}, or drop the column to carve the splits by the fractions."
            )


def _warn_about_duplicates(table: pd.DataFrame, path: Path, split_of: np.ndarray | None) -> None:
    """Say what repeated texts do to the splits: carved splits keep them together, a split column may part them."""
    repeated = table["text"].duplicated(keep=False).to_numpy()
    if not repeated.any():
        return
    texts = table["text"].to_numpy()[repeated]
    conflicting = int((table[repeated].groupby("text")["label"].nunique() > 1).sum())
    labelled = f"{conflicting} {'text has' if conflicting == 1 else 'texts have'} rows with different labels"
    note = f"{path}: {repeated.sum()} rows repeat another row's text ({labelled})."
    if split_of is None:
        logger.warning("%s Identical texts are kept in one split, so split fractions count distinct texts.", note)
        return
    parted = int((pd.Series(split_of[repeated]).groupby(texts).nunique() > 1).sum())
    if parted:
        logger.warning(
            "%s %d of those texts appear in more than one value of column '%s': scores on a split that shares texts "
            "with train are optimistic. Put each text in one split, or drop the column to split randomly.",
            note,
            parted,
            SPLIT_COLUMN,
        )


def read_table(path: Path) -> pd.DataFrame:
    """A data file as a DataFrame (CSV cells as text), or a DataError that names what is wrong with it."""
    if not path.exists():
        raise DataError(
            f"Data file {path} not found. Check the path, or use --dataset {OFFLINE_DATASET} (offline) or "
            f"--dataset {AMAZON_POLARITY} (Hugging Face hub)."
        )
    suffix = path.suffix.lower()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FILE_EXTENSIONS)[:_SHOWN]
        raise DataError(
            f"{path} is a folder; --dataset takes one data file. Point it at the file itself"
            + (f", e.g. {path / inside[0]} (the folder holds {inside})." if inside else ".")
        )
    if suffix not in FILE_EXTENSIONS:
        raise DataError(
            f"{path} is not a supported data file: use a file ending in {', '.join(FILE_EXTENSIONS)} "
            "(convert it, or rename it if its content already is one of these formats)."
        )
    if path.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty (0 bytes). Put a header and labelled rows in it.")
    _refuse_compressed_or_utf16(path)
    try:
        if suffix == ".csv":
            # Everything as text and empty cells as "", so labels like "01" or "NA" are judged as written.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = _read_json(path, lines=suffix == ".jsonl")
    except UnicodeDecodeError:
        raise _non_utf8_error(path) from None
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise DataError(
            f"{path} could not be parsed as {suffix[1:].upper()}: {str(e).strip().rstrip('.')}. Check the file's "
            f"format: a {suffix} file holds {_FORMATS[suffix]}."
        ) from e
    if frame.empty:
        raise DataError(f"Data file {path} has no data rows. Add labelled rows below the header.")
    return frame


def _read_json(path: Path, lines: bool) -> pd.DataFrame:
    """A .jsonl file, or a .json file holding an array of objects or, as `Dataset.to_json` writes it, JSON Lines.

    Read as utf-8-sig: Windows tools start JSON files with a byte-order mark, which is no JSON.
    """
    if not lines:
        try:
            return pd.read_json(path, dtype=False, encoding="utf-8-sig")
        except ValueError as e:
            if "Trailing data" not in str(e):  # more than one top-level value: JSON Lines
                raise
    return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")


def _separator_hint(frame: pd.DataFrame) -> str:
    """Where a CSV header came out as one column, the separator it really uses (Excel in many locales writes ';')."""
    header = str(frame.columns[0]) if len(frame.columns) == 1 else ""
    separator = next((sep for sep in (";", "\t", "|") if sep in header), None)
    return f" Its header is one column split by {separator!r}: save the file comma-separated." if separator else ""


def _refuse_compressed_or_utf16(path: Path) -> None:
    """Name a gzipped or UTF-16 file as such: read as UTF-8 it fails on its first bytes, which are no latin1 text."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        raise DataError(
            f"{path} is gzip-compressed (it starts with gzip's magic bytes 1f 8b). Decompress it first, e.g. "
            f"`gunzip -c {path.name} > plain-{path.name}`, and pass that file."
        )
    if head in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark, as Excel's 'Unicode Text' and PowerShell "
            f"save files). Re-save it as UTF-8, e.g. `iconv -f UTF-16 -t UTF-8 {path.name} > utf8-{path.name}`."
        )


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


_INVISIBLE = ("Cc", "Cf")  # Unicode's control and format characters


def _has_text(value: object) -> bool:
    """A string with a visible character. Tokenizers' normalisers delete control and format characters (a zero-width
    space, a stray byte-order mark): a text of only those, and spaces, would train as an empty text."""
    return isinstance(value, str) and any(not c.isspace() and unicodedata.category(c) not in _INVISIBLE for c in value)


def _check_text(texts: pd.Series, path: Path, column: str) -> None:
    bad = ~texts.map(_has_text).to_numpy(dtype=bool)
    if bad.any():
        raise DataError(
            f"{path}: column '{column}' has empty, whitespace-only, invisible (control or zero-width characters only) "
            f"or non-text values in rows {_rows(bad)} (1-based data rows). Fill in or remove those rows."
        )


_MISSING, _UNKNOWN = -2, -1  # label ids of rows without a label / with a label that names no class


def _label_text(value: object) -> str | None:
    """A label as a CSV cell shows it (1.0 -> '1', True -> 'True'), None where it is missing (NaN, None, '')."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value).strip() or None


def _label_ids(labels: pd.Series, path: Path, column: str, data_args: DataArguments) -> np.ndarray:
    """Map each label to its id: a label name (see `label_key`), or else an id 0..n-1 where no name is an integer.

    The same label reads the same from every format: CSV's '1.0', JSONL's 1.0 and Parquet's 1 are one label.
    """
    names = data_args.label_names
    by_key = {label_key(name): index for index, name in enumerate(names)}
    ids_allowed = not any(INTEGER_LABEL.fullmatch(name.strip()) for name in names)  # else '1' could be id or name

    def to_id(value: object) -> int:
        text = _label_text(value)
        if text is None:
            return _MISSING
        key = label_key(text)
        if key in by_key:
            return by_key[key]
        if ids_allowed and INTEGER_LABEL.fullmatch(text) and 0 <= int(key) < len(names):
            return int(key)
        return _UNKNOWN

    if labels.dtype == object:  # mixed Python values (JSON): 1 and True are equal as keys, yet read differently
        ids = np.fromiter((to_id(v) for v in labels), dtype=np.int64, count=len(labels))
    else:  # one type throughout: read each distinct label once (a label column holds a handful)
        codes, distinct = pd.factorize(labels, use_na_sentinel=False)
        ids = np.array([to_id(v) for v in distinct], np.int64)[codes]
    missing = ids == _MISSING
    if missing.any():
        raise DataError(
            f"{path}: column '{column}' has no label (empty or NaN) in rows {_rows(missing)}. Label those rows or "
            "remove them."
        )
    unknown = ids == _UNKNOWN
    if unknown.any():
        values = list(dict.fromkeys(map(repr, labels[unknown])))
        rule = f"or an id 0..{len(names) - 1}" if ids_allowed else "(integers themselves, so never read as ids)"
        raise DataError(
            f"{path}: column '{column}' has labels outside label_names {names}: {', '.join(values[:_SHOWN])} "
            f"(rows {_rows(unknown)}). Labels must be one of those names {rule}. {_label_names_hint(labels)}"
        )
    return ids


def _label_names_hint(labels: pd.Series) -> str:
    """The fix: --label_names spelled out from the column's own values, where they are few enough to be classes."""
    found: dict[str, str] = {}
    for text in filter(None, map(_label_text, labels.drop_duplicates())):
        found.setdefault(label_key(text), text)
    if len(found) > 10:
        return f"Check --label_column: '{labels.name}' holds {len(found)} distinct values, too many to be classes."
    order = sorted(found, key=lambda key: (0, int(key), "") if INTEGER_LABEL.fullmatch(key) else (1, 0, key))
    return (
        f"The column holds {[found[key] for key in order]}: if those are the classes, set --label_names to them in id "
        f"order, e.g. --label_names {shlex.join(found[key] for key in order)}."
    )


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
    shares = {"test": test_share, "validation": data_args.validation_fraction}  # test first, then validation
    missing = {split: share for split, share in shares.items() if split not in splits}
    options = " and ".join(f"--{split}_fraction {share:g}" for split, share in reversed(missing.items()))
    too_few = f"{data_args.dataset}: its {len(splits['train'])} rows to carve splits from are too few for {options}"
    for split, share in missing.items():
        fraction = share / (1 - test_share) if split == "validation" else share
        option = f"--{split}_fraction"
        if fraction <= 0:
            raise DataError(f"The {split} split is empty because {option} is 0. Set {option} > 0.")
        carved = _carve(splits["train"], fraction, data_args.data_seed, group_column, split, too_few)
        splits["train"], splits[split] = carved
    return splits


def _carve(
    ds: datasets.Dataset, fraction: float, seed: int, group_column: str | None, split: str, too_few: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off `fraction` of `ds`: of whole groups if `group_column`, else of rows, stratified where possible.

    `group_column="text"` keeps identical texts together (one in train and one in test would be a test seen in
    training), stratified, and gives the plain row split where no text repeats. `too_few` begins the error where
    the split would leave nothing to train on.
    """
    if group_column is None:
        return _stratified_split(ds, _carved_size(fraction, len(ds), "rows", split, too_few), seed)
    if group_column == "text":
        texts = pd.factorize(_column(ds, "text"))[0]
        distinct = int(texts.max()) + 1
        if distinct < 2 and len(ds) > 1:
            raise DataError(f"Every row left has the same text: cannot carve a {split} split without sharing it.")
        size = _carved_size(fraction, distinct, "distinct texts", split, too_few)
        return _stratified_split(ds, size, seed, texts if distinct < len(ds) else None)
    groups = _column(ds, group_column)
    if len(set(groups)) < 2:
        raise DataError(f"Only one {group_column} left: cannot carve a {split} split without sharing it.")
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    keep, carved = next(splitter.split(groups, groups=groups))
    return _take_rows(ds, np.sort(keep)), _take_rows(ds, np.sort(carved))


def _carved_size(fraction: float, units: int, unit: str, split: str, too_few: str) -> int:
    """How many of the `units` rows or texts left the split takes: at least one, and never all, which sklearn would
    refuse with a bare ValueError after the data was read."""
    size = max(1, round(fraction * units))
    if size >= units:
        raise DataError(
            f"{too_few}: the {split} split would take {size} of the {units} {unit} left, leaving none to train on. "
            f"Lower the fractions, add rows, or give each row its split in a '{SPLIT_COLUMN}' column."
        )
    return size


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read as a single Arrow batch (row-wise access is far slower)."""
    return np.asarray(ds.with_format("numpy", columns=[name])[:][name])


def _take_rows(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """The rows of `ds` at `indices`, copied into a table of their own by pyarrow's `take` (C++, one pass).

    `Dataset.select` would keep an indices mapping instead, and whatever reads through one gathers it row by row: a
    `map` over 920k such rows (amazon_polarity's text building) took 18-25 s against 2.3-4.4 s (bench/RESULTS.md, C16).
    The price is a copy in memory of the rows kept (~1.6 GB for amazon_polarity's training split).
    """
    if ds._indices is not None:  # never one of lorasent's own splits, which all come from here or a plain table
        ds = ds.flatten_indices()
    rows = InMemoryTable(ds.data.table.take(indices))
    return datasets.Dataset(rows, info=ds.info.copy(), split=ds.split, fingerprint=generate_random_fingerprint())


def _stratified_split(
    ds: datasets.Dataset, size: int, seed: int, groups: np.ndarray | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, picked) with `size` rows picked at random, keeping class shares where the counts allow it.

    With `groups` (a group id 0..k-1 per row), `size` whole groups are picked, stratified by each group's first label.
    """
    labels = _column(ds, "label")
    if groups is not None:
        labels = labels[np.unique(groups, return_index=True)[1]]  # each group's first row's label
    units = np.arange(len(labels))
    try:
        rest, picked = train_test_split(units, test_size=size, random_state=seed, stratify=labels)
    except ValueError:  # a class too small to stratify on: a plain random split is the best we can do
        rest, picked = train_test_split(units, test_size=size, random_state=seed)
    if groups is not None:
        chosen = np.isin(groups, picked)
        rest, picked = np.flatnonzero(~chosen), np.flatnonzero(chosen)
    return _take_rows(ds, rest), _take_rows(ds, picked)


def describe_rows(data_args: DataArguments, rows: dict[str, int]) -> str:
    """How many rows each split holds, and the limits that cut them (the presets' subsets of a user's file)."""
    counts = " / ".join(f"{rows[split]:,} {split}" for split in SUBSET_OPTIONS)
    options = SUBSET_OPTIONS.values()
    limits = [f"--{option} {getattr(data_args, option)}" for option in options if getattr(data_args, option)]
    cut = f" ({', '.join(limits)}; 'none' takes all)" if limits else ""
    return f"Data: {counts} rows of {data_args.dataset}{cut}"


def _subset(ds: datasets.Dataset, split: str, data_args: DataArguments) -> datasets.Dataset:
    option = SUBSET_OPTIONS[split]
    limit = getattr(data_args, option)
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
    """Two classes in every split, and every named class in train: a class without training rows would get a head
    output the model can never learn to predict, and train without a word of warning."""
    present = set(np.unique(_column(ds, "label")).tolist())
    if len(present) < 2:
        only = data_args.label_names[present.pop()] if present else "none"
        raise DataError(
            f"The {split} split of {data_args.dataset} holds a single class ('{only}', {len(ds)} rows); a classifier "
            "needs at least two. Include examples of every class, and check --label_column and --label_names."
        )
    absent = [name for index, name in enumerate(data_args.label_names) if index not in present]
    if split == "train" and absent:
        limit, it = data_args.max_train_samples, "it" if len(absent) == 1 else "them"
        raise DataError(
            f"The train split of {data_args.dataset} has no rows of {', '.join(map(repr, absent))}, named in "
            f"--label_names {data_args.label_names}: the model could never learn to predict {it}. Drop {it} from "
            f"--label_names, or add training rows labelled with {it}"
            + (
                f". If the data holds {it}, the --max_train_samples {limit} subset left {it} out: raise it."
                if limit
                else "."
            )
        )
