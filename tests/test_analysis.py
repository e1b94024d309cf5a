"""The analysis step on a real experiment: the `python tune/run.py --smoke-test` that the test session runs once
(`conftest.smoke_search`: a real local Ray, ASHA + Optuna, tiny DistilBERT), then tables, the executed report,
retrain-best and the CLI are checked against it and against what the search itself printed."""

from __future__ import annotations

import ast
import io
import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import fsspec
import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import SmokeSearch
from IPython.core.pylabtools import print_figure

from analysis import plots
from analysis.__main__ import main as analysis_main
from analysis.report import build_notebook, write_report
from analysis.results import (
    ExperimentWarning,
    compute_spent,
    grid_levels,
    importance_note,
    load_experiment,
    param_importances,
    summary_line,
    trial_table,
)
from analysis.retrain import (
    PROVENANCE_FILE,
    best_arguments,
    final_model_mismatch,
    load_final_evaluation,
    retrain_best,
)
from lorasent.errors import ExperimentError
from lorasent.evaluate import SeenSplitWarning
from lorasent.evaluate import main as evaluate_main
from lorasent.predict import Predictor
from tune.cluster import sample_number

PLOT_CALLS = ("plots.learning_curves", "plots.lr_vs_metric", "plots.lr_batch_heatmap", "plots.rank_effect")
NO_EXPERIMENT_WARNING = pytest.mark.filterwarnings("error::analysis.results.ExperimentWarning")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def search(smoke_search: SmokeSearch) -> tuple[Path, str]:
    """(experiment folder, console output) of the real smoke search: 4 trials, up to 2 epochs."""
    return smoke_search.experiment, smoke_search.output


@pytest.fixture(scope="module")
def final_model(search: tuple[Path, str]) -> Path:
    """The best config retrained on train + validation and tested once (the default <experiment>/final_model)."""
    return retrain_best(search[0])


def _rewrite_results(result: Path, **changes: float) -> None:
    """Set `changes` in every row of a trial's result.json (what the trial would have reported)."""
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    result.write_text("".join(json.dumps(row | changes) + "\n" for row in rows))


def test_importance_is_a_note_when_every_trial_scored_the_same(search: tuple[Path, str], tmp_path: Path) -> None:
    """fANOVA has nothing to explain (its forest raised and the report cell failed): the report says so instead."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, symlinks=True)
    for result in copy.glob("*/result.json"):
        _rewrite_results(result, accuracy=0.5)
    exp = load_experiment(copy)
    assert param_importances(exp).empty
    assert "all 4 scored trials have the same best 'accuracy'" in importance_note(exp)


def test_tables_match_what_the_search_reported(search: tuple[Path, str]) -> None:
    path, console = search
    exp = load_experiment(path)
    saved = json.loads((path / "lorasent_search.json").read_text())
    trial_dirs = [d for d in path.iterdir() if (d / "params.json").exists()]

    assert len(exp.trials) == len(trial_dirs) == saved["tune"]["num_samples"]
    assert set(exp.trials["status"]) == {"TERMINATED"}
    assert exp.params == list(saved["tune"]["search_space"])
    assert (exp.metric, exp.mode, exp.max_epochs) == ("accuracy", "max", saved["train"]["num_train_epochs"])
    # one epochs row per reported epoch, numbered 1..n
    for trial_id, epochs in exp.epochs.groupby("trial_id"):
        trial = exp.trials.set_index("trial_id").loc[trial_id]
        assert list(epochs["epoch"]) == list(range(1, trial["epochs"] + 1))
    # the search's own summary: "N trials, M stopped early" and "Best trial <dir>, epoch E" + its accuracy
    stopped = int(re.search(r"(\d+) stopped early", console).group(1))
    assert int(exp.trials["early_stopped"].sum()) == stopped
    best_dir, best_epoch = re.search(r"Best trial (\S+), epoch (\d+)", console).groups()
    best_accuracy = float(re.search(r"validation: accuracy=([\d.]+)", console).group(1))
    printed = exp.trials[exp.trials["trial_dir"].str.endswith(best_dir)].iloc[0]
    assert printed["best_accuracy"] == pytest.approx(best_accuracy, abs=1e-4)
    assert (exp.best_trial["trial_id"], exp.best_epoch) == (printed["trial_id"], int(best_epoch))  # ties too
    assert exp.best_checkpoint is not None and (exp.best_checkpoint / "adapter_model.safetensors").is_file()

    table = trial_table(exp)
    assert list(table.index) == list(range(1, len(exp.trials) + 1))
    assert table.iloc[0]["trial_id"] == exp.best_trial["trial_id"]

    importances = param_importances(exp)
    assert set(importances.index) <= set(exp.params) and importances.sum() == pytest.approx(1.0)
    spent = compute_spent(exp)
    assert spent.loc["this search", "trial_epochs"] == exp.trials["epochs"].sum()
    # smoke space: loguniform lr (3 grid levels) x 2 batch sizes x 2 ranks, 2 epochs each
    assert grid_levels(exp) == {"learning_rate": 3, "per_device_train_batch_size": 2, "lora_r": 2}
    assert spent.loc["full grid", "trial_epochs"] == 12 * 2


@NO_EXPERIMENT_WARNING  # a torn last result line is a trial still writing, nothing to warn about
def test_interrupted_experiment_statuses_are_inferred(search: tuple[Path, str], tmp_path: Path) -> None:
    """Without Ray's state file (a search killed early): ended trials, one still writing, one not started."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    for state in copy.glob("experiment_state-*.json"):
        state.unlink()
    # the trial with the most epochs plays the one still running: its last epoch is only half written
    running, *ended = sorted(
        (d for d in copy.iterdir() if (d / "result.json").exists()),
        key=lambda d: -len((d / "result.json").read_text().splitlines()),
    )
    lines = (running / "result.json").read_text().splitlines()
    (running / "result.json").write_text("\n".join([*lines[:-1], '{"accuracy": 0.5, "epo']))
    pending = copy / "train_trial_pending0_5_2099-01-01"
    pending.mkdir()
    shutil.copy(running / "params.json", pending / "params.json")

    exp = load_experiment(copy)
    status = dict(zip(exp.trials["trial_dir"].map(lambda p: Path(p).name), exp.trials["status"], strict=True))
    assert status[running.name] == "RUNNING"
    assert {status[d.name] for d in ended} == {"TERMINATED"}
    assert status[pending.name] == "PENDING"
    assert exp.trials.set_index("trial_dir").loc[str(running), "epochs"] == len(lines) - 1


