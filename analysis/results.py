"""Gather a Ray Tune experiment folder into pandas tables: one row per trial, one row per (trial, epoch).

Reads only the JSON and CSV files Ray Tune writes (`experiment_state-*.json`, each trial's `params.json`
and `result.json`) plus lorasent's own `lorasent_search.json` (and, where a trial's `result.json` lost reports, its
checkpoints' `lorasent.json`), never `tuner.pkl` or any other pickle. That
is what makes a running or interrupted experiment readable, and what keeps reading a folder someone sent
you safe. Storage URIs (`s3://`, `gs://`, anything pyarrow or fsspec opens) are mirrored into the local
cache first, so every later step (plots, retraining from a checkpoint) works on plain local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lorasent.errors import ExperimentError
from lorasent.paths import META_FILE, cache_root
from tune.cluster import sample_number

DEFAULT_EXPERIMENT = "runs/tune/latest"
SEARCH_FILE = "lorasent_search.json"
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
STATE_GLOB = "experiment_state-*.json"
UNFINISHED = ("RUNNING", "PENDING", "PAUSED")  # trial statuses of a search still running, or interrupted
FAILURE_HEADER = re.compile(r"^Failure # \d+", re.MULTILINE)  # one per failed attempt in a trial's error.txt
TUNE_COMMAND = "python tune/run.py"
REPORT_DIR = "report"  # written into the experiment (or its local copy) by `python -m analysis report`
FINAL_MODEL_DIR = "final_model"  # written there by `python -m analysis retrain`
# Reported by some trials only, summarised per trial in the trial table: a GPU trial's memory peak (what the search's
# GPU sharing really needed) and a fused trial's mean trials per step (how packed its engine stepped it).
EPOCH_SUMMARIES = {"gpu_memory_peak_gib": "max", "trials_per_step": "mean"}

# Ray's bookkeeping in every result row: kept in the epochs table, but never a hyperparameter or a metric.
_BOOKKEEPING = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "epoch", "diverged",
}  # fmt: skip


class ExperimentWarning(UserWarning):
    """Something about an experiment or its final model that skews what the analysis shows (a damaged file read
    around, an unfinished search, a final model of another trial); the message names the fix."""


@dataclass
class Experiment:
    """One search, as tables. `trials` has one row per trial, `epochs` one row per reported epoch."""

    path: Path  # local folder (a mirror in the cache when `source` is a storage URI)
    source: str  # the path or URI the user gave
    trials: pd.DataFrame
    epochs: pd.DataFrame
    metric: str  # validation metric the search optimised
    mode: str  # "max" or "min"
    max_epochs: int
    params: list[str]  # config columns the search sampled (learning_rate, lora_r, ...)
    config_columns: list[str]  # every config column (sampled and constant), nested keys as 'a/b'
    configs: dict[str, dict[str, Any]]  # trial_id -> its config exactly as Ray recorded it (flattened)
    search: dict[str, Any] = field(default_factory=dict)  # lorasent_search.json, {} when absent

    @property
    def location(self) -> str:
        """Where to read this experiment again: its storage URI, or its resolved local folder (never a `latest`
        link, which a later search re-points)."""
        return str(self.path) if _is_local(self.source) else self.source

    @property
    def best_column(self) -> str:
        return f"best_{self.metric}"

    @cached_property
    def best_trial(self) -> pd.Series:
        """The trial whose best epoch scored best on the search's metric (a diverged trial by its epochs before)."""
        scored = self.scored_trials
        if scored.empty:
            raise ExperimentError(no_score_note(self))
        return scored.sort_values("rank", kind="stable").iloc[0]

    @property
    def scored_trials(self) -> pd.DataFrame:
        """Trials with a finite score for at least one epoch (one that diverged, for the epochs before it)."""
        return self.trials[self.trials[self.best_column].notna()]

    @property
    def best_config(self) -> dict[str, Any]:
        """The best trial's sampled hyperparameters (only the searched ones), with their recorded types."""
        config = self.configs[self.best_trial["trial_id"]]
        return {name: config[name] for name in self.params if name in config}

    @property
    def best_epoch(self) -> float:
        """Epochs the best trial had trained at its best evaluation: whole unless it evaluated within epochs."""
        epoch = float(self.best_trial["best_epoch"])
        return int(epoch) if epoch.is_integer() else epoch

    @property
    def best_checkpoint(self) -> Path | None:
        value = self.best_trial["best_checkpoint"]
        return Path(value) if isinstance(value, str) else None

    def param(self, name: str) -> str | None:
        """The config column for a hyperparameter's short name (`lora_r` matches `model/lora_r`)."""
        for column in self.params + self.config_columns:
            if column == name or column.endswith("/" + name):
                return column
        return None

    @property
    def resources(self) -> dict[str, float]:
        """CPUs and GPUs each trial held, as the search resolved them (`resources`; older records only have the
        requested tune arguments, where an automatic GPU share is None), else Ray's default of 1 CPU."""
        if "resources" in self.search:
            return {key: float(self.search["resources"][key]) for key in ("cpu", "gpu")}
        tune_args = self.search.get("tune", {})
        return {"cpu": float(tune_args.get("cpus_per_trial") or 1), "gpu": float(tune_args.get("gpus_per_trial") or 0)}

    @property
    def early_stopping(self) -> bool:
        """Whether a scheduler could stop trials early (ASHA, the default; `--scheduler none` runs every epoch)."""
        return self.search.get("tune", {}).get("scheduler") != "none"

    @property
    def search_space(self) -> dict[str, dict[str, list[Any]]]:
        """The search space as `tune/run.py` recorded it: {parameter: {distribution: values}}; {} if unknown."""
        return self.search.get("tune", {}).get("search_space") or {}


