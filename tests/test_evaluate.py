"""Final evaluation of a model folder on its own held-out test split: metrics, report, confusion matrix, files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import interrupt_when_ready

from lorasent import evaluate as evaluate_module
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.errors import ConfigError
from lorasent.evaluate import SeenSplitWarning, evaluate_file, evaluate_model_dir
from lorasent.metrics import metric_names, scores
from lorasent.predict import Predictor
from lorasent.train import train

DATA = DataArguments(max_train_samples=48, max_eval_samples=32, max_test_samples=40, max_length=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, vader_file: Path, tiny_model_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    args = TrainArguments(output_dir=str(tmp / "model"), num_train_epochs=1, per_device_train_batch_size=8)
    return train(DATA, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir


def test_evaluation_on_the_saved_test_split(model_dir: Path, tmp_path: Path) -> None:
    result = evaluate_model_dir(model_dir, batch_size=16, device="cpu")
    assert result.split == "test" and result.label_names == ["negative", "positive"]
    frame = result.predictions
    assert len(frame) == 40  # the data arguments saved with the model rebuilt the same 40-review test split
    assert list(frame.columns) == ["text", "label", "prediction", "prob_negative", "prob_positive", "correct"]
    assert frame["correct"].mean() == pytest.approx(result.metrics["accuracy"])
    matrix = result.confusion_matrix
    assert sum(map(sum, matrix)) == 40 and matrix[0][0] + matrix[1][1] == frame["correct"].sum()
    assert sum(matrix[1]) == (frame["label"] == "positive").sum()  # rows are true labels
    assert result.report["positive"]["support"] == sum(matrix[1])
    assert "negative" in result.report_text and "macro avg" in result.report_text

    out = result.save(tmp_path / "evaluation")
    summary = json.loads((out / "test_metrics.json").read_text())
    assert summary["metrics"] == result.metrics and summary["confusion_matrix"] == matrix
    assert summary["classification_report"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    saved = pd.read_csv(out / "test_predictions.csv")
    assert len(saved) == 40 and saved["correct"].sum() == frame["correct"].sum()


@pytest.mark.filterwarnings("error::UserWarning")  # scikit-learn's "y_prob values do not sum to one" among them
def test_other_data_and_splits(model_dir: Path) -> None:
    result = evaluate_model_dir(model_dir, split="validation", device="cpu")
    assert len(result.predictions) == 32
    trained = json.loads((model_dir / "lorasent.json").read_text())["metrics"]  # what the Trainer measured there
    assert result.metrics["loss"] == pytest.approx(trained["loss"], abs=1e-4)
    assert result.metrics["accuracy"] == pytest.approx(trained["accuracy"])
    with pytest.raises(ConfigError, match="label names"):
        evaluate_model_dir(model_dir, data_args=DataArguments(label_names=["bad", "good"]), device="cpu")
    with pytest.raises(ConfigError, match="Unknown split"):
        evaluate_model_dir(model_dir, split="dev")


def test_cli_prints_the_report_and_writes_files(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert evaluate_module.main([str(model_dir), "--output_dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "macro avg" in out and "confusion matrix" in out and "loss (mean cross-entropy): " in out
    assert (tmp_path / "test_metrics.json").is_file() and (tmp_path / "test_predictions.csv").is_file()
    assert evaluate_module.main([str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # refused before the evaluation, not by a traceback after it
    assert evaluate_module.main([str(model_dir), "--output_dir", str(tmp_path / "test_metrics.json" / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: Cannot write {tmp_path}/test_metrics.json/out/test_metrics.json: {tmp_path}/test_metrics.json is a "
        "file, not a folder. Pick another --output_dir.\n"
    )
    assert evaluate_module.main([str(model_dir), "--device", "cpu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'fp16' needs a CUDA GPU" in err and "Traceback" not in err


def test_other_labelled_data_is_scored_row_by_row(model_dir: Path, tmp_path: Path, write_data, capsys) -> None:
    """New labelled data (it was refused as the model's own data changed): every row of the file, its own columns,
    its labels the model's names as training reads them; a split column is not read."""
    rows = [("Works great.", "Positive"), ("Broke after a day.", " negative"), ("Love it", "POSITIVE"), ("meh", "0")]
    path = write_data([{"body": t, "sentiment": label, "split": "train"} for t, label in rows], "new.jsonl")
    result = evaluate_file(model_dir, path, text_column="body", label_column="sentiment", device="cpu")
    assert result.split == "data" and result.data_file == str(path)
    frame = result.predictions
    assert frame["text"].tolist() == [t for t, _ in rows]
    assert frame["label"].tolist() == ["positive", "negative", "positive", "negative"]
    expected = Predictor.from_dir(model_dir, device="cpu").predict(frame["text"].tolist())
    assert frame["prob_positive"].tolist() == pytest.approx([p.probabilities["positive"] for p in expected], abs=1e-6)
    assert result.metrics["accuracy"] == pytest.approx(frame["correct"].mean())

    out = tmp_path / "out"
    flags = ["--text_column", "body", "--label_column", "sentiment", "--device", "cpu", "--output_dir", str(out)]
    assert evaluate_module.main([str(model_dir), "--data", str(path), *flags]) == 0
    assert json.loads((out / "data_metrics.json").read_text())["data_file"] == str(path)
    assert "wrote data_metrics.json and data_predictions.csv" in capsys.readouterr().out
    unknown = write_data([{"body": "fine", "sentiment": "meh"}], "unknown.csv")
    assert evaluate_module.main([str(model_dir), "--data", str(unknown), *flags[:4]]) == 2
    assert "'meh'" in capsys.readouterr().err
    assert evaluate_module.main([str(model_dir), "--text_column", "body"]) == 2
    assert "give --data FILE too" in capsys.readouterr().err
    assert evaluate_module.main([str(model_dir), "--data", str(path), "--dataset", str(path)]) == 2
    assert "--data scores other data. Give one." in capsys.readouterr().err


def test_cli_help_gives_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        evaluate_module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Split of the model's own data (default: test)." in help_text
    assert "Texts per forward pass (default: 128)." in help_text


def test_evaluating_on_a_split_the_model_learnt_from_warns(model_dir: Path, tmp_path: Path, write_data) -> None:
    """lorasent.json records the splits a model learnt from; scoring one of them warns and names an unseen split."""
    assert json.loads((model_dir / "lorasent.json").read_text())["train_splits"] == ["train"]
    checkpoint = next(model_dir.parent.glob("model-checkpoints/checkpoint-*"))
    assert json.loads((checkpoint / "lorasent.json").read_text())["train_splits"] == ["train"]
    expected = (
        rf"{model_dir} was trained on train \(lorasent\.json\), so its train scores are optimistic.* --split test"
    )
    with pytest.warns(SeenSplitWarning, match=expected):
        assert evaluate_module.main([str(model_dir), "--split", "train", "--device", "cpu"]) == 0

    old = tmp_path / "old"  # a folder saved before lorasent.json recorded train_splits learnt from train
    shutil.copytree(model_dir, old)
    meta = json.loads((old / "lorasent.json").read_text())
    del meta["train_splits"]
    (old / "lorasent.json").write_text(json.dumps(meta))
    with pytest.warns(SeenSplitWarning, match="was trained on train "):
        evaluate_model_dir(old, split="train", device="cpu")

    other = DataArguments(  # another source's train split is not the one the model learnt
        dataset=str(write_data([{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(40)])),
        max_length=32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeenSplitWarning)
        for split in ("validation", "test"):
            evaluate_model_dir(model_dir, split=split, device="cpu")
        evaluate_model_dir(model_dir, data_args=other, split="train", device="cpu")


def test_ctrl_c_while_a_split_is_scored_ends_without_a_traceback(
    tmp_path: Path, vader_file: Path, tiny_model_dir: Path
) -> None:
    """Ctrl-C once the seen-split warning is out (the model then loads and scores 1,200 texts one at a time, seconds
    of work): exit 130, one line, and no half-written output."""
    data = dataclasses.replace(DATA, max_train_samples=1200)
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=64)
    model = train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir

    def warned(process: subprocess.Popen) -> None:
        warning = process.stderr.readline()  # SeenSplitWarning, before the model loads
        assert "SeenSplitWarning" in warning, warning + process.stderr.read()
        process.stderr.readline()  # the warning's source line

    argv = ["-m", "lorasent.evaluate", str(model), "--split", "train", "--batch_size", "1", "--device", "cpu"]
    returncode, out, err = interrupt_when_ready([*argv, "--output_dir", str(tmp_path / "out")], warned, timeout=120)
    assert returncode == 130, out + err
    assert err == f"interrupted: nothing written to {tmp_path / 'out'}\n" and not (tmp_path / "out").exists()


def test_a_model_is_not_scored_on_splits_carved_from_changed_data(tmp_path: Path, write_data) -> None:
    """Rows appended to the training file move others across the splits: the test split carved again would hold rows
    the model learnt from. lorasent.json records the data's sha256, and evaluation refuses other content."""
    rows = [{"text": f"review number {i} was {['bad', 'good'][i % 2]}", "label": i % 2} for i in range(80)]
    source = write_data(rows, name="reviews.csv")
    data = DataArguments(dataset=str(source), max_length=32, label_names=["negative", "positive"])
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=8)
    model = train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir
    recorded = json.loads((model / "lorasent.json").read_text())["source"]
    assert recorded["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert evaluate_model_dir(model, device="cpu").split == "test"

    write_data(rows + [{"text": f"another review {i}", "label": i % 2} for i in range(40)], name="reviews.csv")
    changed = rf"{source} has changed since {model} was trained .*may hold rows it trained on"
    with pytest.raises(ConfigError, match=changed):
        evaluate_model_dir(model, device="cpu")
    assert evaluate_module.main([str(model), "--device", "cpu"]) == 2


def test_a_model_whose_data_file_moved_is_scored_on_it_where_it_is_now(tmp_path: Path, write_data) -> None:
    """On another machine (or after a tidy-up) the path lorasent.json records is gone: the error says so, not that
    the data changed, and --dataset names the new place of the same content."""
    rows = [{"text": f"review number {i} was {['bad', 'good'][i % 2]}", "label": i % 2} for i in range(80)]
    source = write_data(rows, name="reviews.csv")
    data = DataArguments(dataset=str(source), max_length=32, label_names=["negative", "positive"])
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=8)
    model = train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir
    before = evaluate_model_dir(model, device="cpu").metrics
    moved = tmp_path / "elsewhere" / "reviews.csv"
    moved.parent.mkdir()
    source.rename(moved)
    with pytest.raises(ConfigError, match=rf"{source}, the data file .* is not there .*--dataset PATH"):
        evaluate_model_dir(model, device="cpu")
    assert evaluate_model_dir(model, dataset=str(moved), device="cpu").metrics == before
    with pytest.warns(SeenSplitWarning):  # still the model's own data
        evaluate_model_dir(model, dataset=str(moved), split="train", device="cpu")
    assert evaluate_module.main([str(model), "--dataset", str(moved), "--device", "cpu"]) == 0


