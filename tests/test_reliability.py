"""Faults a long search must survive, each caused for real while a real `python tune/run.py` runs.

One grid search of two trials runs once for this module (a local Ray, tiny DistilBERT, 3 epochs each):
- trial A's worker process gets SIGKILL early in its second epoch → retried from its last checkpoint;
- trial B's worker process is held to a memory limit (RLIMIT_AS below what it maps already) after the first
  epoch of each attempt → real allocation failures; retried once (from its checkpoint), then marked ERROR
  while A completes. B has many epochs left when it is hurt, so the injector may see its reports late.
The other tests damage copies of that experiment (checkpoints, tuner.pkl, experiment state) and run predict,
analysis and --resume on them, and SIGKILL a model save and a results write halfway.

Faults covered elsewhere: a killed driver (tests/test_tune_resume.py), a killed worker node
(tests/test_multinode.py), a diverging trial in a search (tests/test_tune_search.py); see docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_bad_input import refused

from analysis.results import load_experiment
from tune.trainable import work_root

REPO = Path(__file__).resolve().parents[1]
LR_KILLED, LR_OOM = 1e-3, 3e-3
EPOCHS = 4  # trial A's
OOM_EPOCHS = 12  # trial B's: it fails long before, however late the injector sees an epoch on a loaded machine
MAX_FAILURES = 1

pytestmark = pytest.mark.ray


def _rows(result_file: Path) -> list[dict[str, Any]]:
    """The complete lines of a result.json that Ray may still be appending to."""
    try:
        lines = result_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _memory_limits_in_use(pid: int) -> list[tuple[int, int]]:
    """(limit, bytes in use) for RLIMIT_AS (all mappings) and RLIMIT_DATA (private writable memory: it also counts
    malloc arenas that grow inside address space they reserved earlier, which RLIMIT_AS does not see)."""
    info = psutil.Process(pid).memory_info()
    return [(resource.RLIMIT_AS, info.vms), (resource.RLIMIT_DATA, info.data)]


class FaultInjector(threading.Thread):
    """Watches the live trial folders of one search and hurts trial workers as each reports its first epoch.

    Ray's driver appends every result (with the worker's `pid`) to result.json in its staging folder as soon
    as it arrives, so the injector acts while the worker trains its next epoch. Only processes descended
    from the search's own driver are ever touched.
    """

    def __init__(self, driver: subprocess.Popen, experiment_name: str, storage: Path) -> None:
        super().__init__(daemon=True)
        self.driver = psutil.Process(driver.pid)
        self.process = driver
        from ray._common.utils import get_default_system_temp_dir

        staging = f"session_*/artifacts/*/{experiment_name}/driver_artifacts/*/result.json"  # synced to storage later
        self.patterns = [
            (storage / experiment_name, "*/result.json"),
            (Path(get_default_system_temp_dir()) / "ray", staging),
        ]
        self.killed: list[int] = []  # pids of trial A's workers that got SIGKILL
        self.limited: list[int] = []  # pids of trial B's workers that got a memory limit
        self.errors: list[BaseException] = []
        self._checked: dict[int, bool] = {}

    def _ours(self, pid: int) -> bool:
        """Whether pid descends from the driver (asked once per pid: walking the process tree is slow)."""
        if pid not in self._checked:
            self._checked[pid] = any(child.pid == pid for child in self.driver.children(recursive=True))
        return self._checked[pid]

    def _latest_rows(self) -> dict[float, dict[int, dict[str, Any]]]:
        """learning rate -> {worker pid -> the latest result row that worker reported}."""
        seen: dict[float, dict[int, dict[str, Any]]] = {}
        for root, pattern in self.patterns:
            try:
                result_files = list(root.glob(pattern))
            except FileNotFoundError:  # a folder went while it was listed (Ray re-points session_latest): next round
                continue
            for result_file in result_files:
                try:
                    lr = json.loads(result_file.with_name("params.json").read_text())["learning_rate"]
                except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
                    continue
                for row in _rows(result_file):
                    seen.setdefault(lr, {})[row["pid"]] = row
        return seen

    def run(self) -> None:
        try:
            while self.process.poll() is None:
                rows = self._latest_rows()
                for pid, latest in rows.get(LR_KILLED, {}).items():
                    if not self.killed and not latest["done"] and self._ours(pid):
                        time.sleep(0.2)  # into the next epoch (each takes a second or more)
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                for pid in rows.get(LR_OOM, {}):
                    if pid not in self.limited and self._ours(pid):
                        # Into the next epoch, as for the kill: Ray registers the epoch's checkpoint a step after
                        # logging its result, and a worker whose memory fails before that loses the checkpoint.
                        time.sleep(0.2)
                        # Below what the process uses already: its next allocation that needs memory fails.
                        for kind, used in _memory_limits_in_use(pid):
                            resource.prlimit(pid, kind, (used - (1 << 20), resource.RLIM_INFINITY))
                        self.limited.append(pid)
                time.sleep(0.05)
        except BaseException as e:  # surfaced by the fixture
            self.errors.append(e)


@pytest.fixture(scope="module")
def faulty_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the two-trial search with its faults; return what the tests check."""
    storage = tmp_path_factory.mktemp("faults")
    name = f"faults-{uuid.uuid4().hex[:8]}"
    space = {"learning_rate": {"choice": [LR_KILLED, LR_OOM]}, "num_train_epochs": {"choice": [EPOCHS, OOM_EPOCHS]}}
    space |= {"per_device_train_batch_size": None, "lora_r": None}
    trials = [{"learning_rate": LR_KILLED, "num_train_epochs": EPOCHS}]
    trials += [{"learning_rate": LR_OOM, "num_train_epochs": OOM_EPOCHS}]
    command = [
        sys.executable, "tune/run.py", "--preset", "smoke", "--storage_path", str(storage), "--name", name,
        "--num_cpus", "2", "--include_dashboard", "false", "--verbose", "1", "--searcher", "random",
        "--num_samples", "2", "--points_to_evaluate", json.dumps(trials),
        "--scheduler", "none", "--search_space", json.dumps(space),
        "--max_train_samples", "1200", "--per_device_train_batch_size", "8", "--max_failures", str(MAX_FAILURES),
        "--metric", "loss", "--mode", "min",  # no ties, so the best epoch's checkpoint is always one Tune keeps
        "--reuse_actors", "false",  # a hurt worker process must never be handed the next trial
    ]  # fmt: skip
    # glibc serves allocations >= 4 KiB with fresh mappings (instead of reusing freed heap), so a limited worker's
    # next activation tensor fails at once rather than whenever its heap happens to grow. (The tiny model's
    # activations are 1 KiB per token of a batch of 8: with glibc's 64 KiB-and-up default they often fit in freed heap.)
    # One malloc arena: each extra thread's arena reserves 64 MiB up front and grows inside it without a new mapping,
    # which no limit sees. With several, the retried worker trained on unhurt to its last epoch in most runs once the
    # batches came in random order.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 1024), "MALLOC_ARENA_MAX": "1"}
    started = time.perf_counter()
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    injector = FaultInjector(driver, name, storage)
    injector.start()
    try:
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
        injector.join(timeout=10)
    assert not injector.errors, injector.errors
    experiment = storage / name
    trials = load_experiment(experiment).trials
    by_lr = {row["learning_rate"]: row for _, row in trials.iterrows()}
    return {
        "rc": driver.returncode,
        "output": output,
        "seconds": time.perf_counter() - started,
        "experiment": experiment,
        "trials": by_lr,
        "killed": injector.killed,
        "limited": injector.limited,
    }


