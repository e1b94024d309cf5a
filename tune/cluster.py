"""The Ray session of a search: start a local Ray or join a cluster, plan resources, and place the results.

Everything a user can get wrong here (an unreachable address, more concurrent trials than the cluster fits, a
GPU that is not there, an unwritable storage path) is refused with a ConfigError before any trial starts; the
local checks run before Ray itself starts.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasent.errors import ConfigError
from lorasent.paths import atomic_write_text
from tune.config import TuneArguments

DEFAULT_GPU_FRACTION = 0.25  # LoRA trials of small encoders leave most of a GPU idle: pack four per GPU
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_HELP = (
    "Ray token authentication is on: the dashboard and every client need the cluster's token. Print it with "
    "`ray get-auth-token` (it lives in ~/.ray/auth_token; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH override it) and "
    "paste it when the dashboard asks. On a trusted single-user machine you may turn it off with "
    "RAY_AUTH_MODE=disabled."
)


# ---------------------------------------------------------------------------------------------------------------
# Storage: local folders and URIs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage_path(storage_path: str) -> str:
    """A URI as given; a local folder made absolute, created, and checked to be writable."""
    if is_uri(storage_path):
        return storage_path
    path = Path(storage_path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create storage_path {path}: {e.strerror}. Use a writable --storage_path.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"storage_path {path} is not writable. Choose a writable --storage_path.")
    return str(path)


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(path)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise ConfigError(f"Cannot open storage location {path}: {e}") from None


def write_experiment_file(experiment_path: str, filename: str, text: str) -> None:
    """Write one small file into an experiment directory (atomically when it is local)."""
    if not is_uri(experiment_path):
        atomic_write_text(Path(experiment_path) / filename, text)
        return
    fs, root = _filesystem(experiment_path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{filename}") as f:
        f.write(text.encode("utf-8"))


def read_experiment_file(experiment_path: str, filename: str) -> str:
    """Read one small file of an experiment directory; a missing one is a ConfigError naming the path."""
    if not is_uri(experiment_path):
        path = Path(experiment_path).expanduser().resolve() / filename
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"Cannot read {path}: {e.strerror}. Give the experiment directory that `python tune/run.py` "
                "printed (or STORAGE_PATH/latest)."
            ) from None
    fs, root = _filesystem(experiment_path)
    try:
        with fs.open_input_stream(f"{root}/{filename}") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot read {experiment_path}/{filename}: {e}. Check the experiment URI.") from None


def update_latest_link(storage_path: str, experiment_name: str) -> Path | None:
    """Point STORAGE_PATH/latest at the experiment (relative link, replaced atomically); local storage only."""
    if is_uri(storage_path):
        return None
    link = Path(storage_path) / "latest"
    tmp = link.with_name(f".latest-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(experiment_name, target_is_directory=True)
    os.replace(tmp, link)
    return link


# ---------------------------------------------------------------------------------------------------------------
# Resource plan


@dataclass(frozen=True)
class ResourcePlan:
    """What the cluster has and how many trials run on it at once."""

    nodes: int
    cpus: float
    gpus: float
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int

    @property
    def trials_per_gpu(self) -> int | None:
        return math.floor(1 / self.gpus_per_trial + 1e-9) if 0 < self.gpus_per_trial <= 1 else None

    def describe(self) -> str:
        per_trial = f"{self.cpus_per_trial:g} CPU" + (f" + {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else "")
        packing = f", {self.trials_per_gpu} trials per GPU" if self.trials_per_gpu else ""
        return (
            f"Resource plan: {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs | per trial: {per_trial}"
            f"{packing} | up to {self.max_concurrent_trials} trial(s) at once"
        )


def _fits(have: float, need: float) -> float:
    return math.inf if need == 0 else math.floor(have / need + 1e-9)


def plan_resources(tune_args: TuneArguments, nodes: list[dict[str, float]]) -> ResourcePlan:
    """Check the per-trial request and the concurrency against the nodes' CPUs and GPUs."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    cpt = tune_args.cpus_per_trial
    gpt = tune_args.gpus_per_trial
    if gpt is None:
        gpt = DEFAULT_GPU_FRACTION if gpus else 0.0
    where = f"{len(nodes)} node(s) with {cpus:g} CPUs and {gpus:g} GPUs"
    if gpt > 0 and gpus == 0:
        raise ConfigError(
            f"gpus_per_trial={gpt:g} but the Ray cluster has no GPU ({where}). Run on CPUs with --gpus_per_trial 0, "
            "or join a cluster with GPUs (--address)."
        )
    capacity = int(sum(min(_fits(n.get("CPU", 0.0), cpt), _fits(n.get("GPU", 0.0), gpt)) for n in nodes))
    if capacity == 0:
        raise ConfigError(
            f"No node can hold one trial of {cpt:g} CPU(s) and {gpt:g} GPU(s) ({where}). Lower --cpus_per_trial "
            "or --gpus_per_trial."
        )
    wanted = tune_args.max_concurrent_trials
    if wanted is not None and wanted > capacity:
        raise ConfigError(
            f"max_concurrent_trials={wanted} needs {wanted * cpt:g} CPUs and {wanted * gpt:g} GPUs, but the cluster "
            f"({where}) fits {capacity} trial(s) of {cpt:g} CPU + {gpt:g} GPU at once. Lower --max_concurrent_trials "
            "or --cpus_per_trial, or leave max_concurrent_trials unset to use what the cluster has."
        )
    return ResourcePlan(len(nodes), cpus, gpus, cpt, gpt, wanted or capacity)


