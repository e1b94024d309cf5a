"""What --resume needs beyond Ray Tune's restore, for a driver killed at any moment.

Ray saves an experiment in several files, one after another: the trials (experiment_state-*.json), then the searcher
(searcher-state-*.pkl: Optuna's study; search_gen_state-*.json: the trials its ConcurrencyLimiter counts as running,
how many trials were made; basic-variant-state-*.json for random and grid search), and a thread copies them to the
storage folder. A driver killed in between (SIGKILL, the OOM killer, a lost head node) leaves the searcher a snapshot
behind or ahead of the trials. Restored as it is, a searcher that still counts as running a trial which has finished
since never proposes another one once its concurrency limit is full: the resumed search waits forever (a killed search
in CI did). One behind by a trial also makes a trial too many, or random search the same trial again. So once Ray has
restored them, the search algorithms here bring the searcher in line with the saved trials that Ray restores: a trial
that finished since the searcher's snapshot is reported to it now (Optuna learns its result), one it proposed that was
never saved is reported failed (Ray will not run it), and the trials made are the ones saved.

Ray saves no scheduler state: a resumed ASHA knew none of the results reported before the resume, and judged each
trial against the few reported since (a resumed search of 6 trials, one at a time, stopped a trial after one epoch
that the same search never interrupted trained for three). `ResumableASHA` replays each restored trial's reports
into its rungs first, up to the report its checkpoint holds (the trial reports the rest again).

Between two snapshots Ray also deletes checkpoints (beyond --keep_checkpoints), among them perhaps the one the last
snapshot names as a trial's latest: `restorable` trials then restore from their nearest checkpoint that exists, and
`AlreadyDeletedCheckpoint` says in one line what Ray logs as an error when it goes to delete one of those again."""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.train._internal.checkpoint_manager import _TrainingResult
from ray.train._internal.storage import StorageContext, _exists_at_fs_path, get_fs_and_path
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.utils.util import _load_newest_checkpoint

from lorasent.paths import META_FILE
from tune.cluster import SavedTrial, saved_trials

FINISHED = "TERMINATED"  # errored trials are not finished: --resume runs them again

_resumed_at: tuple[str, str] | None = None  # (storage path, experiment name) of the experiment this process resumes


def resuming_at(storage_path: str, name: str) -> None:
    """Say where the experiment about to be resumed lies now. Ray restores a searcher with the location the
    experiment was started at, and puts the trials it has yet to make there; when the experiment has been moved or
    copied since, the search algorithms here put them where it lies now, beside the trials Ray restores."""
    global _resumed_at
    _resumed_at = (storage_path, name)


def _stored_here(storage: StorageContext) -> StorageContext:
    """`storage` moved to where the experiment being resumed lies, as Ray moves its restored trials' storage."""
    if _resumed_at is None:
        return storage
    storage_path, name = _resumed_at
    here = copy.copy(storage)
    here.storage_filesystem, here.storage_fs_path = get_fs_and_path(storage_path)
    here.experiment_dir_name = name
    return here


