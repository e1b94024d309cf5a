"""Final evaluation of a model folder on a held-out split, or on other labelled data: metrics, classification report,
confusion matrix.

The data arguments saved in the folder's `lorasent.json` rebuild exactly the split the model never saw
(same source, seed and sizes), unless other data arguments are given. Inference goes through `Predictor`,
so evaluation and serving score texts identically.

    python -m lorasent.evaluate runs/train --output_dir runs/train/evaluation
    python -m lorasent.evaluate runs/train --data new_reviews.csv     # every row of other labelled data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, log_loss
from transformers.utils import logging as hf_logging

from lorasent.config import DataArguments, Precision, replace
from lorasent.cpus import cap_torch_threads
from lorasent.data import SPLITS, labelled_rows, load_splits
from lorasent.errors import CheckpointError, ConfigError, LorasentError
from lorasent.metrics import averaged_labels, scores
from lorasent.model import META_FILE, read_meta, trained_splits
from lorasent.paths import atomic_write_text, check_writable
from lorasent.predict import PRECISION_HELP, TRUST_REMOTE_CODE_HELP, Predictor
from lorasent.process import exit_process
from lorasent.tokenize import source_identity


class SeenSplitWarning(UserWarning):
    """The evaluated split is one the model learnt from: its scores are optimistic."""


def warn_if_trained_on(model_dir: str | Path, split: str, trained_on: Sequence[str], record: str = META_FILE) -> None:
    """Warn when `split` is among `trained_on` (as `record` in the model folder says): the model has seen it."""
    if split not in trained_on:
        return
    unseen = [s for s in SPLITS if s not in trained_on]
    fix = f"Evaluate on a split it never saw: --split {unseen[-1]}." if unseen else "Evaluate it on other data."
    warnings.warn(
        f"{model_dir} was trained on {' + '.join(trained_on)} ({record}), so its {split} scores are optimistic: it "
        f"has seen those texts. {fix}",
        SeenSplitWarning,
        stacklevel=3,
    )


@dataclass
class EvaluationResult:
    """Everything the report shows about one model on one split."""

    model_dir: Path
    split: str
    label_names: list[str]
    metrics: dict[str, float]
    report: dict[str, Any]  # sklearn classification_report(output_dict=True)
    report_text: str
    confusion_matrix: list[list[int]]  # rows: true label, columns: predicted label (label-id order)
    predictions: pd.DataFrame  # text, label, prediction, prob_<name>..., correct
    data_file: str | None = None  # where split "data" came from: every row of a file (`evaluate_file`)

    def save(self, out_dir: str | Path) -> Path:
        """Write `<split>_metrics.json` and `<split>_predictions.csv` into `out_dir` (each atomically)."""
        out = Path(out_dir)
        summary = {
            "model_dir": str(self.model_dir),
            "split": self.split,
            **({"data_file": self.data_file} if self.data_file else {}),
            "label_names": self.label_names,
            "metrics": self.metrics,
            "classification_report": self.report,
            "confusion_matrix": self.confusion_matrix,
        }
        atomic_write_text(out / f"{self.split}_metrics.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / f"{self.split}_predictions.csv", self.predictions.to_csv(index=False))
        return out


def _check_unchanged(model_dir: str | Path, dataset: str, split: str, meta: dict[str, Any]) -> None:
    """The splits are carved again from the data: from changed content they are other splits, and the one scored
    may then hold rows the model learnt from (a folder saved before lorasent.json recorded the source is trusted)."""
    recorded = meta.get("source")
    now = source_identity(dataset)
    if recorded and "sha256" in recorded and "name" in now:  # a file then, no file there now
        raise ConfigError(
            f"{dataset}, the data file {model_dir} was trained on, is not there (moved, or trained on another "
            "machine). Pass where it is now: --dataset PATH (dataset=PATH in Python); its content must be unchanged."
        )
    if recorded and now != recorded:
        raise ConfigError(
            f"{dataset} has changed since {model_dir} was trained ({META_FILE} records {recorded}): the {split} split "
            "carved from it now is not the one the model was kept from, and may hold rows it trained on. Evaluate "
            "on the data as it was, or score new labelled data with --data FILE (`evaluate_file` in Python)."
        )


def _own_data_args(model_dir: str | Path, meta: dict[str, Any], dataset: str | None) -> DataArguments:
    """The data arguments the model was trained with, its data file read from `dataset` if given. A cache folder of
    the machine it was trained on that is not here gives way to this machine's ($LORASENT_CACHE or the default)."""
    fields = dict(meta["data"])
    if dataset is not None:
        fields["dataset"] = dataset
    if fields.get("cache_dir") and not Path(fields["cache_dir"]).is_dir():
        fields["cache_dir"] = None
    try:
        return DataArguments(**fields)
    except (TypeError, LorasentError) as e:
        raise CheckpointError(f"{model_dir}/lorasent.json holds invalid data arguments ({e}).") from e


