"""How many CPUs this process may use: the cores it may run on, capped by its cgroup's CPU quota.

A container limited to 4 CPUs on a 64-core host (a KubeRay pod's `limits.cpu`, `docker run --cpus 4`) still sees
64 cores through `sched_getaffinity`: the kernel enforces the limit by throttling, not by hiding cores. Sized by the
cores alone, tokenisation would fork 64 encoder processes there, each holding its own tokenizer and chunk in the
pod's memory limit, a local Ray would offer 64 CPUs to trials that get 4, and torch would run 64 threads on them.
Ray reads the same quota for its own count, so the two agree.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on (all of them where there is no affinity call: macOS), at most its quota.

    A fractional quota rounds up: 1.5 CPUs keep two processes busy for three quarters of the time each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cap_torch_threads(threads: int | None = None) -> None:
    """Have torch use `threads` CPU threads, else its default of one per core but no more than `usable_cpus`: more
    threads than a quota lets run at once are throttled in turn, each waiting on the others at every operator."""
    import torch

    torch.set_num_threads(threads or min(torch.get_num_threads(), usable_cpus()))


@contextlib.contextmanager
def capped_torch_threads(threads: int | None = None) -> Iterator[None]:
    """`cap_torch_threads` for the block only: a library call (a `train()` in a notebook) leaves the process's count
    as it found it, so a later call's default is not a former call's `torch_threads`."""
    import torch

    before = torch.get_num_threads()
    cap_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs a second the cgroups of this process allow (None: no quota, or no cgroup file system: not Linux).

    A quota anywhere on the path up to the root applies, so the smallest one counts. Inside a container the path is
    often its own root, and a host path the container cannot see falls back to the root it can.
    """
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in memberships:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2: one hierarchy, quota and period in cpu.max ("max 100000": none)
            quotas += [_v2_quota(folder / "cpu.max") for folder in _folders(cgroup_root, path)]
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own mount ("cpu" or "cpu,cpuacct")
            for mount in (cgroup_root / "cpu", cgroup_root / controllers):
                quotas += [_v1_quota(folder) for folder in _folders(mount, path)]
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _folders(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` under `mount` and each of its ancestors up to `mount` (only `mount` if the path
    is not there)."""
    folder = mount / path.strip("/")
    if not folder.is_dir():
        return [mount]
    return [folder, *(parent for parent in folder.parents if parent.is_relative_to(mount))]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else quota / period