def test_a_cache_folder_of_the_training_machine_gives_way_to_this_ones(model_dir: Path, tmp_path: Path) -> None:
    """A model trained with --cache_dir on another machine records a path that may not be creatable here."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "lorasent.json").read_text())
    (tmp_path / "a_file").write_text("")
    meta["data"]["cache_dir"] = str(tmp_path / "a_file" / "cache")  # cannot be made: a file stands in its way
    (copy / "lorasent.json").write_text(json.dumps(meta))
    assert evaluate_model_dir(copy, device="cpu").metrics == evaluate_model_dir(model_dir, device="cpu").metrics


@pytest.mark.filterwarnings("error")  # scikit-learn's UndefinedMetricWarning among them
def test_metrics_of_three_classes_with_one_absent_never_predicted_or_always_predicted() -> None:
    names = ["très négatif", "neutral one", "positive 👍"]
    perfect = scores(np.array([0, 2, 0, 2]), np.array([0, 2, 0, 2]), names)  # the test split lacks "neutral one"
    assert perfect["f1_macro"] == perfect["precision_macro"] == perfect["recall_macro"] == perfect["accuracy"] == 1
    assert (perfect["f1_très négatif"], perfect["f1_neutral one"], perfect["recall_positive 👍"]) == (1, 0, 1)
    assert set(perfect) == set(metric_names(names)) - {"loss"}
    one_class = scores(np.array([0, 1, 2, 1]), np.array([1, 1, 1, 1]), names)
    assert one_class["accuracy"] == 0.5 and one_class["precision_neutral one"] == 0.5
    assert one_class["recall_macro"] == pytest.approx(1 / 3) and one_class["precision_macro"] == pytest.approx(1 / 6)
    wrongly_predicted = scores(np.array([0, 0]), np.array([0, 1]), names)  # a class absent from the data is predicted
    assert wrongly_predicted["recall_macro"] == pytest.approx(0.5 / 2)


def test_the_report_averages_over_the_classes_the_metrics_do(tmp_path: Path, write_data) -> None:
    """A rare class may miss the test split (each split needs two classes, train all of them): the report's macro
    averages then leave it out as the metrics' do, and it keeps its row and column in the confusion matrix."""
    names = ["negative", "neutral", "positive"]
    rows = [{"text": f"review {i} was {['bad', 'good'][i % 2]}", "label": names[2 * (i % 2)]} for i in range(80)]
    rows += [{"text": f"review {i} was fine", "label": "neutral"} for i in range(2)]
    data = DataArguments(dataset=str(write_data(rows)), max_length=32, label_names=names)
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=8)
    model = train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir
    result = evaluate_model_dir(model, device="cpu")
    assert "neutral" not in set(result.predictions["label"]) | set(result.predictions["prediction"])
    assert [row for row in result.report if row in names] == ["negative", "positive"]
    for name, key in [("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")]:
        assert result.report["macro avg"][key] == pytest.approx(result.metrics[f"{name}_macro"])
    assert result.confusion_matrix[1] == [0, 0, 0] and [row[1] for row in result.confusion_matrix] == [0, 0, 0]
