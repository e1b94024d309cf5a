"""Bad input refused by the command lines: exit code 2, one `error:` line that names the fix, no traceback, and
nothing half-written left behind.

Three commands run as real subprocesses, started together (each spends most of its time importing torch and
Ray); the rest call the same `main` in this process. Cases that other test files already cover (bad data files,
bad flags and YAML, impossible search spaces, bad prediction strings, ...) are listed in docs/RELIABILITY.md,
not repeated here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.model import build_model, save_model_dir
from lorasent.tokenize import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["tune/run.py", "--preset", "smoke", "--include_dashboard", "false", "--num_cpus", "2", "--name", "exp"]
CLOSED_HUB = "http://127.0.0.1:9"  # the hub at a closed local port, whatever this machine's connectivity
TINY_TRAIN = ["-m", "lorasent.train", "--model_name_or_path", TINY_MODEL, "--max_train_samples", "32"]


def refused(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert a command refused its input cleanly and return its error line.

    Exit code 2, no Python traceback, and exactly one `error:` line (argparse prefixes it with the program
    name) that contains every fragment, e.g. the bad value and the option that fixes it.
    """
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) tiny LoRA model folder: enough to feed the prediction CLI bad input."""
    model_args = ModelArguments(model_name_or_path=TINY_MODEL)
    folder = tmp_path_factory.mktemp("model") / "model"
    model = build_model(model_args, ["negative", "positive"])
    save_model_dir(
        model, load_tokenizer(model_args), folder, data_args=DataArguments(), model_args=model_args,
        train_args=TrainArguments(),
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Any]:
    """The subprocess cases, started together and then collected: name -> CompletedProcess, plus their folder."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "fast.yaml").write_text(f"model_name_or_path: {TINY_MODEL}\nlearning_rate: fast\n")
    garbage = tmp / "garbage.txt"
    garbage.write_bytes(bytes(range(256)) * 64 + b"\n\x00\xff\xfe binary \x89PNG\r\n\x1a\n")
    cases = {
        "unreachable_cluster": [  # without SMOKE's --num_cpus, which a search on a cluster refuses
            "tune/run.py", "--preset", "smoke", "--name", "exp", "--storage_path", str(tmp / "storage"),
            "--address", "127.0.0.1:1",
        ],
        "refused_beside_ray": [*SMOKE, "--storage_path", str(tmp / "storage-2"), "--num_gpus", "99"],
        "unreachable_hub": [
            "-X", "importtime", *SMOKE, "--storage_path", str(tmp / "storage-3"),
            "--model_name_or_path", "distilbert-base-uncased",
        ],
        "train_wrong_type": [*TINY_TRAIN, "--output_dir", str(tmp / "model"), "--config", str(tmp / "fast.yaml")],
        "predict_binary_garbage": [
            "-m", "lorasent.predict", str(model_dir), "--input", str(garbage), "--output", str(tmp / "out.csv"),
        ],
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": CLOSED_HUB}
    running = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in cases.items()
    }
    done: dict[str, Any] = {"tmp": tmp}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def _main_refused(
    main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str
) -> str:
    """`refused` for a command run in this process through its `main` (same code path, without the import cost)."""
    code = main(argv)
    captured = capsys.readouterr()
    return refused(subprocess.CompletedProcess(argv, code, captured.out, captured.err), *fragments)


def _search_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], *fragments: str) -> str:
    """A refused `python tune/run.py` (in-process), which must leave at most an empty storage folder."""
    from tune.run import main

    storage = tmp_path / "storage"
    error = _main_refused(main, [*SMOKE[1:], "--storage_path", str(storage), *args], capsys, *fragments)
    assert not storage.exists() or not any(storage.iterdir()), sorted(storage.iterdir())
    return error


def _train_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], *fragments: str) -> str:
    """A refused `python -m lorasent.train` (in-process), which must write neither the model nor checkpoints."""
    from lorasent.train import main

    error = _main_refused(main, [*TINY_TRAIN[2:], "--output_dir", str(tmp_path / "model"), *args], capsys, *fragments)
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())
    return error


# ----------------------------------------------------------------------------------------------- environment


def test_unreachable_cluster_address(runs: dict[str, Any]) -> None:
    refused(runs["unreachable_cluster"], "127.0.0.1:1 is unreachable", "drop --address")
    storage = runs["tmp"] / "storage"
    assert not storage.exists() or not any(storage.iterdir())