def local_nodes(tune_args: TuneArguments) -> list[dict[str, float]]:
    """The one node a local Ray would have, counted before Ray starts."""
    cpus = tune_args.num_cpus or len(os.sched_getaffinity(0))
    if tune_args.num_gpus is not None:
        gpus = tune_args.num_gpus
    else:
        import torch

        gpus = torch.cuda.device_count()
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


# ---------------------------------------------------------------------------------------------------------------
# Starting or joining Ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail within `timeout` seconds when a HOST:PORT or ray://HOST:PORT address does not answer."""
    if address == "auto":
        return  # Ray finds a cluster started on this machine itself, or says at once that there is none
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"--address {address} is a dashboard/job URL. Give the cluster's GCS address HOST:6379, "
            "ray://HOST:10001 (Ray Client) or 'auto'."
        )
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Cannot read Ray address {address!r}. Use HOST:PORT, ray://HOST:PORT or 'auto'.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(
            f"Ray cluster at {address} is unreachable ({e.strerror or e}). Check that the head node is up "
            "(`ray status` on it) and the port is open to you, or drop --address/RAY_ADDRESS to run a local Ray."
        ) from None


@dataclass
class RaySession:
    """The Ray a search runs on, with its resource plan; `owned` when this process started or joined it."""

    plan: ResourcePlan
    dashboard_url: str | None
    owned: bool

    def shutdown(self) -> None:
        """Stop a local Ray we started, disconnect from a cluster we joined; leave a caller's Ray alone."""
        import ray

        if self.owned:
            ray.shutdown()


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _print_auth_and_dashboard(dashboard_url: str | None) -> None:
    if dashboard_url:
        print(f"Ray dashboard: http://{dashboard_url}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        print(TOKEN_HELP)


def cluster_address(tune_args: TuneArguments) -> str | None:
    return tune_args.address or os.environ.get("RAY_ADDRESS") or None


def preflight(tune_args: TuneArguments) -> ResourcePlan | None:
    """Checks that need no Ray: the cluster address answers, or the local Ray's plan fits this machine.

    Returns the local plan, or None when joining a cluster (planned once joined) or the caller's own Ray.
    """
    import ray

    address = cluster_address(tune_args)
    if address:
        check_reachable(address)
        return None
    if ray.is_initialized():
        return None
    return plan_resources(tune_args, local_nodes(tune_args))


def start_ray(tune_args: TuneArguments, plan: ResourcePlan | None) -> RaySession:
    """Start a local Ray under `plan` (from `preflight`; dashboard on 127.0.0.1), or join --address / $RAY_ADDRESS
    / the caller's own Ray."""
    import ray

    if ray.is_initialized():  # the caller's own Ray (a notebook, a test): use it and leave it running
        return RaySession(plan_resources(tune_args, _alive_nodes()), None, owned=False)
    log_to_driver = tune_args.verbose >= 2
    if plan is not None:
        if tune_args.include_dashboard and tune_args.dashboard_host not in LOOPBACK:
            warnings.warn(
                f"The Ray dashboard will listen on {tune_args.dashboard_host}, reachable from other machines. "
                "Keep token authentication on, or use --dashboard_host 127.0.0.1 with an SSH tunnel "
                "(ssh -L 8265:127.0.0.1:8265 HOST).",
                stacklevel=2,
            )
        context = ray.init(
            num_cpus=int(plan.cpus),
            num_gpus=int(plan.gpus),
            include_dashboard=tune_args.include_dashboard,
            dashboard_host=tune_args.dashboard_host,
            dashboard_port=tune_args.dashboard_port,
            log_to_driver=log_to_driver,
        )
        dashboard_url = context.dashboard_url if tune_args.include_dashboard else None
        _print_auth_and_dashboard(dashboard_url)
        return RaySession(plan, dashboard_url, owned=True)

    address = cluster_address(tune_args)
    from ray.exceptions import AuthenticationError

    try:
        context = ray.init(address=address, log_to_driver=log_to_driver)
    except AuthenticationError as e:
        raise ConfigError(
            f"Ray at {address} refused this client's token ({e.message}). Set RAY_AUTH_MODE=token and give the "
            "cluster's token: copy the head node's `ray get-auth-token` output into RAY_AUTH_TOKEN or "
            "~/.ray/auth_token."
        ) from None
    except ConnectionError as e:
        auth_hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray never sends a token to an explicit address unless told to, and then only says it cannot connect.
            auth_hint = (
                " If the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and give its "
                "token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the "
                "head node prints it)."
            )
        raise ConfigError(
            f"Cannot join Ray at {address}: {e}. Check that the cluster is up (`ray status` on its head)." + auth_hint
        ) from None
    try:
        plan = plan_resources(tune_args, _alive_nodes())
    except ConfigError:
        ray.shutdown()
        raise
    _print_auth_and_dashboard(context.dashboard_url)
    return RaySession(plan, context.dashboard_url, owned=True)


def warn_if_storage_not_shared(plan: ResourcePlan, storage_path: str) -> None:
    """On several nodes, a node-local results folder leaves each trial's files on the node that ran it."""
    if plan.nodes > 1 and not is_uri(storage_path):
        warnings.warn(
            f"The search runs on {plan.nodes} nodes but stores results in the local folder {storage_path}. Unless "
            "that folder is a filesystem shared by every node at the same path (NFS), checkpoints written on other "
            "nodes will not be gathered here. Use --storage_path s3://BUCKET/PATH, gs://... or a shared mount.",
            stacklevel=2,
        )
