"""The Ray session of a search: start a local Ray or join a cluster, plan resources, and place the results.

Everything a user can get wrong here (an unreachable address, more concurrent trials than the cluster fits, a
GPU that is not there, an unwritable storage path) is refused with a ConfigError before any trial starts. A local
Ray starts beside the checks (`EarlyRay`), quietly, and a refusal stops it."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import math
import os
import re
import socket
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasent.cpus import usable_cpus
from lorasent.errors import ConfigError
from lorasent.paths import atomic_write_text
from tune.config import TuneArguments

if TYPE_CHECKING:  # the footprint module imports torch and peft; the plan only reads the numbers
    from lorasent.footprint import TrainingFootprint

# gpus_per_trial left automatic: as many trials per GPU as fit in its memory, at most MAX_TRIALS_PER_GPU (the most
# measured: 8 trials on one H100 gave ~1.8x one trial's throughput, bench/RESULTS.md), within GPU_MEMORY_USABLE of it
# (the rest is headroom for fragmentation and other processes). Where GPU memory is not known before trials start (a
# joined or autoscaling cluster), DEFAULT_GPU_FRACTION.
MAX_TRIALS_PER_GPU = 8
# With --fused_trials the trials on a GPU share one base model and step together: a step of more trials is one pass
# over more rows, not more passes. The H200 anchors put a bf16 step of ~1.6k tokens (batch 16) at ~17 ms and
# one of ~6.4k (batch 64) at ~20 ms: below ~25k tokens a step is mostly its fixed launch cost, so trials added up to
# there come almost free (32 trials of batch 8 at ~100 tokens). At most MAX_SHARED_TRIALS_PER_GPU, as memory allows,
# and no more than the search holds. Unmeasured on a GPU (bench/RESULTS.md, C21).
MAX_SHARED_TRIALS_PER_GPU = 32
GPU_MEMORY_USABLE = 0.9
DEFAULT_GPU_FRACTION = 0.25
UNKNOWN_GPU_MEMORY = "GPU memory not known before trials start: 0.25 GPU per trial (--gpus_per_trial chooses)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_HELP = (
    "Ray token authentication is on: the dashboard and every client need the cluster's token. Print it with "
    "`ray get-auth-token` (it lives in ~/.ray/auth_token; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH override it) and "
    "paste it when the dashboard asks. On a trusted single-user machine you may turn it off with "
    "RAY_AUTH_MODE=disabled."
)
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where a client's token comes from, in Ray's order


# ---------------------------------------------------------------------------------------------------------------
# Storage: local folders and URIs


def is_uri(path: str) -> bool:
    return "://" in path


def join_location(storage_path: str, name: str) -> str:
    """`storage_path`/`name`; in a URI the name goes before its query (`s3://b/runs?endpoint_override=...`)."""
    if not is_uri(storage_path):
        return str(Path(storage_path) / name)
    base, question, query = storage_path.partition("?")
    return f"{base.rstrip('/')}/{name}{question}{query}"


def split_location(experiment_path: str) -> tuple[str, str]:
    """(storage path, experiment name) of an experiment path or URI: the inverse of `join_location`."""
    base, question, query = experiment_path.partition("?") if is_uri(experiment_path) else (experiment_path, "", "")
    storage_path, _, name = base.rstrip("/").rpartition("/")
    return f"{storage_path}{question}{query}", name


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


CREATE_BUCKET = {"s3": "aws s3 mb s3://{}", "gcs": "gcloud storage buckets create gs://{}"}  # by pyarrow's type_name


def location_uri(experiment_path: str, fs_path: str) -> str:
    """Where a file or folder of an experiment lies, as a user passes it: Ray gives the results of an experiment in
    a bucket as paths in its filesystem (`bucket/runs/...`), which name no scheme or endpoint; as a URI, with the
    experiment's query (`s3://bucket/runs/...?endpoint_override=...`). A local path as it is."""
    if not is_uri(experiment_path):
        return fs_path
    scheme, _, rest = experiment_path.partition("://")
    _, question, query = rest.partition("?")
    return f"{scheme}://{fs_path}{question}{query}"


def check_bucket(storage_uri: str) -> None:
    """Refuse a storage URI whose bucket does not exist, before anything starts: Ray (which never creates one) failed
    with pyarrow's traceback only after the checks, the tokenisation and its own start-up, a minute later."""
    import pyarrow.fs

    fs, root = _filesystem(storage_uri)
    if fs.type_name not in CREATE_BUCKET:  # no buckets
        return
    bucket = root.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound
    except OSError as e:  # no access to the bucket, no network: pyarrow says which
        raise ConfigError(
            f"Cannot reach the bucket {bucket} of {storage_uri}: {e}. Check the URI, your network and the storage "
            "credentials, or use a local --storage_path."
        ) from None
    if missing:
        raise ConfigError(
            f"The bucket {bucket} of --storage_path {storage_uri} does not exist. Create it first "
            f"(`{CREATE_BUCKET[fs.type_name].format(bucket)}`), or fix the bucket's name."
        )


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
        raise ConfigError(
            f"Cannot read {join_location(experiment_path, filename)}: {e}. Check the experiment URI, your network and "
            "the storage credentials."
        ) from None


