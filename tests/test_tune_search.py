"""The search on a real local Ray (2 CPUs) with the tiny model: ASHA + Optuna end to end, per-epoch reports and
adapter-only checkpoints, a diverging trial that ends as a bad result; plus the searcher, scheduler, param-space
and resource-plan factories on their own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from conftest import amazon_polarity_repo, distilbert_repo, search_to_end
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from lorasent.errors import ConfigError
from lorasent.predict import Predictor
from tune import search
from tune.cluster import Autoscaler, configured_node_types, find_autoscaler, launcher_max_resources, plan_resources
from tune.config import METADATA_FILE, configurations, parse_args
from tune.run import _summary, experiment_location, run_search
from tune.trainable import require_gpu, sweep_abandoned_work_dirs

# ---------------------------------------------------------------------------------------------- factories (no Ray)


def _args(*argv: str):
    return parse_args(["--smoke-test", *argv])


def test_param_space_per_searcher() -> None:
    space_flag = json.dumps(
        {
            "learning_rate": {"loguniform": [1e-4, 1e-2]},
            "lora_r": {"grid": [2, 4]},
            "per_device_train_batch_size": {"choice": [8, 16]},
            "lora_alpha": {"uniform": [8, 32]},
        }
    )
    a = _args("--search_space", space_flag)
    space, optuna_space = search.build_param_space(a.tune, a.model, a.train)
    assert set(space) == {"learning_rate", "lora_r", "per_device_train_batch_size", "lora_alpha"}
    assert isinstance(optuna_space["lora_r"], type(tune.choice([1])))  # Optuna samples grid lists
    assert optuna_space["lora_alpha"].lower == 8 and optuna_space["lora_alpha"].upper == 33  # whole numbers, inclusive
    r = _args("--searcher", "random", "--search_space", space_flag)
    _, random_space = search.build_param_space(r.tune, r.model, r.train)
    assert random_space["lora_r"] == {"grid_search": [2, 4]}  # random search expands grid lists...
    assert not isinstance(random_space["per_device_train_batch_size"], dict)  # ...and samples choices
    grid = _args("--searcher", "grid", "--search_space", json.dumps({"learning_rate": {"choice": [1e-3, 2e-3]}}))
    grid_searched, grid_space = search.build_param_space(grid.tune, grid.model, grid.train)
    assert grid_space["learning_rate"] == {"grid_search": [1e-3, 2e-3]}
    assert search.num_samples(grid.tune, grid_searched) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--search_space", '{"learning_rate": null, "lora_r": null, "per_device_train_batch_size": null}'], "empty"),
        (["--searcher", "grid"], "Grid search needs a finite list of values, but ['learning_rate'] are continuous"),
        (["--search_space", '{"lora_r": {"choice": [4, 0]}}'], "search_space.lora_r: 0 is not allowed"),
        (["--search_space", '{"lora_dropout": {"uniform": [0.1, 1.5]}}'], "search_space.lora_dropout: 1.5"),
        (["--search_space", '{"target_modules": {"choice": ["auto", ""]}}'], "target_modules is empty"),
    ],
)
def test_impossible_search_spaces(argv: list[str], message: str) -> None:
    a = _args(*argv)
    with pytest.raises(ConfigError) as caught:
        search.build_param_space(a.tune, a.model, a.train)
    assert message in str(caught.value)


def test_searchers_and_scheduler() -> None:
    batch_sizes = json.dumps({"per_device_train_batch_size": {"choice": [8, 16]}})  # searched in the flags' layer
    point = '[{"lora_r": 4}]'
    a = _args("--points_to_evaluate", point, "--search_space", batch_sizes, "--per_device_train_batch_size", "8")
    space, _ = search.build_param_space(a.tune, a.model, a.train)
    points = search.starting_points(a.tune, space, a.model, a.train)
    # The point leaves learning_rate and batch size out: they come from the flags (learning_rate's default 5e-4).
    assert points == [{"learning_rate": 5e-4, "per_device_train_batch_size": 8, "lora_r": 4}]
    limited = search.build_searcher(a.tune, space, points, max_concurrent=2).searcher
    assert isinstance(limited, ConcurrencyLimiter) and isinstance(limited.searcher, OptunaSearch)
    assert limited.max_concurrent == 2
    random = search.build_searcher(_args("--searcher", "random").tune, space, points, max_concurrent=2)
    assert isinstance(random, BasicVariantGenerator)  # learning rate from a range: repeats are improbable
    # Random search over choices only draws without replacement, as scikit-learn's ParameterSampler does.
    drawn = _args("--searcher", "random", "--search_space", '{"learning_rate": null}', "--num_samples", "9")
    choices, param_space = search.build_param_space(drawn.tune, drawn.model, drawn.train)
    assert search.num_samples(drawn.tune, choices) == 4 and "holds 4 configurations" in search.fewer_trials_note(
        drawn.tune, choices
    )
    searcher = search.build_searcher(drawn.tune, choices, [], max_concurrent=4).searcher
    searcher.set_search_properties("accuracy", "max", param_space)
    drawn_configs = sorted((c["lora_r"], c["per_device_train_batch_size"]) for c in map(searcher.suggest, "0123"))
    assert drawn_configs == [(2, 8), (2, 16), (4, 8), (4, 16)]
    # A whole-number range is finite too: TPE over 2 x 2 x 3 configurations (lora_alpha 8, 9 or 10) tries each once.
    ints = _args("--search_space", '{"learning_rate": null, "lora_alpha": {"uniform": [8, 10]}}', "--num_samples", "20")
    finite, param_space = search.build_param_space(ints.tune, ints.model, ints.train)
    assert configurations(finite) == search.num_samples(ints.tune, finite) == 12
    one = _args(
        "--search_space", '{"learning_rate": null, "lora_r": null, "per_device_train_batch_size": {"grid": [8]}}'
    )
    single, _ = search.build_param_space(one.tune, one.model, one.train)
    assert search.fewer_trials_note(one.tune, single).startswith(
        "The search space holds 1 configuration: running 1 trial,"
    )
    searcher = search.build_searcher(ints.tune, finite, [], max_concurrent=12).searcher
    searcher.set_search_properties("accuracy", "max", param_space)
    configs = [searcher.suggest(str(i)) for i in range(12)]
    assert len({tuple(sorted(c.items())) for c in configs}) == 12 and {c["lora_alpha"] for c in configs} == {8, 9, 10}
    scheduler = search.build_scheduler(a.tune, epochs=3)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler._max_t, scheduler._time_attr) == (3, "training_iteration")
    assert search.build_scheduler(_args("--scheduler", "none").tune, epochs=3) is None
    with pytest.raises(ConfigError, match="grace_period=3 exceeds the 2 epoch"):
        search.build_scheduler(_args("--grace_period", "3").tune, epochs=2)
    # Four evaluations an epoch: ASHA counts reports, its first rung a quarter of an epoch in.
    quarters = search.build_scheduler(_args("--grace_period", "0.25").tune, epochs=2, evals_per_epoch=4)
    assert (quarters._max_t, quarters._brackets[0]._rungs[-1][0]) == (8, 1)
    with pytest.raises(ConfigError, match=r"does not end at an evaluation.*multiple of 0\.25"):
        search.build_scheduler(_args("--grace_period", "0.3").tune, epochs=2, evals_per_epoch=4)
    with pytest.raises(ConfigError, match="does not end at an evaluation"):
        search.build_scheduler(_args("--grace_period", "0.5").tune, epochs=2)
    with pytest.raises(ConfigError, match="lies outside its search space"):
        search.starting_points(_args("--points_to_evaluate", '[{"lora_r": 64}]').tune, space, a.model, a.train)
    twice = _args("--points_to_evaluate", '[{"lora_r": 4}, {"lora_r": 4, "learning_rate": 5e-4}]').tune
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[1\] is points_to_evaluate\[0\] again"):
        search.starting_points(twice, space, a.model, a.train)
    with pytest.raises(ConfigError, match="which are not searched"):
        search.starting_points(_args("--points_to_evaluate", '[{"lora_alpha": 8}]').tune, space, a.model, a.train)
    epochs_searched = _args("--search_space", '{"num_train_epochs": {"choice": [2, 5]}}')
    space, _ = search.build_param_space(epochs_searched.tune, epochs_searched.model, epochs_searched.train)
    assert search.max_epochs(epochs_searched.tune, space, epochs_searched.train) == 5
    # --max_epochs above every trial's epochs: the budget is theirs, so a grace period past them is refused (ASHA
    # could never stop a trial), not planned against 8 epochs no trial runs.
    beyond = _args("--max_epochs", "8", "--grace_period", "3", "--num_train_epochs", "2")
    space, _ = search.build_param_space(beyond.tune, beyond.model, beyond.train)
    epochs = search.max_epochs(beyond.tune, space, beyond.train)
    assert epochs == 2 and search.max_epochs(_args("--max_epochs", "1").tune, space, beyond.train) == 1
    with pytest.raises(ConfigError, match="grace_period=3 exceeds the 2 epoch"):
        search.build_scheduler(beyond.tune, epochs)


def test_resource_plans() -> None:
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    packed = plan_resources(_args("--gpus_per_trial", "0.25").tune, [gpu_node])
    assert (packed.max_concurrent_trials, packed.trials_per_gpu) == (4, 4)
    assert "4 trials per GPU" in packed.describe()
    auto = plan_resources(_args().tune, [gpu_node, gpu_node])  # GPUs present: 0.25 GPU per trial by default
    assert (auto.gpus_per_trial, auto.max_concurrent_trials, auto.nodes) == (0.25, 8, 2)
    cpu = plan_resources(_args("--cpus_per_trial", "0.5").tune, [{"CPU": 2.0}])
    assert (cpu.gpus_per_trial, cpu.max_concurrent_trials) == (0.0, 4)
    with pytest.raises(ConfigError, match="max_concurrent_trials=3 needs 3 CPUs"):
        plan_resources(_args("--max_concurrent_trials", "3").tune, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="has no GPU"):
        plan_resources(_args("--gpus_per_trial", "1").tune, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="No node can hold one trial of 4 CPU"):
        plan_resources(_args("--cpus_per_trial", "4").tune, [{"CPU": 2.0}, {"CPU": 2.0}])


def test_autoscaling_resource_plans() -> None:
    """A KubeRay / `ray up` cluster whose GPU workers are at zero: the head alone is up, with no CPU for trials."""
    head = [{"CPU": 0.0}]
    unknown = Autoscaler("autoscaler node types gpu-group, headgroup")  # v1/v2 status: no ceiling published
    with pytest.raises(ConfigError, match="has no GPU"):  # a fixed cluster like this one is refused, as before
        plan_resources(_args("--gpus_per_trial", "0.25").tune, head)
    packed = plan_resources(_args("--gpus_per_trial", "0.25").tune, head, unknown)
    assert (packed.gpus_per_trial, packed.max_concurrent_trials, packed.autoscaler) == (0.25, None, unknown)
    assert (
        "now 1 node(s), 0 CPUs, 0 GPUs" in packed.describe() and "as the autoscaler adds nodes for" in packed.describe()
    )
    assert packed.resources_per_trial == {"cpu": 1.0, "gpu": 0.25}
    wanted = plan_resources(_args("--gpus_per_trial", "0.25", "--max_concurrent_trials", "16").tune, head, unknown)
    assert wanted.max_concurrent_trials == 16  # beyond what is up now: the autoscaler is asked for it
    with pytest.raises(ConfigError, match=r"does not publish which nodes.*--gpus_per_trial 0.25.*--gpus_per_trial 0"):
        plan_resources(_args().tune, head, unknown)  # automatic GPUs: the answer depends on nodes nobody lists
    assert plan_resources(_args().tune, [{"CPU": 8.0, "GPU": 1.0}], unknown).gpus_per_trial == 0.25  # GPUs up: use them

    ceiling = Autoscaler("the autoscaler's cluster config", {"CPU": 32.0, "GPU": 8.0})
    auto = plan_resources(_args().tune, head, ceiling)
    assert (auto.gpus_per_trial, auto.max_concurrent_trials) == (0.25, 32)  # 8 GPUs × 4, within 32 CPUs
    with pytest.raises(ConfigError, match="can reach at most 32 CPUs and 8 GPUs: 32 trial"):
        plan_resources(_args("--max_concurrent_trials", "40").tune, head, ceiling)
    cpu_only = Autoscaler("~/ray_bootstrap_config.yaml", {"CPU": 8.0})
    assert plan_resources(_args().tune, head, cpu_only).gpus_per_trial == 0.0
    with pytest.raises(ConfigError, match="not one trial of 1 CPU"):
        plan_resources(_args("--gpus_per_trial", "1").tune, head, cpu_only)


def test_autoscaler_evidence() -> None:
    """What Ray 2.60 publishes (status JSON shapes as its v1 monitor writes them), and launcher configs."""
    readonly_id = "7dde8c071abdd337c9283bb2bfd1bacec2a327648d5cedbb2a122a61"
    hand_started = {  # `ray start --head` / a local Ray: Ray's read-only provider invents one type per node
        "autoscaler_report": {
            "active_nodes": {f"node_{readonly_id}": 1},
            "pending_nodes": [],
            "pending_launches": {},
            "node_type_mapping": {readonly_id: f"node_{readonly_id}"},
        }
    }
    assert configured_node_types(hand_started, [f"node_{readonly_id}"]) == []
    autoscaled = {
        "autoscaler_report": {
            "active_nodes": {"headgroup": 1},
            "pending_nodes": [["10.0.0.7", "gpu-group", "setting-up"]],
            "pending_launches": {"gpu-group": 1},
            "node_type_mapping": {"10.0.0.5": "headgroup"},
        }
    }
    assert configured_node_types(autoscaled) == ["gpu-group", "headgroup"]
    assert configured_node_types(None, ["ray.head.default", ""]) == ["ray.head.default"]  # v2: labelled node types

    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "max_workers": 0},
            "a10g": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 8},
            "a100x8": {"resources": {"CPU": 96, "GPU": 8}, "min_workers": 0, "max_workers": 1},
        },
    }
    # At most 3 workers: the head's 4 CPUs plus the A100 node and two A10G nodes, per resource.
    assert launcher_max_resources(config) == {"CPU": 4 + 96 + 4 + 4, "GPU": 8 + 1 + 1}
    aws = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml").read_text())
    plan = plan_resources(_args().tune, [{"CPU": 0.0}], Autoscaler("aws.yaml", launcher_max_resources(aws)))
    assert plan.gpus_per_trial == 0.25 and plan.max_concurrent_trials >= 8  # the repo's launcher config: GPU workers


# ---------------------------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray (2 CPUs, several processes) for this module's searches."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_search(local_ray, tmp_path_factory: pytest.TempPathFactory):
    """6 trials, 3 epochs, ASHA (rungs at epochs 1 and 2) + Optuna TPE, on validation loss (it always differs)."""
    storage = tmp_path_factory.mktemp("tune")
    argv = ["--num_samples", "6", "--num_train_epochs", "3", "--metric", "loss", "--mode", "min"]
    args = _args(*argv, "--storage_path", str(storage), "--name", "e2e", "--verbose", "0")
    return run_search(args, *experiment_location(args)), storage


@pytest.mark.ray
def test_asha_optuna_search_end_to_end(tiny_search) -> None:
    outcome, storage = tiny_search
    results = outcome.results
    assert len(results) == 6 and results.errors == []
    assert outcome.epochs == 3
    iterations = []
    for result in results:
        frame = result.metrics_dataframe
        # one report per epoch, numbered 1..n, each with the validation metrics and a checkpoint
        assert frame["training_iteration"].tolist() == list(range(1, len(frame) + 1))
        assert frame["epoch"].tolist() == [float(i) for i in range(1, len(frame) + 1)]
        assert {"loss", "accuracy", "f1_macro", "train_loss"} <= set(frame.columns)
        assert frame["checkpoint_dir_name"].notna().all()
        assert set(frame["node_id"]) == {ray.get_runtime_context().get_node_id()}  # the local Ray's one node
        iterations.append(len(frame))
    assert max(iterations) == 3
    assert min(iterations) < 3, f"ASHA stopped no trial early: {iterations}"

    best = results.get_best_result("loss", "min", scope="all")
    checkpoint = best.get_best_checkpoint("loss", "min")
    folder = Path(checkpoint.path)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5_000_000  # the adapter and small state, not a model
    predictions = Predictor.from_dir(folder).predict(["I love it, works great.", "Broke after a day."])
    assert len(predictions) == 2

    experiment = storage / "e2e"
    assert outcome.experiment_path == str(experiment)
    assert (storage / "latest").resolve() == experiment.resolve()
    saved = json.loads((experiment / METADATA_FILE).read_text())
    assert saved["tune"]["num_samples"] == 6 and saved["model"]["model_name_or_path"] == "tiny:distilbert"
    assert saved["tune"]["gpus_per_trial"] is None and saved["resources"] == {"cpu": 1.0, "gpu": 0.0}  # as resolved
    assert list(experiment.glob("*/events.out.tfevents.*")), "no TensorBoard logs"
    assert tune.Tuner.can_restore(str(experiment))


@pytest.mark.ray
def test_a_search_stopped_as_its_tuner_starts_leaves_no_experiment_and_latest_as_it_was(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C once the record is written, as Ray's Tuner starts (Tune's own handler is not in place yet): nothing of
    the new search stays, and `latest` still names the experiment it named, which a --resume of it continues."""
    (tmp_path / "older").mkdir()
    (tmp_path / "latest").symlink_to("older", target_is_directory=True)

    class InterruptedTuner(tune.Tuner):
        def __init__(self, *args, **kwargs) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune, "Tuner", InterruptedTuner)
    args = _args("--storage_path", str(tmp_path), "--name", "stopped", "--verbose", "0")
    with pytest.raises(KeyboardInterrupt):
        run_search(args, *experiment_location(args))
    assert os.readlink(tmp_path / "latest") == "older" and not (tmp_path / "stopped").exists()