def _incarnations(trial_dir: str) -> list[list[dict[str, Any]]]:
    """A trial's result rows grouped by the worker process that reported them, in order."""
    groups: list[list[dict[str, Any]]] = []
    for row in _rows(Path(trial_dir) / "result.json"):
        if not groups or groups[-1][0]["pid"] != row["pid"]:
            groups.append([])
        groups[-1].append(row)
    return groups


def test_search_completes_despite_the_faults(faulty_search: dict[str, Any]) -> None:
    print(f"faulty search: {faulty_search['seconds']:.0f} s")
    assert faulty_search["rc"] == 0, faulty_search["output"][-5000:]
    assert f"{len(faulty_search['trials'])} trials" in faulty_search["output"]
    assert "1 errored" in faulty_search["output"] and "Best trial" in faulty_search["output"]


def test_killed_worker_is_retried_from_its_last_checkpoint(faulty_search: dict[str, Any]) -> None:
    trial = faulty_search["trials"][LR_KILLED]
    assert len(faulty_search["killed"]) == 1
    assert trial["status"] == "TERMINATED" and trial["num_failures"] == 1
    before, after = _incarnations(trial["trial_dir"])
    assert before[0]["pid"] == faulty_search["killed"][0] and after[0]["pid"] != before[0]["pid"]
    # The retry continued after the last checkpointed epoch instead of starting again at epoch 1.
    epochs = [row["epoch"] for row in before + after]
    assert epochs == list(range(1, EPOCHS + 1))
    assert after[0]["epoch"] == before[-1]["epoch"] + 1
    assert re.search(r"SIGKILL|died", Path(trial["trial_dir"], "error.txt").read_text())
    # The killed process could not remove its work folder; its retry did.
    assert not list(work_root().glob(f"{faulty_search['killed'][0]}-*"))