def test_damaged_newest_state_file_is_read_around_with_a_warning(search: tuple[Path, str], tmp_path: Path) -> None:
    """A damaged newest experiment_state file: the older one is read instead, with a warning naming the damage (on
    the command line, one clean line); without any, a trial that reported its planned epochs is finished even where
    Ray wrote no `done`."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    expected = load_experiment(copy).trials.set_index("trial_id")["status"]
    (readable,) = copy.glob("experiment_state-*.json")
    damaged = copy / "experiment_state-2099-01-01_00-00-00.json"  # a later run's, cut short
    damaged.write_text(readable.read_text()[:200])
    with pytest.warns(ExperimentWarning, match=rf"{re.escape(str(damaged))} .* older {readable.name}"):
        exp = load_experiment(copy)
    assert exp.trials.set_index("trial_id")["status"].to_dict() == expected.to_dict()
    table = subprocess.run(
        [sys.executable, "-m", "analysis", "table", str(copy)],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in table.stderr.splitlines() if line]  # no echo of the code that warned
    assert line.startswith(f"warning: Ray's experiment state {damaged} (") and line.endswith(
        f"is not valid JSON. Read the trials' statuses from the older {readable.name} and their folders instead; "
        "restore it from a copy before resuming the search."
    )

    readable.unlink()
    planned = exp.trials.set_index("trial_dir")["max_epochs"]
    for trial_dir, epochs in exp.trials.set_index("trial_dir")["epochs"].items():
        if epochs == planned[trial_dir]:  # ran every epoch: Ray may leave `done` false on all its rows
            _rewrite_results(Path(trial_dir) / "result.json", done=False)
    with pytest.warns(ExperimentWarning, match=rf"{re.escape(str(damaged))} .* Inferred the trials' statuses"):
        blind = load_experiment(copy)
    assert set(blind.trials["status"]) == {"TERMINATED"}


def test_searched_parameters_come_from_the_search_space(search: tuple[Path, str], tmp_path: Path) -> None:
    """Without Ray's state, a parameter every trial drew the same is still searched: retraining uses its sampled
    value, not the base argument."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    for state in copy.glob("experiment_state-*.json"):
        state.unlink()
    for params in copy.glob("*/params.json"):
        params.write_text(json.dumps(json.loads(params.read_text()) | {"lora_r": 3}))
    exp = load_experiment(copy)
    assert exp.params == list(json.loads((copy / "lorasent_search.json").read_text())["tune"]["search_space"])
    assert exp.best_config == json.loads((Path(exp.best_trial["trial_dir"]) / "params.json").read_text())
    assert best_arguments(exp)[1].lora_r == 3


def test_compute_spent_plans_num_train_epochs_under_a_larger_max_epochs(
    search: tuple[Path, str], tmp_path: Path
) -> None:
    """--max_epochs above num_train_epochs: trials, and the full grid, still run num_train_epochs."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    search_file = copy / "lorasent_search.json"
    saved = json.loads(search_file.read_text())
    saved["tune"]["max_epochs"] = 5
    search_file.write_text(json.dumps(saved))
    exp = load_experiment(copy)
    epochs = saved["train"]["num_train_epochs"]
    assert compute_spent(exp).loc["full grid", "trial_epochs"] == 12 * epochs
    assert f"max {epochs} epochs" in plots.learning_curves(exp).get_suptitle()


def test_corrupt_result_line_before_the_last_warns_and_names_it(search: tuple[Path, str], tmp_path: Path) -> None:
    """A damaged line that is not the last one hides an epoch for good: the reader skips it, but says so."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    result = next(r for r in sorted(copy.glob("*/result.json")) if len(r.read_text().splitlines()) >= 2)
    lines = result.read_text().splitlines()
    result.write_text("\n".join(['{"accuracy": 0.5, "epo', *lines[1:]]) + "\n")
    with pytest.warns(ExperimentWarning, match=rf"{re.escape(str(result))} line 1 is not valid JSON"):
        exp = load_experiment(copy)
    trial_id = json.loads(lines[-1])["trial_id"]
    assert list(exp.epochs.loc[exp.epochs["trial_id"] == trial_id, "epoch"]) == list(range(2, len(lines) + 1))


def test_a_finished_trials_result_file_cut_short_by_a_killed_driver_is_read_from_its_checkpoints(
    search: tuple[Path, str], tmp_path: Path
) -> None:
    """Ray's driver rewrites every trial's result.json in the experiment about once a second, finished trials' too
    (truncate, then write): a driver killed in between (reproduced by killing it at that write) left a finished
    trial empty, or cut short, for good, since --resume never writes it again; the trial counted no epochs and no
    score. Its checkpoints' lorasent.json hold its epochs' metrics."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    exp = load_experiment(copy)
    columns = ["status", "epochs", f"best_{exp.metric}", "best_epoch", "best_checkpoint", "rank", "early_stopped"]
    best = exp.best_trial
    result = Path(best["trial_dir"]) / "result.json"
    first, *rest = result.read_text().splitlines(keepends=True)
    assert rest, "the best smoke trial reported one epoch only"
    for left in ("", first + rest[0][:20]):  # what a kill leaves: nothing, or the rows written before a torn one
        result.write_text(left)
        with pytest.warns(ExperimentWarning, match=rf"{re.escape(str(result))} lacks the finished trial's last"):
            damaged = load_experiment(copy)
        assert (
            damaged.trials.set_index("trial_id")[columns].to_dict()
            == exp.trials.set_index("trial_id")[columns].to_dict()
        )
        assert damaged.best_trial["trial_id"] == best["trial_id"] and damaged.best_epoch == exp.best_epoch


def test_corrupt_params_json_falls_back_to_rays_state(search: tuple[Path, str], tmp_path: Path) -> None:
    """One truncated params.json: the trial's config comes from Ray's experiment state, with a warning naming the
    file; without that state its hyperparameters are blank, and retraining it is refused rather than guessed."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    best_dir = Path(load_experiment(copy).best_trial["trial_dir"])
    _rewrite_results(best_dir / "result.json", accuracy=1.0)  # the best, however the tied smoke scores are ordered
    exp = load_experiment(copy)
    best_id = exp.best_trial["trial_id"]
    params = best_dir / "params.json"
    params.write_text(params.read_text()[:10])

    with pytest.warns(
        ExperimentWarning, match=rf"{re.escape(str(params))} is not valid JSON .* Ray's experiment state"
    ):
        damaged = load_experiment(copy)
    assert damaged.best_trial["trial_id"] == best_id and damaged.best_config == exp.best_config

    for state in copy.glob("experiment_state-*.json"):
        state.unlink()
    with pytest.warns(ExperimentWarning, match=rf"{re.escape(str(params))} is not valid JSON .* left blank"):
        blind = load_experiment(copy)
    assert blind.trials.set_index("trial_id").loc[best_id, exp.params].isna().all()
    assert len(blind.trials) == len(exp.trials)
    refused = r"unknown: its params\.json is damaged .* --use-checkpoint"
    with pytest.raises(ExperimentError, match=refused), pytest.warns(ExperimentWarning):
        retrain_best(copy, tmp_path / "final")


