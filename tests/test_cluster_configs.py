"""The cluster recipes are checked offline: the launcher YAML by Ray's own validation, the KubeRay manifests for
structure and safety, and all of them against the container recipe they run (image tag, paths, cache, command).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.docker import docker_start_cmds
from ray.autoscaler._private.util import prepare_config, validate_config

from tune.config import PRESET_DIR, parse_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _dockerfile() -> dict[str, Any]:
    """The facts of cluster/Dockerfile the manifests must agree with."""
    text = (CLUSTER / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    instructions = [line.strip() for line in logical.splitlines() if line.strip() and not line.startswith("#")]
    build_tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text)
    assert build_tag, "cluster/Dockerfile must document its `docker build ... -t IMAGE .` command"
    args = {k: v.strip('"') for k, v in re.findall(r"^ARG (\w+)=(\S*)", logical, re.M)}
    env = dict(re.findall(r"(\w+)=(\S+)", next(i for i in instructions if i.startswith("ENV "))[4:]))
    return {
        "image": build_tag.group(1),
        "args": args,
        "env": env,
        "workdir": [i.split()[1] for i in instructions if i.startswith("WORKDIR ")][-1],
        "user": [i.split()[1] for i in instructions if i.startswith("USER ")][-1],
        "runs": [i for i in instructions if i.startswith("RUN ")],
    }


def _constraint(package: str) -> str:
    pins = dict(
        line.split("==")
        for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    return pins[package]


@pytest.fixture(scope="module")
def docker() -> dict[str, Any]:
    return _dockerfile()


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _k8s(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{name}: incomplete document {doc}"
        assert doc["metadata"].get("name"), f"{name}: {doc['kind']} without metadata.name"
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def raycluster() -> dict[str, dict[str, Any]]:
    return _k8s("raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, dict[str, Any]]:
    return _k8s("rayjob.yaml")


@pytest.fixture(scope="module")
def service_account() -> dict[str, Any]:
    return _k8s("serviceaccount.yaml")["ServiceAccount"]


# -- the container recipe ----------------------------------------------------------------------------------------


def test_dockerfile_pins_what_ci_tests_and_runs_unprivileged(docker):
    base = docker["args"]["RAY_IMAGE"]
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu"), "a CUDA (GPU) Ray base image"
    assert base.split(":")[1].startswith(_constraint("ray") + "-"), "base image's Ray = the pinned ray"
    assert any("pip install -c .ci/constraints.txt" in run for run in docker["runs"]), "pinned dependencies"
    assert any("pip install --no-deps -e ." in run for run in docker["runs"]), "the project itself"
    assert docker["user"] not in ("root", "0"), "the image must not run as root"
    assert docker["args"]["PREFETCH_MODELS"] == "", "nothing fetched from the hub unless asked"
    version = importlib.metadata.version("lorasent")  # pyproject.toml's (tomllib: Python 3.11 on)
    assert docker["image"].rsplit(":", 1)[1] == version, "image tag = project version"
    assert docker["env"]["LORASENT_CACHE"].startswith("/cache/"), "the per-node cache volume"
    assert docker["env"]["HF_HOME"] == "${HF_HOME}" and docker["args"]["HF_HOME"].startswith("/cache/")


# -- the cluster launcher ----------------------------------------------------------------------------------------


def test_launcher_config_passes_rays_own_validation(aws):
    validate_config(prepare_config(copy.deepcopy(aws)))  # what `ray up` runs before it calls the cloud


def test_launcher_validation_is_not_a_rubber_stamp(aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu-a10g"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "a CPU head without trials"
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] < t["max_workers"] <= aws["max_workers"], f"{name} must autoscale"
    assert aws["provider"]["type"] == "aws" and aws["provider"]["cache_stopped_nodes"] is False
    assert 0 < aws["idle_timeout_minutes"] <= 30 and aws["max_workers"] <= 16, "cost control"


def _statements(policy_file: str) -> list[dict[str, Any]]:
    policy = json.loads((CLUSTER / "aws-iam" / policy_file).read_text())
    return [
        {**st, "Action": [st["Action"]] if isinstance(st["Action"], str) else st["Action"]}
        for st in policy["Statement"]
    ]


def _allows(statements: list[dict[str, Any]], action: str, resource: str) -> bool:
    return any(
        st["Effect"] == "Allow" and action in st["Action"] and fnmatch.fnmatchcase(resource, st["Resource"])
        for st in statements
    )


def test_launcher_head_may_launch_its_workers_and_they_may_write_the_bucket(aws):
    """Launching an instance with a profile takes iam:PassRole on its role: the role Ray makes for a head that names
    none (ray-autoscaler-v1) has no such right, so the head names its own, whose policy may pass the workers' role;
    the workers' policy reads and writes the bucket the documented search stores results in."""
    types = aws["available_node_types"]
    profile = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    head = profile.pop(aws["head_node_type"])
    assert head == "lorasent-head" and set(profile.values()) == {"lorasent-worker"}, profile
    head_policy, worker_policy = _statements("head-policy.json"), _statements("worker-policy.json")
    assert _allows(head_policy, "iam:PassRole", "arn:aws:iam::123456789012:role/lorasent-worker")
    assert not _allows(head_policy, "iam:PassRole", "arn:aws:iam::123456789012:role/admin"), "only the worker's"
    bucket = re.search(r"--storage_path s3://([^/\s']+)", (CLUSTER / "aws.yaml").read_text()).group(1)
    for statements in (head_policy, worker_policy):  # the driver on the head writes the experiment's own files
        assert _allows(statements, "s3:PutObject", f"arn:aws:s3:::{bucket}/lorasent/seed/trial/checkpoint")
        assert _allows(statements, "s3:ListBucket", f"arn:aws:s3:::{bucket}")
    assert not any(_allows(worker_policy, a, "*") for a in ("ec2:RunInstances", "iam:PassRole")), "workers: S3 only"
    readme = (CLUSTER / "README.md").read_text()
    assert "cluster/aws-iam/$node-policy.json" in readme and "cluster/aws-iam/*.json" in readme


