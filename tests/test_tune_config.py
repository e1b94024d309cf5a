"""The search's command line: presets, YAML and flags in their order of precedence, the search space, --help,
and clear errors for unknown or impossible settings (all before any trial could start)."""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from lorasent.config import OFFLINE_DATASET, OFFLINE_MODEL, TINY_MODEL, ModelArguments, TrainArguments, read_yaml
from lorasent.errors import ConfigError
from tune.cluster import ResourcePlan, check_reachable, start_early_ray, use_token_from_env
from tune.config import (
    METADATA_FILE,
    SEARCHABLE,
    apply_trial_config,
    build_parser,
    experiment_metadata,
    parse_args,
    parse_search_space,
    preset_names,
)
from tune.run import main

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp_path: Path, values: dict, name: str = "search.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def test_defaults_are_the_offline_quickstart() -> None:
    args = parse_args([])
    assert args.tune.preset == "quickstart"
    assert args.data.dataset == OFFLINE_DATASET
    assert args.model.model_name_or_path == OFFLINE_MODEL
    assert set(args.tune.search_space) == {"learning_rate", "per_device_train_batch_size", "lora_r"}
    assert (args.tune.searcher, args.tune.scheduler) == ("optuna", "asha")
    assert args.tune.dashboard_host == "127.0.0.1"


def test_every_preset_parses_and_the_seed_preset_starts_from_the_seed_config() -> None:
    assert {"quickstart", "seed", "full", "smoke"} <= set(preset_names())
    for name in preset_names():
        assert parse_args(["--preset", name]).tune.preset == name
    seed = parse_args(["--preset", "seed"])
    assert (seed.data.dataset, seed.model.model_name_or_path) == ("amazon_polarity", "distilbert-base-uncased")
    assert (seed.data.max_train_samples, seed.data.max_test_samples, seed.train.num_train_epochs) == (1000, 1000, 5)
    assert seed.tune.search_space["learning_rate"] == {"choice": [1e-3, 5e-4, 3e-4]}
    assert seed.tune.search_space["per_device_train_batch_size"] == {"choice": [4, 8, 16]}
    assert seed.tune.points_to_evaluate == [{"learning_rate": 5e-4, "per_device_train_batch_size": 16, "lora_r": 4}]
    assert (seed.model.lora_alpha, seed.model.lora_dropout, seed.model.target_modules) == (32, 0.01, "q_lin")


def test_precedence_defaults_preset_yaml_flags(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        # YAML 1.1 reads 3e-4 as a string: it must still become a float, as it would on the command line.
        {"num_samples": 3, "weight_decay": "3e-4", "max_train_samples": 50, "search_space": {"lora_r": None}},
    )
    args = parse_args(["--preset", "smoke", "--config", config, "--num_samples", "5", "--seed", "7"])
    assert args.model.model_name_or_path == TINY_MODEL  # preset over default
    assert args.data.max_train_samples == 50  # YAML over preset
    assert args.train.weight_decay == pytest.approx(3e-4)  # YAML, typed
    assert args.tune.num_samples == 5  # flag over YAML
    assert args.train.seed == 7
    assert "lora_r" not in args.tune.search_space  # null removed it; the rest of the preset's space stays
    assert "learning_rate" in args.tune.search_space


def test_yaml_can_choose_the_preset_and_smoke_test_selects_smoke(tmp_path: Path) -> None:
    assert parse_args(["--config", _yaml(tmp_path, {"preset": "seed"})]).tune.preset == "seed"
    args = parse_args(["--smoke-test"])
    assert args.tune.preset == "smoke" and args.model.model_name_or_path == TINY_MODEL
    args = parse_args(["--config", _yaml(tmp_path, {"smoke_test": True})])
    assert args.tune.preset == "smoke" and args.model.model_name_or_path == TINY_MODEL


@pytest.mark.parametrize(
    ("config", "argv"),
    [
        ({"preset": "seed"}, ["--smoke-test"]),  # the flag overrides the config file's preset
        ({"scheduler": "asha", "grace_period": 2}, ["--scheduler", "none"]),  # and what the file set up for ASHA
        ({"dataset": "reviews.csv", "text_column": "body"}, ["--dataset", "amazon_polarity"]),
        ({"num_samples": 4}, ["--searcher", "grid", "--search_space", '{"lora_r": {"grid": [2, 4]}}']),
    ],
)
def test_a_flag_may_turn_off_what_the_config_file_set_up(tmp_path: Path, config: dict, argv: list[str]) -> None:
    """A flag overrides the config file: what it leaves unread there is not refused."""
    parse_args(["--config", _yaml(tmp_path, config), *argv])