def test_out_of_memory_trial_is_marked_failed_and_the_rest_continue(faulty_search: dict[str, Any]) -> None:
    trial = faulty_search["trials"][LR_OOM]
    assert faulty_search["limited"], "the injector never saw the trial's first epoch"
    assert trial["status"] == "ERROR" and trial["num_failures"] == MAX_FAILURES + 1
    incarnations = _incarnations(trial["trial_dir"])
    assert [group[0]["pid"] for group in incarnations] == faulty_search["limited"]
    assert incarnations[1][0]["epoch"] == incarnations[0][-1]["epoch"] + 1  # the retry resumed too
    error = Path(trial["trial_dir"], "error.txt").read_text()
    # A real allocation failure, as torch's CPU allocator or oneDNN (which needs scratch memory per op) reports it;
    # or, when one of Ray's native threads is first to need memory (abseil's allocator: "mmap error: 12", then
    # SIGABRT; about 1 run in 10 on a 2-core machine), the worker's death, as Ray reports it for an OOM kill too.
    allocation_failed = r"can't allocate memory|Cannot allocate memory|MemoryError|could not create a primitive"
    assert re.search(f"{allocation_failed}|The actor died unexpectedly", error), error[-2000:]


# ------------------------------------------------------------------------------------ damaged checkpoints and state


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def damaged_runs(faulty_search: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Copies of the experiment, each damaged one way, and the commands users would run on them (in parallel)."""
    root = tmp_path_factory.mktemp("damaged")
    source = faulty_search["experiment"]
    copies = {kind: root / kind / source.name for kind in ("checkpoints", "tuner", "state")}
    for copy in copies.values():
        shutil.copytree(source, copy)
    for checkpoint in copies["checkpoints"].glob("*/checkpoint_*"):
        _truncate(checkpoint / "adapter_model.safetensors")
    _truncate(copies["tuner"] / "tuner.pkl")
    for state in copies["state"].glob("experiment_state-*.json"):
        _truncate(state)
    best = Path(load_experiment(copies["checkpoints"]).best_checkpoint)
    listings = {kind: sorted(p.name for p in copy.iterdir()) for kind, copy in copies.items()}
    session = ["--include_dashboard", "false", "--num_cpus", "2", "--verbose", "0"]
    commands = {
        "predict": ["-m", "lorasent.predict", str(best), "--text", "Works great."],
        "retrain": ["-m", "analysis", "retrain", str(copies["checkpoints"]), "--use-checkpoint"],
        "resume_checkpoints": ["tune/run.py", "--resume", str(copies["checkpoints"]), *session],
        "resume_tuner": ["tune/run.py", "--resume", str(copies["tuner"]), *session],
        "resume_state": ["tune/run.py", "--resume", str(copies["state"]), *session],
    }
    running = {
        key: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, args in commands.items()
    }
    done = {}
    for key, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        done[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return {"copies": copies, "listings": listings, "best": best, "done": done}


def test_predict_on_a_truncated_checkpoint_names_the_file(damaged_runs: dict[str, Any]) -> None:
    refused(damaged_runs["done"]["predict"], f"{damaged_runs['best']}/adapter_model.safetensors is corrupt")


def test_analysis_on_a_truncated_checkpoint_names_the_file_and_writes_nothing(damaged_runs: dict[str, Any]) -> None:
    experiment = damaged_runs["copies"]["checkpoints"]
    refused(damaged_runs["done"]["retrain"], f"{damaged_runs['best']}/adapter_model.safetensors is corrupt")
    assert not (experiment / "final_model").exists()
    assert not any(p.name.startswith(".final_model") for p in experiment.iterdir())


def test_resume_from_a_truncated_checkpoint_is_a_clear_trial_error(
    faulty_search: dict[str, Any], damaged_runs: dict[str, Any]
) -> None:
    # The OOM trial ended in ERROR, so --resume restarts it from its (now truncated) checkpoint; the finished
    # trial is kept as it was.
    done = damaged_runs["done"]["resume_checkpoints"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 errored" in done.stdout and "CheckpointError" in done.stdout
    resumed = {
        row["learning_rate"]: row for _, row in load_experiment(damaged_runs["copies"]["checkpoints"]).trials.iterrows()
    }
    error = Path(resumed[LR_OOM]["trial_dir"], "error.txt").read_text()
    assert re.search(r"CheckpointError: .*adapter_model\.safetensors is corrupt or truncated", error)
    finished = _rows(Path(faulty_search["trials"][LR_KILLED]["trial_dir"]) / "result.json")
    assert _rows(Path(resumed[LR_KILLED]["trial_dir"]) / "result.json") == finished  # neither lost nor re-run


@pytest.mark.parametrize(("kind", "damaged_file"), [("tuner", "tuner.pkl"), ("state", "experiment_state")])
def test_resume_of_damaged_experiment_state_is_refused(
    damaged_runs: dict[str, Any], kind: str, damaged_file: str
) -> None:
    refused(damaged_runs["done"][f"resume_{kind}"], damaged_file, "python -m analysis report")
    after = sorted(p.name for p in damaged_runs["copies"][kind].iterdir())
    assert after == damaged_runs["listings"][kind]  # no trial started afresh, no new state written


# ------------------------------------------------------------------------------------ atomic writes under SIGKILL

# Each child writes a good version, then starts writing a new one and stalls halfway (a real write, paused by a
# hook so that SIGKILL lands mid-write every time), announcing "WRITING" first.
SAVE_MODEL_TWICE = """
import sys, time
from lorasent.config import DataArguments, ModelArguments, TrainArguments, TINY_MODEL
from lorasent.model import build_model, save_model_dir
from lorasent.tokenize import load_tokenizer

model_args = ModelArguments(model_name_or_path=TINY_MODEL)
model, tokenizer = build_model(model_args, ["negative", "positive"]), load_tokenizer(model_args)
def save(accuracy):
    save_model_dir(model, tokenizer, sys.argv[1], data_args=DataArguments(), model_args=model_args,
                   train_args=TrainArguments(), metrics={"accuracy": accuracy})
save(0.5)
write_tokenizer = tokenizer.save_pretrained
def stalled(*args, **kwargs):
    write_tokenizer(*args, **kwargs)  # the adapter and the tokenizer of the new version are on disk
    print("WRITING", flush=True)
    time.sleep(600)
tokenizer.save_pretrained = stalled
save(0.9)
"""

PREDICT_TWICE = """
import os, sys, time
from lorasent.predict import main
main([sys.argv[1], "--text", "Works great.", "--output", sys.argv[2]])
fsync = os.fsync
def stalled(fd):
    print("WRITING", flush=True)
    time.sleep(600)
os.fsync = stalled
main([sys.argv[1], "--text", "Broke after a day.", "--text", "Fine.", "--output", sys.argv[2]])
"""


def _kill_mid_write(script: str, *args: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        while not lines or lines[-1] not in ("WRITING\n", ""):
            lines.append(child.stdout.readline())
        assert lines[-1] == "WRITING\n", "".join(lines) + child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_killed_model_save_leaves_the_previous_model(tmp_path: Path) -> None:
    from lorasent.model import load_model_dir

    final = tmp_path / "final_model"
    _kill_mid_write(SAVE_MODEL_TWICE, str(final))
    assert load_model_dir(final, device="cpu").meta["metrics"] == {"accuracy": 0.5}
    # The half-written version lies only in a hidden temporary sibling, never under the final name.
    leftovers = [p.name for p in tmp_path.iterdir() if p != final]
    assert leftovers and all(name.startswith(".final_model.tmp-") for name in leftovers)


def test_killed_results_write_leaves_the_previous_results(faulty_search: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = load_experiment(faulty_search["experiment"]).best_checkpoint
    output = tmp_path / "predictions.jsonl"
    _kill_mid_write(PREDICT_TWICE, str(checkpoint), str(output))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["text"] for row in rows] == ["Works great."]