@pytest.mark.ray
def test_a_local_ray_has_no_autoscaler(local_ray) -> None:
    """Ray's monitor runs here too, with its read-only provider: its published status must not look autoscaled."""
    from ray.experimental.internal_kv import _internal_kv_get

    status: dict = {}
    # The monitor publishes its first status about a second after start (later on a loaded machine), and a status
    # without its autoscaler report before that.
    for _ in range(300):
        status = json.loads(_internal_kv_get("__autoscaling_status") or "{}")
        if "autoscaler_report" in status:
            break
        time.sleep(0.1)
    assert status["autoscaler_report"]["node_type_mapping"]
    assert find_autoscaler() is None


@pytest.mark.ray
def test_diverging_trial_is_a_bad_result_not_an_error(local_ray, tmp_path: Path) -> None:
    space = json.dumps({"learning_rate": {"grid": [1e30, 1e-3]}, "lora_r": None, "per_device_train_batch_size": None})
    args = _args(
        *("--searcher", "grid", "--scheduler", "none", "--search_space", space, "--num_train_epochs", "2"),
        *("--metric", "loss", "--mode", "min", "--storage_path", str(tmp_path), "--name", "nan", "--verbose", "0"),
    )
    results = run_search(args, *experiment_location(args)).results
    assert len(results) == 2 and results.errors == []
    by_lr = {r.config["learning_rate"]: r for r in results}
    diverged = by_lr[1e30].metrics_dataframe
    assert len(diverged) == 1 and diverged["diverged"].tolist() == [1.0]
    assert diverged["loss"].tolist() == [math.inf]  # the worst value under mode=min: never picked as best
    assert by_lr[1e-3].metrics_dataframe["diverged"].tolist() == [0.0, 0.0]
    assert results.get_best_result(scope="all").config["learning_rate"] == 1e-3