def evaluate_model_dir(
    model_dir: str | Path,
    *,
    data_args: DataArguments | None = None,
    dataset: str | None = None,
    split: str = "test",
    batch_size: int = 128,
    device: str | None = None,
    precision: str = "auto",
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Score a model folder on `split` of its own data (from lorasent.json) or of `data_args`.

    `dataset` is where the model's own data file is now, when it moved since training (the same content: the same
    splits). Warns (SeenSplitWarning) when the model learnt from that split of that data. `trust_remote_code` lets a
    base model that needs its own code run it (see `load_model_dir`).
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
    if data_args is not None and dataset is not None:
        raise ConfigError("Pass data_args (other data) or dataset (the model's own data, moved), not both.")
    meta = read_meta(model_dir)
    own = data_args is None or data_args.dataset == meta["data"].get("dataset")
    if data_args is None:
        data_args = _own_data_args(model_dir, meta, dataset)
    if own:  # the splits of other data are not the ones it learnt
        _check_unchanged(model_dir, data_args.dataset, split, meta)
        warn_if_trained_on(model_dir, split, trained_splits(meta))
    run = {"device": device, "batch_size": batch_size, "precision": precision, "trust_remote_code": trust_remote_code}
    predictor = Predictor.from_dir(model_dir, max_length=data_args.max_length, **run)
    label_names = predictor.label_names
    if list(data_args.label_names) != label_names:
        raise ConfigError(
            f"The data's label names {data_args.label_names} differ from the model's {label_names}. Evaluate on "
            "data labelled with the model's classes (same names, same order)."
        )
    return _score(predictor, load_splits(data_args)[split], model_dir, split)