def load_experiment(path: str | os.PathLike[str] = DEFAULT_EXPERIMENT) -> Experiment:
    """Read an experiment folder (finished, running or interrupted; local path or storage URI)."""
    source = str(path)
    root = _local_root(source)
    try:
        search = _read_json(root / SEARCH_FILE) or {}
    except ExperimentError as e:
        raise ExperimentError(
            f"{e} It holds the search's arguments (metric, search space, data and model): restore it from a copy, "
            "or move it away to read the trials without it (retraining then needs --use-checkpoint)."
        ) from e
    state = _read_state(root)
    trial_dirs = _trial_dirs(root, state)
    if not trial_dirs:
        raise ExperimentError(_no_trials_message(source, root))

    trial_rows, epoch_frames, configs = [], [], {}
    max_failures = search.get("tune", {}).get("max_failures")
    for name, trial_state in trial_dirs.items():
        config, row, epochs = _read_trial(root / name, trial_state, max_failures)
        configs[row["trial_id"]] = config
        trial_rows.append(row)
        epoch_frames.append(epochs)
    config_columns = list(dict.fromkeys(key for config in configs.values() for key in config))
    epochs = pd.concat([f for f in epoch_frames if not f.empty] or [pd.DataFrame()], ignore_index=True)
    trials = pd.DataFrame(trial_rows)

    metric, mode = _metric_and_mode(search, state, epochs)
    params = _searched_params(search, state, config_columns)
    max_epochs = _max_epochs(search, trials, epochs)
    base_epochs = min(int(search.get("train", {}).get("num_train_epochs") or max_epochs), max_epochs)
    _summarise_trials(trials, epochs, metric, mode, max_epochs, base_epochs)
    first = ["trial_id", "status", *params]
    # A searched parameter no trial's config holds (every params.json damaged, no state) is a blank column.
    trials = trials.reindex(columns=first + [c for c in trials.columns if c not in first])
    return Experiment(root, source, trials, epochs, metric, mode, max_epochs, params, config_columns, configs, search)


def trial_table(exp: Experiment) -> pd.DataFrame:
    """The trial table for people: best first, searched hyperparameters, scores, how far each trial got."""
    columns = ["trial_id", "status", *exp.params, exp.best_column, f"last_{exp.metric}", "best_epoch", "epochs",
               "early_stopped", "diverged", "wall_time_s", "node", "num_failures"]  # fmt: skip
    for column in EPOCH_SUMMARIES:
        if column in exp.trials:
            columns.insert(columns.index("wall_time_s"), column)
    if exp.trials["error"].astype(bool).any():
        columns.append("error")
    table = exp.trials.sort_values("rank", kind="stable", na_position="last")
    return table.set_index(pd.RangeIndex(1, len(table) + 1))[columns]


# ---------------------------------------------------------------------------------------------------- reading


def _is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def _local_root(source: str) -> Path:
    """A local folder holding the experiment: the path itself, or a cache mirror of a storage URI."""
    if _is_local(source):
        root = Path(source.removeprefix("file://")).expanduser()
        if not root.exists():
            raise ExperimentError(
                f"Experiment folder {source} does not exist. Pass the folder `{TUNE_COMMAND}` printed at the end "
                f"(<storage_path>/<name>, e.g. {DEFAULT_EXPERIMENT}), or run a search first: {TUNE_COMMAND}."
            )
        if not root.is_dir():
            raise ExperimentError(f"{source} is a file, not an experiment folder. Pass <storage_path>/<name>.")
        return root.resolve()
    return _mirror(source)