@pytest.mark.ray
def test_relative_paths_reach_every_trial(local_ray, tmp_path: Path, monkeypatch, write_data, capsys) -> None:
    """Ray runs each trial in its own folder: a relative --dataset must still name the user's file there, and a
    relative $LORASENT_CACHE the cache the driver tokenised into. The search says how many rows of the file each split
    holds, and which limits cut them (the preset's subsets were silent)."""
    words = {0: ["broke at once", "waste of money"], 1: ["works great", "love it"]}
    write_data([{"text": f"{words[i % 2][i % 3 % 2]} #{i}", "label": i % 2} for i in range(300)], "reviews.csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORASENT_CACHE", "relcache")
    argv = ["--dataset", "reviews.csv", "--num_samples", "1", "--num_train_epochs", "1", "--scheduler", "none"]
    args = _args(*argv, "--storage_path", "runs", "--name", "relative", "--verbose", "0")
    results = run_search(args, *experiment_location(args)).results
    assert len(results) == 1 and results.errors == []
    saved = json.loads((tmp_path / "runs" / "relative" / METADATA_FILE).read_text())
    assert saved["data"]["dataset"] == str(tmp_path / "reviews.csv")
    # The environment a Ray started by the search (as `python tune/run.py` starts one) hands its trials; this
    # module's Ray started before the variable was set, so its trials never see it.
    assert os.environ["LORASENT_CACHE"] == str(tmp_path / "relcache")
    assert any((tmp_path / "relcache" / "tokenized").iterdir())  # the driver's tokenised splits
    data = f"Data: 64 train / 32 validation / 32 test rows of {tmp_path / 'reviews.csv'} (--max_train_samples 64,"
    assert data in capsys.readouterr().out