def test_a_search_refused_while_its_ray_starts_says_only_why(runs: dict[str, Any]) -> None:
    """A fresh `python tune/run.py` starts its local Ray beside the checks that need torch: that Ray says nothing, not
    even that it started, and is stopped."""
    done = runs["refused_beside_ray"]
    refused(done, "--num_gpus 99, but torch sees")
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr  # Ray's held lines were dropped
    assert not (runs["tmp"] / "storage-2").exists() or not any((runs["tmp"] / "storage-2").iterdir())


def test_an_unreachable_hub_is_refused_before_the_search_imports_torch_or_starts_ray(runs: dict[str, Any]) -> None:
    """A hub model the local cache lacks needs the hub: asked first, in seconds, not after the ~15 s of imports and
    Ray's start that the checks once came after (`-X importtime` lists every module the process imported)."""
    done = runs["unreachable_hub"]
    refused(done, "distilbert-base-uncased", f"the Hugging Face hub at {CLOSED_HUB} is unreachable")
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "ray" in imported and "torch" not in imported


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_requested_but_absent_on_this_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _search_refused(tmp_path, capsys, ["--gpus_per_trial", "1"], "gpus_per_trial=1", "no GPU", "--gpus_per_trial 0")


def test_unreachable_hub_through_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_hub: str
) -> None:
    args = ["--model_name_or_path", "distilbert-base-uncased"]
    fragments = ("distilbert-base-uncased", f"the Hugging Face hub at {closed_hub} is unreachable")
    _search_refused(tmp_path, capsys, args, *fragments, "offline:all-MiniLM-L6-v2")


def test_unwritable_cache_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file, not a folder\n")
    monkeypatch.setenv("LORASENT_CACHE", str(in_the_way))
    out = tmp_path / "out"
    out.mkdir()
    _train_refused(out, capsys, [], str(in_the_way), "LORASENT_CACHE")


# ----------------------------------------------------------------------------------------------- configs


def test_search_with_unknown_target_modules_is_refused_before_any_trial(tmp_path: Path, capsys) -> None:
    from tune.run import main

    code = main([*SMOKE[1:], "--storage_path", str(tmp_path / "storage"), "--target_modules", "q_lin,query"])
    captured = capsys.readouterr()
    assert "Resource plan" not in captured.out  # refused before the plan, not by every trial after retries
    refused(subprocess.CompletedProcess([], code, captured.out, captured.err), "['query']", "q_lin", "v_lin")
    # ... and before the data is read and tokenised (minutes for a large dataset): a file it would refuse comes later.
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("review,label\nfine,positive\nbad,negative\n")
    code = main(
        [
            *SMOKE[1:],
            "--storage_path",
            str(tmp_path / "storage"),
            "--target_modules",
            "query",
            "--dataset",
            str(no_text),
        ]
    )
    captured = capsys.readouterr()
    refused(subprocess.CompletedProcess([], code, captured.out, captured.err), "['query']", "q_lin")


def test_search_space_of_unknown_target_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = json.dumps({"target_modules": {"choice": ["auto", "query,value"]}})
    _search_refused(tmp_path, capsys, ["--search_space", space], "search_space.target_modules: 'query,value'", "q_lin")


def test_search_space_of_lora_ranks_above_the_layers_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Trials of r = 10**20 failed inside torch after their retries, and r = 100,000 trained for nothing."""
    space = json.dumps({"lora_r": {"loguniform": [2, 10**20]}})
    fragments = [f"search_space.lora_r: LoRA rank {10**20} exceeds", "(q_lin, v_lin: 32 x 32 weights)", "at most 32."]
    _search_refused(tmp_path, capsys, ["--search_space", space], *fragments)


def test_search_batch_larger_than_the_train_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = json.dumps({"per_device_train_batch_size": {"choice": [8, 128]}})
    _search_refused(tmp_path, capsys, ["--search_space", space], "128", "64 training examples", "max_train_samples")


def test_a_search_given_the_name_another_is_starting_under_is_refused(tmp_path: Path, capsys) -> None:
    """Ray writes tuner.pkl (what marks an experiment) only once the search runs, seconds in: two searches started
    with one --name (or one default name, in the same second) both passed the check and wrote their trials into one
    experiment. The first to start claims the folder; the second is refused and leaves the first's folder alone."""
    from tune.run import _claim, main

    storage = tmp_path / "storage"
    _claim(storage / "exp")  # a search starting under this name right now
    code = main([*SMOKE[1:], "--storage_path", str(storage)])
    refused(
        subprocess.CompletedProcess([], code, *capsys.readouterr()), f"{storage / 'exp'} is taken by another search"
    )
    assert [p.name for p in (storage / "exp").iterdir()] == [".lorasent-claim"]


