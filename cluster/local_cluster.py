#!/usr/bin/env python
"""A real multi-node Ray cluster on one machine: a head and N workers as separate `ray start` processes.

Why: a search that works against `ray.init()` in one process can still break on a cluster (results written
to node-local paths, trials that assume the driver's filesystem, retries after a node dies). This script
reproduces a cluster's moving parts on a laptop or CI box — separate raylets, object stores and temp dirs,
joined over the network through the head's GCS port — runs `tune/run.py --address ...` against it, prints
which node every trial ran on, and tears every process it started down again, also after a failure, Ctrl-C
or SIGTERM. It never touches other Ray clusters on the machine: it does not call `ray stop` (which kills
every Ray process of the user); it kills only the process groups it started and any stray process that
carries its run marker.

    python cluster/local_cluster.py -- --preset smoke                      # head + 1 worker, smoke search
    python cluster/local_cluster.py --num_workers 2 --worker_cpus 2 -- --preset quickstart
    python cluster/local_cluster.py --keep --no_search                     # leave it up, print how to stop it
    python cluster/local_cluster.py --stop /tmp/lorasent-ray-XXXX          # stop a kept cluster

Everything after `--` (or any flag this script does not know) goes to `tune/run.py` unchanged.

Token authentication: Ray 2.60 authenticates every GCS/raylet/dashboard connection with a shared token when
RAY_AUTH_MODE=token. A `ray start --head` does not create a token (only `ray.init()` does) and every joining
node and driver must present the same one, so this script writes a fresh 256-bit token into the run folder
(mode 0600) and hands RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN_PATH to every node and to the search.
`--no_auth` sets RAY_AUTH_MODE=disabled instead (trusted single-user machines only: Ray's GCS and raylet
ports listen on all interfaces, and Ray replaces 127.0.0.1 with the machine's address).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from lorasent.errors import ConfigError, LorasentError

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
# Every process of one local cluster (nodes, their Ray workers, the search driver) inherits this variable,
# so tear-down finds strays by it without ever matching another cluster's processes.
MARKER_ENV = "LORASENT_LOCAL_CLUSTER"
STATE_FILE = "cluster.json"
# Unix sockets live under <run_dir>/<node>/session_<date>_<pid>/sockets/<name>; Linux caps the path at 107.
_SOCKET_SUFFIX_LEN = len("/worker-99/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107


class LocalCluster:
    """A head and `num_workers` worker nodes on this machine, each a `ray start --block` process group.

    Use as a context manager: the cluster is up inside the block and completely gone after it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        num_workers: int = 1,
        head_cpus: int = 1,
        worker_cpus: int = 1,
        worker_gpus: int = 0,
        object_store_mb: int = 256,
        auth: bool = True,
        port: int = 0,
        dashboard_port: int = 0,
    ) -> None:
        if num_workers < 0 or head_cpus < 0 or worker_cpus <= 0 or worker_gpus < 0:
            raise ConfigError(
                "num_workers and head_cpus must be >= 0, worker_cpus > 0 and worker_gpus >= 0; "
                f"got {num_workers=}, {head_cpus=}, {worker_cpus=}, {worker_gpus=}."
            )
        if object_store_mb < 80:
            raise ConfigError(f"object_store_mb={object_store_mb} is below Ray's minimum; use at least 80.")
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="lorasent-ray-", dir="/tmp")).resolve()
        if len(str(self.run_dir)) + _SOCKET_SUFFIX_LEN > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"--run_dir {self.run_dir} is too long for Ray's unix sockets (limit {_MAX_SOCKET_PATH} characters "
                "with Ray's session path). Use a short folder such as /tmp/lc1, or leave --run_dir out."
            )
        self.num_workers = num_workers
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.worker_gpus = worker_gpus
        self.object_store_mb = object_store_mb
        self.auth = auth
        taken: set[int] = set()
        self.port = port or _free_port(taken)
        self.dashboard_port = dashboard_port or _free_port(taken)
        self._taken = taken | {self.port, self.dashboard_port}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- addresses and environment -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address that `ray start --address`, `ray.init(address=...)` and `tune/run.py` take."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.run_dir / "auth_token"

    @property
    def node_names(self) -> list[str]:
        return ["head"] + [f"worker-{k}" for k in range(1, self.num_workers + 1)]

    def env(self) -> dict[str, str]:
        """The environment every node and driver of this cluster needs (auth mode, token, run marker)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env[MARKER_ENV] = str(self.run_dir)
        env["RAY_AUTH_MODE"] = "token" if self.auth else "disabled"
        if self.auth:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        # SIGTERM makes a node drain for up to 30 s (meant for Serve); a test cluster should stop at once.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    # -- start ---------------------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120) -> None:
        """Start the head, then the workers, and wait until all nodes are alive in the GCS."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.auth and not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        head_args = [
            "--head",
            f"--port={self.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port(self._taken)}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
        ]
        self._spawn("head", head_args, {})
        self._write_state()
        self._wait_for_nodes(1, timeout_s)
        for k, name in enumerate(self.node_names[1:]):
            extra_env = {}
            if self.worker_gpus:
                first = k * self.worker_gpus
                extra_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(self.worker_gpus))
            args = [f"--address={self.address}", f"--num-cpus={self.worker_cpus}", f"--num-gpus={self.worker_gpus}"]
            self._spawn(name, args, extra_env)
        self._write_state()
        self._wait_for_nodes(len(self.node_names), timeout_s)

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str]) -> None:
        cmd = [
            *RAY_CLI,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--temp-dir={self.run_dir / name}",
            f"--resources={json.dumps({_node_resource(name): 1})}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--dashboard-agent-listen-port={_free_port(self._taken)}",
            "--disable-usage-stats",
            *args,
        ]
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child for its lifetime
        # A session of its own: the terminal's Ctrl-C reaches only this script, which tears down in order,
        # and the whole node (raylet, GCS, dashboard, Ray workers) is one process group to kill.
        self.procs[name] = subprocess.Popen(
            cmd, env={**self.env(), **extra_env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise LorasentError(
                        f"Ray node '{name}' exited with code {proc.returncode} while starting. Its log "
                        f"({self.run_dir / f'{name}.log'}) ends with:\n{self.log_tail(name)}\nFix the cause above "
                        "(a port in use: pass other --port/--dashboard_port; low memory: lower --object_store_mb)."
                    )
            # The dashboard answers (first with errors, then with JSON) a few seconds after the GCS is up.
            with contextlib.suppress(OSError, ValueError, KeyError):
                if sum(n["state"] == "ALIVE" for n in self.state_api("nodes")) >= count:
                    return
            if time.monotonic() > deadline:
                raise LorasentError(
                    f"Only some of the {count} Ray nodes came up within {timeout_s:.0f} s. Logs are in "
                    f"{self.run_dir}; on a busy machine raise --start_timeout."
                )
            time.sleep(1)

    def state_api(self, resource: str, **params: str | int) -> list[dict[str, Any]]:
        """Rows of Ray's state API (`ray list <resource> --detail`), read from the dashboard over HTTP.

        Plain HTTP with the cluster's token keeps this process free of Ray's process-wide auth settings, so a
        test or notebook can inspect this cluster while talking to another one.
        """
        query = urllib.parse.urlencode({"detail": 1, "limit": 10_000, **params})
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/{resource}?{query}")
        if self.auth:
            request.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.run_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _write_state(self) -> None:
        state = {
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "auth": self.auth,
            "nodes": {name: proc.pid for name, proc in self.procs.items()},
        }
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # -- inspect -------------------------------------------------------------------------------------------

    def nodes(self) -> dict[str, str]:
        """Node id -> node name ('head', 'worker-1', ...) of every node the GCS knows, alive or dead."""
        return {n["node_id"]: n["node_name"] for n in self.state_api("nodes")}

    def raylet_pid(self, name: str) -> int:
        """The raylet of one node: kill it and the node is gone, as when a machine dies."""
        for proc in _descendants(self.procs[name].pid):
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet":
                    return proc.pid
        raise LorasentError(f"Node '{name}' has no raylet process; its log ends with:\n{self.log_tail(name)}")

    def trial_placement(self, experiment_dir: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
        """Where each trial ran: trial folder name -> [{node, node_id, pid, hostname}] in the order it ran there.

        Ray Tune writes `pid`, `hostname` and `node_ip` into every result, but on one machine all nodes share
        the host and IP, so the pid is mapped to its node through the actors the GCS still remembers.
        """
        names = self.nodes()
        pid_node = {a["pid"]: a["node_id"] for a in self.state_api("actors") if a.get("pid")}
        placement: dict[str, list[dict[str, Any]]] = {}
        for result_file in sorted(Path(experiment_dir).glob("*/result.json")):
            runs: list[dict[str, Any]] = []
            for line in result_file.read_text().splitlines():
                try:
                    result = json.loads(line)
                except ValueError:  # blank, or the line Tune is writing right now
                    continue
                node_id = result.get("node_id") or pid_node.get(result.get("pid"))
                run = {
                    "node": names.get(node_id, "?"),
                    "node_id": node_id,
                    "pid": result.get("pid"),
                    "hostname": result.get("hostname"),
                }
                if not runs or runs[-1]["pid"] != run["pid"]:
                    runs.append(run)
            placement[result_file.parent.name] = runs
        return placement

    # -- stop ----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process of this cluster: workers first, then the head; then any marked stray."""
        stop_run_dir(self.run_dir, [self.procs[n].pid for n in reversed(self.node_names) if n in self.procs])
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def stop_run_dir(run_dir: Path, pgids: Sequence[int], grace_s: float = 10) -> int:
    """Terminate the given process groups, then SIGKILL them and any process carrying `run_dir`'s marker.

    Returns how many processes had to be force-killed. Signals are blocked meanwhile so a second Ctrl-C
    cannot interrupt tear-down halfway and leave nodes behind.
    """
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (_alive_groups(pgids) or cluster_processes(run_dir)):
            time.sleep(0.25)
        for pgid in _alive_groups(pgids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        strays = cluster_processes(run_dir)
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(strays, timeout=5)
        return len(strays)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _alive_groups(pgids: Sequence[int]) -> list[int]:
    alive = []
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            continue
        # A group whose members are all zombies still answers killpg; only count live members.
        if any(_is_live(p) for p in psutil.process_iter() if _pgid(p) == pgid):
            alive.append(pgid)
    return alive


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _is_live(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.status() != psutil.STATUS_ZOMBIE
    return False


def cluster_processes(run_dir: Path) -> list[psutil.Process]:
    """This user's live processes that belong to the cluster in `run_dir` (by environment or command line)."""
    uid = os.getuid()
    marker = str(run_dir)
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        if proc.pid == os.getpid() or not proc.info["uids"] or proc.info["uids"].real != uid:
            continue
        with contextlib.suppress(psutil.Error):
            if not _is_live(proc):
                continue
            if proc.environ().get(MARKER_ENV) == marker or marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _free_port(taken: set[int]) -> int:
    """A TCP port free on all interfaces (Ray's servers bind 0.0.0.0), distinct from those handed out."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _node_resource(name: str) -> str:
    """A custom resource that exists on one node only, e.g. {'node_worker-1': 1}: pin work to a node with it."""
    return f"node_{name}"


# -- command line ------------------------------------------------------------------------------------------


def _flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of `--name v` / `--name=v` (underscores or dashes) in pass-through arguments."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in spellings:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _default_storage_path() -> str:
    """tune/run.py's own default, so the experiment is found where the search put it."""
    import dataclasses

    from tune.config import TuneArguments

    return next(f.default for f in dataclasses.fields(TuneArguments) if f.name == "storage_path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Start a head and N worker Ray nodes on this machine, run `tune/run.py --address` against "
        "them, show where each trial ran, and tear everything down. Unknown flags (or all after `--`) go to "
        "tune/run.py.",
        allow_abbrev=False,
    )
    p.add_argument("--num_workers", "--num-workers", type=int, default=1, help="Worker nodes besides the head.")
    p.add_argument("--head_cpus", "--head-cpus", type=int, default=1, help="CPUs the head offers to trials.")
    p.add_argument("--worker_cpus", "--worker-cpus", type=int, default=1, help="CPUs each worker offers.")
    p.add_argument(
        "--worker_gpus", "--worker-gpus", type=int, default=0, help="GPUs per worker (distinct devices each)."
    )
    p.add_argument("--object_store_mb", "--object-store-mb", type=int, default=256, help="Object store per node (MiB).")
    p.add_argument("--port", type=int, default=0, help="Head GCS port (0: a free one).")
    p.add_argument("--dashboard_port", "--dashboard-port", type=int, default=0, help="Dashboard port (0: free).")
    p.add_argument("--run_dir", "--run-dir", default=None, help="Temp dir of the nodes (default: a new /tmp dir).")
    p.add_argument(
        "--no_auth", "--no-auth", action="store_true", help="RAY_AUTH_MODE=disabled (trusted machines only)."
    )
    p.add_argument("--start_timeout", "--start-timeout", type=float, default=120, help="Seconds for nodes to join.")
    p.add_argument("--keep", action="store_true", help="Leave the cluster running; print its address and stop command.")
    p.add_argument("--no_search", "--no-search", action="store_true", help="Only start the cluster (use with --keep).")
    p.add_argument("--stop", metavar="RUN_DIR", help="Stop a cluster left running by --keep, then exit.")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the arguments passed through to tune/run.py."""
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        return build_parser().parse_args(argv[:split]), argv[split + 1 :]
    return build_parser().parse_known_args(argv)


def run_search(cluster: LocalCluster, search_args: list[str]) -> int:
    """Run tune/run.py against the cluster; the first Ctrl-C lets Tune save its state, a later one kills it."""
    cmd = [sys.executable, str(REPO_ROOT / "tune" / "run.py"), "--address", cluster.address, *search_args]
    print("local_cluster: running", " ".join(cmd), flush=True)
    driver = subprocess.Popen(cmd, env=cluster.env(), start_new_session=True)
    try:
        return driver.wait()
    except KeyboardInterrupt:
        print("local_cluster: interrupted; letting the search save its state (Ctrl-C again to kill)", flush=True)
        with contextlib.suppress(ProcessLookupError):
            driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        raise


def print_placement(cluster: LocalCluster, experiment_dir: Path) -> None:
    """Print which node each trial ran on and save it as <experiment>/placement.json."""
    if not experiment_dir.is_dir():
        print(f"local_cluster: no experiment folder at {experiment_dir}; cannot show where trials ran.")
        return
    placement = cluster.trial_placement(experiment_dir)
    (experiment_dir / "placement.json").write_text(json.dumps(placement, indent=2))
    print(f"\nWhere each trial ran ({experiment_dir}):")
    for trial, runs in placement.items():
        where = " -> ".join(f"{r['node']} (pid {r['pid']})" for r in runs) or "no results"
        print(f"  {trial[:60]:<60} {where}")
    per_node: dict[str, int] = {}
    for runs in placement.values():
        for node in {r["node"] for r in runs}:
            per_node[node] = per_node.get(node, 0) + 1
    print("  trials per node:", ", ".join(f"{n}: {c}" for n, c in sorted(per_node.items())))


def print_kept(cluster: LocalCluster) -> None:
    token_hint = (
        f"  token:     RAY_AUTH_TOKEN_PATH={cluster.token_path} ray get-auth-token   (paste it into the dashboard)\n"
        f"  env:       export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
        if cluster.auth
        else "  env:       export RAY_AUTH_MODE=disabled\n"
    )
    print(
        "\nlocal_cluster: left running (--keep)\n"
        f"  nodes:     {', '.join(cluster.node_names)}\n"
        f"  address:   {cluster.address}\n"
        f"  dashboard: {cluster.dashboard_url}\n"
        f"{token_hint}"
        f"  search:    python tune/run.py --address {cluster.address} --preset smoke   (with the env above)\n"
        f"  stop:      python cluster/local_cluster.py --stop {cluster.run_dir}",
        flush=True,
    )


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    opts, search_args = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.stop:
        run_dir = Path(opts.stop).resolve()
        state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).exists() else {}
        if not state and not cluster_processes(run_dir):
            raise ConfigError(
                f"{run_dir} holds no running local cluster ({STATE_FILE} missing, no processes found): it is already "
                "stopped, or this is not the run dir that --keep printed."
            )
        stop_run_dir(run_dir, list(reversed(state.get("nodes", {}).values())))
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"local_cluster: stopped {run_dir}")
        return 0
    if _flag_value(search_args, "address"):
        raise ConfigError("Do not pass --address: this script points tune/run.py at the cluster it starts.")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    cluster = LocalCluster(
        opts.run_dir,
        num_workers=opts.num_workers,
        head_cpus=opts.head_cpus,
        worker_cpus=opts.worker_cpus,
        worker_gpus=opts.worker_gpus,
        object_store_mb=opts.object_store_mb,
        auth=not opts.no_auth,
        port=opts.port,
        dashboard_port=opts.dashboard_port,
    )
    rc = 0
    try:
        cluster.start(opts.start_timeout)
        print(
            f"local_cluster: {len(cluster.node_names)} nodes up at {cluster.address}, dashboard "
            f"{cluster.dashboard_url}, run dir {cluster.run_dir}",
            flush=True,
        )
        if not opts.no_search:
            storage = _flag_value(search_args, "storage_path") or _default_storage_path()
            name = _flag_value(search_args, "name")
            if name is None:
                name = f"local-cluster-{time.strftime('%Y%m%d-%H%M%S')}"
                search_args = [*search_args, "--name", name]
            rc = run_search(cluster, search_args)
            if storage and "://" not in storage:
                print_placement(cluster, Path(storage).expanduser().resolve() / name)
        if opts.keep:
            print_kept(cluster)
            return rc
    except BaseException:
        cluster.stop()
        print(f"local_cluster: stopped after an interruption or error; logs kept in {cluster.run_dir}", file=sys.stderr)
        raise
    cluster.stop()
    if rc == 0:
        shutil.rmtree(cluster.run_dir, ignore_errors=True)
    else:
        print(f"local_cluster: the search exited with {rc}; node logs kept in {cluster.run_dir}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except LorasentError as e:
        print(f"local_cluster: error: {e}", file=sys.stderr)
        sys.exit(2)
