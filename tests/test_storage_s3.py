"""A search whose --storage_path is an S3 bucket, on a real local S3 server: moto's, from the `dev` extra (moto[s3],
flask, flask-cors; .ci/setup installs them). Where the tests' environment lacks `moto_server`, these skip."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest
import ray

from analysis.results import load_experiment
from tune.config import parse_args
from tune.run import _summary, experiment_location, main, run_search

BUCKET = "lorasent"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A local S3 server holding the bucket `lorasent`; yields the URI query that points pyarrow (and Ray) at it."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))  # this environment's, not PATH's
    if server is None:
        pytest.skip('no moto_server in this environment (pip install -e ".[dev]") to serve S3 locally')
    port = _free_port()
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with pytest.MonkeyPatch.context() as env:  # the driver's, and the trials' (a local Ray's workers inherit it)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.setenv(name, "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        try:
            while True:  # until the server answers (it exits where it cannot start)
                assert process.poll() is None, "moto_server exited"
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            fs = pyarrow.fs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
            )
            fs.create_dir(BUCKET)
            yield f"endpoint_override=127.0.0.1:{port}&scheme=http"
        finally:
            process.terminate()
            process.wait()


def test_a_missing_bucket_is_refused_before_anything_starts(s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray never creates a bucket: it failed with pyarrow's traceback after the checks, the tokenisation and its own
    start-up."""
    assert main(["--smoke-test", "--storage_path", f"s3://no-such-bucket/runs?{s3}", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The bucket no-such-bucket of --storage_path s3://no-such-bucket/runs?") and (
        "Create it first (`aws s3 mb s3://no-such-bucket`)" in err and err.count("\n") == 1
    )
    assert not ray.is_initialized()


def test_resuming_what_the_bucket_lacks_names_the_file_by_its_uri(s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The file's name went after the URI's query (`...&scheme=http/lorasent_search.json`)."""
    assert main(["--resume", f"s3://{BUCKET}/runs/none?{s3}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot read s3://{BUCKET}/runs/none/lorasent_search.json?{s3}: ")
    assert err.rstrip().endswith("Check the experiment URI, your network and the storage credentials.")


@pytest.mark.ray
def test_a_search_in_a_bucket_names_its_results_by_uri(s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray gives a bucket's results as paths without scheme or endpoint (`lorasent/runs/...`): the summary printed
    such an adapter path, and a predict command on it that read a local folder of that name."""
    storage = f"s3://{BUCKET}/runs?{s3}"
    args = parse_args(["--smoke-test", "--storage_path", storage, "--name", "bucket", "--verbose", "0"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_search(args, *experiment_location(args))
    finally:
        ray.shutdown()
    capsys.readouterr()
    assert _summary(outcome, args, 0.0) == 0
    out = capsys.readouterr().out
    adapter = next(line.split()[1] for line in out.splitlines() if line.startswith("  adapter:"))
    assert re.fullmatch(rf"s3://{BUCKET}/runs/bucket/train_trial_\S+/checkpoint_\d+\?{re.escape(s3)}", adapter)
    fs, path = pyarrow.fs.FileSystem.from_uri(adapter)
    assert fs.get_file_info(f"{path}/adapter_model.safetensors").type == pyarrow.fs.FileType.File
    experiment = f"s3://{BUCKET}/runs/bucket?{s3}"
    assert f"python -m analysis retrain '{experiment}'" in out and "lorasent.predict" not in out
    assert len(load_experiment(experiment).trials) == len(outcome.results)