def test_failure_the_state_snapshot_missed_makes_the_trial_errored(search: tuple[Path, str], tmp_path: Path) -> None:
    """Ray's last experiment snapshot can predate a trial's last failure: error.txt has the final word."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    max_failures = json.loads((copy / "lorasent_search.json").read_text())["tune"]["max_failures"]
    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    trial, metadata = (json.loads(part) for part in state["trial_data"][0])
    error_file = copy / trial["relative_logdir"] / "error.txt"

    def snapshot(num_failures: int, failures_in_error_file: int) -> str:
        """The trial's status as read when the snapshot says RUNNING after num_failures, error.txt more."""
        trial["status"], metadata["num_failures"] = "RUNNING", num_failures
        state["trial_data"][0] = [json.dumps(trial), json.dumps(metadata)]
        state_file.write_text(json.dumps(state))
        lines = [f"Failure # {i} (occurred at 2026-11-26_10-13-4{i})\nRuntimeError: boom {i}" for i in range(1, 9)]
        error_file.write_text("\n".join(lines[:failures_in_error_file]) + "\n")
        row = load_experiment(copy).trials.set_index("trial_id").loc[trial["trial_id"]]
        assert row["num_failures"] == max(num_failures, failures_in_error_file)
        return row["status"] + (f": {row['error']}" if row["error"] else "")

    # The snapshot saw the last retry start; error.txt shows that retry failed too.
    assert snapshot(max_failures, max_failures + 1) == f"ERROR: RuntimeError: boom {max_failures + 1}"
    # error.txt is no further than the snapshot, or retries are left: the snapshot's RUNNING stands.
    assert snapshot(max_failures + 1, max_failures + 1) == "RUNNING"
    assert snapshot(0, 0) == "RUNNING"