def evaluate_file(
    model_dir: str | Path,
    data_file: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 128,
    device: str | None = None,
    precision: str = "auto",
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Score a model folder on every row of other labelled data (a .csv / .jsonl / .json / .parquet file), read as
    training reads its files: its labels the model's class names (or ids), its columns the ones the model was trained
    with unless named. The split is "data"."""
    meta = read_meta(model_dir)
    data_args = _own_data_args(model_dir, meta, None)
    columns = {"text_column": text_column, "label_column": label_column}
    data_args = replace(data_args, dataset=str(data_file), **{k: v for k, v in columns.items() if v is not None})
    rows = labelled_rows(Path(data_args.dataset), data_args)  # refused before the model loads, not after
    run = {"device": device, "batch_size": batch_size, "precision": precision, "trust_remote_code": trust_remote_code}
    predictor = Predictor.from_dir(model_dir, max_length=data_args.max_length, **run)
    return dataclasses.replace(_score(predictor, rows, model_dir, "data"), data_file=data_args.dataset)


def _score(predictor: Predictor, data: Any, model_dir: str | Path, split: str) -> EvaluationResult:
    """The metrics, report and predictions of `predictor` on `data` (a Dataset of text and label ids)."""
    label_names = predictor.label_names
    texts, labels = data["text"][:], np.asarray(data["label"][:])
    predictions = predictor.predict(texts, progress=sys.stderr.isatty())
    failed = [i for i, p in enumerate(predictions) if p.error is not None]
    if failed:  # the data layer refuses such rows, so this is a bug, not bad input
        raise RuntimeError(f"{len(failed)} {split} texts could not be scored, e.g. row {failed[0]}.")
    predicted = np.asarray([p.label_id for p in predictions])
    ids = list(range(len(label_names)))
    frame = pd.DataFrame({"text": texts, "label": [label_names[i] for i in labels]})
    frame["prediction"] = [p.label for p in predictions]
    for name in label_names:
        frame[f"prob_{name}"] = [p.probabilities[name] for p in predictions]
    frame["correct"] = labels == predicted
    probabilities = frame[[f"prob_{name}" for name in label_names]].to_numpy(dtype=np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # a float32 softmax sums to 1 only within ~1e-7
    # the mean cross-entropy, as the validation `loss` of the trials, so the two read alike
    loss = float(log_loss(labels, probabilities, labels=ids))
    averaged = averaged_labels(labels, predicted)  # as the metrics' macro averages: a class in neither is left out
    report = {"labels": averaged, "target_names": [label_names[i] for i in averaged], "zero_division": 0}
    return EvaluationResult(
        model_dir=Path(model_dir),
        split=split,
        label_names=label_names,
        metrics={**scores(labels, predicted, label_names), "loss": loss},
        report=classification_report(labels, predicted, output_dict=True, **report),
        report_text=classification_report(labels, predicted, **report),
        confusion_matrix=confusion_matrix(labels, predicted, labels=ids).tolist(),
        predictions=frame,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 done, 2 refused, 130 interrupted (Ctrl-C)."""
    hf_logging.disable_progress_bar()  # a bar for loading a few MB of weights is noise on a command line
    parser = argparse.ArgumentParser(
        prog="python -m lorasent.evaluate",
        description="Evaluate a lorasent model folder on a held-out split of its own data, or on other labelled data.",
    )
    parser.add_argument("model_dir", help="A model folder written by lorasent training.")
    own = parser.add_mutually_exclusive_group()
    own.add_argument("--split", choices=SPLITS, help="Split of the model's own data (default: test).")
    own.add_argument(
        "--data",
        help="Other labelled data instead: every row of a .csv / .jsonl / .json / .parquet file, labelled with the "
        "model's class names or ids; writes data_metrics.json and data_predictions.csv.",
    )
    parser.add_argument(
        "--dataset",
        help="Where the model's data file is now, if it moved since training (default: the path in lorasent.json); "
        "its content must be unchanged. Not with --data.",
    )
    parser.add_argument("--text_column", help="With --data: its text column (default: the model's training one).")
    parser.add_argument("--label_column", help="With --data: its label column (default: the model's training one).")
    parser.add_argument(
        "--output_dir", help="Where to write <split>_metrics.json and <split>_predictions.csv (data_... with --data)."
    )
    parser.add_argument("--batch_size", type=int, default=128, help="Texts per forward pass (default: %(default)s).")
    parser.add_argument("--device", help="'cpu', 'cuda', ... (default: a GPU if there is one).")
    parser.add_argument("--precision", default="auto", choices=get_args(Precision), help=PRECISION_HELP)
    parser.add_argument("--trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    args = parser.parse_args(argv)
    cap_torch_threads()
    result = None
    split = "data" if args.data else args.split or "test"
    run = {"batch_size": args.batch_size, "device": args.device, "precision": args.precision}
    try:
        if args.data and args.dataset:
            raise ConfigError("--dataset is where the model's own data moved; --data scores other data. Give one.")
        if not args.data and (args.text_column or args.label_column):
            raise ConfigError("--text_column and --label_column name the columns of --data: give --data FILE too.")
        if args.output_dir:  # before the evaluation, not after it
            check_writable(Path(args.output_dir) / f"{split}_metrics.json", "Pick another --output_dir.")
        if args.data:
            columns = {"text_column": args.text_column, "label_column": args.label_column}
            result = evaluate_file(
                args.model_dir, args.data, **columns, **run, trust_remote_code=args.trust_remote_code
            )
        else:
            result = evaluate_model_dir(
                args.model_dir, dataset=args.dataset, split=split, **run, trust_remote_code=args.trust_remote_code
            )
        if args.output_dir:
            result.save(args.output_dir)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each file is written whole or not at all
        unwritten = args.output_dir and result is None
        print("interrupted" + (f": nothing written to {args.output_dir}" if unwritten else ""), file=sys.stderr)
        return 130
    print(result.report_text)
    print(f"loss (mean cross-entropy): {result.metrics['loss']:.4f}")
    print("confusion matrix (rows: true, columns: predicted):", result.confusion_matrix)
    if args.output_dir:
        print(f"wrote {split}_metrics.json and {split}_predictions.csv to {args.output_dir}")
    return 0


if __name__ == "__main__":
    exit_process(main())
