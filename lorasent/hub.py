"""Hugging Face hub access that fails within seconds, and prefers what is already in the local cache.

Left alone, `from_pretrained` and `load_dataset` retry an unreachable hub for ~45 s before failing with a
message that says nothing about working offline. lorasent asks the local cache first (no network), then
sends one short HEAD request to the hub, and only then makes the real online call. A dataset is taken from
the cache in either form: the Arrow files `load_dataset` prepared, or the hub repository's own files (as
`hf download --repo-type dataset` or an earlier load left them), which `datasets` offline does not read.
"""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, constants, snapshot_download, try_to_load_from_cache

from lorasent.config import OFFLINE_DATASET, OFFLINE_MODEL
from lorasent.errors import HubUnreachableError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # lorasent loads safetensors only
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
NOT_CACHED = "it is not in the local cache"
SHARD = re.compile(r"(.*)-(\d+)-of-(\d+)(\.\w+)$")  # train-00000-of-00004.parquet: one of 4 shards


def _offline_help(what: str, reason: str) -> str:
    return (
        f"Cannot get {what}: {reason}. Work offline instead: use the embedded defaults "
        f"`--dataset {OFFLINE_DATASET}` and `--model_name_or_path {OFFLINE_MODEL}`, or a local data file "
        "(.csv / .jsonl / .json / .parquet) and a local model folder; or fill the Hugging Face cache on a connected "
        "machine and set HF_HUB_OFFLINE=1. Behind a mirror or proxy, set HF_ENDPOINT or HTTPS_PROXY."
    )


def ensure_hub_reachable(what: str, timeout: float = 3.0, not_cached: str = NOT_CACHED) -> None:
    """Raise HubUnreachableError within about `timeout` seconds unless the hub answers one HEAD request.

    Any HTTP answer (even 4xx/5xx) proves the endpoint is reachable; the real call reports its own errors.
    The request runs in a daemon thread because urllib's timeout does not cover a hanging DNS lookup.
    `not_cached` says what the local cache lacks, for the error.
    """
    if constants.is_offline_mode():
        raise HubUnreachableError(_offline_help(what, f"HF_HUB_OFFLINE=1 is set and {not_cached}"))
    endpoint = constants.ENDPOINT
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, name="lorasent-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome and outcome[0] is None:
        return
    error = outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")
    reason = getattr(error, "reason", error)
    unreachable = f"the Hugging Face hub at {endpoint} is unreachable ({reason})"
    raise HubUnreachableError(_offline_help(what, f"{unreachable} and {not_cached}"))


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Make huggingface_hub and datasets behave as under HF_HUB_OFFLINE=1 for the duration of the block.

    Both libraries read the variable once at import, so the cache-only attempt flips their module flags.
    """
    import datasets.config

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _lacking(repo_id: str, folder: Path, missing: list[str], repo_type: str = "") -> str:
    """Words for an error: the cached snapshot `folder` lacks `missing`, and the command that fetches them."""
    fetch = f"hf download {repo_id}" + (f" --repo-type {repo_type}" if repo_type else "")
    return f"the local cache holds it ({folder}) without {', '.join(missing)}; `{fetch}` on a connected machine adds it"


def cached_model_folder(repo_id: str) -> tuple[Path | None, str]:
    """(the local snapshot folder, "") of a hub model whose config, weights and tokenizer are in the HF cache; else
    (None, what the cache lacks, for an error)."""
    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None, NOT_CACHED
    folder = Path(config).parent
    wanted = {
        "model.safetensors (lorasent loads safetensors weights only)": WEIGHT_FILES,
        "its tokenizer files (tokenizer.json or vocab.txt)": TOKENIZER_FILES,
    }
    missing = [what for what, names in wanted.items() if not any((folder / name).exists() for name in names)]
    return (None, _lacking(repo_id, folder, missing)) if missing else (folder, "")


def cached_dataset_folder(repo_id: str) -> tuple[Path | None, str]:
    """(the local snapshot folder, "") of a hub dataset whose README and every data file it names are in the HF cache;
    else (None, what the cache lacks, for an error). Each of the README's `configs` file patterns must match, and
    every shard of a numbered set (`-00001-of-00004`) must be there: a download cut short is not a dataset."""
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: no snapshot at all
        return None, NOT_CACHED
    if not (folder / "README.md").is_file():
        return None, _lacking(repo_id, folder, ["README.md"], "dataset")
    patterns = [
        entry["path"]
        for config in DatasetCard.load(folder / "README.md").data.to_dict().get("configs") or []
        for entry in config.get("data_files") or []
        if isinstance(entry, dict)
    ]
    missing = [pattern for pattern in patterns if not any(file.exists() for file in folder.glob(pattern))]
    for file in folder.rglob("*"):
        if (shard := SHARD.fullmatch(str(file.relative_to(folder)))) and file.exists():
            prefix, _, total, suffix = shard.groups()
            siblings = (f"{prefix}-{i:0{len(total)}d}-of-{total}{suffix}" for i in range(int(total)))
            missing += [name for name in siblings if not (folder / name).exists() and name not in missing]
    return (None, _lacking(repo_id, folder, missing, "dataset")) if missing else (folder, "")


def load_hub_dataset(name: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(name, **kwargs)`: from the local cache if there, else online after a fast check."""
    import datasets

    with contextlib.suppress(ConnectionError, FileNotFoundError), offline_mode():
        return datasets.load_dataset(name, **kwargs)  # the Arrow files an earlier load prepared
    folder, not_cached = cached_dataset_folder(name)
    if folder is not None:
        with offline_mode():
            return datasets.load_dataset(str(folder), **kwargs)
    ensure_hub_reachable(f"the dataset '{name}' from the Hugging Face hub", not_cached=not_cached)
    return datasets.load_dataset(name, **kwargs)
