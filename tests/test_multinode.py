"""A real two-node Ray cluster on this machine (cluster/local_cluster.py): separate `ray start` processes joined
through the head's GCS port, a real search placed on both nodes, a worker node killed mid-search, and nothing left
running afterwards.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local_cluster.py"
# Two trials at once, one per node (each node offers one CPU, each trial takes one). No actor reuse, so a trial
# never inherits the process, and so the node, of one that ran elsewhere.
SMOKE = ["--preset", "smoke", "--num_samples", "2", "--reuse_actors", "false"]


def _load_local_cluster() -> ModuleType:
    spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lc = _load_local_cluster()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short folder for the nodes' temp dirs (Ray's unix socket paths must stay under 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    yield path
    lc.stop_run_dir(path, [])  # a failed assertion must not leave nodes behind
    shutil.rmtree(path, ignore_errors=True)


def _results(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """Trial folder -> its reported results, straight from Tune's result.json files."""
    return {
        f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for f in experiment.glob("*/result.json")
    }


def _trial_statuses(experiment: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    return {Path(t.path).name: t.status for t in ExperimentAnalysis(str(experiment)).trials}


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_two_node_search_places_trials_on_both_nodes_and_tears_down(tmp_path, run_dir):
    storage = tmp_path / "runs"
    args = ["--run_dir", str(run_dir), "--", *SMOKE, "--max_failures", "0"]
    args += ["--storage_path", str(storage), "--name", "two-nodes"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    experiment = storage / "two-nodes"
    results = _results(experiment)
    assert len(results) == 2 and all(results.values()), "both trials reported results"
    assert set(_trial_statuses(experiment).values()) == {"TERMINATED"}
    assert not list(experiment.glob("*/error.txt")), "no trial errored"

    # Where each trial ran: the pids in Tune's results, mapped to nodes through the GCS before tear-down.
    placement = json.loads((experiment / "placement.json").read_text())
    nodes = {}
    for trial, runs in placement.items():
        assert {r["pid"] for r in runs} == {r["pid"] for r in results[trial]}, "placement covers every result"
        [run] = runs  # no retries: each trial ran in one process on one node
        nodes[run["node"]] = (run["node_id"], run["pid"])
    assert set(nodes) == {"head", "worker-1"}, f"trials ran on {nodes}"
    (head_id, head_pid), (worker_id, worker_pid) = nodes["head"], nodes["worker-1"]
    assert head_id != worker_id and head_pid != worker_pid
    assert "Where each trial ran" in output and "head: 1, worker-1: 1" in output

    # Tear-down: no process of this cluster, its GCS port closed, its temp dir removed after success.
    address = re.search(r"nodes up at (\S+),", output).group(1)
    assert lc.cluster_processes(run_dir) == []
    assert not _port_open(address)
    assert not run_dir.exists()


def test_ctrl_c_tears_the_cluster_down(tmp_path, run_dir):
    args = ["--run_dir", str(run_dir), "--", *SMOKE, "--storage_path", str(tmp_path / "runs")]
    launcher = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in launcher.stdout:  # nodes up and the search starting: now the user presses Ctrl-C
        lines.append(line)
        if line.startswith("local_cluster: running"):
            break
    address = re.search(r"nodes up at (\S+),", "".join(lines)).group(1)
    assert lc.cluster_processes(run_dir), "the cluster was running"
    launcher.send_signal(signal.SIGINT)
    output = "".join(lines) + launcher.communicate(timeout=120)[0]

    assert launcher.returncode == 130, output[-3000:]
    assert lc.cluster_processes(run_dir) == [] and not _port_open(address)
    assert (run_dir / "head.log").is_file(), "logs are kept after an interruption"


def _wait_for(predicate, timeout_s: float, what: str, driver: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert driver.poll() is None, f"the search ended before {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def test_killed_worker_node_its_trial_is_rescheduled_and_the_search_completes(tmp_path, run_dir):
    storage, epochs = tmp_path / "runs", 6
    experiment = storage / "fault"
    search = [*SMOKE, "--scheduler", "none", "--num_train_epochs", str(epochs), "--max_train_samples", "1500"]
    search += ["--max_failures", "2", "--storage_path", str(storage), "--name", "fault"]
    log = tmp_path / "driver.log"
    with lc.LocalCluster(run_dir, num_workers=1) as cluster, log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "tune" / "run.py"), "--address", cluster.address, *search],
            env=cluster.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:

            def trial_on_worker() -> str | None:
                placement = cluster.trial_placement(experiment) if experiment.is_dir() else {}
                return next((t for t, runs in placement.items() if any(r["node"] == "worker-1" for r in runs)), None)

            # The worker's trial has reported (and checkpointed) at least one epoch: now the machine "dies".
            victim = _wait_for(trial_on_worker, 180, "a trial reporting from worker-1", driver, log)
            os.kill(cluster.raylet_pid("worker-1"), signal.SIGKILL)
            assert driver.wait(timeout=240) == 0, log.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()

        placement = cluster.trial_placement(experiment)

        def node_states() -> dict[str, str]:
            return {n["node_name"]: n["state"] for n in cluster.state_api("nodes")}

        # The GCS marks a node DEAD only after its missed health checks; on a quiet machine the search can finish
        # first. Wait for the verdict rather than race it.
        deadline = time.monotonic() + 90
        while node_states().get("worker-1") != "DEAD" and time.monotonic() < deadline:
            time.sleep(1)
        final_states = node_states()
        worker_exit = cluster.procs["worker-1"].poll()

    assert final_states == {"head": "ALIVE", "worker-1": "DEAD"}
    assert worker_exit is not None, "the worker node's `ray start` went down with its raylet"
    assert set(_trial_statuses(experiment).values()) == {"TERMINATED"}, "the search completed every trial"

    # The killed trial moved: it reported from worker-1, then from the surviving head in a new process.
    runs = placement[victim]
    assert runs[0]["node"] == "worker-1" and runs[-1]["node"] == "head", runs
    assert runs[0]["pid"] != runs[-1]["pid"]
    victim_results = _results(experiment)[victim]
    epochs_seen = [round(r["epoch"]) for r in victim_results]
    assert epochs_seen[-1] == epochs, f"it ran to the end: {epochs_seen}"
    # Resumed from its last registered checkpoint, not from scratch. Ray Tune registers a function trainable's
    # checkpoint in a second step after logging its result: a node that dies between the two leaves that one
    # epoch logged but not restorable, so it is trained once more (seen in 1 of ~4 runs here).
    repeated = [epoch for epoch, after in itertools.pairwise(epochs_seen) if after == epoch]
    assert epochs_seen == sorted(epochs_seen) and sorted(set(epochs_seen)) == list(range(1, epochs + 1)), epochs_seen
    assert len(repeated) <= 1, f"at most the epoch in flight is trained twice: {epochs_seen}"
    assert [r["training_iteration"] for r in victim_results] == list(range(1, len(victim_results) + 1))
    assert lc.cluster_processes(run_dir) == [], "nothing of the cluster left running"


def _can_unshare_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"]).returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` (root or user namespaces)")
def test_a_results_folder_the_nodes_cannot_see_is_refused_before_any_trial(tmp_path, run_dir):
    """The nodes run in a mount namespace of their own, where an empty tmpfs lies over the results folder: they see
    a folder of their own there, as the nodes of a real cluster see their own disks, while the driver sees this
    machine's. Ray would fail every trial at its first checkpoint; the search is refused before it starts one."""
    storage = tmp_path / "runs"
    storage.mkdir()
    blind = 'mount -t tmpfs lorasent-blind "$1" && shift && exec "$@"'
    start = [sys.executable, str(SCRIPT), "--run_dir", str(run_dir), "--keep", "--no_search"]
    up = subprocess.run(
        ["unshare", "-m", "sh", "-c", blind, "sh", str(storage), *start], capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    address = json.loads((run_dir / lc.STATE_FILE).read_text())["address"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(run_dir / "auth_token"), lc.MARKER_ENV: str(run_dir)}
    done = subprocess.run(
        [sys.executable, str(REPO / "tune" / "run.py"), "--address", address, *SMOKE, "--storage_path", str(storage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    error = done.stderr[done.stderr.index("error: ") :]
    assert re.match(rf"error: Ray node\(s\) (head|worker-1) \([\d.]+\) cannot see the results folder {storage} ", error)
    assert "--storage_path s3://BUCKET/PATH" in error and "Traceback" not in done.stderr
    assert list(storage.iterdir()) == [], "no trial started, and the marker is gone"