def newest_experiment_state(experiment_path: str) -> tuple[Any, str] | None:
    """(filesystem, path) of the newest experiment_state-*.json of a local or URI experiment, the one Ray restores
    from (newest by the session time in its name), or None when there is none."""
    import pyarrow.fs

    fs, root = _filesystem(experiment_path if is_uri(experiment_path) else str(Path(experiment_path).resolve()))
    names = [
        info.path
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
        if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json")
    ]
    return (fs, max(names)) if names else None


def read_trial_data(fs: Any, state_file: str) -> list[Any]:
    """The `trial_data` of an experiment_state file: one [trial JSON, runtime JSON] pair per trial."""
    with fs.open_input_stream(state_file) as f:
        return json.loads(f.read().decode("utf-8"))["trial_data"]


@dataclass(frozen=True)
class SavedTrial:
    """A trial as the experiment's newest saved state holds it."""

    trial_id: str
    folder: str  # its folder's name in the experiment folder
    status: str  # Ray's: PENDING, RUNNING, PAUSED, TERMINATED or ERROR
    last_result: dict[str, Any]  # its last report ({} before the first)
    config: dict[str, Any]  # its hyperparameters


def sample_number(folder: str, trial_id: str) -> float:
    """A trial's number in its search (1, 2, ...: the order its searcher made the trials, kept by a resume), read from
    its folder's name as Ray makes it, `<trainable>_<trial id>_<number>_<config>_<date>`; inf where the name holds
    none. Ties between trials go to the earlier one: Ray draws trial ids at random, anew in each run of a search."""
    found = re.search(rf"_{re.escape(trial_id)}_(\d+)_", folder)
    return int(found.group(1)) if found else math.inf