def _mirror(uri: str) -> Path:
    """Copy a remote experiment into the local cache (refreshing files already there) and return the copy."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        try:
            fs, remote = pafs.FileSystem.from_uri(uri)
        except pa.ArrowInvalid:  # a scheme pyarrow lacks (fsspec-only protocols): open it through fsspec
            import fsspec

            fsspec_fs, remote = fsspec.core.url_to_fs(uri)
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
        if fs.get_file_info(remote).type != pafs.FileType.Directory:
            raise ExperimentError(f"Experiment {uri} does not exist. Pass the storage URI `{TUNE_COMMAND}` printed.")
        local = cache_root() / "experiments" / f"{Path(remote).name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(remote, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        listed = fs.get_file_info(pafs.FileSelector(remote, recursive=True))
        _drop_what_is_gone(local, {posixpath.relpath(info.path, remote) for info in listed})
    except (OSError, ValueError) as e:  # unknown scheme, unreachable endpoint, bucket, credentials: e says which
        raise ExperimentError(
            f"Cannot read experiment {uri}: {e}. Check the URI, the network and your storage credentials."
        ) from e
    return local


def _drop_what_is_gone(local: Path, remote: set[str]) -> None:
    """Delete the files of an earlier copy that the remote experiment no longer holds (a trial folder removed or an
    experiment replaced there would otherwise still count here), but not what the analysis writes into the copy."""
    for path in sorted(local.rglob("*"), reverse=True):  # a folder's files before the folder
        relative = path.relative_to(local)
        if relative.parts[0] in (REPORT_DIR, FINAL_MODEL_DIR) or relative.as_posix() in remote:
            continue
        if path.is_dir():
            with contextlib.suppress(OSError):  # a folder that still holds files the remote has
                path.rmdir()
        else:
            path.unlink()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt.") from e


def _read_state(root: Path) -> dict[str, Any]:
    """Trial states by trial folder name, from Ray's newest readable experiment_state file (plain JSON fields only).

    A damaged newest file is read around with a warning: an older file (a resumed search writes one per run) is
    behind the trial folders, so its unfinished statuses are left out and inferred from the folders instead.
    """
    damaged: list[str] = []
    for number, path in enumerate(sorted(root.glob(STATE_GLOB), reverse=True)):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            trial_data = [[json.loads(part) for part in pair] for pair in state.get("trial_data", [])]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            damaged.append(f"{path} ({e})")
            continue
        if damaged:
            _warn_damaged_state(damaged, f"Read the trials' statuses from the older {path.name} and their folders")
        metric = state.get("runner_data", {}).get("_metric")
        return {"trials": _state_trials(trial_data, stale=number > 0), "metric": metric}
    if damaged:
        _warn_damaged_state(damaged, "Inferred the trials' statuses from their folders")
    return {"trials": {}, "metric": None}


def _warn_damaged_state(damaged: list[str], fallback: str) -> None:
    warnings.warn(
        f"Ray's experiment state {', '.join(damaged)} is not valid JSON. {fallback} instead; restore it from a copy "
        "before resuming the search.",
        ExperimentWarning,
        stacklevel=2,
    )


def _state_trials(trial_data: list[list[dict[str, Any]]], *, stale: bool) -> dict[str, dict[str, Any]]:
    """Trial states by folder name; `stale` (an older state file) drops statuses a trial may have left since."""
    trials = {}
    for trial, metadata in trial_data:
        trials[trial["relative_logdir"]] = {
            "trial_id": trial["trial_id"],
            "status": None if stale and trial["status"] in UNFINISHED else trial["status"],
            "config": trial.get("config") if isinstance(trial.get("config"), dict) else {},
            "evaluated_params": trial.get("evaluated_params") or {},
            "num_failures": metadata.get("num_failures", 0),
        }
    return trials


def _trial_dirs(root: Path, state: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Trial folder names (state entries first, in Ray's order, then folders the state does not know yet)."""
    names: dict[str, dict[str, Any] | None] = dict(state["trials"])
    for child in sorted(root.iterdir()):
        is_trial = (child / PARAMS_FILE).exists() or (child / RESULT_FILE).exists()
        if is_trial and child.name not in names:
            names[child.name] = None
    return names


