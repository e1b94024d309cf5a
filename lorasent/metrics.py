"""Classification metrics: accuracy, macro and per-class precision / recall / F1 (scikit-learn).

One function for the `Trainer` (per-epoch validation), the final test evaluation and the reports, so every
number that names a metric means the same thing everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import EvalPrediction

MACRO_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def metric_names(label_names: Sequence[str]) -> list[str]:
    """Every key `compute_metrics` returns (without the Trainer's `eval_` prefix), plus `loss`."""
    per_class = [f"{kind}_{name}" for kind in ("precision", "recall", "f1") for name in label_names]
    return [*MACRO_METRICS, *per_class, "loss"]


def averaged_labels(label_ids: np.ndarray, predicted_ids: np.ndarray) -> list[int]:
    """The label ids macro averages are taken over: those in the data or the predictions. A class in neither has
    no precision or recall to average; counted as 0, it would cap a perfect model's macro F1 at 2/3 on a test
    split that lacks one of three classes."""
    return np.union1d(label_ids, predicted_ids).astype(int).tolist()


def scores(label_ids: np.ndarray, predicted_ids: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Metrics of predicted label ids against true ones; a class never predicted scores 0, not a warning, and so
    does a class absent from both, which the macro averages leave out (`averaged_labels`)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support  # here: `--help` needs no sklearn

    labels = list(range(len(label_names)))
    result = {"accuracy": float(accuracy_score(label_ids, predicted_ids))}
    precision, recall, f1, _ = precision_recall_fscore_support(
        label_ids, predicted_ids, labels=averaged_labels(label_ids, predicted_ids), average="macro", zero_division=0
    )
    result.update(precision_macro=float(precision), recall_macro=float(recall), f1_macro=float(f1))
    precision, recall, f1, _ = precision_recall_fscore_support(
        label_ids, predicted_ids, labels=labels, average=None, zero_division=0
    )
    for i, name in enumerate(label_names):
        result[f"precision_{name}"] = float(precision[i])
        result[f"recall_{name}"] = float(recall[i])
        result[f"f1_{name}"] = float(f1[i])
    return result


def compute_metrics(eval_pred: EvalPrediction, label_names: Sequence[str]) -> dict[str, float]:
    """Metrics of a `Trainer` evaluation: logits (or a tuple starting with logits) against label ids."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return scores(np.asarray(eval_pred.label_ids), np.asarray(logits).argmax(axis=-1), label_names)


def metrics_fn(label_names: Sequence[str]) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` bound to the class names, in the shape `Trainer(compute_metrics=...)` wants."""
    return functools.partial(compute_metrics, label_names=list(label_names))