@pytest.mark.ray
def test_summary_counts_a_trial_that_ran_its_epochs_as_finished(local_ray, tmp_path: Path, capsys) -> None:
    """Neither --max_epochs nor a trial's own (searched) epochs make a trial that ran them all 'stopped early'."""
    space = {"num_train_epochs": {"grid": [1, 3]}, "learning_rate": None, "lora_r": None}
    space["per_device_train_batch_size"] = None
    argv = ["--searcher", "grid", "--scheduler", "none", "--search_space", json.dumps(space), "--max_epochs", "2"]
    args = _args(*argv, "--storage_path", str(tmp_path), "--name", "epochs", "--verbose", "0")
    outcome = run_search(args, *experiment_location(args))
    assert sorted(len(r.metrics_dataframe) for r in outcome.results) == [1, 2]
    capsys.readouterr()
    assert _summary(outcome, args, 0.0) == 0
    assert "2 trials, 0 stopped early, 0 diverged, 0 errored" in capsys.readouterr().out


@pytest.mark.ray
def test_optuna_runs_each_configuration_of_a_space_of_choices_once(local_ray, tmp_path: Path, capsys) -> None:
    """Over 2 x 2 choices, --num_samples 6 runs the 4 configurations once each (TPE alone repeats them: the same
    training seed, the same model again), says so, and records the 4 trials it plans, which the same command line
    resumes."""
    from analysis.results import load_experiment, unfinished_note

    argv = ["--search_space", '{"learning_rate": null}', "--num_samples", "6", "--scheduler", "none"]
    argv += ["--num_train_epochs", "1", "--storage_path", str(tmp_path), "--name", "choices"]
    args = _args(*argv, "--verbose", "0")
    outcome = run_search(args, *experiment_location(args))
    assert "The search space holds 4 configurations: running 4 trials, not --num_samples 6" in capsys.readouterr().out
    configs = sorted((r.config["lora_r"], r.config["per_device_train_batch_size"]) for r in outcome.results)
    assert configs == [(2, 8), (2, 16), (4, 8), (4, 16)] and outcome.results.errors == []
    assert outcome.expected_trials == 4
    assert _summary(outcome, args, 0.0) == 0 and "interrupted" not in capsys.readouterr().out
    assert unfinished_note(load_experiment(Path(outcome.experiment_path))) == ""
    # The first command line, given again to --resume, runs the same 4 trials; one that would run 3 is refused
    assert _args(*argv, "--resume", outcome.experiment_path).tune.num_samples == 4
    with pytest.raises(ConfigError, match=r"cannot change: \['num_samples'\]"):
        _args(*argv, "--resume", outcome.experiment_path, "--num_samples", "3")