def test_searches_started_in_the_same_second_get_names_of_their_own(tmp_path: Path, monkeypatch) -> None:
    """Two terminals (or a script) starting searches without --name in one second: the first took the default name,
    the rest were refused and told to pick another --name. Now each gets one of its own; a given --name is still its
    user's to change."""
    from tune.config import parse_args
    from tune.run import _claim, experiment_location

    monkeypatch.setattr(time, "strftime", lambda *_: "20260102-030405")  # the same second for each
    args = parse_args(["--smoke-test", "--storage_path", str(tmp_path)])
    names = []
    for _ in range(3):
        storage, name = experiment_location(args)
        os.close(_claim(Path(storage) / name))  # as `run_search` does, at once
        names.append(name)
    assert names == ["smoke-20260102-030405", "smoke-20260102-030405-2", "smoke-20260102-030405-3"]


def test_a_dashboard_port_another_program_holds_is_refused(tmp_path: Path, capsys) -> None:
    """Was Ray's ValueError traceback (exit 1) naming `ray start --dashboard-port`, after its GCS had started."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        args = ["--include_dashboard", "true", "--dashboard_port", port]
        _search_refused(tmp_path, capsys, args, f"127.0.0.1:{port}", "--dashboard_port", "--include_dashboard false")
    assert not ray.is_initialized()


def test_search_evaluating_more_often_than_its_largest_batch_steps(tmp_path: Path, capsys) -> None:
    """The smoke preset's 64 training examples in batches of 16 make 4 steps an epoch: 8 evaluations would have given
    4 reports an epoch, which ASHA and --max_epochs read as half epochs (a trial ran 2 epochs under --max_epochs 1)."""
    space = json.dumps({"per_device_train_batch_size": {"choice": [8, 16]}})
    args = ["--search_space", space, "--evals_per_epoch", "8", "--grace_period", "0.5"]
    _search_refused(
        tmp_path, capsys, args, "evals_per_epoch 8", "its 4 step(s) (batches of 16 over 64", "--evals_per_epoch 4"
    )


def test_training_config_with_a_wrong_type(runs: dict[str, Any]) -> None:
    refused(runs["train_wrong_type"], "fast.yaml: learning_rate is 'fast', but --learning_rate takes a number")
    assert not (runs["tmp"] / "model").exists()


def test_training_with_unknown_target_modules_writes_nothing(tmp_path: Path, capsys) -> None:
    _train_refused(tmp_path, capsys, ["--target_modules", "query"], "['query']", "q_lin", "v_lin")
    # Refused before the data is read and tokenised: a data file it would also refuse comes second.
    no_text, out = tmp_path / "no_text.csv", tmp_path / "out"
    no_text.write_text("review,label\nfine,positive\nbad,negative\n")
    out.mkdir()
    _train_refused(out, capsys, ["--target_modules", "query", "--dataset", str(no_text)], "['query']", "q_lin")


def test_training_with_an_impossible_lora_rank_or_alpha_writes_nothing(tmp_path: Path, capsys) -> None:
    """r = 10**20 crashed inside torch (a C++ frame dump); r = 100,000 trained 25.6M LoRA parameters on the tiny
    model's 32-wide layers; alpha = 10**400 overflowed alpha / r inside peft. Refused before the data is read."""
    width = "(q_lin, v_lin: 32 x 32 weights)"
    _train_refused(tmp_path, capsys, ["--lora_r", str(10**20)], f"LoRA rank {10**20} exceeds", width, "at most 32.")
    _train_refused(tmp_path, capsys, ["--lora_r", "100000"], "LoRA rank 100000 exceeds", width, "at most 32.")
    alpha = ["--lora_alpha", str(10**400)]
    _train_refused(tmp_path, capsys, alpha, "with lora_r 8 scales the LoRA update by more than a 32-bit float")


def test_training_with_an_unknown_or_incomplete_flag_or_schedule(tmp_path: Path, capsys) -> None:
    _train_refused(tmp_path, capsys, ["--learning_rte", "1e-3"], "Unrecognised arguments ['--learning_rte', '1e-3']")
    _train_refused(tmp_path, capsys, ["--config"], "--config: expected one argument. See `python -m lorasent.train")
    _train_refused(tmp_path, capsys, ["--lr_scheduler_type", "cosin"], "lr_scheduler_type 'cosin' is unknown", "cosine")
    no_warmup = ["--lr_scheduler_type", "constant", "--warmup_ratio", "0.1"]  # trained without one, not a word said
    _train_refused(tmp_path, capsys, no_warmup, "warmup_ratio 0.1 does nothing", "constant_with_warmup")
    needs_more = "lr_scheduler_type 'cosine_with_min_lr' needs arguments lorasent does not pass"
    _train_refused(tmp_path, capsys, ["--lr_scheduler_type", "cosine_with_min_lr"], needs_more, "constant_with_warmup")


