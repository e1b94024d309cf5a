"""Joining an autoscaling Ray cluster: a real autoscaler (Ray's v1 monitor with its fake multi-node provider, which
starts real raylets on this machine) behind a head with no CPUs, token authentication on. The search must plan from
what its trials request, make the autoscaler add a node, run there, say where, and record what it used.

The fake provider is Ray's own test double for a cloud: only the machine is simulated, the autoscaler, its
decisions and the nodes it starts are the real thing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tune" / "run.py"
# The fake provider numbers the nodes it launches: the head is ...00000, the first worker it adds ...00001.
FIRST_ADDED_NODE = "f" * 51 + "00001"


def _load_local_cluster() -> ModuleType:
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local_cluster.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lc = _load_local_cluster()  # its tear-down kills only this cluster's processes (by marker), never `ray stop`


class Cluster(NamedTuple):
    address: str
    env: dict[str, str]  # what every node holds: token mode, token path, run marker
    run_dir: Path


def _autoscaling_config(gcs_address: str) -> dict:
    """A head without CPUs and one worker type from 0 to 1 node, as a launcher/KubeRay config would declare."""
    return {
        "cluster_name": "lorasent-test",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            # as Ray's own fake_multi_node/example.yaml: nodes are local processes, nothing to ssh into or update
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 1, "object_store_memory": 150 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{key: [] for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
    }


@pytest.fixture(scope="module")
def autoscaling_cluster() -> Iterator[Cluster]:
    run_dir = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))  # short: Ray's socket paths are limited
    token = run_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    taken: set[int] = set()
    address = f"127.0.0.1:{lc._free_port(taken)}"
    config = run_dir / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(address)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {
        lc.MARKER_ENV: str(run_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    head_env = env | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = [
        *lc.RAY_CLI,
        *("start", "--head", "--block", f"--port={address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1"),
        *("--num-cpus=0", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={run_dir / 'head'}"),
        f"--ray-client-server-port={lc._free_port(taken)}",
        f"--dashboard-agent-listen-port={lc._free_port(taken)}",
        f"--object-store-memory={150 * 2**20}",
        f"--autoscaling-config={config}",
        "--disable-usage-stats",
    ]
    with (run_dir / "head.log").open("wb") as log:
        head = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The autoscaler publishes its status once it is up: from then on a driver can see it.
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("head/session_*/logs/monitor.log")) or "StandardAutoscaler" not in "".join(
            p.read_text(errors="replace") for p in run_dir.glob("head/session_*/logs/monitor.log")
        ):
            assert head.poll() is None, (run_dir / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the autoscaling head did not come up"
            time.sleep(0.5)
        yield Cluster(address, env, run_dir)
    finally:
        lc.stop_run_dir(run_dir, [head.pid], grace_s=3)  # its nodes need no graceful drain
        assert lc.cluster_processes(run_dir) == [], "a process of the autoscaling cluster survived tear-down"
        shutil.rmtree(run_dir, ignore_errors=True)


def _results(experiment: Path) -> dict[str, list[dict]]:
    return {
        f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for f in experiment.glob("*/result.json")
    }


def test_search_on_an_autoscaling_cluster_makes_it_add_a_node(autoscaling_cluster: Cluster, tmp_path: Path) -> None:
    from analysis.results import load_experiment

    # The user gives the token file only: tune/run.py must turn token mode on itself for an explicit address.
    env = {k: v for k, v in autoscaling_cluster.env.items() if k != "RAY_AUTH_MODE"}
    argv = ["--smoke-test", "--num_samples", "2", "--num_train_epochs", "1", "--gpus_per_trial", "0"]
    argv += ["--address", autoscaling_cluster.address, "--storage_path", str(tmp_path), "--name", "autoscaled"]
    done = subprocess.run(
        [sys.executable, str(RUN), *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "RAY_AUTH_TOKEN_PATH is set: sending its token to the cluster (RAY_AUTH_MODE=token)" in output
    # Only the head is up, but it is of a configured node type: an autoscaler runs this cluster.
    assert "The Ray cluster autoscales (autoscaler node types ray.head.default)" in output
    # Before the fix: "No node can hold one trial" (the head has no CPU) and the autoscaler was never asked.
    assert "Resource plan: now 1 node(s), 0 CPUs, 0 GPUs | per trial: 1 CPU | as many trials at once" in output
    # The nodes it will add cannot be asked whether they see the local results folder: said, not refused.
    assert f"autoscaling cluster but stores results in the local folder {tmp_path}: the nodes up now see it" in output

    experiment = tmp_path / "autoscaled"
    results = _results(experiment)
    assert len(results) == 2 and all(results.values()), output[-3000:]
    # Every report names the node it ran on: the worker the autoscaler added for the waiting trials.
    assert {row["node_id"] for rows in results.values() for row in rows} == {FIRST_ADDED_NODE}
    saved = json.loads((experiment / "lorasent_search.json").read_text())
    assert saved["resources"] == {"cpu": 1.0, "gpu": 0.0} and saved["tune"]["gpus_per_trial"] == 0.0
    assert load_experiment(experiment).resources == {"cpu": 1.0, "gpu": 0.0}


def test_joining_without_the_token_says_how_to_give_it(autoscaling_cluster: Cluster, tmp_path: Path) -> None:
    from lorasent.paths import cache_root

    env = {k: v for k, v in autoscaling_cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env |= {"HOME": str(tmp_path), "LORASENT_CACHE": str(cache_root())}  # no ~/.ray/auth_token either
    env["RAY_gcs_server_port_wait_time_s"] = "3"  # Ray retries a refused connection for ~20 s; the message is the test
    argv = ["--smoke-test", "--gpus_per_trial", "0", "--address", autoscaling_cluster.address]
    done = subprocess.run(
        [sys.executable, str(RUN), *argv, "--storage_path", str(tmp_path / "runs")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    error = done.stderr[done.stderr.index("error: ") :]
    assert "refused this client: it sent no token (RAY_AUTH_MODE is not token)" in error, error
    assert "`ray get-auth-token` on the head node prints it) in RAY_AUTH_TOKEN or in a file named by" in error
