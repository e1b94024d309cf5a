"""lorasent.cpus: the CPUs a process may use are its cores, capped by its cgroup's CPU quota (a container's limit),
read in a real cgroup where this machine lets the tests make one, and from cgroup files laid out as the kernel does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from lorasent.cpus import cgroup_cpu_quota, usable_cpus

CORES = len(os.sched_getaffinity(0))
V1_CPU = Path("/sys/fs/cgroup/cpu")
IN_V1_CPU = any(line.split(":")[1] in ("cpu", "cpu,cpuacct") for line in Path("/proc/self/cgroup").read_text().split())


@pytest.fixture
def limited_cgroup():
    """A real cgroup v1 whose parent allows half a CPU a second and whose child sets no quota of its own."""
    if not (IN_V1_CPU and os.access(V1_CPU, os.W_OK)):
        pytest.skip("needs a writable cgroup v1 cpu controller (root in a container that mounts it read-write)")
    parent = V1_CPU / f"lorasent-test-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    child = parent / "inner"
    try:
        (parent / "cpu.cfs_quota_us").write_text(str(int((parent / "cpu.cfs_period_us").read_text()) // 2))
        child.mkdir()
        yield child
    finally:
        for folder in (child, parent):  # empty once the process in it has ended
            if folder.exists():
                folder.rmdir()


def test_a_process_in_a_cgroup_with_a_cpu_quota_uses_only_what_the_quota_allows(limited_cgroup: Path) -> None:
    """The quota set on an ancestor applies; the tokeniser's workers, a local Ray's CPUs and torch's threads (of a
    single run, predict and evaluate) follow it."""
    code = f"""
        import json, os
        (open({str(limited_cgroup / "cgroup.procs")!r}, "w")).write(str(os.getpid()))
        import torch
        from lorasent.cpus import cap_torch_threads, cgroup_cpu_quota, usable_cpus
        from tune.cluster import local_cpus
        from tune.config import TuneArguments
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # torch's default: one per core
        cap_torch_threads()
        print(json.dumps({{"affinity": len(os.sched_getaffinity(0)), "quota": cgroup_cpu_quota(),
                          "usable": usable_cpus(), "ray": local_cpus(TuneArguments()),
                          "torch": torch.get_num_threads()}}))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {"affinity": CORES, "quota": 0.5, "usable": 1, "ray": 1, "torch": 1}


@pytest.mark.parametrize(
    ("cpu_max", "quota", "usable"),
    [("50000 100000\n", 0.5, 1), ("150000 100000\n", 1.5, min(CORES, 2)), ("max 100000\n", None, CORES)],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, quota: float | None, usable: int) -> None:
    """cgroup v2 (one hierarchy, "quota period" or "max period" in cpu.max), as a container sees its own root."""
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cgroup_cpu_quota(tmp_path) == quota
    assert usable_cpus(tmp_path) == usable


@pytest.mark.skipif(not IN_V1_CPU, reason="this process is in no cgroup v1 cpu hierarchy")
def test_cgroup_v1_quota_and_period(tmp_path: Path) -> None:
    """cgroup v1 (the cpu controller's own mount; -1: no quota), as a container sees its own root."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("25000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.25
    assert usable_cpus(tmp_path) == 1