def test_training_config_may_list_target_modules(tmp_path: Path, capsys) -> None:
    """A YAML list of module names means the comma-separated option (here refused for the wrong architecture)."""
    config = tmp_path.parent / f"{tmp_path.name}-modules.yaml"
    config.write_text("target_modules: [query, value]\n")
    _train_refused(tmp_path, capsys, ["--config", str(config)], "['query', 'value']", "q_lin", "v_lin")


# ----------------------------------------------------------------------------------------------- the user's data


def test_search_on_a_file_with_unlabelled_rows_is_refused_before_any_trial(tmp_path: Path, capsys) -> None:
    """A label lost in a spreadsheet export (an empty cell) names its row before any trial starts."""
    data = tmp_path / "my reviews.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{'' if i == 2 else i % 2}\n" for i in range(40)), "utf-8")
    limits = ["--max_train_samples", "none", "--max_eval_samples", "none", "--max_test_samples", "none"]
    _search_refused(tmp_path, capsys, ["--dataset", str(data), *limits], str(data), "no label", "rows 3")


def test_training_on_a_folder_names_the_file_inside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path.parent / f"{tmp_path.name}-export.csv"
    folder.mkdir()
    (folder / "part-00000.csv").write_text("text,label\ngood,1\nbad,0\n", "utf-8")
    _train_refused(tmp_path, capsys, ["--dataset", str(folder)], "is a folder", str(folder / "part-00000.csv"))


# ----------------------------------------------------------------------------------------------- prediction input


def test_binary_garbage_is_reported_per_row(runs: dict[str, Any]) -> None:
    import pandas as pd

    done = runs["predict_binary_garbage"]
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    frame = pd.read_csv(runs["tmp"] / "out.csv", keep_default_na=False)
    errors = frame["error"].tolist()
    assert "not valid UTF-8" in " ".join(errors)
    # Every line either got a label or says why not; the run as a whole never fails on one bad line.
    assert all((label != "") != (error != "") for label, error in zip(frame["label"], errors, strict=True))


# ----------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ("target_modules: null", ["target_modules is null", "takes a string", "the default 'auto'"]),
        ("label_names: null", ["label_names is null", "takes a list", "the default ['negative', 'positive']"]),
        ("metric_for_best_model: null", ["metric_for_best_model is null", "the default 'accuracy'"]),
        ("output_dir: null", ["output_dir is null", "the default 'runs/train'"]),
        ("learning_rate: [1.0e-3, 1.0e-4]", ["learning_rate is the list [0.001, 0.0001]", "takes one value: a number"]),
        ("lora_r: {choice: [2, 4]}", ["lora_r is the mapping", "one value", """--search_space '{"lora_r": {"""]),
        ("dataset: [a, b]", ["dataset is the list ['a', 'b']", "takes one value: a string"]),
        ("precision: fp64", ["precision is 'fp64'", "one of ['auto', 'fp32', 'bf16', 'fp16']"]),
        ("label_names: [no, yes]", ["holds [False, True]", "Quote such values", 'label_names: ["no", "yes"]']),
    ],
)
def test_training_config_values_of_the_wrong_kind_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, fragments: list[str]
) -> None:
    """A null, list or mapping where the option takes one value, a choice that is none, or YAML's booleans for
    names: refused naming the file, the key, the value and what it takes, before the data is read (the file given
    is one it would refuse)."""
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    config.write_text(line + "\n")
    no_text = tmp_path.parent / f"{tmp_path.name}-no-text.csv"
    no_text.write_text("review,label\nfine,positive\nbad,negative\n")
    argv = ["--config", str(config), "--dataset", str(no_text)]
    _train_refused(tmp_path, capsys, argv, f"config file {config}: ", *fragments)


def test_a_yaml_string_for_label_names_is_one_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As `--label_names ab` is, not the names 'a' and 'b' (its characters); one name is too few."""
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    config.write_text("label_names: ab\n")
    _train_refused(tmp_path, capsys, ["--config", str(config)], "got ['ab']", "label_names: [negative, positive]")


@pytest.mark.parametrize("flag", ["--seed", "--data_seed"])
@pytest.mark.parametrize("value", ["-1", str(2**32)])
def test_training_seed_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    _train_refused(tmp_path, capsys, [flag, value], f"{flag} must lie in [0, 2**32 - 1]", f"got {value}")