def saved_trials(experiment_path: str) -> list[SavedTrial] | None:
    """The trials in the experiment's newest saved state (the one a resume starts from), or None when there is none
    to read (none yet, or caught mid-write)."""
    try:
        newest = newest_experiment_state(experiment_path)
        if newest is None:
            return None
        trials = []
        for trial_json, runtime_json in read_trial_data(*newest):
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            folder, status = trial["relative_logdir"], trial["status"]
            last_result, config = runtime.get("last_result") or {}, trial.get("config") or {}
            trials.append(SavedTrial(trial["trial_id"], folder, status, last_result, config))
        return trials
    except (ConfigError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def saved_trial_statuses(experiment_path: str) -> dict[str, str] | None:
    """Trial folder name -> status in the experiment's newest saved state, or None when there is none to read.

    After Ctrl-C, Ray saves the state and then marks the trials it stops TERMINATED in memory only: the saved state
    is the one that says which trials had finished.
    """
    trials = saved_trials(experiment_path)
    return None if trials is None else {trial.folder: trial.status for trial in trials}


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
# Autoscaling clusters

# Ray's read-only node provider (a cluster started by hand with `ray start`, or a local Ray) names each node's type
# `node_<node id>`; an autoscaler names them after its config (`gpu_worker`, a KubeRay worker group).
_READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")
# The head of a `ray up` cluster keeps the launcher config here (Ray Tune's own autoscaling check reads it too).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class Autoscaler:
    """An autoscaler that adds nodes for waiting trials: what showed it, and the most it can reach if known."""

    evidence: str
    max_resources: dict[str, float] | None = None  # cluster-wide ceiling per resource ("CPU", "GPU"), if known


def configured_node_types(status: Mapping[str, Any] | None, node_types: Iterable[str] = ()) -> list[str]:
    """Node types named by an autoscaler config, from autoscaler v1's status JSON (the GCS key
    `__autoscaling_status`) and the node types autoscaler v2 lists; Ray's read-only `node_<id>` stand-ins dropped."""
    report = (status or {}).get("autoscaler_report") or {}
    seen = [
        *node_types,
        *(report.get("node_type_mapping") or {}).values(),
        *(report.get("active_nodes") or {}),
        *(report.get("pending_launches") or {}),
        *(pending[1] for pending in report.get("pending_nodes") or ()),  # [ip, node type, status]
    ]
    return sorted({t for t in seen if t and not _READONLY_NODE_TYPE.fullmatch(t)})


def launcher_max_resources(config: Mapping[str, Any]) -> dict[str, float]:
    """The most of each resource a cluster-launcher config can reach: the head plus the worker types at their
    max_workers, and no more than the config's max_workers workers in all (the largest ones, per resource)."""
    cap = config.get("max_workers")
    total: dict[str, float] = {}
    workers: dict[str, list[float]] = {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        for key, amount in (node_type.get("resources") or {}).items():
            if name == config.get("head_node_type"):
                total[key] = total.get(key, 0.0) + amount
            else:
                workers.setdefault(key, []).extend([float(amount)] * node_type.get("max_workers", 0))
    for key, amounts in workers.items():
        largest = sorted(amounts, reverse=True)
        total[key] = total.get(key, 0.0) + sum(largest if cap is None else largest[:cap])
    return total


def _detect_autoscaler() -> Autoscaler | None:
    """Ray 2.60 has no one switch for "autoscaling": read what each kind of autoscaler leaves behind, the ones that
    also tell how far the cluster can grow first."""
    import ray
    import yaml
    from ray._private.state import state
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental.internal_kv import _internal_kv_get

    # The config an autoscaler reports to the GCS (what Ray Train and Ray Data read; not every Ray version writes it).
    config = state.get_cluster_config()
    groups = config.node_group_configs if config else ()
    if any(g.max_count == -1 or g.max_count > g.min_count for g in groups if g.max_count and g.resources):
        ceiling = state.get_max_resources_from_cluster_config() or {}
        return Autoscaler("the autoscaler's cluster config", {k: float(v) for k, v in ceiling.items()})
    launcher = Path(LAUNCHER_CONFIG).expanduser()
    if launcher.is_file():
        return Autoscaler(str(launcher), launcher_max_resources(yaml.safe_load(launcher.read_text(encoding="utf-8"))))
    raw = _internal_kv_get("__autoscaling_status")  # autoscaler v1 (KubeRay's default), ray_constants' key
    status = get_cluster_status(ray.get_runtime_context().gcs_address)  # autoscaler v2 (`ray up`'s default)
    v2_types = [
        *(n.ray_node_type_name for n in (*status.active_nodes, *status.idle_nodes, *status.pending_nodes)),
        *(launch.ray_node_type_name for launch in status.pending_launches),
    ]
    node_types = configured_node_types(json.loads(raw) if raw else None, v2_types)
    return Autoscaler(f"autoscaler node types {', '.join(node_types)}") if node_types else None


def find_autoscaler() -> Autoscaler | None:
    """The autoscaler of the cluster this process is connected to; None for a fixed cluster or a local Ray."""
    import ray

    if ray.util.client.ray.is_connected():  # Ray Client: the GCS is reachable from inside the cluster only
        return ray.get(ray.remote(num_cpus=0)(_detect_autoscaler).remote())
    return _detect_autoscaler()


# ---------------------------------------------------------------------------------------------------------------
# Resource plan


@dataclass(frozen=True)
class ResourcePlan:
    """What the cluster has and how many trials run on it at once.

    On an autoscaling cluster `max_concurrent_trials` may be None: every trial the search holds asks at once and the
    autoscaler's own limits (max_workers) decide how many run.
    """

    nodes: int
    cpus: float
    gpus: float
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int | None
    autoscaler: Autoscaler | None = None
    gpu_sharing: str = ""  # why gpus_per_trial is what it is, when it was automatic

    @property
    def trials_per_gpu(self) -> int | None:
        return trials_sharing_a_gpu(self.gpus_per_trial)

    @property
    def resources_per_trial(self) -> dict[str, float]:
        """As `tune.with_resources` takes them, and as `lorasent_search.json` records them for the analysis."""
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}

    def describe(self) -> str:
        per_trial = f"{self.cpus_per_trial:g} CPU" + (f" + {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else "")
        packing = f", {self.trials_per_gpu} trials per GPU" if self.trials_per_gpu else ""
        now = "now " if self.autoscaler else ""
        if self.max_concurrent_trials is None:
            at_once = "as many trials at once as the autoscaler adds nodes for"
        else:
            at_once = f"up to {self.max_concurrent_trials} trial(s) at once"
        why = f"\n  {self.gpu_sharing}" if self.gpu_sharing else ""
        return (
            f"Resource plan: {now}{self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs | per trial: "
            f"{per_trial}{packing} | {at_once}{why}"
        )


def trials_sharing_a_gpu(gpus_per_trial: float | None) -> int | None:
    """How many trials of `gpus_per_trial` share one GPU; None for whole GPUs per trial, none, or not yet known."""
    return math.floor(1 / gpus_per_trial + 1e-9) if gpus_per_trial and 0 < gpus_per_trial <= 1 else None


def _fits(have: float, need: float) -> float:
    return math.inf if need == 0 else math.floor(have / need + 1e-9)


def trials_per_gpu(gpu_memory: int, trial_memory: int) -> int:
    """How many trials share one GPU of `gpu_memory` bytes when each needs `trial_memory`: 1 to MAX_TRIALS_PER_GPU."""
    return max(1, min(MAX_TRIALS_PER_GPU, int(GPU_MEMORY_USABLE * gpu_memory) // max(trial_memory, 1)))


def automatic_gpu_sharing(gpu_memory: int, footprint: TrainingFootprint) -> tuple[float, str]:
    """(gpus_per_trial, why) for an automatic gpus_per_trial on GPUs of `gpu_memory` bytes."""
    from lorasent.footprint import GIB  # imported already: the footprint was computed

    n = trials_per_gpu(gpu_memory, footprint.total)
    why = f"{n} trial(s) per GPU of {gpu_memory / GIB:.0f} GiB: each trial needs {footprint.describe()}"
    _warn_if_one_trial_does_not_fit(gpu_memory, footprint)
    return 1 / n, why


def shared_gpu_sharing(gpu_memory: int, footprint: TrainingFootprint, trials: int) -> tuple[float, str]:
    """(gpus_per_trial, why) for trials that share one base model per GPU (--fused_trials), for a search of `trials`
    trials on GPUs of `gpu_memory` bytes: as many as fit, at most MAX_SHARED_TRIALS_PER_GPU and `trials`."""
    from lorasent.footprint import GIB  # imported already: the footprint was computed

    usable = GPU_MEMORY_USABLE * gpu_memory
    most = max(1, min(MAX_SHARED_TRIALS_PER_GPU, trials))
    n = max([k for k in range(1, most + 1) if footprint.shared_total(k) <= usable], default=1)
    why = (
        f"{n} trial(s) per GPU of {gpu_memory / GIB:.0f} GiB sharing one base model (at most {most}): "
        f"~{footprint.shared_total(n) / GIB:.1f} GiB for them all, ~{footprint.per_shared_trial / GIB:.2f} GiB a trial"
    )
    _warn_if_one_trial_does_not_fit(gpu_memory, footprint)  # one trial on a base needs what a trial process needs
    return 1 / n, why


def _warn_if_one_trial_does_not_fit(gpu_memory: int, footprint: TrainingFootprint) -> None:
    """Warn (at the plan's caller) where even one trial may not fit: it then gets a whole GPU."""
    from lorasent.footprint import GIB

    if footprint.total > GPU_MEMORY_USABLE * gpu_memory:
        warnings.warn(
            f"One trial may not fit a GPU of {gpu_memory / GIB:.0f} GiB: it needs {footprint.describe()}, an upper "
            "bound. Lower per_device_train_batch_size, per_device_eval_batch_size or max_length, or use "
            "--half_precision_base; each trial gets a whole GPU.",
            stacklevel=3,
        )


def plan_resources(
    tune_args: TuneArguments,
    nodes: list[dict[str, float]],
    autoscaler: Autoscaler | None = None,
    *,
    gpu_sharing: tuple[float, str] = (DEFAULT_GPU_FRACTION, UNKNOWN_GPU_MEMORY),
) -> ResourcePlan:
    """Check the per-trial request and the concurrency against the nodes' CPUs and GPUs.

    `gpu_sharing` is (gpus_per_trial, why) for an automatic gpus_per_trial (`automatic_gpu_sharing`). With an
    autoscaler the nodes up now are not the limit: the plan follows the request (checked against the autoscaler's
    ceiling when it publishes one), and waiting trials make it add nodes.
    """
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if autoscaler is not None:
        return _plan_autoscaling(tune_args, nodes, cpus, gpus, autoscaler)
    cpt = tune_args.cpus_per_trial
    gpt = tune_args.gpus_per_trial
    why = ""
    if gpt is None:
        gpt, why = gpu_sharing if gpus else (0.0, "")
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
    return ResourcePlan(len(nodes), cpus, gpus, cpt, gpt, wanted or capacity, gpu_sharing=why)


def _plan_autoscaling(
    tune_args: TuneArguments, nodes: list[dict[str, float]], cpus: float, gpus: float, autoscaler: Autoscaler
) -> ResourcePlan:
    ceiling = autoscaler.max_resources
    cpt = tune_args.cpus_per_trial
    gpt = tune_args.gpus_per_trial
    why = ""
    if gpt is None:
        if gpus or (ceiling and ceiling.get("GPU")):
            gpt, why = DEFAULT_GPU_FRACTION, UNKNOWN_GPU_MEMORY
        elif ceiling is not None:
            gpt = 0.0
        else:
            raise ConfigError(
                f"gpus_per_trial is automatic, but this autoscaling cluster ({autoscaler.evidence}) has no GPU node up "
                "yet and does not publish which nodes it can add. Say what a trial needs: --gpus_per_trial 0.25 (the "
                "autoscaler adds GPU workers; four trials share each GPU) or --gpus_per_trial 0 (CPU trials)."
            )
    wanted = tune_args.max_concurrent_trials
    if ceiling is None:
        return ResourcePlan(len(nodes), cpus, gpus, cpt, gpt, wanted, autoscaler, why)
    most = f"at most {ceiling.get('CPU', 0):g} CPUs and {ceiling.get('GPU', 0):g} GPUs"
    capacity = int(min(_fits(ceiling.get("CPU", 0.0), cpt), _fits(ceiling.get("GPU", 0.0), gpt)))
    if capacity == 0:
        raise ConfigError(
            f"The autoscaler ({autoscaler.evidence}) can reach {most}: not one trial of {cpt:g} CPU(s) and "
            f"{gpt:g} GPU(s). Lower --cpus_per_trial or --gpus_per_trial, or add node types to the cluster config."
        )
    if wanted is not None and wanted > capacity:
        raise ConfigError(
            f"max_concurrent_trials={wanted} needs {wanted * cpt:g} CPUs and {wanted * gpt:g} GPUs, but the autoscaler "
            f"({autoscaler.evidence}) can reach {most}: {capacity} trial(s) at once. Lower --max_concurrent_trials, "
            "or leave it unset."
        )
    return ResourcePlan(len(nodes), cpus, gpus, cpt, gpt, wanted or capacity, autoscaler, why)


def local_gpu_memory() -> int | None:
    """Bytes of the smallest GPU this process sees (None without one). Reads device properties, allocates nothing."""
    import torch

    count = torch.cuda.device_count()
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) if count else None


def local_cpus(tune_args: TuneArguments) -> int:
    """The CPUs of a local Ray: --num_cpus, else those this process may use (its cores, within any CPU quota)."""
    return tune_args.num_cpus or usable_cpus()


def local_nodes(tune_args: TuneArguments) -> list[dict[str, float]]:
    """The one node a local Ray has, counted by this process (torch counts the GPUs)."""
    cpus = local_cpus(tune_args)
    import torch

    visible = torch.cuda.device_count()
    gpus = visible if tune_args.num_gpus is None else tune_args.num_gpus
    if gpus > visible:  # Ray would hand trials GPUs that are not there, and each would fail on start
        raise ConfigError(
            f"--num_gpus {gpus}, but torch sees {visible} GPU(s) here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Use --num_gpus {visible} or leave it unset; GPUs of "
            "other machines join through a Ray cluster (--address)."
        )
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


# ---------------------------------------------------------------------------------------------------------------
# Starting or joining Ray


def auto_address() -> tuple[str, str]:
    """(address, where it came from) of the cluster `auto` joins, as Ray finds it: $RAY_ADDRESS, else the cluster that
    `ray start` last started on this machine (the address it recorded).

    Where neither is there, Ray would join any Ray it finds running here: another search's own local Ray, which that
    search stops when it ends, and this one died with it (exit 1, no error). That is refused instead.
    """
    from ray._common.utils import get_ray_address_file
    from ray._private.services import find_bootstrap_address

    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env, "RAY_ADDRESS"
    record = get_ray_address_file(None)
    found = find_bootstrap_address(None)
    if not found:
        raise ConfigError(
            f"--address auto (or RAY_ADDRESS=auto) joins the cluster `ray start` started on this machine, and none is "
            f"recorded in {record}; a Ray that another program (another search) started for itself stops when that "
            "program ends, so it is not joined. Start a cluster with `ray start --head`, give a cluster's HOST:PORT, "
            "or drop --address/RAY_ADDRESS to start a local Ray of this search's own."
        )
    return found, f"`ray start`'s record {record}"


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail within `timeout` seconds when a HOST:PORT or ray://HOST:PORT address (or the one `auto` finds) does not
    answer: Ray itself retries an address that is gone for minutes."""
    where = ""
    if address == "auto":
        address, source = auto_address()
        where = f" (--address auto found it in {source})"
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
            f"Ray cluster at {address}{where} is unreachable ({e.strerror or e}). Check that the head node is up "
            "(`ray status` on it) and the port is open to you, or drop --address/RAY_ADDRESS to run a local Ray."
        ) from None


@dataclass
class RaySession:
    """The Ray a search runs on, with its resource plan; `owned` when this process started or joined it."""

    plan: ResourcePlan
    dashboard_url: str | None
    owned: bool
    started_early: bool = False  # the EarlyRay, so what was started on it before the plan (engines) is still there

    def shutdown(self) -> None:
        """Stop a local Ray we started, disconnect from a cluster we joined; leave a caller's Ray alone."""
        if self.owned:
            stop_ray()


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _cluster_plan(tune_args: TuneArguments) -> ResourcePlan:
    """The plan on the cluster this process is connected to, autoscaler included."""
    autoscaler = find_autoscaler()
    if autoscaler is not None:
        warnings.warn(
            f"The Ray cluster autoscales ({autoscaler.evidence}): the search is planned from what trials request, not "
            "from the nodes up now, and waiting trials make the autoscaler add nodes. Trials that stay PENDING ask for "
            "more than any node type offers: check `ray status` on the head.",
            stacklevel=3,
        )
    return plan_resources(tune_args, _alive_nodes(), autoscaler)


def _print_auth_and_dashboard(dashboard_url: str | None) -> None:
    if dashboard_url:
        print(f"Ray dashboard: http://{dashboard_url}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        print(TOKEN_HELP)


def cluster_address(tune_args: TuneArguments) -> str | None:
    return tune_args.address or os.environ.get("RAY_ADDRESS") or None


def check_token_file() -> None:
    """A token file named by RAY_AUTH_TOKEN_PATH must be readable (Ray would only say it found no token)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN"):  # RAY_AUTH_TOKEN, when set, is the token Ray uses
        try:
            problem = "it is empty" if not Path(path).expanduser().read_text(encoding="utf-8").strip() else ""
        except (OSError, UnicodeDecodeError) as e:
            problem = f"it cannot be read: {getattr(e, 'strerror', None) or e}"
        if problem:
            raise ConfigError(
                f"RAY_AUTH_TOKEN_PATH={path} names no token ({problem}). Point it at a file holding the cluster's "
                "token (`ray get-auth-token` on the head node prints it), or put the token itself in RAY_AUTH_TOKEN."
            )


def use_token_from_env() -> str | None:
    """Turn token authentication on when the user gave a token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) but no mode.

    Ray sends a token to an explicit --address or $RAY_ADDRESS only with RAY_AUTH_MODE=token (it turns that mode on by
    itself just for a local Ray and `auto`). An explicit RAY_AUTH_MODE is left as it is. Returns the variable whose
    token will be sent, if this turned the mode on.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return None
    given = next((name for name in TOKEN_ENV if os.environ.get(name)), None)
    if given is not None:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # RAY_AUTH_MODE=token for this process, and Ray's cached config refreshed
    return given


def _refuse_local_ray_options(tune_args: TuneArguments, address: str) -> None:
    """Options that size and expose a local Ray have no effect on a cluster this search joins: refused, not ignored
    (a user who gave --num_gpus 2 there expects two GPUs' worth of trials)."""
    local = ("num_cpus", "num_gpus", "include_dashboard", "dashboard_port")
    given = [f"--{name}" for name in local if getattr(tune_args, name) is not None]
    if tune_args.dashboard_host not in LOOPBACK:
        given.append("--dashboard_host")
    if given:
        raise ConfigError(
            f"{', '.join(given)} set up a local Ray, but this search joins the Ray cluster at {address}, whose CPUs, "
            "GPUs and dashboard are its nodes' own (`ray start --num-cpus/--num-gpus/--include-dashboard/"
            "--dashboard-port` there). Drop "
            f"{' and '.join(given)} (on --resume, set them to none), or drop --address and RAY_ADDRESS to run on a "
            "local Ray."
        )


def preflight(
    tune_args: TuneArguments,
    footprint: Callable[[], TrainingFootprint] | None = None,
    early: EarlyRay | None = None,
    shared_by: int | None = None,
) -> ResourcePlan | None:
    """Checks that need no Ray: the cluster address answers, or the local Ray's plan fits this machine.

    `footprint` gives one trial's memory, asked for only to share local GPUs automatically (without it, 0.25 GPU per
    trial); `shared_by`: the trials of a search whose trials share one base model per GPU (--fused_trials), which
    packs them by `shared_gpu_sharing`. Returns the local plan (also for the `early` Ray, which this process started
    for it), or None when joining a cluster (planned once joined) or the caller's own Ray.
    """
    import ray

    address = cluster_address(tune_args)
    if address:
        _refuse_local_ray_options(tune_args, address)
        check_reachable(address)
        check_token_file()
        return None
    if ray.is_initialized() and early is None:
        return None
    nodes = local_nodes(tune_args)
    automatic = footprint is not None and tune_args.gpus_per_trial is None and any(n["GPU"] for n in nodes)
    memory = local_gpu_memory() if automatic else None
    if memory is None:
        return plan_resources(tune_args, nodes)
    if shared_by is not None:
        sharing = shared_gpu_sharing(memory, footprint(), shared_by)
    else:
        sharing = automatic_gpu_sharing(memory, footprint())
    return plan_resources(tune_args, nodes, gpu_sharing=sharing)


class EarlyRay:
    """The local Ray of a search, started before the search's checks so that Ray's start-up (seconds) runs while the
    driver imports torch and transformers (seconds), instead of after them.

    Until the checks pass it stays quiet: Ray's own log lines are held back, and a refused search discards it, so the
    user sees only the error and no Ray is left running. `adopt` makes it the search's Ray and lets the lines out.
    """

    def __init__(self, tune_args: TuneArguments) -> None:
        ray_logger = logging.getLogger("ray")
        handlers, held = ray_logger.handlers[:], logging.handlers.BufferingHandler(capacity=10_000)
        ray_logger.handlers[:] = [held]
        try:
            # GPUs: --num_gpus, else as many as Ray finds (`adopt` checks them against torch's count)
            self.dashboard_url = _init_local_ray(tune_args, local_cpus(tune_args), tune_args.num_gpus)
        finally:
            ray_logger.handlers[:] = handlers
        self.held = held.buffer

    def adopt(self, plan: ResourcePlan) -> bool:
        """Whether this Ray has the plan's resources (it is then the search's, and its held log lines are out); a
        Ray that counted other GPUs than torch did is stopped, to be started again under the plan."""
        import ray

        ray_logger = logging.getLogger("ray")
        for record in self.held:
            ray_logger.handle(record)
        resources = ray.cluster_resources()
        if resources.get("CPU", 0) == int(plan.cpus) and resources.get("GPU", 0) == int(plan.gpus):
            return True
        stop_ray()
        return False

    def discard(self) -> None:
        """Stop it: the search was refused (or interrupted) before it started."""
        stop_ray()


def start_early_ray(tune_args: TuneArguments) -> EarlyRay | None:
    """Start the local Ray a search will run on now, quietly (see EarlyRay); None when the search joins a cluster or
    the caller's own Ray, which are planned once joined."""
    import ray

    if cluster_address(tune_args) or ray.is_initialized():
        return None
    return EarlyRay(tune_args)


def check_dashboard_port(tune_args: TuneArguments) -> None:
    """Refuse a --dashboard_port that cannot be bound (another program, or another search's dashboard, holds it), as
    Ray tests it: Ray's own refusal came after its GCS had started, as a traceback naming `ray start` flags."""
    host, port = tune_args.dashboard_host, tune_args.dashboard_port
    if tune_args.include_dashboard is False or port is None:  # unset: Ray takes 8265 or the next free port
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"The Ray dashboard cannot listen on {host}:{port} ({e.strerror or e}). Give a free --dashboard_port "
                "or leave it unset (8265, or the next free one), or turn the dashboard off with --include_dashboard "
                "false."
            ) from None


def _init_local_ray(tune_args: TuneArguments, cpus: int, gpus: int | None) -> str | None:
    """`ray.init` of a new local Ray (dashboard on 127.0.0.1 unless asked); returns the dashboard's address."""
    import ray

    check_dashboard_port(tune_args)
    dashboard = tune_args.include_dashboard is not False  # None: on
    if dashboard and tune_args.dashboard_host not in LOOPBACK:
        warnings.warn(
            f"The Ray dashboard will listen on {tune_args.dashboard_host}, reachable from other machines. "
            "Keep token authentication on, or use --dashboard_host 127.0.0.1 with an SSH tunnel "
            "(ssh -L 8265:127.0.0.1:8265 HOST).",
            stacklevel=3,
        )
    try:
        # A Ctrl-C is held until the start is done: one that broke into it left a Ray that, once stopped, could
        # crash the interpreter's exit (SIGSEGV instead of exit 130).
        with _ctrl_c_held():
            context = ray.init(
                address="local",  # a new local Ray, never silently a `ray start` cluster already on this machine
                num_cpus=cpus,
                num_gpus=gpus,
                include_dashboard=dashboard,
                dashboard_host=tune_args.dashboard_host,
                dashboard_port=tune_args.dashboard_port,
                log_to_driver=tune_args.verbose >= 2,
            )
    except BaseException:  # that Ctrl-C, or a failure: stop what the start started
        stop_ray()
        raise
    return context.dashboard_url if dashboard else None


def _ctrl_c_held() -> contextlib.AbstractContextManager[Any]:
    """Ray's own `DeferSigint`: a Ctrl-C in the block is held and raised as KeyboardInterrupt when it ends (on the
    main thread; elsewhere a no-op)."""
    from ray._private.utils import DeferSigint

    return DeferSigint.create_if_main_thread()


def stop_ray() -> None:
    """`ray.shutdown()` with a Ctrl-C held until it is done, as in `_init_local_ray`. The second Ctrl-C of an
    interrupted search (Tune handles the first) tends to land here, while the local Ray's processes stop: breaking in
    left Ray half stopped, for its exit handler to stop again."""
    import ray

    with _ctrl_c_held():
        ray.shutdown()


def start_ray(tune_args: TuneArguments, plan: ResourcePlan | None, early: EarlyRay | None = None) -> RaySession:
    """Start a local Ray under `plan` (from `preflight`), or adopt the `early` one when it has the plan's resources;
    or join --address / $RAY_ADDRESS / the caller's own Ray."""
    import ray

    if early is not None and plan is not None and early.adopt(plan):
        _print_auth_and_dashboard(early.dashboard_url)
        return RaySession(plan, early.dashboard_url, owned=True, started_early=True)
    if ray.is_initialized():  # the caller's own Ray (a notebook, a test): use it and leave it running
        return RaySession(_cluster_plan(tune_args), None, owned=False)
    if plan is not None:
        dashboard_url = _init_local_ray(tune_args, int(plan.cpus), int(plan.gpus))
        _print_auth_and_dashboard(dashboard_url)
        return RaySession(plan, dashboard_url, owned=True)

    address = cluster_address(tune_args)
    token_from = use_token_from_env()
    if token_from:
        print(f"{token_from} is set: sending its token to the cluster (RAY_AUTH_MODE=token).")
    from ray.exceptions import AuthenticationError

    try:
        context = ray.init(address=address, log_to_driver=tune_args.verbose >= 2)
    except (AuthenticationError, ConnectionError) as e:
        raise _join_error(address, e) from None
    try:
        plan = _cluster_plan(tune_args)
    except ConfigError:
        stop_ray()
        raise
    _print_auth_and_dashboard(context.dashboard_url)
    return RaySession(plan, context.dashboard_url, owned=True)


def _join_error(address: str | None, error: Exception) -> ConfigError:
    """Why joining failed, and the fix. Ray reports a refused token only in the cause, after ~20 s of retries."""
    from ray.exceptions import AuthenticationError

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    give_token = (
        "Give the cluster's token (`ray get-auth-token` on the head node prints it) in RAY_AUTH_TOKEN or in a file "
        "named by RAY_AUTH_TOKEN_PATH, and leave RAY_AUTH_MODE unset (this command then sets it to token) or token."
    )
    if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error.__cause__):
        sent = "a token the cluster does not accept" if token_mode else "no token (RAY_AUTH_MODE is not token)"
        return ConfigError(f"Ray at {address} refused this client: it sent {sent}. {give_token}")
    # Ray never sends a token to an explicit address unless in token mode, and may only say it cannot connect.
    hint = "" if token_mode else f" If the cluster uses token authentication (Ray's default): {give_token}"
    return ConfigError(
        f"Cannot join Ray at {address}: {error}. Check that the cluster is up (`ray status` on its head).{hint}"
    )


def check_storage_shared(plan: ResourcePlan, storage_path: str, timeout_s: float = 120.0) -> None:
    """Refuse a local results folder that a node of the joined cluster cannot see, before any trial starts.

    Ray checks, at each trial's first checkpoint, that the trial's node sees the experiment folder the driver made,
    and fails the trial otherwise: every trial placed there would fail, be retried and fail again. So a marker is
    written here and one zero-CPU task per other node (every node through Ray Client, whose driver runs elsewhere)
    looks for it. Nodes an autoscaler has not started yet cannot be asked: for those the warning stays.
    """
    import ray

    if is_uri(storage_path):
        return
    client = ray.util.client.ray.is_connected()
    here = None if client else ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: _node_label(n) for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here}
    if plan.autoscaler:
        warnings.warn(
            f"The search runs on an autoscaling cluster but stores results in the local folder {storage_path}: the "
            "nodes up now see it, those added later must mount it at the same path (EFS, NFS), or their trials fail "
            "at their first checkpoint. Use --storage_path s3://BUCKET/PATH, gs://... or a shared mount.",
            stacklevel=2,
        )
    if not nodes:
        return
    blind = nodes_without(storage_path, nodes, timeout_s)
    if blind:
        raise ConfigError(
            f"Ray node(s) {', '.join(sorted(blind))} cannot see the results folder {storage_path} that this driver "
            f"{'(through Ray Client, on another machine) ' if client else ''}writes: Ray would fail every trial "
            "placed there at its first checkpoint. Use --storage_path s3://BUCKET/PATH or gs://... (every node needs "
            "the bucket's credentials), or a filesystem mounted at the same path on every node (EFS, Filestore, NFS)."
        )


def _node_label(node: dict[str, Any]) -> str:
    """A node's address, and its name where it has one of its own (`ray start --node-name`)."""
    address, name = node["NodeManagerAddress"], node.get("NodeName") or ""
    return address if name in ("", address) else f"{name} ({address})"


def nodes_without(folder: str, nodes: dict[str, str], timeout_s: float) -> list[str]:
    """The labels of the `nodes` (id -> label) on which a marker file written into `folder` here is not seen
    (a node that does not answer within `timeout_s` counts as seeing it: busy is not blind)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(folder).mkdir(parents=True, exist_ok=True)
    marker = Path(folder) / f".lorasent-shared-{uuid.uuid4().hex}"
    marker.touch()
    try:
        sees = ray.remote(num_cpus=0)(os.path.isfile)
        asked = {
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(str(marker)): a
            for node_id, a in nodes.items()
        }
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        return [asked[ref] for ref in answered if not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