def _read_trial(
    trial_dir: Path, trial_state: dict[str, Any] | None, max_failures: int | None = None
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """(flattened config, trial row, epochs table) of one trial folder.

    Ray's experiment state can lag the trial's own error.txt (its last snapshot may predate a trial's last
    failure): a trial whose error.txt records failures the state has not seen, beyond the retries the search allows
    (`max_failures`), ended in ERROR.
    """
    results = _read_results(trial_dir / RESULT_FILE)
    config = _flatten(_trial_config(trial_dir / PARAMS_FILE, (trial_state or {}).get("config") or {}))
    trial_id = (trial_state or {}).get("trial_id") or (results[-1]["trial_id"] if results else trial_dir.name)
    error = (trial_dir / ERROR_FILE).read_text(errors="replace").strip() if (trial_dir / ERROR_FILE).exists() else ""
    known = (trial_state or {}).get("num_failures", 0)
    failures = max(len(FAILURE_HEADER.findall(error)), known)
    out_of_retries = failures > known and max_failures is not None and 0 <= max_failures < failures
    state_status = (trial_state or {}).get("status")
    if state_status and not (out_of_retries and state_status in UNFINISHED):
        status = state_status
    elif out_of_retries or (error and not trial_state):
        status = "ERROR"
    elif results:
        status = "TERMINATED" if results[-1].get("done") else "RUNNING"
    else:
        status = "PENDING"

    # `_inferred`: no state says how the trial ended, and Ray writes `done` only on some trials' last row (ASHA's
    # stops); _summarise_trials finishes one that reached its planned epochs.
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "_inferred": not state_status}
    row.update(config)
    row.update(
        {
            "trial_dir": str(trial_dir),
            "num_failures": failures,
            # A retried trial keeps the error.txt of its failed attempt: only a trial that ended in error shows it.
            "error": error.splitlines()[-1] if error and status == "ERROR" else "",
            "node": results[-1].get("hostname", "") if results else "",
            "wall_time_s": float(results[-1].get("time_total_s", math.nan)) if results else math.nan,
        }
    )
    # A finished trial's result.json may have lost its last epochs to a killed driver; a live one is still writing.
    reports = _with_checkpointed_epochs(trial_dir, results) if state_status == "TERMINATED" else results
    epochs = pd.DataFrame([{k: v for k, v in _flatten(r).items() if not k.startswith("config/")} for r in reports])
    if not epochs.empty:
        epochs["trial_id"] = trial_id
        reported = epochs["epoch"] if "epoch" in epochs else pd.Series(math.nan, index=epochs.index)
        # (rows read from a checkpoint's history lack Ray's training_iteration, never their epoch)
        epochs["epoch"] = _epoch_values(reported.fillna(epochs.get("training_iteration", math.nan)))
        # A trial retried from its checkpoint re-reports the epochs after it: keep the latest report of each.
        epochs = epochs.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)
        names = epochs["checkpoint_dir_name"] if "checkpoint_dir_name" in epochs else [None] * len(epochs)
        epochs["checkpoint"] = [_checkpoint_path(trial_dir, name) for name in names]
    return config, row, epochs