def test_an_unread_option_is_refused_only_where_the_user_gave_it(tmp_path: Path) -> None:
    """A preset's values are its own; an option given in the config file is refused where the file, or a later flag,
    makes it unread."""
    assert parse_args(["--preset", "seed", "--scheduler", "none"]).tune.grace_period == 2
    with pytest.raises(ConfigError, match="--grace_period has no effect with --scheduler none"):
        parse_args(["--config", _yaml(tmp_path, {"scheduler": "none"}), "--grace_period", "2"])
    with pytest.raises(ConfigError, match="--text_column has no effect with --dataset amazon_polarity"):
        parse_args(["--config", _yaml(tmp_path, {"dataset": "amazon_polarity", "text_column": "body"})])
    with pytest.raises(ConfigError, match="--preset has no effect with --smoke_test true"):
        parse_args(["--config", _yaml(tmp_path, {"smoke_test": True}), "--preset", "seed"])
    with pytest.raises(ConfigError, match="--preset has no effect with --smoke_test true"):
        parse_args(["--config", _yaml(tmp_path, {"smoke_test": "true", "preset": "seed"})])
    assert parse_args(["--config", _yaml(tmp_path, {"smoke_test": "false"})]).tune.preset == "quickstart"


def test_an_optional_switch_takes_none() -> None:
    """--include_dashboard unset can be told from one given (a cluster refuses one given), and a resume unsets it."""
    assert [parse_args(argv).tune.include_dashboard for argv in ([], ["--include_dashboard"])] == [None, True]
    assert parse_args(["--include_dashboard", "false"]).tune.include_dashboard is False
    assert parse_args(["--include_dashboard", "none"]).tune.include_dashboard is None


def test_a_value_given_over_a_searched_parameter_fixes_it(tmp_path: Path) -> None:
    """A later layer overrides an earlier one: `--lora_r 16` over the preset's search of lora_r fixes it at 16 (it was
    ignored: the trials searched [2, 4, 8]), and the preset's starting points leave it out. A value in the same layer
    as the space stays the one a point that leaves the parameter out takes."""
    args = parse_args(["--lora_r", "16"])
    assert args.model.lora_r == 16 and "lora_r" not in args.tune.search_space
    assert {"learning_rate", "per_device_train_batch_size"} <= set(args.tune.search_space)
    seed = parse_args(["--preset", "seed", "--lora_r", "16", "--learning_rate", "1e-3"])
    assert set(seed.tune.search_space) == {"per_device_train_batch_size"}
    assert seed.tune.points_to_evaluate == [{"per_device_train_batch_size": 16}]
    assert "lora_r" not in parse_args(["--config", _yaml(tmp_path, {"lora_r": 16})]).tune.search_space
    space = {"lora_r": {"choice": [4, 8]}}
    same_file = parse_args(["--config", _yaml(tmp_path, {"search_space": space, "lora_r": 4})])
    same_flags = parse_args(["--search_space", json.dumps(space), "--lora_r", "4"])
    for args in (same_file, same_flags):
        assert args.tune.search_space["lora_r"] == space["lora_r"] and args.model.lora_r == 4
    file = _yaml(tmp_path, {"search_space": space, "points_to_evaluate": [{"lora_r": 4, "learning_rate": 1e-3}]})
    flag_over_file = parse_args(["--config", file, "--lora_r", "16"])
    assert "lora_r" not in flag_over_file.tune.search_space
    assert flag_over_file.tune.points_to_evaluate == [{"learning_rate": 1e-3}]  # the flag overrides the file's point
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\] sets lora_r, which --lora_r fixes"):
        parse_args(["--lora_r", "16", "--points_to_evaluate", '[{"lora_r": 4}]'])


def test_a_preset_limit_can_be_lifted_and_yaml_lists_join(tmp_path: Path) -> None:
    assert parse_args([]).data.max_train_samples == 600  # the quick-start preset's subset
    args = parse_args(["--max_train_samples", "none", "--max_eval_samples", "None"])
    assert args.data.max_train_samples is None and args.data.max_eval_samples is None
    args = parse_args(["--config", _yaml(tmp_path, {"target_modules": ["query", "value"]})])
    assert args.model.target_modules == "query,value"


