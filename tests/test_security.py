"""Security defaults, each checked against the real thing: the local Ray dashboard listens on loopback and asks
for Ray's token, model code from a folder never runs unless asked, weights load from safetensors only, and no
pickle is unpickled on the way (torch.load always with weights_only=True). Downloaded assets are hash-verified:
see tests/test_assets.py (test_vader_sdist_with_wrong_hash_is_refused, test_tampered_offline_model_is_refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments, replace
from lorasent.errors import ConfigError
from lorasent.export import merge_and_export
from lorasent.model import build_model, save_model_dir
from lorasent.tokenize import load_tokenizer
from lorasent.train import train

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("lorasent", "tune", "analysis", "cluster", "bench")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}  # resume only
LABELS = ["negative", "positive"]


class _Payload:
    """A pickle that, when unpickled, creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --------------------------------------------------------------------------------------------- Ray dashboard


@pytest.mark.ray
def test_local_dashboard_listens_on_loopback_and_asks_for_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from tune.cluster import preflight, start_ray
    from tune.config import TuneArguments

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it in this process; undone afterwards
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = TuneArguments(num_cpus=1, num_gpus=0)  # the defaults: dashboard on, on 127.0.0.1
    session = start_ray(args, preflight(args))
    try:
        host, port = session.dashboard_url.rsplit(":", 1)
        assert host == "127.0.0.1"
        listening = [
            c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == int(port)
        ]
        assert listening and set(listening) <= {"127.0.0.1"}, listening
        assert os.environ["RAY_AUTH_MODE"] == "token"  # Ray 2.60's default for a new local cluster, kept on
        base = f"http://{session.dashboard_url}"
        with urllib.request.urlopen(f"{base}/api/authentication_mode", timeout=30) as response:
            assert json.load(response)["authentication_mode"] == "token"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/jobs/", timeout=30)
        assert refused.value.code == 401
    finally:
        session.shutdown()


# --------------------------------------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_in_every_entry_point() -> None:
    from lorasent.train import parse_cli
    from tune.config import parse_args

    assert ModelArguments().trust_remote_code is False
    assert parse_cli(["--output_dir", "x"])[1].trust_remote_code is False
    assert parse_args([]).model.trust_remote_code is False


def _model_with_custom_code(tiny_model_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny model, but its config asks for code shipped in the folder; importing that code leaves `marker`."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "lorasent-test-custom"
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForSequenceClassification": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import DistilBertConfig, DistilBertForSequenceClassification\n"
        "class Config(DistilBertConfig):\n    model_type = 'lorasent-test-custom'\n"
        "class Model(DistilBertForSequenceClassification):\n    config_class = Config\n"
    )
    return folder


def test_model_code_in_a_folder_never_runs_by_default(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "custom-code-ran"
    folder = _model_with_custom_code(tiny_model_dir, tmp_path / "custom", marker)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        build_model(ModelArguments(model_name_or_path=str(folder)), LABELS)
    assert not marker.exists()
    # The same folder with the switch on does run its code: the check above is not vacuous.
    with contextlib.suppress(Exception):  # what the fake code does after leaving its mark does not matter
        build_model(ModelArguments(model_name_or_path=str(folder), trust_remote_code=True), LABELS)
    assert marker.exists()


# --------------------------------------------------------------------------------------------- weights


def test_pickled_weights_are_refused_unopened(tiny_model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors only"):
        build_model(ModelArguments(model_name_or_path=str(folder)), LABELS)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # what a careless loader would have done
    assert marker.exists()


def test_model_folders_hold_no_pickles(tmp_path: Path) -> None:
    model_args = ModelArguments(model_name_or_path=TINY_MODEL)
    folder = save_model_dir(
        build_model(model_args, LABELS), load_tokenizer(model_args), tmp_path / "model", data_args=DataArguments(),
        model_args=model_args, train_args=TrainArguments(),
    )  # fmt: skip
    merged = merge_and_export(folder, tmp_path / "merged")
    for written in (folder, merged):
        files = {p.name for p in written.iterdir()}
        assert not {name for name in files if Path(name).suffix in PICKLE_SUFFIXES}, files
        assert any(name.endswith(".safetensors") for name in files)


def test_tampered_training_state_is_never_unpickled_on_resume(tmp_path: Path) -> None:
    """A checkpoint's optimizer/scheduler/RNG state is torch-pickled by Trainer; resuming loads it weights-only."""
    data = DataArguments(max_train_samples=16, max_eval_samples=8, max_test_samples=8, max_length=16)
    model_args = ModelArguments(model_name_or_path=TINY_MODEL)
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=8)
    first = train(data, model_args, args, work_dir=str(tmp_path / "work"), save_final=False)
    checkpoint = first.best_checkpoint
    marker = tmp_path / "unpickled"
    tampered = [p for p in checkpoint.iterdir() if p.suffix in {".pt", ".pth"}]
    assert {p.name for p in tampered} & TRAINING_STATE
    for path in tampered:
        torch.save(_Payload(marker), path)
    resumed = replace(args, num_train_epochs=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(data, model_args, resumed, resume_from_checkpoint=str(checkpoint), work_dir=str(tmp_path / "work"))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- the source


def _python_sources() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call `name(...)` in `text` (balanced parentheses)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                calls.append(text[start:i])
                break
    return calls


def test_source_never_unpickles_or_trusts_remote_code() -> None:
    sources = _python_sources()
    assert len(sources) > 10
    problems = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        problems += [f"{path}: torch.load({a})" for a in _calls(text, "torch.load") if "weights_only=True" not in a]
        for unsafe in ("pickle.load", "pickle.loads", "cloudpickle.load", "joblib.load", "dill.load", "yaml.load"):
            problems += [f"{path}: {unsafe}(...)" for _ in _calls(text, unsafe)]
        problems += [f"{path}: trust_remote_code=True" for _ in re.finditer(r"trust_remote_code\s*=\s*True", text)]
        problems += [f"{path}: use_safetensors=False" for _ in re.finditer(r"use_safetensors\s*=\s*False", text)]
    assert not problems, problems
