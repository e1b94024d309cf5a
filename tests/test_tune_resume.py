"""`python tune/run.py` as users run it, in real processes: the --smoke-test path, and a search whose driver is
killed with SIGKILL mid-search and then finished with --resume, keeping every finished trial as it was."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

import psutil
import pytest
import ray.tune.search.optuna  # imported now: the searcher's files are unpickled while trials run
from conftest import REPO, SmokeSearch, exit_code, kill_search, search_to_end, start_search
from ray.tune.schedulers import ASHAScheduler

from tune.cluster import sample_number, saved_trial_statuses, saved_trials

pytestmark = pytest.mark.ray


def _trial_states(experiment: Path) -> dict[str, str]:
    """Trial folder -> status in the newest experiment snapshot Tune wrote (what a resume starts from); {} while
    there is none, or while it is caught mid-write."""
    return saved_trial_statuses(str(experiment)) or {}


def _results(experiment: Path, trial: str) -> bytes:
    return (experiment / trial / "result.json").read_bytes()


def test_smoke_test_runs_end_to_end(smoke_search: SmokeSearch) -> None:
    out, experiment = smoke_search.output, smoke_search.experiment
    assert "Resource plan: 1 node(s)" in out and "Ray dashboard: http://127.0.0.1:" in out
    if os.environ.get("RAY_AUTH_MODE", "token") == "token":  # Ray's default: say how to get the token
        assert "ray get-auth-token" in out
    assert "Best trial" in out and f"python -m analysis report {experiment}" in out
    adapter = Path(re.search(r"adapter:\s+(\S+)", out).group(1))
    assert (adapter / "adapter_model.safetensors").is_file()
    assert f"python -m lorasent.predict {adapter}" in out
    assert os.readlink(experiment.parent / "latest") == "smoke"
    assert set(_trial_states(experiment).values()) == {"TERMINATED"}


def _two_finished(experiment: Path) -> bool:
    return sum(s == "TERMINATED" for s in _trial_states(experiment).values()) >= 2


def _searcher_saved_whole(experiment: Path) -> bool:
    """Whether none of the searcher's files in storage is cut short (Ray's thread copies them there after each
    snapshot): each is a pickle, which ends with its STOP opcode."""
    patterns = ("search_gen_state-*", "searcher-state-*", "basic-variant-state-*")
    return all(file.read_bytes().endswith(pickle.STOP) for pattern in patterns for file in experiment.glob(pattern))


def _killed_search(
    tmp_path: Path,
    way: list[str],
    on_state: Callable[[Path], None] = lambda _: None,
    until: Callable[[Path], bool] = _two_finished,
    epochs: int = 3,
) -> Path:
    """Start a search of 6 trials of `epochs` epochs, one at a time, and SIGKILL its driver once `until(experiment)`
    holds (by default: two trials have finished in its saved state); the driver dies at once: no handler, no last
    snapshot. `on_state(experiment)` runs at each look before. Returns the experiment folder, with `latest` in its
    storage folder pointing at it."""
    storage = tmp_path / "runs"
    experiment = storage / "killed"
    argv = ["--smoke-test", "--num_samples", "6", "--num_train_epochs", str(epochs), "--max_concurrent_trials", "1"]
    argv += way
    first = start_search([*argv, "--storage_path", str(storage), "--name", "killed"], tmp_path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        while not until(experiment):
            log = (tmp_path / "first.log").read_text
            assert first.poll() is None, f"the search ended before it was killed: {log()}"
            assert time.monotonic() < deadline, f"no kill point in time: {log()}"
            on_state(experiment)
            time.sleep(0.2)
        while not _searcher_saved_whole(experiment):  # a kill mid-copy has tests of its own
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        kill_search(first)
    return experiment


def _resume_keeps_the_finished_and_runs_the_rest(
    tmp_path: Path, experiment: Path, epochs: int = 3, gapped: Collection[str] = ()
) -> None:
    """`--resume` of a killed 6-trial search: it finishes with exactly the 6 trials, each finished one untouched;
    the trials `gapped` (folder names) may lack the reports their checkpoint was restored past."""
    before = _trial_states(experiment)
    finished = {trial for trial, status in before.items() if status == "TERMINATED"}
    assert 1 <= len(finished) < 6
    finished_results = {trial: _results(experiment, trial) for trial in finished}

    log = tmp_path / "resume.log"
    second = start_search(["--resume", str(experiment.parent / "latest"), "--verbose", "0"], tmp_path, log)
    try:
        assert exit_code(second, log, timeout=400) == 0, log.read_text()
    finally:
        kill_search(second)
    out = log.read_text()
    assert f"Resuming {experiment}" in out and "Search finished" in out
    assert "Trial status" not in out, out  # the search ran with --verbose 1: the resume's --verbose 0 holds
    # A checkpoint deleted after the snapshot is one INFO line, where Ray logs an ERROR with a traceback
    assert "Error handling checkpoint" not in out, out

    after = _trial_states(experiment)
    assert len(after) == 6, f"trials were added or lost: {sorted(after)}"  # the searcher did not start over
    assert set(after.values()) == {"TERMINATED"}
    assert finished <= set(after)
    for trial in finished:  # kept as they were: not re-run, not a single result row added
        assert _results(experiment, trial) == finished_results[trial], f"finished trial {trial} was run again"
    for trial in after:  # every trial reported each of its epochs (a restored one again those since its checkpoint)
        reported = [json.loads(line)["training_iteration"] for line in _results(experiment, trial).splitlines()]
        if trial in gapped:  # reports after the last snapshot died with the driver: it went on from where it got
            assert reported == sorted(set(reported)), reported
            metas = experiment.glob(f"{trial}/checkpoint_*/lorasent.json")
            trained = [json.loads(meta.read_text())["metrics"]["epoch"] for meta in metas]
            assert max(trained) == epochs, trained
        else:
            assert sorted(set(reported)) == list(range(1, max(reported) + 1)) and max(reported) <= epochs
    if json.loads((experiment / "lorasent_search.json").read_text())["tune"]["scheduler"] == "asha":
        _asha_stopped_each_trial_where_it_would_have_uninterrupted(experiment, epochs)


def _asha_stopped_each_trial_where_it_would_have_uninterrupted(experiment: Path, epochs: int) -> None:
    """Each trial of a resumed search of one trial at a time ended where Ray's ASHA (the smoke preset's), fed every
    trial's reports in the order the trials were sampled, stops it: where an uninterrupted search stops it. Ray
    restores no scheduler state, and a resumed ASHA that had forgotten the finished trials' rungs stopped a trial
    after one epoch that the uninterrupted search trained for three."""
    asha = ASHAScheduler(max_t=epochs, grace_period=1, reduction_factor=2, metric="accuracy", mode="max")
    for trial in sorted(saved_trials(str(experiment)), key=lambda t: sample_number(t.folder, t.trial_id)):
        asha.on_trial_add(None, trial)
        reports = {}  # a trial restored from a checkpoint reported the epochs after it again, the same
        for report in map(json.loads, _results(experiment, trial.folder).splitlines()):
            reports.setdefault(report["training_iteration"], report)
        ended = next((i for i, report in reports.items() if asha.on_trial_result(None, trial, report) == "STOP"), None)
        assert ended == max(reports), f"{trial.folder} ran {max(reports)} epoch(s); uninterrupted: {ended or 'more'}"


@pytest.mark.parametrize(
    ("way", "moved"), [([], False), (["--fused_trials"], False), ([], True)], ids=["processes", "fused", "moved"]
)
def test_killed_search_resumes_without_losing_or_rerunning_finished_trials(
    tmp_path: Path, way: list[str], moved: bool
) -> None:
    """Resumed where it ran, or copied elsewhere first (another disk, another machine): there Ray alone would put
    the trials the searcher has yet to make back where the search started."""
    experiment = _killed_search(tmp_path, way)
    if moved:
        started, copied = experiment, {path.name for path in experiment.iterdir()}
        shutil.copytree(experiment.parent, tmp_path / "elsewhere", symlinks=True)
        experiment = tmp_path / "elsewhere" / experiment.name
    _resume_keeps_the_finished_and_runs_the_rest(tmp_path, experiment)
    if moved:  # what the resume wrote (its trials, its state files) is where it ran, none of it where the search began
        written = {path.name for path in experiment.iterdir()} - copied
        assert written and not written & {path.name for path in started.iterdir()}


# Ray's saved state, by what it holds, with how to read it: the trials, and the searcher (pickles, whatever the name
# says): Optuna's study and its wrappers, or random (and grid) search
SAVED_STATE = {
    "trials": (("experiment_state-*.json", json.loads),),
    "optuna": (("searcher-state-*.pkl", pickle.loads), ("search_gen_state-*.json", pickle.loads)),
    "random": (("basic-variant-state-*.json", pickle.loads),),
}


@pytest.mark.parametrize(
    ("searcher", "behind"),
    [("optuna", "optuna"), ("random", "random"), ("optuna", "trials")],
    ids=["optuna-searcher-behind", "random-searcher-behind", "trials-behind"],
)
def test_resume_with_the_searcher_and_the_trials_saved_a_snapshot_apart(
    tmp_path: Path, searcher: str, behind: str
) -> None:
    """Ray saves the trials, then the searcher, and a thread copies them to storage: a driver killed in between
    leaves them a snapshot apart. Here one of them (`behind`) is put back as it was while one trial had finished,
    beside the other as it was when two had. Restored as they are, the searcher counts a trial as running for ever
    (one that has finished, or one the trials never held), so its concurrency limit (1) is never free again (a killed
    search in CI hung so), and it makes a trial too many or too few; --resume must finish the search, with each of
    its 6 trials once."""
    earlier = tmp_path / "earlier"

    def keep_the_state_while_one_trial_has_finished(experiment: Path) -> None:
        if sum(s == "TERMINATED" for s in _trial_states(experiment).values()) != 1:
            return
        for pattern, load in SAVED_STATE[behind]:
            for file in experiment.glob(pattern):
                data = file.read_bytes()
                try:
                    load(data)  # a whole file, not one caught mid-write
                except (pickle.UnpicklingError, EOFError, ValueError):
                    continue
                earlier.mkdir(exist_ok=True)
                (earlier / file.name).write_bytes(data)

    experiment = _killed_search(tmp_path, ["--searcher", searcher], keep_the_state_while_one_trial_has_finished)
    kept = list(earlier.iterdir())
    assert len(kept) == len(SAVED_STATE[behind]), kept
    for file in kept:
        shutil.copyfile(file, experiment / file.name)
    _resume_keeps_the_finished_and_runs_the_rest(tmp_path, experiment)


def test_resume_with_optunas_saved_study_cut_short(tmp_path: Path) -> None:
    """Ray copies the searcher's files to storage after the trials: a kill during that copy leaves Optuna's study
    (searcher-state-*.pkl) cut short. Ray alone starts the whole experiment afresh then (and a CI run hung so);
    --resume must rebuild the study from the finished trials and finish the search, with each of its 6 trials once."""
    experiment = _killed_search(tmp_path, [])
    (study,) = experiment.glob("searcher-state-*.pkl")
    study.write_bytes(study.read_bytes()[: study.stat().st_size // 2])
    _resume_keeps_the_finished_and_runs_the_rest(tmp_path, experiment)
    assert "rebuilt from the finished trials' results" in (tmp_path / "resume.log").read_text()


def test_resume_with_the_searchers_wrappers_cut_short_is_refused(smoke_search: SmokeSearch, tmp_path: Path) -> None:
    """Cut short, the searcher's wrappers (search_gen_state-*.json: the trials made, the experiment's spec) cannot be
    rebuilt, and Ray would start the experiment afresh: refused before Ray starts, naming the file."""
    copy = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_search.experiment, copy, symlinks=True)
    (wrappers,) = copy.glob("search_gen_state-*.json")
    wrappers.write_bytes(wrappers.read_bytes()[:-100])
    run = subprocess.run(
        [sys.executable, str(REPO / "tune" / "run.py"), "--resume", str(copy)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"its Ray Tune state file {wrappers.name} is damaged" in run.stderr and "Ray dashboard" not in run.stdout


def test_resume_while_another_process_runs_the_experiment_is_refused(
    smoke_search: SmokeSearch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --resume while the experiment runs (its first run, thought dead in another terminal, or a second resume) ran
    its unfinished trials twice into the same folders, sampled new trials twice and overwrote the other's state (a
    finished 6-trial search then held 8 trials, one trained twice, and its first run said it was interrupted). The
    running one holds the experiment (a lock its process holds, whatever way it ends); the second is refused before
    Ray starts, naming it. Here the running one is a real resume, paused (SIGSTOP) once it holds the experiment."""
    from tune.run import CLAIM_FILE, main

    copy = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_search.experiment, copy, symlinks=True)
    log = tmp_path / "running.log"
    running = start_search(["--resume", str(copy), "--verbose", "0"], tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while (copy / CLAIM_FILE).read_text().strip() != str(running.pid):  # it writes its pid once it holds it
            assert running.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        running.send_signal(signal.SIGSTOP)
        try:
            assert main(["--resume", str(copy)]) == 2
        finally:
            running.send_signal(signal.SIGCONT)
        err = capsys.readouterr().err
        assert f"{copy} is being run right now by another process (pid {running.pid})" in err, err
        assert not ray.is_initialized()
        assert exit_code(running, log, timeout=300) == 0, log.read_text()  # the running one was left alone
    finally:
        kill_search(running)


def test_resume_after_the_data_changed_is_refused(tmp_path: Path, write_data, capsys) -> None:
    """A search's data file changed before --resume (labels fixed, rows added): the resumed trials trained on the new
    data and were ranked with the finished ones, scored on other splits (a killed search, its CSV's labels flipped,
    then resumed: one trial's checkpoints recorded one sha256, the other three's another). Refused before any trial,
    naming the data."""
    from tune.run import main

    rows = [{"text": f"{word} product number {i}", "label": i % 2} for i, word in enumerate(["bad", "good"] * 150)]
    data = write_data(rows, "reviews.csv")
    experiment = tmp_path / "runs" / "csv"
    argv = ["--smoke-test", "--dataset", str(data), "--num_samples", "1", "--storage_path", str(experiment.parent)]
    log = tmp_path / "search.log"
    search_to_end([*argv, "--name", "csv", "--verbose", "0"], tmp_path, log, timeout=400)
    write_data([{**row, "label": 1 - row["label"]} for row in rows], "reviews.csv")
    assert main(["--resume", str(experiment)]) == 2
    err = capsys.readouterr().err
    assert f"Cannot resume {experiment}: its data {data} changed since its trials trained on it" in err, err
    assert not ray.is_initialized()


def test_resume_when_a_trials_latest_checkpoint_was_deleted_after_the_snapshot(tmp_path: Path) -> None:
    """Ray deletes a trial's older checkpoints (--keep_checkpoints) as soon as it reports a new one: a driver killed
    before its next snapshot leaves the snapshot naming a deleted checkpoint as the trial's latest. Here the driver
    dies while a trial runs with two epochs saved, and the checkpoint its snapshot names goes: Ray alone fails that
    trial's restore on every retry; --resume must go on from the trial's nearest checkpoint that exists."""

    def a_trial_running_with_two_epochs_saved(experiment: Path) -> bool:
        trials = saved_trials(str(experiment)) or []
        done = any(t.status == "TERMINATED" for t in trials)
        return done and any(t.status == "RUNNING" and t.last_result.get("training_iteration", 0) >= 2 for t in trials)

    way = ["--scheduler", "none"]  # every trial runs all its epochs: none is stopped before the kill point
    experiment = _killed_search(tmp_path, way, until=a_trial_running_with_two_epochs_saved, epochs=6)
    running = [t for t in saved_trials(str(experiment)) or [] if t.status == "RUNNING"]
    assert running
    for trial in running:
        named = experiment / trial.folder / trial.last_result["checkpoint_dir_name"]
        assert len(list(named.parent.glob("checkpoint_*"))) >= 2  # the best one is kept beside the latest
        shutil.rmtree(named, ignore_errors=True)  # gone already where Ray's rotation beat the snapshot to it
    _resume_keeps_the_finished_and_runs_the_rest(tmp_path, experiment, epochs=6, gapped={t.folder for t in running})


def _interrupt_after_a_trial_finished(tmp_path: Path, name: str, ctrl_c: int) -> tuple[Path, str]:
    """Run a search of 6 long trials, one at a time; once one has finished, press Ctrl-C `ctrl_c` times (0.3 s
    apart). Returns the experiment folder and the output; the run must exit 130."""
    experiment = tmp_path / "runs" / name
    argv = ["--smoke-test", "--num_samples", "6", "--num_train_epochs", "20", "--scheduler", "none"]
    argv += ["--max_concurrent_trials", "1"]  # trials long enough that Ctrl-C comes with some unfinished
    log = tmp_path / "run.log"
    proc = start_search([*argv, "--storage_path", str(tmp_path / "runs"), "--name", name], tmp_path, log)
    try:
        deadline = time.monotonic() + 300
        while "TERMINATED" not in _trial_states(experiment).values():
            assert proc.poll() is None, f"the search ended before it was interrupted: {log.read_text()}"
            assert time.monotonic() < deadline, f"no trial finished in time: {log.read_text()}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        for _ in range(ctrl_c - 1):
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        kill_search(proc)
    return experiment, log.read_text()


def test_interrupted_search_says_so_and_counts_what_finished(tmp_path: Path) -> None:
    """Ctrl-C: Ray saves the state, then marks the trials it stops TERMINATED in memory; the summary must go by
    the saved state (exit 130, the finished count, the resume command), never report a finished search."""
    experiment, out = _interrupt_after_a_trial_finished(tmp_path, "interrupted", ctrl_c=1)
    finished = sum(status in ("TERMINATED", "ERROR") for status in _trial_states(experiment).values())
    assert 1 <= finished < 6
    assert f"with {finished} of 6 trials finished" in out and "Search finished" not in out
    assert f"python tune/run.py --resume {experiment}" in out


def _ray_starting(proc: subprocess.Popen) -> bool:
    """Whether the driver's local Ray has begun to start (its GCS server runs; `ray.init` is not done yet)."""
    try:
        return any(child.name() == "gcs_server" for child in psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return False


# In the driver's first imports (seconds on a 2-core CPU); then a second into the local Ray's start beside its imports
@pytest.mark.parametrize("when", [0.6, 1.5, "ray start"])
def test_ctrl_c_before_the_search_starts_exits_cleanly(tmp_path: Path, when: float | str) -> None:
    """Ctrl-C while the driver imports, checks or starts Ray (before Tune handles SIGINT): no traceback, exit 130.
    One that broke into Ray's start could crash the exit (SIGSEGV or SIGABRT in a few runs in ten): it now waits for
    the start to finish."""
    log = tmp_path / "run.log"
    proc = start_search(["--smoke-test", "--storage_path", str(tmp_path / "runs"), "--name", "early"], tmp_path, log)
    try:
        if when == "ray start":
            deadline = time.monotonic() + 60
            while not _ray_starting(proc):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            time.sleep(1.0)
        else:
            time.sleep(when)  # past Python's start-up (its SIGINT handler), long before the first trial
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        kill_search(proc)
    out = log.read_text()
    assert "Traceback" not in out and "there is nothing to resume" in out


CTRL_C_IN_A_DEL = """
import builtins, os, runpy, signal, sys, time

class Collected:
    def __del__(self):  # as the garbage collector runs it, at any moment: a KeyboardInterrupt here is swallowed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)

plain_import = builtins.__import__

def importing(name, *args, **kwargs):
    if name == "ray":  # the driver's first import of Ray, in its main thread
        builtins.__import__ = plain_import
        Collected()  # made and freed at once: the Ctrl-C lands in its __del__
    return plain_import(name, *args, **kwargs)

builtins.__import__ = importing
sys.argv = ["tune/run.py", *sys.argv[1:]]
runpy.run_path(os.path.join("tune", "run.py"), run_name="__main__")
"""


def test_a_ctrl_c_python_swallowed_still_stops_the_search(tmp_path: Path) -> None:
    """A Ctrl-C that lands in a `__del__` (the garbage collector runs them at any moment, as it did once during the
    driver's imports in test_ctrl_c_before_the_search_starts_exits_cleanly) is swallowed by Python ("Exception ignored
    in ..."): the search went on as if none was pressed. It is remembered, and stops the search before Tune starts."""
    argv = ["--smoke-test", "--storage_path", str(tmp_path / "runs"), "--name", "swallowed"]
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_A_DEL, *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "Exception ignored" in result.stderr and "KeyboardInterrupt" in result.stderr  # it was swallowed
    assert result.returncode == 130, result.stdout[-2000:] + result.stderr[-3000:]
    assert "there is nothing to resume" in result.stderr and "Search finished" not in result.stdout
    assert not (tmp_path / "runs" / "swallowed").exists()


def test_second_ctrl_c_during_the_search_still_says_how_to_resume(tmp_path: Path) -> None:
    """Tune handles the first Ctrl-C and offers a second to skip its last snapshot: neither may end in a traceback."""
    experiment, out = _interrupt_after_a_trial_finished(tmp_path, "twice", ctrl_c=2)
    assert "Traceback" not in out and f"python tune/run.py --resume {experiment}" in out


STOP_RAY_INTERRUPTED = """
import os, signal, sys, threading
import psutil, ray
from tune.cluster import stop_ray

def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

ray.init(num_cpus=1, include_dashboard=False)
started = {process: process.name() for process in psutil.Process().children(recursive=True)}
assert "gcs_server" in started.values() and "raylet" in started.values(), started
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # while the stop waits for Ray's processes
try:
    stop_ray()
except KeyboardInterrupt:
    print("still running:", sorted(name for process, name in started.items() if alive(process)))
    sys.exit(130)
"""


def test_a_ctrl_c_while_ray_stops_is_held_until_it_has_stopped() -> None:
    """Where an interrupted search's second Ctrl-C lands: it must not leave Ray half stopped, to be stopped again by
    Ray's exit handler (it raised in the middle of `ray.shutdown` before)."""
    done = subprocess.run(
        [sys.executable, "-c", STOP_RAY_INTERRUPTED], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stdout + done.stderr
    assert "still running: []" in done.stdout, done.stdout
