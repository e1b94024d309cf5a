"""Hugging Face hub access that fails within seconds, and prefers what is already in the local cache.

Left alone, `from_pretrained` and `load_dataset` retry an unreachable hub for ~45 s before failing with a
message that says nothing about working offline. lorasent asks the local cache first (no network), then
sends one short HEAD request to the hub, and only then makes the real online call.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import constants, try_to_load_from_cache

from lorasent.config import OFFLINE_DATASET, OFFLINE_MODEL
from lorasent.errors import HubUnreachableError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # lorasent loads safetensors only
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def _offline_help(what: str, reason: str) -> str:
    return (
        f"Cannot get {what}: {reason}. Work offline instead: use the embedded defaults "
        f"`--dataset {OFFLINE_DATASET}` and `--model_name_or_path {OFFLINE_MODEL}`, or a local data file "
        "(.csv / .jsonl / .json / .parquet) and a local model folder; or fill the Hugging Face cache on a connected "
        "machine and set HF_HUB_OFFLINE=1. Behind a mirror or proxy, set HF_ENDPOINT or HTTPS_PROXY."
    )


def ensure_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Raise HubUnreachableError within about `timeout` seconds unless the hub answers one HEAD request.

    Any HTTP answer (even 4xx/5xx) proves the endpoint is reachable; the real call reports its own errors.
    The request runs in a daemon thread because urllib's timeout does not cover a hanging DNS lookup.
    """
    if constants.is_offline_mode():
        raise HubUnreachableError(_offline_help(what, "HF_HUB_OFFLINE=1 is set and it is not in the local cache"))
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
    raise HubUnreachableError(_offline_help(what, f"the Hugging Face hub at {endpoint} is unreachable ({reason})"))


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


def cached_model_folder(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model whose config, weights and tokenizer are in the HF cache, else None."""
    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    complete = all(any((folder / name).exists() for name in names) for names in (WEIGHT_FILES, TOKENIZER_FILES))
    return folder if complete else None


def load_hub_dataset(name: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset(name, **kwargs)`: from the local cache if there, else online after a fast check."""
    import datasets

    with contextlib.suppress(ConnectionError, FileNotFoundError), offline_mode():
        return datasets.load_dataset(name, **kwargs)
    ensure_hub_reachable(f"the dataset '{name}' from the Hugging Face hub")
    return datasets.load_dataset(name, **kwargs)