class ResumableSearchGenerator(SearchGenerator):
    """Ray's wrapper of a searcher behind a ConcurrencyLimiter, made consistent with the saved trials on restore."""

    searcher: ConcurrencyLimiter

    def __init__(self, searcher: ConcurrencyLimiter, metric: str, mode: str) -> None:
        super().__init__(searcher)
        self.objective = (metric, mode)  # what Tune gives the searcher when the search starts, and not on a resume

    def restore_from_dir(self, dirpath: str) -> None:
        trials = saved_trials(dirpath)  # Ray has just copied the experiment's state files here, and restores them
        try:
            super().restore_from_dir(dirpath)
        except (EOFError, pickle.UnpicklingError):
            self._restore_without_the_searchers_file(dirpath, trials or [])
        if self._experiment is not None and "storage" in self._experiment.spec:  # of the trials it has yet to make
            self._experiment.spec["storage"] = _stored_here(self._experiment.spec["storage"])
        if trials is None:
            return
        saved = {trial.trial_id: trial for trial in trials}
        limiter = self.searcher
        for trial_id in sorted(limiter.live_trials):
            trial = saved.get(trial_id)
            if trial is not None and trial.status != FINISHED:
                continue  # Ray runs it on, and its end reaches the searcher as usual
            try:
                if trial is None:  # proposed after the trials were saved: Ray does not know it
                    limiter.on_trial_complete(trial_id, error=True)
                else:  # finished after the searcher was saved: the result it missed
                    limiter.on_trial_complete(trial_id, result=trial.last_result)
            except KeyError:  # the searcher's own file is older still: it never proposed this trial
                limiter.live_trials.discard(trial_id)
        self._counter = len(trials)

    def _restore_without_the_searchers_file(self, dirpath: str, trials: list[SavedTrial]) -> None:
        """Restore when Optuna's own file (searcher-state-*.pkl, the last Ray copies to storage) was cut short by
        the kill: the rest of the state as saved, and Optuna's study set up afresh and told the result of every
        finished trial. The limiter then counts none as running: the study knows none."""
        state = _load_newest_checkpoint(dirpath, self.CKPT_FILE_TMPL.format("*"))  # Ray read it whole already
        self.set_state({key: value for key, value in state.items() if not key.startswith("name:")})
        self.searcher.live_trials.clear()
        study, space, (metric, mode) = self.searcher.searcher, self._experiment.spec["config"], self.objective
        study.set_search_properties(metric, mode, space)
        for trial in trials:
            value = trial.last_result.get(metric)
            if trial.status == FINISHED and isinstance(value, (int, float)) and math.isfinite(value):
                study.add_evaluated_point({name: v for name, v in trial.config.items() if name in space}, value)
        logging.getLogger(__name__).warning(
            "The searcher's saved study was cut short; it has been rebuilt from the finished trials' results."
        )


class ResumableVariantGenerator(BasicVariantGenerator):
    """Ray's random and grid search, made consistent with the saved trials on restore: a trial that has finished, or
    was never saved, no longer counts against --max_concurrent_trials, and a trial it makes again (its state a
    snapshot behind: the same id, from the same variant) is dropped, as Ray restores the saved one. A trial it made
    that was never saved is not made again (its variant is gone with it): the search runs one trial fewer."""

    _saved: frozenset[str] = frozenset()

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        for iterator in self._iterators:  # the specs of the trials it has yet to make
            if "storage" in iterator.unresolved_spec:
                iterator.unresolved_spec["storage"] = _stored_here(iterator.unresolved_spec["storage"])
        trials = saved_trials(dirpath)
        if trials is not None:
            self._live_trials &= {trial.trial_id for trial in trials if trial.status != FINISHED}
            self._saved = frozenset(trial.trial_id for trial in trials)

    def next_trial(self) -> Trial | None:
        trial = super().next_trial()
        while trial is not None and trial.trial_id in self._saved:
            self._live_trials.discard(trial.trial_id)
            trial = super().next_trial()
        return trial


class ResumableASHA(ASHAScheduler):
    """Ray's ASHA, whose rungs hold again, on a resume, what the restored trials reported before it."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        restored_to = trial.run_metadata.last_result.get(self._time_attr)  # a new trial has reported nothing
        if restored_to is None:
            return
        bracket = self._trial_info[trial.trial_id]
        for report in _reports(trial.storage.storage_filesystem, trial.storage.trial_fs_path):
            if report.get(self._time_attr, math.inf) <= restored_to and self._metric in report:
                bracket.on_result(trial, report[self._time_attr], self._metric_op * report[self._metric])


def _reports(fs: Any, trial_folder: str) -> list[dict[str, Any]]:
    """The reports in a trial's result.json on `fs`, in order, up to a line that is not one (the last, cut short by
    a kill); [] where there is none to read."""
    try:
        with fs.open_input_stream(f"{trial_folder}/result.json") as f:
            lines = f.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    reports = []
    for line in lines:
        try:
            report = json.loads(line)
        except ValueError:
            break
        if not isinstance(report, dict):
            break
        reports.append(report)
    return reports


class AlreadyDeletedCheckpoint(logging.Filter):
    """Ray's ERROR and traceback when a resumed trial's new checkpoint makes it delete an old one that was deleted
    already (after the snapshot Ray restored its list of checkpoints from), as one INFO line: the new checkpoint is
    registered all the same, and the old one was to go. Install it on Tune's controller logger (`LOGGER`)."""

    LOGGER = "ray.tune.execution.tune_controller"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FileNotFoundError) and any(
            frame.name == "_delete_fs_path" for frame in traceback.extract_tb(error.__traceback__)
        ):
            trial = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "Trial %s: an old checkpoint it was to delete was gone already (deleted before the resume)."
            record.args = (trial,)
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.INFO, "INFO", None, None
        return True