def _trial_config(path: Path, state_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's params.json, else its config in Ray's experiment state; one damaged file must not sink the report."""
    try:
        return _read_json(path) or state_config
    except ExperimentError as e:
        fallback = (
            "Using the trial's config from Ray's experiment state instead."
            if state_config
            else "Ray's experiment state holds no config for it either, so its hyperparameters are left blank."
        )
        warnings.warn(f"{e} {fallback}", ExperimentWarning, stacklevel=2)
        return state_config


def _read_results(path: Path) -> list[dict[str, Any]]:
    """result.json rows. A last line that does not parse is skipped quietly (the trial is still writing it); any
    other is skipped with a warning, since it hides a reported epoch."""
    if not path.exists():
        return []
    lines = [
        (number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if line.strip()
    ]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number != lines[-1][0]:
                warnings.warn(
                    f"{path} line {number} is not valid JSON ({e}); skipped that result row, so an epoch of this "
                    "trial may be missing from the tables.",
                    ExperimentWarning,
                    stacklevel=2,
                )
    return rows


def _with_checkpointed_epochs(trial_dir: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A finished trial's `results` plus the epochs after them that its checkpoints record, with a warning.

    Ray's driver copies its staging folder, every trial's result.json in it, to the experiment about once a second
    while the search runs, finished trials included, each file truncated then written: a driver killed mid-copy
    leaves a finished trial's result.json empty or cut short, and `--resume` never writes it again. Each
    checkpoint's lorasent.json holds the trial's metrics of every epoch up to it (`history`), written once, and Ray
    always keeps a trial's latest checkpoint.
    """
    history: list[dict[str, Any]] = []
    kept: dict[float, str] = {}  # epoch -> the checkpoint folder that holds it
    for meta_file in sorted(trial_dir.glob(f"checkpoint_*/{META_FILE}")):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            kept[float(meta["metrics"]["epoch"])] = meta_file.parent.name
            history = max(history, list(meta.get("history", [])), key=len)
        except (OSError, ValueError, KeyError, TypeError):  # cut short by a kill: the other checkpoints say
            continue
    last = max((float(row["epoch"]) for row in results if isinstance(row.get("epoch"), (int, float))), default=0.0)
    lost = [
        epoch
        for epoch in history
        if isinstance(epoch, dict) and isinstance(epoch.get("epoch"), (int, float)) and epoch["epoch"] > last
    ]
    if lost:
        warnings.warn(
            f"{trial_dir / RESULT_FILE} lacks the finished trial's last {len(lost)} reported epoch(s) (a driver killed "
            f"while Ray rewrote it); read them from its checkpoints' {META_FILE} instead.",
            ExperimentWarning,
            stacklevel=3,
        )
    return [*results, *({**epoch, "checkpoint_dir_name": kept.get(float(epoch["epoch"]))} for epoch in lost)]


def _checkpoint_path(trial_dir: Path, name: Any) -> str | None:
    """The checkpoint folder of an epoch if Ray kept it (CheckpointConfig.num_to_keep deletes the others)."""
    if isinstance(name, str) and (trial_dir / name).is_dir():
        return str(trial_dir / name)
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to 'a/b' keys, the way Ray names nested config entries."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so configs print and serialise cleanly."""
    return value.item() if hasattr(value, "item") else value


def _no_trials_message(source: str, root: Path) -> str:
    nested = sorted({p.parent.name for p in root.glob(f"*/{STATE_GLOB}")})
    hint = f" It contains experiment folder(s) {nested}: pass one of those." if nested else ""
    return (
        f"{source} holds no trials (no {STATE_GLOB} and no trial folder with {PARAMS_FILE} or {RESULT_FILE}).{hint} "
        f"Pass the experiment folder `{TUNE_COMMAND}` printed (<storage_path>/<name>), or start a search: "
        f"{TUNE_COMMAND} --storage_path <dir> --name <name>."
    )


# -------------------------------------------------------------------------------------------------- summaries


def _metric_and_mode(search: dict[str, Any], state: dict[str, Any], epochs: pd.DataFrame) -> tuple[str, str]:
    tune_args = search.get("tune", {})
    metric = tune_args.get("metric") or state["metric"]
    if metric is None:
        metric = "accuracy" if "accuracy" in epochs else "loss"
    mode = tune_args.get("mode") or ("min" if "loss" in metric or "error" in metric else "max")
    if not epochs.empty and metric not in epochs:
        reported = sorted(c for c in epochs.columns if c not in _BOOKKEEPING)
        raise ExperimentError(
            f"The trials report no '{metric}' (they report {reported}). Set the search metric in {SEARCH_FILE} "
            "to one of those."
        )
    return metric, mode


def _searched_params(search: dict[str, Any], state: dict[str, Any], config_columns: list[str]) -> list[str]:
    """Sampled hyperparameters: the search space `tune/run.py` recorded, else Ray's `evaluated_params`, else every
    config key (a trial's config is its sampled values). Never only the values that vary: a single trial, or a
    value every trial drew, is searched all the same, and retraining must not drop it for the base argument."""
    space = search.get("tune", {}).get("search_space") or {}
    if space:
        return [next((c for c in config_columns if c.split("/")[-1] == name), name) for name in space]
    sampled: list[str] = []
    for trial in state["trials"].values():
        sampled += [k for k in trial["evaluated_params"] if k not in sampled and k in config_columns]
    return sampled or config_columns


def _max_epochs(search: dict[str, Any], trials: pd.DataFrame, epochs: pd.DataFrame) -> int:
    """The epochs a trial may run at most, as `tune.search.max_epochs` plans them: the trials' own num_train_epochs
    (the search space's, else the configs', else the base argument), capped by the search's --max_epochs, which above
    them counts for nothing; else the most seen."""
    longest, tune_max = _longest_planned(search, trials), search.get("tune", {}).get("max_epochs")
    if longest is not None:
        return min(longest, int(tune_max)) if tune_max else longest
    if tune_max:
        return int(tune_max)
    return int(epochs["epoch"].max()) if not epochs.empty else 0


def _longest_planned(search: dict[str, Any], trials: pd.DataFrame) -> int | None:
    """The most epochs a trial was set to run (None where nothing says): the searched num_train_epochs, else the
    trials' configs', else the base argument."""
    searched = next(iter((search.get("tune", {}).get("search_space") or {}).get("num_train_epochs", {}).values()), None)
    if searched:
        return int(max(searched))
    configured = [c for c in trials.columns if c == "num_train_epochs" or c.endswith("/num_train_epochs")]
    if configured and trials[configured[0]].notna().any():
        return int(trials[configured[0]].max())
    train_epochs = search.get("train", {}).get("num_train_epochs")
    return int(train_epochs) if train_epochs else None


def _epoch_values(epochs: pd.Series) -> pd.Series:
    """Epochs as reported (to 1e-4); as integers where all are whole (one evaluation an epoch, the default)."""
    rounded = epochs.astype(float).round(4)
    return rounded.astype(int) if (rounded % 1 == 0).all() else rounded


def _summarise_trials(
    trials: pd.DataFrame, epochs: pd.DataFrame, metric: str, mode: str, max_epochs: int, base_epochs: int
) -> None:
    """Add per-trial summaries to `trials` in place: best/last metric, best epoch, planned epochs, early stop, rank.

    A trial plans its sampled `num_train_epochs`, else the search's base value (`base_epochs`), at most
    `max_epochs` (ASHA's budget).
    """
    best_col, last_col = f"best_{metric}", f"last_{metric}"
    summary = pd.DataFrame(index=trials["trial_id"])
    if not epochs.empty:
        reported = epochs.dropna(subset=[metric])
        # A diverged epoch reports the worst value (+-inf), or its own where a checkpoint's history stood in for
        # result.json: never a best, but the trial's earlier epochs still are.
        diverged = reported.get("diverged", pd.Series(0.0, index=reported.index)).fillna(0).astype(bool)
        scored = reported[np.isfinite(reported[metric].astype(float)) & ~diverged]
        # Among epochs tied on the metric, prefer one whose checkpoint Ray kept (num_to_keep deletes the others).
        kept = scored["checkpoint"].notna() if "checkpoint" in scored else pd.Series(False, index=scored.index)
        ranked = scored.assign(_kept=kept).sort_values(
            [metric, "_kept", "epoch"], ascending=[mode == "min", False, True], kind="stable"
        )
        best_rows = ranked.groupby("trial_id", sort=False).head(1).set_index("trial_id")
        summary[best_col] = best_rows[metric]
        summary["best_epoch"] = best_rows["epoch"]
        summary["best_checkpoint"] = best_rows.get("checkpoint")
        summary[last_col] = reported.groupby("trial_id", sort=False)[metric].last()
        all_by_trial = epochs.groupby("trial_id", sort=False)
        summary["epochs"] = all_by_trial["epoch"].max()
        summary["diverged"] = all_by_trial["diverged"].any() if "diverged" in epochs else False
        for column, how in EPOCH_SUMMARIES.items():
            if column in epochs:
                trials[column] = all_by_trial[column].agg(how).reindex(trials["trial_id"]).to_numpy()
    for column, default in ((best_col, math.nan), (last_col, math.nan), ("best_epoch", math.nan),
                            ("best_checkpoint", None), ("epochs", 0), ("diverged", False)):  # fmt: skip
        values = summary[column] if column in summary else pd.Series(default, index=summary.index)
        trials[column] = values.reindex(trials["trial_id"]).to_numpy()
    trials["epochs"] = _epoch_values(trials["epochs"].fillna(0))
    trials["diverged"] = trials["diverged"].fillna(False).astype(bool)
    sampled = next((trials[c] for c in trials.columns if c.split("/")[-1] == "num_train_epochs"), None)
    planned = sampled.fillna(base_epochs).clip(upper=max_epochs) if sampled is not None else base_epochs
    trials["max_epochs"] = planned
    finished = trials.pop("_inferred") & (trials["status"] == "RUNNING") & (trials["epochs"] >= planned)
    trials.loc[finished, "status"] = "TERMINATED"
    # ASHA ends a trial by terminating it before its planned epochs; diverged and errored trials end themselves.
    trials["early_stopped"] = (trials["status"] == "TERMINATED") & (trials["epochs"] < planned) & ~trials["diverged"]
    # Ties go to a trial whose best epoch kept its checkpoint, then to the one that got there in fewer epochs, then
    # to the one sampled first; not to Ray's trial order, which a resumed search may change, nor to its trial ids,
    # drawn anew in each run of a search. tune/run.py's summary ranks the same way.
    folders = trials["trial_dir"].map(lambda folder: Path(folder).name)
    numbers = [sample_number(folder, trial) for folder, trial in zip(folders, trials["trial_id"], strict=True)]
    ranked = trials.assign(_unkept=trials["best_checkpoint"].isna(), _number=numbers).sort_values(
        [best_col, "_unkept", "best_epoch", "_number", "trial_id"],
        ascending=[mode == "min", True, True, True, True],
        na_position="last",
        kind="stable",
    )
    position = pd.Series(range(1, len(ranked) + 1), index=ranked.index, dtype=float)
    trials["rank"] = position.where(trials[best_col].notna())


# --------------------------------------------------------------------------------------------------- status


def configurations_tried(exp: Experiment) -> int:
    """How many distinct configurations the trials ran (fewer than the trials where some repeat one)."""
    return len(exp.trials[exp.params].drop_duplicates()) if exp.params else len(exp.trials)


def summary_line(exp: Experiment) -> str:
    """One line on the trials: how many (and how many distinct configurations, where some repeat one: the same
    seed trains the same model again), their statuses, early stops, the metric."""
    stops = (
        f"{int(exp.trials['early_stopped'].sum())} stopped early by ASHA"
        if exp.early_stopping
        else "no early stopping (--scheduler none)"
    )
    statuses = ", ".join(f"{n} {status}" for status, n in exp.trials["status"].value_counts().items())
    distinct = configurations_tried(exp)
    repeats = f", {distinct} distinct configuration(s)" if distinct < len(exp.trials) else ""
    return f"{len(exp.trials)} trial(s){repeats}: {statuses}; {stops}; metric: {exp.metric} ({exp.mode})"


def unfinished_note(exp: Experiment) -> str:
    """What the search has still to run, or '' when nothing: unfinished trials, and planned trials not started yet
    (`num_samples`; an interrupted search has not created them). Until then the best trial may change."""
    unfinished = int(exp.trials["status"].isin(UNFINISHED).sum())
    tune_args = exp.search.get("tune", {})
    planned = tune_args.get("num_samples") if tune_args.get("searcher") != "grid" else None  # grid: every point
    missing = max(0, int(planned) - len(exp.trials)) if planned else 0
    notes = []
    if unfinished:
        notes.append(
            f"{unfinished} of {len(exp.trials)} trials of {exp.location} are unfinished ({', '.join(UNFINISHED)})"
        )
    if missing:
        notes.append(
            f"{missing} of the {planned} planned trials {'' if unfinished else f'of {exp.location} '}have not started"
        )
    return " and ".join(notes)


def no_score_note(exp: Experiment) -> str:
    """Why there is no best trial: no trial has a usable score yet, or none will (all failed or diverged)."""
    if unfinished_note(exp):
        return (
            f"No trial of {exp.location} has reported '{exp.metric}' yet, so there is no best trial. If the search is "
            f"running, wait for the first epoch to finish; if it was stopped, continue it: `{TUNE_COMMAND} --resume "
            f"{exp.location}`. A trial that failed shows why in the trial table's error column (its error.txt)."
        )
    errored = exp.trials[exp.trials["status"] == "ERROR"]
    example = f" (e.g. {errored['error'].iloc[0]})" if not errored.empty and errored["error"].iloc[0] else ""
    return (
        f"No trial of {exp.location} produced a usable '{exp.metric}', so there is no best trial: of its "
        f"{len(exp.trials)} trials, {len(errored)} ended in ERROR{example} and {int(exp.trials['diverged'].sum())} "
        "diverged. Fix the cause (each failed trial's error.txt holds its traceback; lower the learning rate for "
        f"diverging ones) and start a new search: {TUNE_COMMAND}."
    )


# ------------------------------------------------------------------------------------ importance and compute


def param_importances(exp: Experiment, *, seed: int = 0) -> pd.Series:
    """fANOVA importance of each searched hyperparameter for the search metric (sums to 1).

    The trials become a real Optuna study (`create_trial` with each trial's best metric as its value and its
    per-epoch metric as intermediate values) and Optuna's `FanovaImportanceEvaluator` fits its random forest
    on it. Every trial with a score counts, ASHA-stopped ones included: their best score is what the
    configuration achieved in the epochs it was given. Empty when fewer than two trials have a score or
    nothing varied; `importance_note` says why.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if importance_note(exp):
        return pd.Series(dtype=float, name="importance")
    scored = exp.scored_trials
    distributions: dict[str, Any] = {}
    for name in _varied_params(exp):
        values = scored[name].dropna()
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            distributions[name] = CategoricalDistribution(sorted(values.astype(str).unique()))
        else:
            low, high = values.min(), values.max()
            log = bool(low > 0 and high / low >= 10)
            if pd.api.types.is_integer_dtype(values):
                distributions[name] = IntDistribution(int(low), int(high), log=log)
            else:
                distributions[name] = FloatDistribution(float(low), float(high), log=log)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if exp.mode == "max" else "minimize")
    curves = exp.epochs.dropna(subset=[exp.metric]).groupby("trial_id")
    for _, trial in scored.iterrows():
        params = {
            n: str(trial[n]) if isinstance(d, CategoricalDistribution) else _plain(trial[n])
            for n, d in distributions.items()
        }
        curve = curves.get_group(trial["trial_id"])
        study.add_trial(
            optuna.trial.create_trial(
                value=float(trial[exp.best_column]),
                params=params,
                distributions=distributions,
                intermediate_values=dict(zip(curve["epoch"], curve[exp.metric].astype(float), strict=True)),
            )
        )
    importances = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
    )
    return pd.Series(importances, name="importance").rename_axis("hyperparameter")


def importance_note(exp: Experiment) -> str:
    """Why `param_importances` is empty, or '' when it is not."""
    scored = len(exp.scored_trials)
    if scored < 2:
        return f"Importance needs 2 or more trials with a score on '{exp.metric}'; the search has {scored}."
    if not _varied_params(exp):
        return "Hyperparameter importance needs a hyperparameter that differs between scored trials; none does."
    if exp.scored_trials[exp.best_column].nunique() < 2:  # fANOVA's forest has no variance to explain
        return f"Importance needs scores that differ; all {scored} scored trials have the same best '{exp.metric}'."
    return ""


def _varied_params(exp: Experiment) -> list[str]:
    return [p for p in exp.params if exp.scored_trials[p].dropna().astype(str).nunique() > 1]


def grid_levels(exp: Experiment, continuous_levels: int = 3) -> dict[str, int]:
    """Levels each searched hyperparameter would need in a full grid search of the same space.

    A choice or grid counts its values; a range (loguniform, uniform) counts `continuous_levels`, the size of
    the seed's 3-point grids (fewer if an integer range holds fewer values). Without a recorded search space
    the trials' distinct values stand in for choices. The epoch count is not a grid axis: the grid runs every
    config for `max_epochs`.
    """
    levels = {}
    for name in exp.params:
        if name.split("/")[-1] == "num_train_epochs":
            continue
        values = exp.trials[name].dropna()
        integer = pd.api.types.is_integer_dtype(values)
        distribution, spec_values = next(iter(exp.search_space.get(name.split("/")[-1], {}).items()), (None, []))
        if distribution in ("choice", "grid"):
            levels[name] = len(spec_values)
        elif distribution is not None:  # a range
            span = int(spec_values[1] - spec_values[0] + 1) if integer else continuous_levels
            levels[name] = min(continuous_levels, span)
        elif integer or not pd.api.types.is_numeric_dtype(values):
            levels[name] = values.astype(str).nunique()
        else:
            levels[name] = min(values.nunique(), continuous_levels)
    return levels


def compute_spent(exp: Experiment, continuous_levels: int = 3) -> pd.DataFrame:
    """Trial-epochs and device-hours this search used, against running its configs without early stopping (each
    for its own planned epochs, which differ when the search samples epochs) and against the equivalent full grid
    (`grid_levels`) × max epochs, at the search's measured cost per epoch.
    """
    resources = exp.resources
    used_epochs = exp.trials["epochs"].sum()
    used_hours = float(exp.trials["wall_time_s"].fillna(0).sum()) / 3600
    hours_per_epoch = used_hours / used_epochs if used_epochs else math.nan
    grid = math.prod(grid_levels(exp, continuous_levels).values())
    rows = [
        ("this search", len(exp.trials), used_epochs, used_hours),
        ("same trials, no early stopping", len(exp.trials), int(exp.trials["max_epochs"].sum()), math.nan),
        ("full grid", grid, grid * exp.max_epochs, math.nan),
    ]
    table = pd.DataFrame(rows, columns=["run", "configs", "trial_epochs", "trial_hours"]).set_index("run")
    estimated = table["trial_hours"].isna()
    table.loc[estimated, "trial_hours"] = table.loc[estimated, "trial_epochs"] * hours_per_epoch
    table["cpu_hours"] = table["trial_hours"] * resources["cpu"]
    table["gpu_hours"] = table["trial_hours"] * resources["gpu"]
    table["share_of_grid"] = table["trial_epochs"] / table.loc["full grid", "trial_epochs"]
    return table