@pytest.mark.ray
def test_random_search_counts_a_point_as_one_of_its_grid_samples(local_ray, tmp_path: Path, capsys) -> None:
    """Ray's random search runs a point in a sample's place, as one trial (it sets the grid parameter), and walks
    the grid in each other sample: 1 + (2 - 1) x 2 = 3 trials. Counted as 2 x 2, the finished search was reported
    interrupted (exit 130), and its resume could never finish it."""
    space = '{"lora_r": {"grid": [2, 4]}, "learning_rate": null, "per_device_train_batch_size": null}'
    argv = ["--searcher", "random", "--search_space", space, "--num_samples", "2", "--scheduler", "none"]
    argv += ["--points_to_evaluate", '[{"lora_r": 2}]', "--num_train_epochs", "1"]
    args = _args(*argv, "--storage_path", str(tmp_path), "--name", "grid-point", "--verbose", "0")
    outcome = run_search(args, *experiment_location(args))
    assert sorted(r.config["lora_r"] for r in outcome.results) == [2, 2, 4] and outcome.results.errors == []
    assert outcome.expected_trials == 3
    assert _summary(outcome, args, 0.0) == 0 and "interrupted" not in capsys.readouterr().out
    more = _args("--points_to_evaluate", '[{"lora_r": 2}, {"lora_r": 4}]', "--num_samples", "1")
    space_of_more, _ = search.build_param_space(more.tune, more.model, more.train)
    with pytest.raises(ConfigError, match=r"holds 2 points, but the search runs 1 trial.* at least 2"):
        search.starting_points(more.tune, space_of_more, more.model, more.train)