def test_launcher_runs_the_image_with_auth_cache_and_shared_storage(aws, docker):
    text = (CLUSTER / "aws.yaml").read_text()
    assert aws["docker"]["image"] == docker["image"]
    run_options = " ".join(aws["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    mount = re.search(r"--volume (\S+):(\S+)", run_options)
    assert mount and mount.group(2) == "/cache" and docker["env"]["LORASENT_CACHE"].startswith("/cache/")
    assert re.search(r"python tune/run\.py --address auto --preset \w+ --storage_path s3://", text)


def test_launcher_mounts_the_token_into_every_container(aws):
    """Ray's updater syncs file_mounts and cluster_synced_files to the node's host; in a Docker setup only
    file_mounts become `docker run -v` mounts, so the token file Ray reads inside the container must be one."""
    env = dict(re.findall(r"--env (\w+)=(\S+)", " ".join(aws["docker"]["run_options"])))
    assert env["RAY_AUTH_MODE"] == "token"
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "/home/ray/.ray/auth_token")  # Ray's default: ~/.ray/auth_token
    assert aws["file_mounts"].get(token_path) == "~/.ray/auth_token", "`ray up` copies `ray get-auth-token`'s file"
    # Ray's own `docker run` for a node: the head's from `ray up`, a worker's from the head's autoscaler, which
    # mounts the same remote paths (commands.py, _set_up_config_for_head_node).
    docker_run = docker_start_cmds(
        user=aws["auth"]["ssh_user"],
        image=aws["docker"]["image"],
        mount_dict=aws["file_mounts"],
        container_name=aws["docker"]["container_name"],
        user_options=aws["docker"]["run_options"],
        cluster_name=aws["cluster_name"],
        home_directory="/home/ray",  # the image's HOME (user `ray`)
        docker_cmd="docker",
    )
    assert token_path in re.findall(r"-v \S+:(\S+)", docker_run), docker_run
    assert not aws["cluster_synced_files"], "these never reach a Docker node's container"


def test_launcher_never_opens_the_dashboard(aws):
    text = (CLUSTER / "aws.yaml").read_text()
    assert "0.0.0.0" not in text
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "IpPermissions" not in aws["provider"].get("security_group", {}), "no extra inbound rules"


# -- KubeRay -----------------------------------------------------------------------------------------------------


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_raycluster_structure(raycluster, service_account, docker):
    # The account lives in a file of its own: `kubectl delete -f rayjob.yaml` must not delete the one a running
    # RayCluster's new pods need.
    assert set(raycluster) == {"RayCluster"}
    cluster = raycluster["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ == _constraint("ray")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "dashboard reachable through port-forward only"
    [head_container] = _containers(head)
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"], "a CPU head"

    [gpu_group] = spec["workerGroupSpecs"]
    assert 0 <= gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    assert gpu_group["maxReplicas"] > gpu_group["minReplicas"], "the GPU group must autoscale"
    [worker] = _containers(gpu_group)
    gpus = worker["resources"]
    assert int(gpus["requests"]["nvidia.com/gpu"]) == int(gpus["limits"]["nvidia.com/gpu"]) >= 1

    for group in (head, gpu_group):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "KubeRay wants strings"
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == service_account["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        [container] = _containers(group)
        assert container["image"] == docker["image"]
        assert container["workingDir"] == docker["workdir"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/cache" in mounts and mounts["/cache"] in volumes, "HF_HOME and LORASENT_CACHE live on a volume"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "object store in shared memory"


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [str(node)]


def test_kuberay_never_exposes_the_dashboard():
    for name in ("raycluster.yaml", "rayjob.yaml", "serviceaccount.yaml"):
        docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
        assert all(d["kind"] not in ("Service", "Ingress") for d in docs), name
        values = [s for d in docs for s in _strings(d)]
        assert not {"LoadBalancer", "NodePort"} & set(values), f"{name}: a Service reachable from outside"
        assert not any("0.0.0.0" in v for v in values), f"{name}: something bound or opened to the world"


def test_rayjob_runs_the_search_on_the_same_cluster_spec(rayjob, raycluster, docker):
    assert set(rayjob) == {"RayJob"}
    job = rayjob["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["rayClusterSpec"] == raycluster["RayCluster"]["spec"], "rayjob.yaml drifted from raycluster.yaml"
    # ttlSecondsAfterFinished is how long the whole cluster, GPU pods included, outlives the search (it only acts
    # with shutdownAfterJobFinishes): results are in the bucket already, so a short grace period is enough.
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 120

    python, script, *args = shlex.split(spec["entrypoint"])
    assert python == "python" and script == f"{docker['workdir']}/tune/run.py"
    assert (REPO / "tune" / "run.py").is_file()
    search = parse_args(args)  # the entrypoint's flags are tune/run.py's own, with valid values
    assert search.tune.address == "auto"
    assert (PRESET_DIR / f"{search.tune.preset}.yaml").is_file()
    assert search.tune.storage_path.startswith("s3://"), "results must outlive the cluster"


def _documented_searches() -> list[tuple[str, list[str]]]:
    """Every `tune/run.py` command for KubeRay: rayjob.yaml's entrypoint, and those raycluster.yaml's comments and the
    cluster README give (continuation lines joined): (where, its flags)."""
    commands = [("rayjob.yaml", _k8s("rayjob.yaml")["RayJob"]["spec"]["entrypoint"])]
    for path in (CLUSTER / "README.md", CLUSTER / "kuberay" / "raycluster.yaml"):
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())
        commands += [(path.name, line) for line in text.splitlines() if "/home/ray/lorasent/tune/run.py" in line]
    return [(where, shlex.split(line.split("tune/run.py", 1)[1])) for where, line in commands]


def test_the_documented_kuberay_searches_plan_before_any_gpu_pod_is_up():
    """On KubeRay the driver sees only the CPU head (no GPU pod yet) and an autoscaler that publishes no worker
    group: an automatic GPU share is refused there, so each documented search must say what a trial takes."""
    from tune.cluster import Autoscaler, plan_resources

    searches = _documented_searches()
    assert len(searches) == 3, searches  # rayjob.yaml's entrypoint, raycluster.yaml's and the README's submit
    for where, argv in searches:
        plan = plan_resources(parse_args(argv).tune, [{"CPU": 0.0}], Autoscaler("autoscaler node types headgroup"))
        assert plan.gpus_per_trial > 0, where