class FallBackToAnExistingCheckpoint:
    """A mixin of Tune's function trainables: when the checkpoint Ray restores a trial from is gone, it restores from
    the trial's nearest checkpoint that exists.

    Ray deletes a trial's older checkpoints (beyond --keep_checkpoints) as soon as a new one is reported; a driver
    killed before its next snapshot leaves the snapshot naming a checkpoint that was deleted since as the trial's
    latest. Ray's restore then fails on every retry, and the trial ends errored with its newer checkpoint unused.
    """

    def restore(self, checkpoint_path: Any) -> Any:
        if isinstance(checkpoint_path, _TrainingResult):
            checkpoint = checkpoint_path.checkpoint
            if not _exists_at_fs_path(checkpoint.filesystem, checkpoint.path):
                checkpoint_path = _nearest_checkpoint(checkpoint) or checkpoint_path
        return super().restore(checkpoint_path)  # type: ignore[misc]  (FunctionTrainable's, next in the MRO)


def restorable(trainable: Callable[..., Any]) -> Callable[..., Any]:
    """A function trainable (as `tune.with_parameters` and `tune.with_resources` return it) whose trial class, which
    Tune builds from it, falls back to an existing checkpoint (`FallBackToAnExistingCheckpoint`)."""
    trainable.__mixins__ = (*getattr(trainable, "__mixins__", ()), FallBackToAnExistingCheckpoint)  # type: ignore[attr-defined]
    return trainable


def _nearest_checkpoint(missing: tune.Checkpoint) -> _TrainingResult | None:
    """The whole checkpoint (one with its lorasent.json) of `missing`'s trial nearest after it, else nearest before
    it, with the metrics of the report that made it: from result.json if the driver synced that row before it died,
    else its training_iteration, one more than its index (every report of a lorasent trial holds a checkpoint).
    The one right after retrains least and leaves the trial's results one report short at most; None if none."""
    import pyarrow.fs

    fs, (trial_folder, missing_name) = missing.filesystem, missing.path.rsplit("/", 1)
    rows = {row.get("checkpoint_dir_name") or "": row for row in _reports(fs, trial_folder)}
    folders = (info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_folder)))
    indices = {name: index for name in folders if (index := _checkpoint_index(name)) is not None}
    gone = _checkpoint_index(missing_name) or 0
    after = sorted((name for name in indices if indices[name] > gone), key=indices.get)
    before = sorted((name for name in indices if indices[name] < gone), key=indices.get, reverse=True)
    for name in after + before:
        if fs.get_file_info(f"{trial_folder}/{name}/{META_FILE}").type == pyarrow.fs.FileType.NotFound:
            continue  # cut short by the kill
        logging.getLogger(__name__).warning(
            "The checkpoint %s is gone (deleted after the driver's last snapshot); restoring from %s instead.",
            missing.path,
            name,
        )
        metrics = rows.get(name) or {"training_iteration": indices[name] + 1}
        return _TrainingResult(tune.Checkpoint(f"{trial_folder}/{name}", filesystem=fs), metrics)
    return None


def _checkpoint_index(name: str) -> int | None:
    """N of Ray's checkpoint folder `checkpoint_<N>`; None for any other name."""
    index = name.removeprefix("checkpoint_")
    return int(index) if index != name and index.isdigit() else None