@pytest.mark.ray
def test_asha_stops_trials_within_an_epoch(local_ray, tmp_path: Path, capsys) -> None:
    """Two evaluations an epoch and a grace period of half an epoch: ASHA's first rung comes half an epoch in, the
    analysis reads fractional epochs, and retrain-best rounds a mid-epoch best up to whole epochs."""
    from analysis.results import compute_spent, load_experiment
    from analysis.retrain import PROVENANCE_FILE, retrain_best

    argv = ["--num_samples", "6", "--num_train_epochs", "2", "--evals_per_epoch", "2", "--grace_period", "0.5"]
    argv += ["--metric", "loss", "--mode", "min", "--storage_path", str(tmp_path), "--name", "halves"]
    args = _args(*argv, "--verbose", "0")
    outcome = run_search(args, *experiment_location(args))
    assert len(outcome.results) == 6 and outcome.results.errors == []
    reported = [r.metrics_dataframe["epoch"].tolist() for r in outcome.results]
    assert all(epochs == [0.5, 1.0, 1.5, 2.0][: len(epochs)] for epochs in reported), reported
    # ASHA's rungs come 1 and 2 reports in (0.5 and 1 epoch), and its budget is 4 reports: the first trial at each
    # rung goes on, so one trains both epochs; the others stop at a rung or at the end.
    assert {len(epochs) for epochs in reported} <= {1, 2, 4} and max(map(len, reported)) == 4, reported
    assert min(map(len, reported)) < 4, f"ASHA stopped no trial: {reported}"
    capsys.readouterr()
    assert _summary(outcome, args, 0.0) == 0
    stopped = sum(len(epochs) < 4 for epochs in reported)
    assert f"6 trials, {stopped} stopped early" in capsys.readouterr().out

    exp = load_experiment(Path(outcome.experiment_path))
    assert sorted(exp.trials["epochs"]) == sorted(epochs[-1] for epochs in reported)
    assert exp.trials["early_stopped"].sum() == stopped
    assert compute_spent(exp).loc["this search", "trial_epochs"] == pytest.approx(sum(e[-1] for e in reported))
    final = json.loads((retrain_best(exp.path) / PROVENANCE_FILE).read_text())
    assert final["epochs"] == exp.best_epoch and f"for {math.ceil(exp.best_epoch)} epoch(s)" in final["method"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_trial_that_reserved_a_gpu_and_sees_none_fails_at_once() -> None:
    with pytest.raises(RuntimeError, match=r"reserved 0.25 GPU but torch sees none.*--gpus_per_trial 0"):
        require_gpu(0.25)
    require_gpu(0)  # a CPU trial never asks


def test_work_folders_of_dead_trial_processes_are_swept(tmp_path: Path) -> None:
    """A SIGKILLed worker leaves its `<pid>-<random>` folder; the next trial on the machine removes it."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = tmp_path / f"{ended.stdout.strip()}-abc", tmp_path / f"{os.getpid()}-def"
    for folder in (dead, alive, tmp_path / "not-a-pid"):
        (folder / "checkpoint-1").mkdir(parents=True)
    assert sweep_abandoned_work_dirs(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "not-a-pid"])


@pytest.mark.ray
def test_the_seed_workload_runs_from_a_warm_hub_cache_offline(
    hub_cache, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`python tune/run.py --preset seed` (distilbert-base-uncased on amazon_polarity) as air-gapped nodes run it: both
    only in the Hugging Face cache, HF_HUB_OFFLINE=1. The trials, processes of their own, find the model there too,
    LoRA goes on the preset's q_lin, and every checkpoint names its base by the hub name, not this machine's cache."""
    hub_cache("model", "distilbert-base-uncased", distilbert_repo(tiny_model_dir))
    hub_cache("dataset", "amazon_polarity", amazon_polarity_repo())
    monkeypatch.setenv("LORASENT_CACHE", str(tmp_path / "cache"))
    sizes = ["--max_train_samples", "64", "--max_eval_samples", "16", "--max_test_samples", "16", "--max_length", "32"]
    argv = ["--preset", "seed", "--num_samples", "1", "--num_train_epochs", "1", "--grace_period", "1", *sizes]
    log = tmp_path / "search.log"
    search_to_end([*argv, "--storage_path", str(tmp_path / "runs"), "--name", "hub"], tmp_path, log, timeout=400)
    (checkpoint,) = (tmp_path / "runs" / "hub").glob("train_trial_*/checkpoint_000000")
    adapter = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "distilbert-base-uncased" and adapter["target_modules"] == ["q_lin"]
    assert (
        json.loads((checkpoint / "lorasent.json").read_text())["model"]["model_name_or_path"]
        == adapter["base_model_name_or_path"]
    )