def test_a_trial_diverged_from_its_first_epoch_is_never_best(search: tuple[Path, str], tmp_path: Path) -> None:
    """A trial whose loss went NaN reports diverged=1 and the worst metric (as tune/trainable.py does)."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    best = load_experiment(copy).best_trial
    _rewrite_results(Path(best["trial_dir"]) / "result.json", diverged=1.0, accuracy=-math.inf)

    exp = load_experiment(copy)
    diverged = exp.trials.set_index("trial_id").loc[best["trial_id"]]
    assert diverged["diverged"] and pd.isna(diverged["rank"]) and not diverged["early_stopped"]
    assert exp.best_trial["trial_id"] != best["trial_id"]
    assert trial_table(exp).iloc[-1]["trial_id"] == best["trial_id"]
    for plot in (plots.learning_curves, plots.lr_vs_metric, plots.lr_batch_heatmap, plots.rank_effect):
        assert plot(exp).axes, plot.__name__  # draws the others, no inf on any axis

    # The learning curves' key gives it no rank (it has none; it read '#4'), and names a trial that ended in error.
    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    k, (failed, metadata) = next(
        (k, [json.loads(part) for part in parts])
        for k, parts in enumerate(state["trial_data"])
        if json.loads(parts[0])["trial_id"] != best["trial_id"]
    )
    state["trial_data"][k] = [json.dumps(failed | {"status": "ERROR"}), json.dumps(metadata)]
    state_file.write_text(json.dumps(state))
    exp = load_experiment(copy)
    key = [text.get_text() for text in plots.learning_curves(exp).legends[0].get_texts()]
    rank = int(exp.trials.set_index("trial_id").loc[failed["trial_id"], "rank"])
    assert f"{best['trial_id']} (no score, diverged)" in key and f"{failed['trial_id']} (#{rank}, ERROR)" in key


def test_learning_rate_plot_is_quiet_and_labelled_whatever_was_searched(
    search: tuple[Path, str], tmp_path: Path
) -> None:
    """The learning rate searched alone: seaborn warned of a palette without a hue and of a key without entries, on
    the notebook's stderr. Learning rates within a decade: the log axis had no tick label at all."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    saved = json.loads((copy / "lorasent_search.json").read_text())
    saved["tune"]["search_space"] = {"learning_rate": saved["tune"]["search_space"]["learning_rate"]}
    (copy / "lorasent_search.json").write_text(json.dumps(saved))
    params_files = sorted(copy.glob("*/params.json"))

    def tick_labels(learning_rates: list[float]) -> list[str]:
        for params, learning_rate in zip(params_files, learning_rates, strict=False):
            params.write_text(json.dumps({"learning_rate": learning_rate}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig = plots.lr_vs_metric(load_experiment(copy))
            fig.savefig(io.BytesIO())  # formats the ticks
        (ax,) = fig.axes
        assert ax.get_legend() is None  # nothing to key: one colour, one marker
        low, high = ax.get_xlim()
        ticks = ax.get_xticklabels() + ax.get_xticklabels(minor=True)
        return [t.get_text() for t in ticks if t.get_text() and low <= t.get_position()[0] <= high]

    assert len(tick_labels([2e-4, 3e-4, 5e-4, 8e-4])) >= 2  # no power of ten in view: the ticks between are named
    # One in view: it alone is named (the ticks between, named too, ran into each other at this width).
    assert tick_labels([1.5e-4, 1.2e-3, 2e-3, 3.8e-3]) == [r"$\mathdefault{10^{-3}}$"]


def test_a_trial_that_diverged_after_a_good_epoch_is_ranked_by_it(search: tuple[Path, str], tmp_path: Path) -> None:
    """Its finished epochs are models like any other (their checkpoints kept); only the diverged epoch is never best.
    Before, the whole trial was dropped: a search whose best epoch came before a divergence reported a worse one."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    loser = load_experiment(copy).trials.sort_values("rank").iloc[-1]  # the worst trial, made the best, then diverged
    result = Path(loser["trial_dir"]) / "result.json"
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    rows[-1]["accuracy"] = 0.99
    step = {"training_iteration": rows[-1]["training_iteration"] + 1, "epoch": rows[-1]["epoch"] + 1}
    rows.append(rows[-1] | step | {"accuracy": -math.inf, "diverged": 1.0})
    result.write_text("".join(json.dumps(row) + "\n" for row in rows))

    exp = load_experiment(copy)
    trial = exp.best_trial
    assert trial["trial_id"] == loser["trial_id"] and trial["diverged"] and trial["rank"] == 1
    assert trial["best_accuracy"] == 0.99 and exp.best_epoch == rows[-2]["epoch"] and not trial["early_stopped"]
    assert trial["last_accuracy"] == -math.inf
    for plot in (plots.learning_curves, plots.lr_vs_metric, plots.lr_batch_heatmap, plots.rank_effect):
        assert plot(exp).axes, plot.__name__
    key = [text.get_text() for text in plots.learning_curves(exp).legends[0].get_texts()]
    assert f"{loser['trial_id']} (#1, diverged)" in key


def _set_accuracy_by_epoch(result: Path, accuracies: list[float]) -> None:
    """Give a trial's result.json rows these accuracies, epoch by epoch (its last value for any later epoch)."""
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["accuracy"] = accuracies[min(i, len(accuracies) - 1)]
    result.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _rename_trial(experiment: Path, trial_id: str, new_id: str) -> None:
    """Give a trial another id everywhere Ray wrote it (its folder's name, its reports, the experiment's state), as
    another run of the same search would: Ray draws trial ids at random."""
    (folder,) = experiment.glob(f"*_{trial_id}_*")
    for file in [*experiment.glob("experiment_state-*.json"), folder / "result.json", folder / "progress.csv"]:
        file.write_text(file.read_text().replace(trial_id, new_id))
    folder.rename(folder.with_name(folder.name.replace(trial_id, new_id)))


def test_ties_go_to_fewer_epochs_then_the_trial_sampled_first(search: tuple[Path, str], tmp_path: Path) -> None:
    """Not to the order Ray lists trials in, which a resumed search may change, nor to the smaller trial id: Ray
    draws ids at random, anew in each run, and `--smoke-test --max_concurrent_trials 1` run 5 times, its trials and
    results the same each time, named (and retrained) trial 2 as the best in 2 runs and trial 4, tied with it, in 3."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    trials = load_experiment(copy).trials
    longer = trials[trials["epochs"] >= 2].iloc[0]  # ASHA always lets a rung's first trial go on
    other = trials[trials["trial_id"] != longer["trial_id"]].iloc[0]
    first, later = sorted(
        [longer, other], key=lambda trial: sample_number(Path(trial["trial_dir"]).name, trial["trial_id"])
    )
    renamed = {first["trial_id"]: "ffffffff", later["trial_id"]: "00000000"}  # the first sampled, the larger id
    for trial_id, new_id in renamed.items():
        _rename_trial(copy, trial_id, new_id)
    results = {
        row["trial_id"]: Path(row["trial_dir"]) / "result.json" for _, row in load_experiment(copy).trials.iterrows()
    }
    for result in results.values():
        _set_accuracy_by_epoch(result, [0.1])
    _set_accuracy_by_epoch(results["ffffffff"], [0.99])
    _set_accuracy_by_epoch(results["00000000"], [0.99])
    assert load_experiment(copy).best_trial["trial_id"] == "ffffffff"

    _set_accuracy_by_epoch(results[renamed[longer["trial_id"]]], [0.5, 0.99])  # the same score, one epoch later
    exp = load_experiment(copy)
    assert (exp.best_trial["trial_id"], exp.best_epoch) == (renamed[other["trial_id"]], 1)


def test_gpu_memory_peak_per_trial(search: tuple[Path, str], tmp_path: Path) -> None:
    """GPU trials report gpu_memory_peak_gib each epoch; the trial table shows each trial's largest. CPU trial
    processes: neither that column nor trials_per_step (fused trials only)."""
    assert not {"gpu_memory_peak_gib", "trials_per_step"} & set(trial_table(load_experiment(search[0])))
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    expected = {}
    for k, result in enumerate(sorted(copy.glob("*/result.json"))):
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        peaks = [1.0 + k + 0.25 * i for i in range(len(rows))]  # grows by epoch, differs by trial
        lines = [json.dumps(row | {"gpu_memory_peak_gib": peak}) for row, peak in zip(rows, peaks, strict=True)]
        result.write_text("\n".join(lines) + "\n")
        expected[rows[0]["trial_id"]] = max(peaks)
    table = trial_table(load_experiment(copy)).set_index("trial_id")
    assert table["gpu_memory_peak_gib"].to_dict() == expected


def test_no_early_stopping_baseline_counts_each_trials_own_epochs(search: tuple[Path, str], tmp_path: Path) -> None:
    """With epochs searched, each trial plans its own epoch count: running them all without early stopping costs
    the sum of those, not trials x the largest."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    ran = load_experiment(copy).trials.set_index("trial_dir")["epochs"]
    # Epoch counts that differ whatever ASHA decided in this run (it may have let every trial finish): one trial
    # other than the longest keeps only its first epoch.
    for trial_dir in ran.index.drop(ran.idxmax())[:1]:
        result = Path(trial_dir) / "result.json"
        result.write_text(result.read_text().splitlines(keepends=True)[0])
        for later in sorted(Path(trial_dir).glob("checkpoint_*"))[1:]:  # a trial that ran one epoch saved one
            shutil.rmtree(later)
        ran[trial_dir] = 1
    for trial_dir, epochs in ran.items():  # each trial planned exactly the epochs it ran: none stopped early
        params = Path(trial_dir) / "params.json"
        params.write_text(json.dumps(json.loads(params.read_text()) | {"num_train_epochs": int(epochs)}))

    exp = load_experiment(copy)
    assert not exp.trials["early_stopped"].any() and ran.sum() < len(ran) * exp.max_epochs
    spent = compute_spent(exp)
    assert spent.loc["same trials, no early stopping", "trial_epochs"] == ran.sum()
    assert spent.loc["same trials, no early stopping", "trial_hours"] == pytest.approx(
        spent.loc["this search", "trial_hours"]
    )


def test_storage_uri_is_mirrored(search: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsspec URI (here fsspec's in-memory filesystem standing in for a bucket) reads like the local folder."""
    monkeypatch.setenv("LORASENT_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.put(str(search[0]), "/bucket/exp", recursive=True)
    try:
        remote, local = load_experiment("memory://bucket/exp"), load_experiment(search[0])
        assert remote.path.is_relative_to(tmp_path / "cache")
        pd.testing.assert_frame_equal(trial_table(remote), trial_table(local))
        # The bucket's experiment loses a trial (as when another search is written over it): the next read must not
        # count the trial from the copy's old files. What the analysis wrote into the copy (the report) stays.
        (remote.path / "report").mkdir()
        (remote.path / "report" / "report.ipynb").write_text("{}")
        gone = Path(remote.trials["trial_dir"].iloc[0]).name
        memory.rm(f"/bucket/exp/{gone}", recursive=True)
        for state_file in memory.glob("/bucket/exp/experiment_state-*.json"):
            state = json.loads(memory.cat(state_file))
            state["trial_data"] = [pair for pair in state["trial_data"] if gone not in pair[0]]
            memory.pipe(state_file, json.dumps(state).encode())
        again = load_experiment("memory://bucket/exp")
        assert again.path == remote.path and len(again.trials) == len(remote.trials) - 1
        assert not (remote.path / gone).exists() and (remote.path / "report" / "report.ipynb").is_file()
        with pytest.raises(ExperimentError, match="does not exist"):
            load_experiment("memory://bucket/missing")
    finally:
        memory.rm("/bucket", recursive=True)


def test_truncated_search_file_names_the_fix(search: tuple[Path, str], tmp_path: Path) -> None:
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    search_file = copy / "lorasent_search.json"
    search_file.write_text(search_file.read_text()[:100])
    with pytest.raises(ExperimentError, match=r"lorasent_search\.json is not valid JSON .* move it away to read"):
        load_experiment(copy)
    search_file.unlink()
    assert len(load_experiment(copy).trials) == len(load_experiment(search[0]).trials)


def test_missing_or_empty_experiment_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExperimentError, match=r"does not exist\. Pass the folder `python tune/run\.py` printed"):
        load_experiment(tmp_path / "no-such-experiment")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExperimentError, match=r"holds no trials .* start a search: python tune/run\.py"):
        load_experiment(empty)
    for run in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):  # a resumed search has a state file per run
        (empty / "exp" / f"experiment_state-{run}.json").parent.mkdir(exist_ok=True)
        (empty / "exp" / f"experiment_state-{run}.json").write_text("{}")
    with pytest.raises(ExperimentError, match=r"It contains experiment folder\(s\) \['exp'\]: pass one of those"):
        load_experiment(empty)
    # the CLI turns both into one clean line and exit status 2
    assert analysis_main(["report", str(empty)]) == 2
    assert analysis_main(["table", str(tmp_path / "no-such-experiment")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err
    with pytest.raises(SystemExit, match="2"):
        analysis_main(["report", str(empty), "--timeout", "0"])
    assert "--timeout: must be a positive number of seconds, not 0" in capsys.readouterr().err


def _outputs(nb: nbformat.NotebookNode, source_start: str) -> list[dict]:
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start))
    return cell.outputs


def test_report_without_final_model_says_how_to_make_it(search: tuple[Path, str], tmp_path: Path) -> None:
    """In a folder whose name holds quotes and braces too: the notebook takes paths as data, never as code."""
    copy = tmp_path / """it's "a" {x}"""
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    paths = write_report(copy, final_model=tmp_path / "none")
    nb = nbformat.read(paths.notebook, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    note = _outputs(nb, "final = retrain.load_final_evaluation")[0]["data"]["text/markdown"]
    assert f"python -m analysis retrain {shlex.quote(str(copy))}" in note


def test_stale_html_is_removed_when_no_new_one_replaces_it(
    search: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier run's report.html must not sit beside a notebook it does not show (--no-execute)."""
    out = tmp_path / "report"
    out.mkdir()
    stale = out / "report.html"
    stale.write_text("<html>an earlier run</html>")
    assert analysis_main(["report", str(search[0]), "--output", str(out), "--no-execute"]) == 0
    assert (out / "report.ipynb").is_file() and not stale.exists()
    assert f"Removed {stale}, an earlier run's report: this notebook is not executed" in capsys.readouterr().out


def test_a_report_run_that_does_not_finish_keeps_the_last_good_report(
    search: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed cell, Ctrl-C or a damaged final model leaves report.ipynb and report.html as the last good run made
    them; the partly run notebook goes beside them, named in one error line."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    out = copy / "report"
    assert analysis_main(["report", str(copy)]) == 0
    good = {name: (out / name).read_bytes() for name in ("report.ipynb", "report.html")}
    partial = out / "report.partial.ipynb"
    capsys.readouterr()

    odd = tmp_path / "odd_model"  # readable files, but no predictions' columns: the final-evaluation cell fails
    odd.mkdir()
    metrics = {"label_names": [], "metrics": {}, "classification_report": {}, "confusion_matrix": []}
    (odd / "test_metrics.json").write_text(json.dumps(metrics))
    (odd / "test_predictions.csv").write_text("text\n")
    assert analysis_main(["report", str(copy), "--final-model", str(odd)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error: A report cell failed: KeyError: 'correct'. The partly run notebook is ")
    assert f"{partial};" in err and f"The earlier report in {out} is kept." in err and ".." not in err
    assert {name: (out / name).read_bytes() for name in good} == good
    errors = [o for c in nbformat.read(partial, as_version=4).cells for o in c.get("outputs", [])]
    assert [o["ename"] for o in errors if o["output_type"] == "error"] == ["KeyError"]

    damaged = tmp_path / "damaged_model"  # caught before the kernel starts, naming this experiment
    shutil.copytree(odd, damaged)
    (damaged / "test_predictions.csv").unlink()
    partial.unlink()
    assert analysis_main(["report", str(copy), "--final-model", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"Recreate it with `python -m analysis retrain {copy.resolve()} --output {damaged}`" in err
    assert "EXPERIMENT" not in err and ".." not in err and not partial.exists()

    report = subprocess.Popen(
        [sys.executable, "-m", "analysis", "report", str(copy)],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "executing report notebook" not in seen:  # the kernel runs: interrupt it mid-notebook
        seen += report.stderr.read(1)
    report.send_signal(signal.SIGINT)
    _, rest = report.communicate(timeout=60)
    assert report.returncode == 130
    # The error may follow the progress bar on its line (the bar ends without a newline when interrupted).
    printed = seen + rest
    expected = f"error: Report interrupted. The partly run notebook is {partial}; open it in Jupyter to see how far"
    expected += f" it got. The earlier report in {out} is kept."
    assert re.findall(r"error: [^\r\n]*", printed) == [expected] and "Traceback" not in printed, printed
    assert {name: (out / name).read_bytes() for name in good} == good and partial.exists()

    assert analysis_main(["report", str(copy)]) == 0
    assert not partial.exists()  # a finished run supersedes it


def test_report_with_retrained_model(search: tuple[Path, str], final_model: Path, capsys) -> None:
    path = search[0]
    exp = load_experiment(path)
    assert analysis_main(["report", str(path)]) == 0
    printed = capsys.readouterr().out
    notebook, html = path / "report" / "report.ipynb", path / "report" / "report.html"
    assert f"Notebook: {notebook}" in printed and f"python -m lorasent.predict {final_model}" in printed

    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert code[0].metadata["tags"] == ["parameters"] and repr(str(path)) in code[0].source
    assert not re.search(r"\d\.\d{3}", "".join(c.source for c in code))  # numbers come from the run, not the code
    for call in (*PLOT_CALLS, "importances = ", "spent = "):
        assert any("image/png" in o.get("data", {}) for o in _outputs(nb, call)), call
    table_html = _outputs(nb, "results.trial_table(exp)")[0]["data"]["text/html"]
    assert table_html.split("<tbody>")[1].count("<tr>") == len(exp.trials)
    shown_config = next(o for o in _outputs(nb, "if exp.scored_trials.empty") if o.output_type == "display_data")
    assert ast.literal_eval(shown_config["data"]["text/plain"]) == exp.best_config

    metrics = json.loads((final_model / "test_metrics.json").read_text())["metrics"]
    final_outputs = _outputs(nb, "final = retrain.load_final_evaluation")
    summary = final_outputs[0]["data"]["text/markdown"]
    assert f"Test accuracy {metrics['accuracy']:.4f}" in summary and f"macro F1 {metrics['f1_macro']:.4f}" in summary
    assert any("image/png" in o.get("data", {}) for o in final_outputs)  # confusion matrix
    errors = _outputs(nb, "if final is not None")
    n_wrong = (~pd.read_csv(final_model / "test_predictions.csv")["correct"]).sum()
    assert (errors[0]["data"]["text/html"].split("<tbody>")[1].count("<tr>") if errors else 0) == min(n_wrong, 25)

    page = html.read_text()
    assert f"Test accuracy {metrics['accuracy']:.4f}" in page and page.count("data:image/png;base64") >= 7


def test_retrained_model_predictions_load_back(search: tuple[Path, str], final_model: Path) -> None:
    exp = load_experiment(search[0])
    assert final_model == search[0] / "final_model"
    meta = json.loads((final_model / "lorasent.json").read_text())
    provenance = json.loads((final_model / PROVENANCE_FILE).read_text())
    assert provenance["config"] == exp.best_config and provenance["epochs"] == exp.best_epoch
    assert meta["train"]["num_train_epochs"] == exp.best_epoch
    assert {k: meta["model"].get(k, meta["train"].get(k)) for k in exp.best_config} == exp.best_config

    saved = load_final_evaluation(final_model)
    predictor = Predictor.from_dir(final_model, device="cpu")
    again = predictor.predict(saved.predictions["text"].tolist())
    assert [p.label for p in again] == saved.predictions["prediction"].tolist()
    assert [p.probabilities["positive"] for p in again] == pytest.approx(
        saved.predictions["prob_positive"].tolist(), abs=1e-5
    )
    assert saved.metrics["accuracy"] == pytest.approx(saved.predictions["correct"].mean())


@NO_EXPERIMENT_WARNING  # a finished search: nothing to warn about
def test_use_checkpoint_tests_the_best_trials_checkpoint(search: tuple[Path, str], tmp_path: Path) -> None:
    """The final model gets the checkpoint's model files, never the Trainer's pickled state, and still serves."""
    exp = load_experiment(search[0])
    out = retrain_best(search[0], tmp_path / "from-checkpoint", use_checkpoint=True)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["checkpoint"] == str(exp.best_checkpoint)
    assert json.loads((out / "lorasent.json").read_text())["train_splits"] == ["train"]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        exp.best_checkpoint / "adapter_model.safetensors"
    ).read_bytes()
    pickles = (".pt", ".pth", ".bin", ".pkl")
    assert {p.suffix for p in exp.best_checkpoint.iterdir()} & set(pickles)  # the checkpoint has them to leave out
    assert not [p.name for p in out.iterdir() if p.suffix in pickles]

    saved = load_final_evaluation(out)
    assert saved.metrics["accuracy"] == pytest.approx(saved.predictions["correct"].mean())
    again = Predictor.from_dir(out, device="cpu").predict(saved.predictions["text"].tolist())
    assert [p.label for p in again] == saved.predictions["prediction"].tolist()


def test_retrain_never_replaces_a_folder_that_is_not_a_final_model(
    search: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final model replaces its folder whole: `--output` pointed at the experiment itself (or any folder of other
    files) deleted every trial; it is refused before training. A final model is replaced by the next."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    for argv in (
        ["retrain", str(copy), "--output", str(copy)],
        ["report", str(copy), "--retrain", "--final-model", str(copy)],
    ):
        assert analysis_main(argv) == 2
        assert "holds files and is not a lorasent model folder" in capsys.readouterr().err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    first = retrain_best(copy, tmp_path / "final", use_checkpoint=True)
    assert retrain_best(copy, first, use_checkpoint=True) == first


def test_retrain_runs_a_base_models_own_code_only_when_asked(search: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """An experiment folder is data: one whose search ran with --trust_remote_code turns code on only with the flag
    again (retraining and testing run the base model's code)."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    meta = json.loads((copy / "lorasent_search.json").read_text())
    meta["model"]["trust_remote_code"] = True
    (copy / "lorasent_search.json").write_text(json.dumps(meta))
    assert analysis_main(["retrain", str(copy), "--use-checkpoint"]) == 2
    assert "was searched with --trust_remote_code" in capsys.readouterr().err
    assert not (copy / "final_model").exists()
    assert analysis_main(["retrain", str(copy), "--use-checkpoint", "--trust_remote_code"]) == 0
    assert (copy / "final_model" / PROVENANCE_FILE).is_file()


def test_retrain_takes_the_data_where_it_is_now(search: tuple[Path, str], tmp_path: Path, write_data, capsys) -> None:
    """An experiment copied from another machine records its data file's path there: --dataset names where it is
    now; data of other content is refused before training (its splits would be others)."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    meta = json.loads((copy / "lorasent_search.json").read_text())
    data = meta["data"]["dataset"]
    meta["data"]["dataset"] = str(tmp_path / "gone" / "reviews.csv")
    (copy / "lorasent_search.json").write_text(json.dumps(meta))
    assert analysis_main(["retrain", str(copy)]) == 2
    assert "--dataset" in capsys.readouterr().err
    other = write_data([{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(40)])
    assert analysis_main(["retrain", str(copy), "--dataset", str(other)]) == 2
    assert f"{other} is not the data" in capsys.readouterr().err and not (copy / "final_model").exists()
    assert analysis_main(["retrain", str(copy), "--dataset", data]) == 0
    assert json.loads((copy / "final_model" / "lorasent.json").read_text())["data"]["dataset"] == data


def test_final_model_records_the_experiment_a_latest_link_pointed_at(search: tuple[Path, str], tmp_path: Path) -> None:
    """`latest` moves on with the next search: final_model.json keeps the experiment folder it resolved to."""
    latest = tmp_path / "latest"
    latest.symlink_to(search[0], target_is_directory=True)
    out = retrain_best(latest, tmp_path / "final", use_checkpoint=True)
    assert json.loads((out / PROVENANCE_FILE).read_text())["experiment"] == str(search[0].resolve())


def test_retrain_mid_search_warns_that_the_best_may_change(search: tuple[Path, str], tmp_path: Path) -> None:
    """Unfinished trials, or planned trials an interrupted search never started: retraining goes ahead (the best so
    far), with a warning that says how to finish first; the report opens with the same caveat."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    location = re.escape(str(copy.resolve()))
    search_file = copy / "lorasent_search.json"
    saved = json.loads(search_file.read_text())
    n_trials = saved["tune"]["num_samples"]
    saved["tune"]["num_samples"] = n_trials + 2  # Ctrl-C came before the search created its last 2 trials
    search_file.write_text(json.dumps(saved))
    expected = rf"^2 of the {n_trials + 2} planned trials of {location} have not started: .*--resume {location}`"
    with pytest.warns(ExperimentWarning, match=expected):
        retrain_best(copy, tmp_path / "final", use_checkpoint=True)

    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    for k, status in enumerate(("RUNNING", "PAUSED")):
        trial, metadata = (json.loads(part) for part in state["trial_data"][k])
        state["trial_data"][k] = [json.dumps(trial | {"status": status}), json.dumps(metadata)]
    state_file.write_text(json.dumps(state))
    expected = (
        rf"2 of {n_trials} trials of {location} are unfinished .* and 2 of the {n_trials + 2} planned trials have not "
        rf"started: .*`python tune/run\.py --resume {location}`"
    )
    with pytest.warns(ExperimentWarning, match=expected):
        out = retrain_best(copy, tmp_path / "final", use_checkpoint=True)
    assert load_final_evaluation(out).provenance["trial_id"] == load_experiment(copy).best_trial["trial_id"]

    paths = write_report(copy, final_model=out)
    assert paths.unfinished.startswith(f"2 of {n_trials} trials of {copy.resolve()} are unfinished")
    banner = _outputs(nbformat.read(paths.notebook, as_version=4), "%matplotlib inline")[1]["data"]["text/markdown"]
    assert re.match(rf"\*\*Partial report: 2 of {n_trials} trials of {location} are unfinished", banner)
    assert f"python tune/run.py --resume {copy.resolve()}" in banner


def test_report_of_a_search_whose_trials_all_failed(search: tuple[Path, str], tmp_path: Path) -> None:
    """Every trial errored before its first epoch: the report renders and says why there is no best or final model,
    its plots show their notes as images, and retraining is refused with the trials' error."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model"))  # another test may have made it
    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    for k, parts in enumerate(state["trial_data"]):
        trial, metadata = (json.loads(part) for part in parts)
        state["trial_data"][k] = [json.dumps(trial | {"status": "ERROR"}), json.dumps(metadata | {"num_failures": 1})]
        trial_dir = copy / trial["relative_logdir"]
        (trial_dir / "result.json").write_text("")
        (trial_dir / "error.txt").write_text("Failure # 1 (occurred at 2026-11-27_01-53-31)\nRuntimeError: boom\n")
    state_file.write_text(json.dumps(state))
    n_trials = len(state["trial_data"])
    why = rf"No trial of {re.escape(str(copy.resolve()))} produced a usable 'accuracy', so there is no best trial: of "
    why += rf"its {n_trials} trials, {n_trials} ended in ERROR \(e\.g\. RuntimeError: boom\) and 0 diverged\."
    with pytest.raises(ExperimentError, match=why):
        retrain_best(copy)

    nb = nbformat.read(write_report(copy).notebook, as_version=4)
    assert re.match(why, _outputs(nb, "if exp.scored_trials.empty")[0]["data"]["text/markdown"])
    for call in PLOT_CALLS:
        assert "image/png" in _outputs(nb, call)[0]["data"], call  # the note, drawn
    final = _outputs(nb, "final = retrain.load_final_evaluation")[0]["data"]["text/markdown"]
    assert final.startswith("No final model: no trial has a score")


def test_report_is_the_same_when_run_again(search: tuple[Path, str]) -> None:
    """Re-running the report on an unchanged experiment changes nothing: no random cell ids, no random jitter."""
    exp = load_experiment(search[0])
    final = search[0] / "final_model"
    assert nbformat.writes(build_notebook(exp, final)) == nbformat.writes(build_notebook(exp, final))
    drawn, state = [], np.random.get_state()
    try:
        for seed in (1, 2):  # each notebook kernel starts numpy's global generator somewhere else
            np.random.seed(seed)
            png = io.BytesIO()
            plots.rank_effect(exp).savefig(png, format="png")
            drawn.append(png.getvalue())
    finally:
        np.random.set_state(state)
    assert drawn[0] == drawn[1]


def test_a_report_run_again_keeps_an_edited_notebook_aside(
    search: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Notes someone added to report.ipynb were silently replaced by the next run: now that notebook is moved aside,
    and said so. A notebook only re-run (outputs changed, cells not) or written before the record is replaced."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy, ignore=shutil.ignore_patterns("final_model", "report"))
    notebook = write_report(copy).notebook  # executed: the kernel leaves the cells as written
    assert write_report(copy, execute=False).notebook == notebook
    earlier = nbformat.read(notebook, as_version=4)
    earlier.metadata.pop("lorasent", None)  # a report written before the cells' digest was recorded
    nbformat.write(earlier, notebook)
    write_report(copy, execute=False)
    assert (
        sorted(p.name for p in notebook.parent.iterdir()) == ["report.ipynb"] and "Moved" not in capsys.readouterr().out
    )

    edited = nbformat.read(notebook, as_version=4)
    edited.cells.append(nbformat.v4.new_markdown_cell("My notes: lr 2e-3 is the one to rerun."))
    nbformat.write(edited, notebook)
    write_report(copy, execute=False)
    (kept,) = notebook.parent.glob("report.edited-*.ipynb")
    assert nbformat.read(kept, as_version=4).cells[-1].source == "My notes: lr 2e-3 is the one to rerun."
    assert "My notes" not in notebook.read_text()
    assert f"Moved {notebook} to {kept}: its cells were edited since the report wrote them." in capsys.readouterr().out


def test_note_figures_show_in_a_notebook() -> None:
    """IPython displays a figure without axes as its repr ('<Figure size ... with 0 Axes>'), not as an image."""
    assert print_figure(plots.note_figure("The search did not vary the LoRA rank."))


def test_summary_names_no_early_stopping_without_a_scheduler(search: tuple[Path, str], tmp_path: Path) -> None:
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    assert "stopped early by ASHA" in summary_line(load_experiment(copy))
    saved = json.loads((copy / "lorasent_search.json").read_text())
    saved["tune"]["scheduler"] = "none"
    (copy / "lorasent_search.json").write_text(json.dumps(saved))
    assert "no early stopping (--scheduler none)" in summary_line(load_experiment(copy))


def test_summary_counts_the_distinct_configurations_where_trials_repeat_one(
    search: tuple[Path, str], tmp_path: Path
) -> None:
    """Experiments of searches that repeated configurations (TPE before DistinctSampler) say how many were distinct."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)
    trials = len(load_experiment(copy).trials)
    assert f"{trials} trial(s): " in summary_line(load_experiment(copy))  # all distinct: nothing to say
    first, second = sorted(copy.glob("*/params.json"))[:2]
    second.write_text(first.read_text())
    assert f"{trials} trial(s), {trials - 1} distinct configuration(s): " in summary_line(load_experiment(copy))


def test_report_flags_a_final_model_that_is_no_longer_the_best(
    search: tuple[Path, str], final_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A search resumed after retraining finds a better trial: the report and its command line say the final model
    is not the current best's, and how to rebuild it."""
    copy = tmp_path / "exp"
    shutil.copytree(search[0], copy)  # with its final_model
    exp = load_experiment(copy)
    assert final_model_mismatch(exp, copy / "final_model") == ""
    other = exp.trials[exp.trials["trial_id"] != exp.best_trial["trial_id"]].iloc[0]
    _rewrite_results(Path(other["trial_dir"]) / "result.json", accuracy=1.0)

    assert analysis_main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out
    fix = f"python -m analysis retrain {copy.resolve()}`"
    assert (
        f"Warning: The final model {copy.resolve() / 'final_model'} was built from trial {exp.best_trial['trial_id']}"
        in printed
    )
    assert f"now trial {other['trial_id']}" in printed and fix in printed
    nb = nbformat.read(copy / "report" / "report.ipynb", as_version=4)
    shown = _outputs(nb, "final = retrain.load_final_evaluation")[0]["data"]["text/markdown"]
    assert shown.startswith("**Warning: not the current best.**") and f"now trial {other['trial_id']}" in shown
    assert fix in shown


@NO_EXPERIMENT_WARNING  # test scores of a model that never saw the test split
@pytest.mark.filterwarnings("error::lorasent.evaluate.SeenSplitWarning")
def test_cli_table_and_evaluate(search: tuple[Path, str], final_model: Path, tmp_path: Path, capsys) -> None:
    exp = load_experiment(search[0])
    assert analysis_main(["table", str(search[0]), "--csv", str(tmp_path / "trials.csv")]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in exp.trials["trial_id"]) and f"Best: trial {exp.best_trial['trial_id']}" in out
    assert len(pd.read_csv(tmp_path / "trials.csv")) == len(exp.trials)

    assert analysis_main(["evaluate", str(final_model), "--output", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["metrics"]
    saved = json.loads((final_model / "test_metrics.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(saved["accuracy"])


def test_evaluating_the_final_model_on_a_split_it_learnt_from_warns(final_model: Path, tmp_path: Path) -> None:
    """The retrained final model learnt from validation (its lorasent.json says so): its validation figures are
    optimistic, and both evaluation commands say so. A final model retrained before lorasent.json recorded it has
    its splits only in final_model.json, which the analysis command still reads."""
    assert json.loads((final_model / "lorasent.json").read_text())["train_splits"] == ["train", "validation"]
    expected = (
        r"trained on train \+ validation \(lorasent\.json\), .* its validation scores are optimistic.* --split test"
    )
    with pytest.warns(SeenSplitWarning, match=expected):
        assert analysis_main(["evaluate", str(final_model), "--split", "validation"]) == 0
    with pytest.warns(SeenSplitWarning, match=expected):
        assert evaluate_main([str(final_model), "--split", "validation", "--device", "cpu"]) == 0

    old = tmp_path / "old_final_model"
    shutil.copytree(final_model, old)
    meta = json.loads((old / "lorasent.json").read_text())
    del meta["train_splits"]
    (old / "lorasent.json").write_text(json.dumps(meta))
    provenance = json.loads((old / PROVENANCE_FILE).read_text())
    (old / PROVENANCE_FILE).write_text(json.dumps(provenance | {"train_splits": ["train", "validation"]}))
    for split, record in (("validation", PROVENANCE_FILE), ("train", "lorasent.json")):
        with pytest.warns(SeenSplitWarning) as caught:
            assert analysis_main(["evaluate", str(old), "--split", split]) == 0
        assert [str(w.message) for w in caught if "optimistic" in str(w.message)] == [
            f"{old} was trained on {'train + validation' if split == 'validation' else 'train'} ({record}), so its "
            f"{split} scores are optimistic: it has seen those texts. Evaluate on a split it never saw: --split test."
        ]
