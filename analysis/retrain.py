"""The final model of a search: the best configuration retrained on train + validation, evaluated once on test.

The search picked hyperparameters on the validation split, so the final model may learn from it too; the test
split is touched exactly once, here. The best trial's best epoch count is kept (ASHA and the per-epoch
validation already chose it; a best evaluation within an epoch, with evals_per_epoch > 1, is rounded up to the
epoch's end). `use_checkpoint=True` skips retraining and evaluates the best trial's own best checkpoint instead:
faster, but trained on less data.

The final model folder (default <experiment>/final_model) is a normal lorasent model folder (adapter,
tokenizer, lorasent.json, whose train_splits say which splits it learnt from) plus test_metrics.json,
test_predictions.csv and final_model.json (where it came from); it appears all at once or not at all. It never
holds a pickle: from a checkpoint only the model's own files are copied, not the Trainer's optimizer, scheduler
and RNG state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.results import (
    FINAL_MODEL_DIR,
    PARAMS_FILE,
    SEARCH_FILE,
    Experiment,
    ExperimentWarning,
    load_experiment,
    unfinished_note,
)
from lorasent.config import DataArguments, ModelArguments, TrainArguments, replace
from lorasent.errors import CheckpointError, ConfigError, ExperimentError
from lorasent.paths import atomic_dir, atomic_write_text

PROVENANCE_FILE = "final_model.json"
TEST_SPLIT = "test"
EXAMPLE_TEXT = "Works great, would buy again."
# What a model folder needs: adapter weights (safetensors), adapter config, tokenizer and lorasent.json (json), and
# tokenizer vocabularies (txt, sentencepiece .model). A checkpoint's Trainer state (optimizer.pt, scheduler.pt,
# rng_state.pth, training_args.bin) is pickled: it is never copied into a final model.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def best_arguments(exp: Experiment) -> tuple[DataArguments, ModelArguments, TrainArguments]:
    """The search's base arguments (lorasent_search.json) with the best trial's sampled hyperparameters put in."""
    from tune.config import apply_trial_config, arguments_from_metadata

    if not exp.search:
        raise ExperimentError(
            f"{exp.source} has no {SEARCH_FILE}, so the arguments of its trials are unknown. Retraining needs an "
            "experiment started by `python tune/run.py`; or evaluate the best checkpoint with --use-checkpoint."
        )
    best = exp.best_trial
    unknown = [name for name in exp.params if name not in exp.configs[best["trial_id"]]]
    if unknown:
        raise ExperimentError(
            f"The hyperparameters {unknown} of the best trial {best['trial_id']} are unknown: its {PARAMS_FILE} is "
            f"damaged and Ray's experiment state lacks its config. Restore {best['trial_dir']}/{PARAMS_FILE}, or "
            "evaluate the trial's own checkpoint with --use-checkpoint."
        )
    saved = arguments_from_metadata(json.dumps(exp.search), str(exp.path / SEARCH_FILE))
    model_args, train_args = apply_trial_config(saved.model, saved.train, exp.best_config)
    return saved.data, model_args, train_args


def retrain_best(
    experiment_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    use_checkpoint: bool = False,
    trust_remote_code: bool = False,
    dataset: str | None = None,
) -> Path:
    """Build, test and save the final model of a search; returns its folder.

    A search run with --trust_remote_code ran its base model's own code: retraining and testing it run that code
    again, so they take the same flag here (an experiment folder is data, which must not turn code on by itself).
    `dataset`: where the search's data file is now, when it moved since the search (the same content: the same
    splits).
    """
    from lorasent.evaluate import evaluate_model_dir
    from lorasent.model import check_model_dir, check_output_dir, read_meta
    from lorasent.tokenize import source_identity
    from lorasent.train import train

    exp = load_experiment(experiment_path)
    best = exp.best_trial
    _warn_if_unfinished(exp)
    out = Path(out_dir) if out_dir else exp.path / FINAL_MODEL_DIR
    check_output_dir(out)  # before minutes of training, which would end by replacing it whole
    if (exp.search or {}).get("model", {}).get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(
            f"{exp.source} was searched with --trust_remote_code: its base model runs code of its own. Pass "
            "--trust_remote_code to retrain and test it, only if you trust that code."
        )
    checkpoint = exp.best_checkpoint
    if dataset is not None and checkpoint is not None and not use_checkpoint:  # a checkpoint's test checks it itself
        recorded = read_meta(checkpoint).get("source")
        if recorded and source_identity(dataset) != recorded:
            raise ConfigError(
                f"{dataset} is not the data {exp.source} searched on ({recorded} then, per {checkpoint}): its splits "
                "would be others, and the test split may hold rows the search chose by. Give the search's data file."
            )
    provenance: dict[str, Any] = {
        "experiment": exp.location,
        "trial_id": best["trial_id"],
        "config": exp.best_config,
        f"validation_{exp.metric}": float(best[exp.best_column]),
        "epochs": exp.best_epoch,
    }
    with atomic_dir(out) as tmp:
        if use_checkpoint:
            if checkpoint is None:
                raise CheckpointError(
                    f"Trial {best['trial_id']} kept no checkpoint of its best epoch {exp.best_epoch} in "
                    f"{best['trial_dir']}. Retrain instead (drop --use-checkpoint)."
                )
            check_model_dir(checkpoint)  # damage is reported against the checkpoint, not the temporary copy
            print(f"Evaluating trial {best['trial_id']}'s best checkpoint {checkpoint} on the {TEST_SPLIT} split")
            for file in checkpoint.iterdir():
                if file.is_file() and file.suffix in MODEL_FILE_SUFFIXES:
                    shutil.copy2(file, tmp / file.name)
            provenance["method"] = f"checkpoint of trial {best['trial_id']}, epoch {exp.best_epoch} (trained on train)"
            provenance["checkpoint"] = str(checkpoint)
        else:
            data_args, model_args, train_args = best_arguments(exp)
            if dataset is not None:
                data_args = replace(data_args, dataset=dataset)
            # An evaluation within an epoch (evals_per_epoch > 1) may be the best: its epoch is finished here. Nothing
            # is evaluated while retraining, so one checkpoint an epoch is all it needs.
            epochs = math.ceil(exp.best_epoch)
            rounded = "" if epochs == exp.best_epoch else f" (its best evaluation came {exp.best_epoch:g} epochs in)"
            train_args = replace(train_args, num_train_epochs=epochs, evals_per_epoch=1, output_dir=str(tmp))
            print(
                f"Retraining trial {best['trial_id']}'s config {exp.best_config} on train + validation for "
                f"{epochs} epoch(s){rounded}"
            )
            with tempfile.TemporaryDirectory(prefix="lorasent-retrain-") as work_dir:
                result = train(
                    data_args,
                    model_args,
                    train_args,
                    train_splits=("train", "validation"),
                    eval_split=None,
                    work_dir=work_dir,
                )
            if result.output_dir is None:
                raise ExperimentError(
                    f"Retraining diverged (NaN/inf loss) with {exp.best_config}, so there is no model to save. "
                    "Evaluate the best trial's own checkpoint with --use-checkpoint, or lower the learning rate."
                )
            provenance["method"] = f"retrained on train + validation for {epochs} epoch(s){rounded}"
        moved = dataset if use_checkpoint else None  # a retrained model records the data where it is now
        tested = evaluate_model_dir(tmp, split=TEST_SPLIT, trust_remote_code=trust_remote_code, dataset=moved)
        evaluation = dataclasses.replace(tested, model_dir=out)
        evaluation.save(tmp)
        atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
    print(f"Final model: {out}")
    m = evaluation.metrics
    print(f"  test accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, loss {m['loss']:.4f}")
    return out


def _warn_if_unfinished(exp: Experiment) -> None:
    """Retraining mid-search is allowed, but its 'best' is only the best so far."""
    note = unfinished_note(exp)
    if note:
        warnings.warn(
            f"{note}: this final model is the best so far, trial {exp.best_trial['trial_id']}, and the best may "
            f"change. Let the search finish (`python tune/run.py --resume {exp.location}` continues an interrupted "
            "one), then retrain.",
            ExperimentWarning,
            stacklevel=3,
        )


def read_provenance(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A final model folder's final_model.json; {} for a folder that has none (a plain model or checkpoint)."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({e}). Recreate the final model with `python -m analysis retrain "
            f"EXPERIMENT --output {model_dir}`."
        ) from e


def final_model_mismatch(exp: Experiment, model_dir: str | os.PathLike[str]) -> str:
    """Why a final model is not that of the experiment's current best trial and epoch, or '' when it is (or when
    there is no final model or no best yet). A resumed search can find a better trial after retraining."""
    provenance = read_provenance(model_dir)
    if "trial_id" not in provenance or exp.scored_trials.empty:
        return ""
    best = exp.best_trial
    if (provenance["trial_id"], provenance.get("epochs")) == (best["trial_id"], exp.best_epoch):
        return ""
    output = "" if Path(model_dir).resolve() == exp.path / FINAL_MODEL_DIR else f" --output {model_dir}"
    return (
        f"The final model {model_dir} was built from trial {provenance['trial_id']}, epoch "
        f"{provenance.get('epochs', '?')}, but the best of {exp.location} is now trial {best['trial_id']}, epoch "
        f"{exp.best_epoch} ({exp.metric} {best[exp.best_column]:.4f}): the search went on after retraining, or the "
        f"model belongs to another experiment. Its test figures are not the current best's. Rerun `python -m "
        f"analysis retrain {exp.location}{output}`."
    )


def warn_if_trained_on_legacy(model_dir: str | os.PathLike[str], split: str) -> None:
    """A final model retrained before lorasent.json recorded its `train_splits` reads there as trained on train
    alone; its final_model.json knows it learnt from validation too. lorasent.evaluate warns for the rest."""
    from lorasent.evaluate import warn_if_trained_on
    from lorasent.model import read_meta, trained_splits

    meta = read_meta(model_dir)
    if "train_splits" not in meta and split not in trained_splits(meta):
        warn_if_trained_on(model_dir, split, read_provenance(model_dir).get("train_splits", []), PROVENANCE_FILE)


@dataclass
class FinalEvaluation:
    """The saved test evaluation of a final model folder, shaped for the report."""

    path: Path
    label_names: list[str]
    metrics: dict[str, float]
    report: dict[str, Any]  # scikit-learn classification_report(output_dict=True)
    confusion_matrix: list[list[int]]
    predictions: pd.DataFrame  # text, label, prediction, prob_<name>..., correct
    provenance: dict[str, Any]

    @property
    def per_class(self) -> pd.DataFrame:
        """Precision, recall, F1 and support of each class, then the macro and weighted averages."""
        rows = [*self.label_names, "macro avg", "weighted avg"]
        return pd.DataFrame({row: self.report[row] for row in rows if row in self.report}).T

    def errors(self, limit: int = 25) -> pd.DataFrame:
        """Misclassified test texts, the most confidently wrong first, with the model's probabilities."""
        wrong = self.predictions[~self.predictions["correct"].astype(bool)].copy()
        prob_columns = [f"prob_{name}" for name in self.label_names]
        wrong["confidence"] = wrong[prob_columns].max(axis=1)
        columns = ["text", "label", "prediction", "confidence", *prob_columns]
        return wrong.sort_values("confidence", ascending=False)[columns].head(limit).reset_index(drop=True)

    def summary_markdown(self) -> str:
        m = self.metrics
        n_errors = int((~self.predictions["correct"].astype(bool)).sum())
        method = self.provenance.get("method", "")
        loss = f", loss {m['loss']:.4f}" if "loss" in m else ""  # final models saved before the test loss lack it
        return (
            f"**Test accuracy {m['accuracy']:.4f}**, macro F1 {m['f1_macro']:.4f}{loss} on {len(self.predictions)} "
            f"test texts ({n_errors} misclassified).\n\n"
            f"Model `{self.path}`: trial {self.provenance.get('trial_id', '?')}'s configuration, {method}.\n\n"
            f'Use it: `python -m lorasent.predict {self.path} --text "{EXAMPLE_TEXT}"`'
        )


def load_final_evaluation(path: str | os.PathLike[str]) -> FinalEvaluation | None:
    """The saved test evaluation of a final model folder; None when the folder does not exist (yet)."""
    folder = Path(path)
    if not folder.exists():
        return None
    metrics_file, predictions_file = folder / f"{TEST_SPLIT}_metrics.json", folder / f"{TEST_SPLIT}_predictions.csv"
    try:
        summary = json.loads(metrics_file.read_text(encoding="utf-8"))
        predictions = pd.read_csv(predictions_file, keep_default_na=False)
    except (OSError, json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{folder} holds no readable test evaluation ({e}). Recreate it with `python -m analysis retrain "
            f"EXPERIMENT --output {folder}`."
        ) from e
    provenance = read_provenance(folder)
    return FinalEvaluation(
        path=folder.resolve(),
        label_names=list(summary["label_names"]),
        metrics=summary["metrics"],
        report=summary["classification_report"],
        confusion_matrix=summary["confusion_matrix"],
        predictions=predictions,
        provenance=provenance,
    )