def test_local_paths_are_made_absolute_for_the_trials(tmp_path: Path, monkeypatch, write_data) -> None:
    """Ray runs each trial in its own folder; paths that exist here reach it absolute, names stay names."""
    write_data([{"text": "fine", "label": 1}], "reviews.csv")
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--dataset", "reviews.csv", "--model_name_or_path", "my-model", "--cache_dir", "cache"])
    assert args.data.dataset == str(tmp_path / "reviews.csv")
    assert args.model.model_name_or_path == str(tmp_path / "my-model")
    assert args.data.cache_dir == str(tmp_path / "cache")
    args = parse_args(["--dataset", "amazon_polarity", "--model_name_or_path", "distilbert-base-uncased"])
    assert (args.data.dataset, args.model.model_name_or_path) == ("amazon_polarity", "distilbert-base-uncased")


def test_search_space_flag_merges_per_parameter() -> None:
    flag = json.dumps({"lora_r": {"choice": [4, 8]}, "warmup_ratio": {"uniform": [0.0, 0.2]}, "lora_dropout": None})
    space = parse_args(["--search_space", flag]).tune.search_space
    assert space["lora_r"] == {"choice": [4, 8]}
    assert space["warmup_ratio"] == {"uniform": [0.0, 0.2]}
    assert "learning_rate" in space  # kept from the preset


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "Unknown preset 'nope'. Presets: full, quickstart, seed, smoke"),
        # an empty preset ran the quick-start, --smoke-test hid any other, and a path named the experiment's folder
        (["--preset", ""], "Unknown preset ''. Presets: full"),
        (["--smoke-test", "--preset", "nope"], "Unknown preset 'nope'"),
        (["--preset", str(REPO / "tune" / "presets" / "seed")], "Unknown preset '/"),
        (
            ["--smoke-test", "--preset", "seed"],
            "--preset has no effect with --smoke_test true: it runs the 'smoke' preset instead. Drop --preset, or "
            "drop --smoke_test to run preset 'seed'.",
        ),
        # options that another setting leaves unread: refused, not ignored
        (["--scheduler", "none", "--grace_period", "2"], "--grace_period has no effect with --scheduler none: it is"),
        (["--scheduler", "none", "--reduction_factor", "3"], "Drop --reduction_factor, or use --scheduler asha."),
        (
            ["--text_column", "body"],
            f"--text_column has no effect with --dataset {OFFLINE_DATASET}: it names a column of a local data file",
        ),
        (["--preset", "seed", "--label_column", "stars"], "--label_column has no effect with --dataset amazon_polar"),
        (["--amazon_text", "content"], "Drop --amazon_text, or use --dataset amazon_polarity."),
        (["--preset", "seed", "--neutral_threshold", "1"], f"or use --dataset {OFFLINE_DATASET}."),
        (["--preset", "seed", "--test_fraction", "0.3"], "--test_fraction has no effect with --dataset amazon_polar"),
        (["--searcher", "grid", "--num_samples", "4"], "--num_samples has no effect with --searcher grid: it runs"),
        (["--searcher", "grid", "--search_seed", "1"], "Drop --search_seed, or use --searcher optuna or random."),
        (["--searcher=grid", "--points_to_evaluate=[]"], "--points_to_evaluate has no effect with --searcher grid"),
        (["--include_dashboard", "false", "--dashboard_port", "8300"], "--dashboard_port has no effect with --incl"),
        (["--fused_trials", "--torch_threads", "2"], "--torch_threads has no effect with --fused_trials true: the"),
        (["--fused_trials", "--dataloader_num_workers", "2"], "Drop --dataloader_num_workers, or search without"),
        (["--precision", "fp32", "--half_precision_base"], "--half_precision_base has no effect with --precision fp"),
        (["--searcher", "hyperopt"], "Unknown searcher 'hyperopt'. Valid: optuna, random, grid"),
        (["--scheduler", "pbt"], "Unknown scheduler 'pbt'"),
        (["--mode", "maximise"], "Unknown mode"),
        (
            ["--metric", "loss", "--mode", "max"],
            "mode 'max' would search for the worst 'loss', which is better smaller",
        ),
        (["--mode", "min"], "mode 'min' would search for the worst 'accuracy'"),
        (["--metric", "auc"], "Unknown metric 'auc'. Trials report: accuracy"),
        (["--num_samples", "many"], "invalid int value"),
        (["--gpus_per_trial", "1.5"], "gpus_per_trial must be a fraction"),
        (["--reduction_factor", "1"], "reduction_factor must be > 1"),
        (["--search_space", "{lora_r: 4"], "not valid JSON"),
        (["--search_space", '{"rank": {"choice": [4]}}'], "unknown parameter 'rank'. Searchable: learning_rate"),
        (["--search_space", '{"lora_r": {"normal": [4, 1]}}'], "expected one of {loguniform|uniform|choice|grid"),
        (["--search_space", '{"lora_r": {"choice": []}}'], "expected a non-empty list"),
        (["--search_space", '{"lora_r": {"choice": [4.5]}}'], "4.5 is not a valid int"),
        (["--search_space", '{"learning_rate": {"loguniform": [0, 1e-3]}}'], "lower bound must be > 0"),
        (["--search_space", '{"learning_rate": {"uniform": [1e-3, 1e-4]}}'], "low < high"),
        (["--search_space", '{"lora_r": {"choice": [4, 8, 4.0]}}'], "lora_r.choice: 4 listed more than once"),
        (["--learning_rate", "-1"], "learning_rate must be a positive number"),
        (["--no_such_flag", "1"], "Unrecognised arguments ['--no_such_flag', '1']"),
        (["--output_dir", "models/best"], "--output_dir has no effect in a search: a search writes into"),
        (["--metric_for_best_model", "f1_macro"], "--metric (accuracy) also picks each trial's best epoch"),
        (["--name", "."], "name '.' is not allowed"),
        (["--name", ".."], "'..' would put the experiment in the storage folder itself, or outside it"),
        (["--verbose", "5"], "verbose must be 0, 1 or 2, got 5"),
        # the options read first (which layers apply) printed a usage of only them, naming `run.py`
        (["--config"], "argument --config: expected one argument. See `python tune/run.py --help`"),
        (["--smoke_test", "maybe"], "Truthy value expected: got maybe but expected one of yes/no"),
        # every trial diverged (NaN, inf), failed on torch's overflow, or forked processes until it was killed
        (["--weight_decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
        (["--torch_threads", str(2**63)], f"torch_threads must be at most 1024, got {2**63}"),
        (["--dataloader_num_workers", str(10**20)], "dataloader_num_workers must lie in [0, 1024], got 1000"),
        (["--lora_alpha", str(10**40)], "lora_alpha 1" + "0" * 40 + " with lora_r 8 scales the LoRA update by more"),
        # Ray's and Optuna's tracebacks once the checks had passed (and --num_cpus 0 ran on every CPU)
        (["--search_seed", "-1"], "search_seed must lie in [0, 2**32 - 1] (4294967295), got -1"),
        (["--num_cpus", "0"], "num_cpus must be >= 1 and num_gpus >= 0, got 0 and None"),
        (["--num_gpus", "-1"], "num_cpus must be >= 1 and num_gpus >= 0, got None and -1"),
        (["--dashboard_port", "99999"], "dashboard_port must be a port number in [1, 65535], got 99999"),
        # In a URI the name would end at '#' or '?' (the search's record went into another folder than its trials,
        # and it could not be resumed), and a space or a non-ASCII letter does not parse
        (["--storage_path", "s3://b/runs", "--name", "run#2"], "name 'run#2' cannot be part of the storage URI"),
        (["--storage_path", "file:///runs", "--name", "rün 2"], "name 'rün 2' cannot be part of the storage URI"),
    ],
)
def test_bad_flags_are_clear_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        parse_args(argv)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("metric", "mode"), [("accuracy", "max"), ("f1_macro", "max"), ("loss", "min"), ("train_loss", "min")]
)
def test_mode_follows_the_metric(metric: str, mode: str) -> None:
    """A loss is minimised, a score maximised, without --mode (as transformers decides greater_is_better)."""
    assert parse_args(["--metric", metric]).tune.mode == mode
    assert parse_args(["--metric", metric, "--mode", mode]).tune.mode == mode


def test_a_search_on_train_loss_keeps_its_epoch_metric() -> None:
    """train_loss is no validation metric, so each trial's best epoch is still picked by --metric_for_best_model."""
    args = parse_args(["--metric", "train_loss", "--metric_for_best_model", "f1_macro"])
    assert args.train.metric_for_best_model == "f1_macro"


def test_unknown_yaml_keys_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", _yaml(tmp_path, {"learning_rte": 1e-3, "num_samples": 2})])
    message = str(caught.value)
    assert "unknown key(s) ['learning_rte']" in message
    assert "learning_rate" in message and "num_samples" in message and "lora_r" in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"searcher": "bayes"}, "Unknown searcher 'bayes'"),
        ({"num_samples": "ten"}, "num_samples is 'ten', but --num_samples takes a whole number"),
        ({"precision": "fp64"}, "precision is 'fp64', but --precision takes one of"),
        ({"search_space": ["lora_r"]}, "search_space is invalid (expected a JSON dict"),
        # what YAML holds besides scalars: a null, a list or a mapping where the option takes one value
        ({"target_modules": None}, "target_modules is null (an empty value), but --target_modules takes"),
        ({"label_names": None}, "label_names is null (an empty value)"),
        ({"dataset": ["a.csv", "b.csv"]}, "dataset is the list ['a.csv', 'b.csv'], but --dataset takes one value"),
        ({"lora_r": {"choice": [4, 8]}}, """--search_space '{"lora_r": {"choice": [4, 8]}}'"""),
        # the search space then refused what it was told to take
        ({"seed": {"choice": [1, 2]}}, "seed cannot be searched either: the search space takes learning_rate, per_"),
        ({"label_names": [False, True]}, 'Quote such values in the config file as written, e.g. label_names: ["no"'),
        ({"resume": "runs/tune/latest"}, "['resume'] can only be given on the command line (--resume)"),
        ({"config": "other.yaml"}, "['config'] can only be given on the command line (--config)"),
    ],
)
def test_bad_yaml_values_are_clear_config_errors(tmp_path: Path, content: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", _yaml(tmp_path, content)])
    assert message in str(caught.value)


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read config file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(bad)
    bad.write_bytes("learning_rate: 1.0e-3  # caf\u00e9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(bad)])


def test_help_documents_every_option() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tune" / "run.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help string"
        assert action.option_strings[0] in done.stdout
    for preset in preset_names():
        assert f"  {preset} " in done.stdout
    assert "loguniform" in done.stdout and "--resume" in done.stdout
    # lorasent.train's --output_dir and --metric_for_best_model, which a search refuses, say so (their help was
    # lorasent.train's: "Where the trained model folder is written.")
    text = " ".join(done.stdout.split())
    assert "--output-dir OUTPUT_DIR Refused in a search: a search writes into --storage_path/--name" in text
    assert "best epoch where --metric is train_loss (no validation metric); refused otherwise" in text


def test_search_space_types_and_trial_config() -> None:
    space = parse_search_space(
        {
            "learning_rate": {"loguniform": ["1e-4", 1e-2]},
            "lora_r": {"grid": [2, "4"]},
            "target_modules": {"choice": ["auto", "attention"]},
        }
    )
    assert space["learning_rate"].values == (1e-4, 1e-2) and space["learning_rate"].is_range
    assert space["lora_r"].values == (2, 4)
    model, train = apply_trial_config(
        ModelArguments(), TrainArguments(), {"learning_rate": 2e-3, "lora_r": 16, "target_modules": "attention"}
    )
    assert (model.lora_r, model.target_modules, train.learning_rate) == (16, "attention", 2e-3)
    assert set(SEARCHABLE) >= {"learning_rate", "per_device_train_batch_size", "lora_r", "lora_alpha", "lora_dropout"}
    with pytest.raises(ConfigError, match="lora_r must be a positive number"):
        apply_trial_config(ModelArguments(), TrainArguments(), {"lora_r": 0})


def test_resume_takes_the_saved_arguments_and_only_session_flags(tmp_path: Path) -> None:
    original = parse_args(["--smoke-test", "--num_samples", "3", "--learning_rate", "2e-3"])
    (tmp_path / METADATA_FILE).write_text(experiment_metadata(original), encoding="utf-8")
    resumed = parse_args(["--resume", str(tmp_path), "--num_cpus", "1", "--address", "auto"])
    assert resumed.data == original.data and resumed.model == original.model and resumed.train == original.train
    assert resumed.tune.num_samples == 3 and resumed.tune.search_space == original.tune.search_space
    assert (resumed.tune.resume, resumed.tune.num_cpus, resumed.tune.address) == (str(tmp_path), 1, "auto")
    with pytest.raises(ConfigError, match=r"cannot change: \['learning_rate', 'num_samples'\]"):
        parse_args(["--resume", str(tmp_path), "--num_samples", "9", "--learning_rate", "1e-3"])
    with pytest.raises(ConfigError, match=f"Cannot read {tmp_path / 'nothing' / METADATA_FILE}"):
        parse_args(["--resume", str(tmp_path / "nothing")])


def test_resume_takes_the_first_runs_whole_command_line(tmp_path: Path) -> None:
    """The command that started a search, with --resume added, continues it: its search-space layer (a null removes
    a preset's parameter), its --num_samples that the run cut to the space's size and its automatic GPU share are
    read as the first run read them, not as changes to the record."""
    argv = ["--smoke-test", "--search_space", '{"learning_rate": null}', "--num_samples", "6", "--num_cpus", "2"]
    first = parse_args(argv)
    recorded = first._replace(tune=dataclasses.replace(first.tune, num_samples=4))  # 2 x 2 choices: run.py's cut
    (tmp_path / METADATA_FILE).write_text(experiment_metadata(recorded, {"cpu": 1.0, "gpu": 0.5}), encoding="utf-8")
    resumed = parse_args([*argv, "--resume", str(tmp_path), "--verbose", "2"])
    assert resumed.tune.search_space == recorded.tune.search_space and "learning_rate" not in resumed.tune.search_space
    assert (resumed.tune.num_samples, resumed.tune.gpus_per_trial, resumed.tune.resume) == (4, 0.5, str(tmp_path))
    assert (resumed.tune.verbose, resumed.data, resumed.model, resumed.train) == (2, *recorded[1:])
    assert parse_args([f"--resume={tmp_path}", "--num_samples", "5"]).tune.num_samples == 4  # 5 runs the same 4
    with pytest.raises(ConfigError, match=r"cannot change: \['num_samples'\]"):  # 3 of the 4 trials
        parse_args([*argv, "--resume", str(tmp_path), "--num_samples", "3"])
    with pytest.raises(ConfigError, match=r"cannot change: \['lora_alpha'\]"):  # named alone, not the layers
        parse_args([*argv, "--lora_alpha", "4", "--resume", str(tmp_path)])


def test_resume_keeps_the_resolved_resources(tmp_path: Path) -> None:
    """An automatic GPU share is recorded as resolved, and a resume (perhaps on other nodes) gives trials the same."""
    original = parse_args(["--smoke-test"])
    assert original.tune.gpus_per_trial is None
    text = experiment_metadata(original, {"cpu": 1.0, "gpu": 0.25})
    assert json.loads(text)["resources"] == {"cpu": 1.0, "gpu": 0.25}
    (tmp_path / METADATA_FILE).write_text(text, encoding="utf-8")
    assert parse_args(["--resume", str(tmp_path)]).tune.gpus_per_trial == 0.25
    (tmp_path / METADATA_FILE).write_text(experiment_metadata(original), encoding="utf-8")  # an older record
    assert parse_args(["--resume", str(tmp_path)]).tune.gpus_per_trial is None


def test_token_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    with socket.socket() as listening:  # an address that answers, so the token check is what refuses
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        (tmp_path / "empty").write_text("\n")
        for path, problem in ((tmp_path / "missing", "it cannot be read"), (tmp_path / "empty", "it is empty")):
            monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
            assert main(["--smoke-test", "--address", address, "--storage_path", str(tmp_path / "runs")]) == 2
            err = capsys.readouterr().err
            assert f"RAY_AUTH_TOKEN_PATH={path} names no token ({problem}" in err and "RAY_AUTH_TOKEN." in err
            assert not ray.is_initialized()
    # An explicit mode is the user's choice: a token in the environment does not override it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert use_token_from_env() is None and os.environ["RAY_AUTH_MODE"] == "disabled"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "Unknown preset 'nope'"),
        (["--searcher", "bogus"], "Unknown searcher 'bogus'"),
        (["--search_space", '{"learning_rate": null, "lora_r": null, "per_device_train_batch_size": null}'], "empty"),
        (["--searcher", "grid"], "Grid search needs a finite list of values"),
        (["--max_concurrent_trials", "3", "--num_cpus", "2"], "max_concurrent_trials=3 needs 3 CPUs"),
        (["--gpus_per_trial", "1", "--num_gpus", "0"], "--gpus_per_trial 0"),
        (["--address", f"127.0.0.1:{_closed_port()}"], "is unreachable"),
        (["--address", "http://127.0.0.1:8265"], "is a dashboard/job URL"),
        (["--address", "10.0.0.1:6379", "--num_gpus", "2"], "--num_gpus set up a local Ray, but this search joins"),
        (["--address", "10.0.0.1:6379", "--dashboard_host", "0.0.0.0"], "Drop --dashboard_host (on --resume"),
        (["--address", "10.0.0.1:6379", "--include_dashboard", "false"], "Drop --include_dashboard (on --resume"),
        (
            ["--search_space", '{"lora_alpha": {"choice": [8, 32]}}', "--points_to_evaluate", '[{"lora_r": 4}]'],
            "points_to_evaluate[0] leaves out lora_alpha, so it takes --lora_alpha's value 16, which lies outside",
        ),
        (["--resume", "/nonexistent/experiment"], "Cannot read /nonexistent/experiment/lorasent_search.json"),
        (["--num_gpus", "99"], "--num_gpus 99, but torch sees"),
        (["--precision", "fp16", "--gpus_per_trial", "0"], "precision 'fp16' needs a CUDA GPU"),
        (["--lr_scheduler_type", "cosin"], "lr_scheduler_type 'cosin' is unknown; valid: linear, cosine"),
        (["--search_space", '{"weight_decay": {"uniform": [0, 1e400]}}'], "weight_decay: inf is not allowed"),
        # a rank above every adapted layer's width (MiniLM's are 384 x 384) trained for nothing, or crashed in torch
        (
            ["--search_space", '{"lora_r": {"choice": [8, 512]}}'],
            "search_space.lora_r: LoRA rank 512 exceeds the width of every layer it adapts in this bert model "
            "(query, value: 384 x 384 weights)",
        ),
        (["--lora_r", "100000", "--search_space", '{"lora_r": null}'], "LoRA rank 100000 exceeds the width of every"),
        # a schedule without warm-up trained without one, and every searched warmup_ratio alike
        (["--warmup_ratio", "0.1", "--lr_scheduler_type", "constant"], "warmup_ratio 0.1 does nothing: lr_scheduler"),
        (
            ["--search_space", '{"warmup_ratio": {"uniform": [0, 0.1]}}', "--lr_scheduler_type", "greedy"],
            "search_space.warmup_ratio does nothing: lr_scheduler_type 'greedy' has no warm-up",
        ),
        (
            ["--storage_path", f"s3://lorasent/runs?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http"],
            "Cannot reach the experiment storage s3://lorasent/runs/",  # the name before the URI's query
        ),
        (["--storage_path", "file:///tmp/my runs"], "Cannot parse the storage URI file:///tmp/my runs/"),
    ],
)
def test_refused_before_the_search_starts(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    """In this process the checks' modules are loaded, so these come before any Ray starts; in a fresh process some
    of them run while a local Ray starts (`test_a_search_refused_while_its_ray_starts_says_only_why` in
    tests/test_bad_input.py)."""
    started = time.perf_counter()
    assert main(["--storage_path", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1  # one clean line, no traceback
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-written
    assert time.perf_counter() - started < 30


def test_a_ray_started_early_is_quiet_until_the_search_takes_it() -> None:
    """The local Ray starts while the driver imports and checks; its log lines wait, and a Ray that counted other GPUs
    than torch did is not the one the search runs on."""
    said = logging.handlers.BufferingHandler(capacity=100)  # beside Ray's own handler, which prints to stderr
    logging.getLogger("ray").addHandler(said)
    try:
        early = start_early_ray(parse_args(["--smoke-test", "--num_cpus", "2"]).tune)
        assert early is not None and ray.is_initialized() and said.buffer == []
        assert start_early_ray(parse_args(["--smoke-test"]).tune) is None  # a running Ray is the caller's own
        torch_counted = ResourcePlan(
            nodes=1, cpus=2, gpus=1, cpus_per_trial=1, gpus_per_trial=1, max_concurrent_trials=1
        )
        assert not early.adopt(torch_counted) and not ray.is_initialized()
        assert any("Started a local Ray instance" in r.getMessage() for r in said.buffer)  # held back, now said
    finally:
        logging.getLogger("ray").removeHandler(said)
        ray.shutdown()


def test_unwritable_storage_path_is_refused(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["--smoke-test", "--storage_path", str(blocker / "runs")]) == 2
    assert "Cannot create storage_path" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_unroutable_cluster_fails_within_seconds() -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable"):
        check_reachable("192.0.2.123:6379", timeout=2.0)  # TEST-NET-1: nothing answers there
    assert time.perf_counter() - started < 5


def test_address_auto_joins_only_a_cluster_that_ray_start_recorded(tmp_path: Path, monkeypatch) -> None:
    """`auto` is what `ray start` recorded on this machine (under $RAY_TMPDIR here). With no record Ray joined any Ray
    running here, another search's own, and died with it when that search ended; a stale record (a `ray start`
    cluster killed) hung for minutes. Both are refused at once, naming the fix."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    record = tmp_path / "ray" / "ray_current_cluster"
    with pytest.raises(ConfigError, match=f"none is recorded in {record}.*`ray start --head`.*drop --address"):
        check_reachable("auto")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{closed.getsockname()[1]}"
    record.parent.mkdir()
    record.write_text(gone)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{gone} \\(--address auto found it in `ray start`'s record {record}\\)"):
        check_reachable("auto")
    assert time.perf_counter() - started < 5
    with socket.create_server(("127.0.0.1", 0)) as head:  # a cluster that answers: joined
        record.write_text(f"127.0.0.1:{head.getsockname()[1]}")
        check_reachable("auto")
        monkeypatch.setenv("RAY_ADDRESS", gone)  # Ray's order: $RAY_ADDRESS before the record
        with pytest.raises(ConfigError, match=f"{gone} \\(--address auto found it in RAY_ADDRESS\\)"):
            check_reachable("auto")


def _trial_result(
    tmp: Path, trial_id: str, scores: list[float], kept: list[int], metric: str = "accuracy", number: int | None = None
) -> Any:
    """A trial's Result as Tune returns it: one row per epoch, checkpoints kept for the epochs in `kept`; in a folder
    named as Ray names it where the trial has its `number` in the search."""
    import pandas as pd
    from ray.tune import Checkpoint, Result

    rows = [{metric: a, "training_iteration": i + 1, "trial_id": trial_id} for i, a in enumerate(scores)]
    trial_dir = tmp / (trial_id if number is None else f"train_trial_{trial_id}_{number}_lora_r=2_2026-01-01_00-00-00")
    checkpoints = []
    for row in rows:
        if row["training_iteration"] in kept:
            folder = trial_dir / f"checkpoint_{row['training_iteration']}"
            folder.mkdir(parents=True)
            checkpoints.append((Checkpoint.from_directory(str(folder)), row))
    return Result(
        metrics=rows[-1], checkpoint=None, error=None, path=str(trial_dir),
        metrics_dataframe=pd.DataFrame(rows), best_checkpoints=checkpoints,
    )  # fmt: skip


def test_the_printed_best_breaks_ties_as_the_report_does(tmp_path: Path) -> None:
    """Best score; then an epoch with a kept checkpoint; then the earlier epoch; then the trial sampled first (Ray
    draws trial ids at random, anew in each run); then the smaller trial id."""
    from tune.run import _best_epoch

    late = _trial_result(tmp_path, "aaaa", [0.5, 0.9, 0.9], kept=[2, 3])
    early = _trial_result(tmp_path, "bbbb", [0.9, 0.7], kept=[1])
    unkept = _trial_result(tmp_path, "0000", [0.9], kept=[])
    diverged = _trial_result(tmp_path, "cccc", [float("-inf")], kept=[1])  # its only epoch diverged: no score
    diverged.metrics["diverged"] = 1.0
    for order in ([late, early, unkept, diverged], [diverged, unkept, early, late]):
        _, metrics, checkpoint = _best_epoch(order, "accuracy", "max")
        assert (metrics["trial_id"], metrics["training_iteration"]) == ("bbbb", 1)
        assert checkpoint is not None and checkpoint.path.endswith("bbbb/checkpoint_1")
    _, metrics, _ = _best_epoch([late, unkept], "accuracy", "max")
    assert (metrics["trial_id"], metrics["training_iteration"]) == ("aaaa", 2)
    same = _trial_result(tmp_path / "again", "0001", [0.9], kept=[1])
    assert _best_epoch([early, same], "accuracy", "max")[1]["trial_id"] == "0001"
    first = _trial_result(tmp_path, "ffffffff", [0.9], kept=[1], number=1)
    second = _trial_result(tmp_path, "00000000", [0.9], kept=[1], number=2)
    assert _best_epoch([second, first], "accuracy", "max")[0] is first
    assert _best_epoch([diverged], "accuracy", "max") is None
    assert _best_epoch([late, early], "loss", "min") is None  # no trial reported the metric


def test_a_trial_that_diverged_after_good_epochs_keeps_them(tmp_path: Path) -> None:
    """Its diverged epoch reports the worst value and is never the best; the epochs it finished before are, as in
    `analysis` (and its best epoch's checkpoint is kept)."""
    from tune.run import _best_epoch

    steady = _trial_result(tmp_path, "aaaa", [0.7, 0.8], kept=[1, 2])
    diverged = _trial_result(tmp_path, "bbbb", [0.6, 0.9, float("-inf")], kept=[2, 3])
    diverged.metrics["diverged"] = 1.0
    best, metrics, checkpoint = _best_epoch([steady, diverged], "accuracy", "max")
    assert best is diverged and metrics["training_iteration"] == 2 and checkpoint.path.endswith("bbbb/checkpoint_2")
    lossy = _trial_result(tmp_path, "cccc", [0.5, 0.4, float("inf")], kept=[2, 3], metric="loss")
    lossy.metrics["diverged"] = 1.0
    assert _best_epoch([lossy], "loss", "min")[1]["training_iteration"] == 2  # under mode=min the worst is +inf
