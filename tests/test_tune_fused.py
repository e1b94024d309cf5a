"""`--fused_trials` on a real local Ray (2 CPUs): trial engines that train several trials on one shared base, the
search end to end through them (ASHA + Optuna, checkpoints, analysis), a diverging trial, an engine that dies and
comes back, and the refusals that come before any trial starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch
from conftest import search_to_end
from safetensors.torch import load

from analysis.results import load_experiment, trial_table
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments, to_dict
from lorasent.errors import ConfigError
from lorasent.fused import FUSED_STATE
from lorasent.model import check_model_dir
from lorasent.predict import Predictor
from tune import engine as engine_module
from tune.cluster import MAX_SHARED_TRIALS_PER_GPU, ResourcePlan
from tune.config import METADATA_FILE, parse_args
from tune.engine import TRIAL_CPUS, EngineLayout, folder_files, start_engines, write_files
from tune.run import experiment_location, run_search

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

DATA = DataArguments(max_train_samples=48, max_eval_samples=32, max_test_samples=32, max_length=32)
MODEL = ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4)


def _args(*argv: str):
    return parse_args(["--smoke-test", "--fused_trials", *argv])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_an_engine_trains_trials_side_by_side_and_keeps_no_state(local_ray, tmp_path: Path) -> None:
    """Two trials' epochs at once on one engine; each next epoch starts from the files the last one returned, also
    after the engine was killed and restarted."""
    # As on a GPU machine whose user asked for CPU trials (--gpus_per_trial 0): one engine, on the CPUs
    cpus = ResourcePlan(nodes=1, cpus=2, gpus=1, cpus_per_trial=1, gpus_per_trial=0, max_concurrent_trials=2)
    plan = start_engines(DATA, MODEL, TrainArguments(), cpus)
    assert plan.trials_at_once == 4 and plan.resources_per_trial == {"cpu": TRIAL_CPUS, "gpu": 0.0}
    assert plan.describe().startswith("Fused trials: 1 engine(s) on the CPUs")
    (engine,) = plan.engines
    model = to_dict(MODEL)
    configs = {
        "a": to_dict(TrainArguments(per_device_train_batch_size=8, num_train_epochs=2)),
        "b": to_dict(TrainArguments(per_device_train_batch_size=4, learning_rate=1e-3, num_train_epochs=2)),
    }
    calls = [engine.run_epoch.remote(key, model, config, None) for key, config in configs.items()]
    first = dict(zip(configs, ray.get(calls), strict=True))
    for key, (metrics, files) in first.items():
        assert metrics["epoch"] == 1.0 and metrics["diverged"] == 0.0
        assert {"accuracy", "f1_macro", "loss", "train_loss", "train_seconds", "eval_seconds"} <= set(metrics)
        assert 0 < metrics["real_token_share"] <= 1
        folder = write_files(files, tmp_path / key)
        assert check_model_dir(folder)["metrics"]["epoch"] == 1.0
        Predictor.from_dir(folder).predict(["works great"])
    # batch 8 has 6 steps an epoch, batch 4 has 12: b joined a within a step or two of it and stepped with it
    assert 1 < first["a"][0]["trials_per_step"] <= 2 and 1 < first["b"][0]["trials_per_step"] <= 1.5

    ray.kill(engine, no_restart=False)  # as if killed for memory: it restarts and loads its base again
    metrics, files = ray.get(engine.run_epoch.remote("a", model, configs["a"], first["a"][1]), timeout=300)
    assert metrics["epoch"] == 2.0
    history = json.loads(files["lorasent.json"])["history"]
    assert [h["epoch"] for h in history] == [1.0, 2.0]

    with pytest.raises(ray.exceptions.RayTaskError, match="cannot search target_modules"):
        other_targets = to_dict(ModelArguments(model_name_or_path=TINY_MODEL, target_modules="all-linear"))
        ray.get(engine.run_epoch.remote("c", other_targets, configs["a"], None))
    with pytest.raises(ray.exceptions.RayTaskError, match="not a plain file name"):
        ray.get(engine.run_epoch.remote("d", model, configs["a"], {"../escape": b""}))
    plan.shutdown()


def test_an_engine_out_of_gpu_memory_steps_fewer_trials_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU that holds 16 training rows a step and 8 rows an evaluation pass (the out-of-memory error is raised by a
    hook: a real one needs a GPU). Four trials of batch 8 still train every batch of their epoch, two per step from the
    first failure on, and are evaluated 8 rows at a time; a trial of batch 24 does not fit alone and fails, saying
    what to lower. The engine runs in this process, as in its actor."""
    threads = torch.get_num_threads()
    engine = engine_module.TrialEngine(to_dict(DATA), to_dict(MODEL), to_dict(TrainArguments()), threads)
    assert engine.shared is None  # an engine loads nothing but modules until asked: the splits may not be cached yet
    assert engine.prepare() == "cpu (4 LoRA layers, fp32)" and engine.prepare() == "cpu (4 LoRA layers, fp32)"
    failures = []

    def small_gpu(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows = kwargs["input_ids"].shape[0]
        if rows > (16 if module.training else 8):
            failures.append((module.training, rows))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    engine.shared.model.register_forward_pre_hook(small_gpu, with_kwargs=True)
    model, batch_8 = to_dict(MODEL), to_dict(TrainArguments(per_device_train_batch_size=8))
    with ThreadPoolExecutor(4) as pool:  # four trials asking for an epoch at once, as four Tune trials do
        epochs = pool.map(lambda key: engine.run_epoch(key, model, batch_8, None), "abcd")
        results = dict(zip("abcd", epochs, strict=True))
    assert {training for training, _ in failures} == {True, False}
    assert engine.max_trials_per_step == 2 and engine.shared.eval_rows == 8
    log = capsys.readouterr().err
    assert "out of GPU memory stepping" in log and "at most 8 rows per evaluation pass" in log
    for metrics, files in results.values():
        assert metrics["epoch"] == 1.0 and metrics["trials_per_step"] <= 2 and math.isfinite(metrics["loss"])
        assert int(load(files[FUSED_STATE])["step"]) == 6, "every one of the epoch's 6 batches, once"

    with pytest.raises(RuntimeError, match=r"ran out of memory in a step of this trial alone\. Lower per_device_train"):
        engine.run_epoch("e", model, to_dict(TrainArguments(per_device_train_batch_size=24)), None)
    metrics, _ = engine.run_epoch("a", model, batch_8, results["a"][1])  # the engine goes on
    assert metrics["epoch"] == 2.0


def test_engines_that_cannot_start_are_an_error_not_a_wait(local_ray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that counts a GPU this Ray does not have: the engine can never be placed."""
    monkeypatch.setattr(engine_module, "ENGINE_START_S", 3)
    gpu = ResourcePlan(nodes=1, cpus=2, gpus=1, cpus_per_trial=1, gpus_per_trial=0.5, max_concurrent_trials=2)
    with pytest.raises(ConfigError, match="did not start within 3 s: the cluster has no free GPU"):
        start_engines(DATA, MODEL, TrainArguments(), gpu)


def test_a_trial_process_imports_neither_torch_nor_transformers() -> None:
    """Fused trial processes only wait on their engine; each starts at the search's start, so what they import is
    paid before the first trial can ask for an epoch (transformers' argument parser alone: ~0.5 s per process)."""
    code = "import sys, tune.engine; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_engines_started_before_the_plan_are_kept_when_they_fit_it() -> None:
    """A local search starts its engines with its Ray, before the plan: as the plan would, or it starts new ones."""
    cpu = EngineLayout.of(0, 2, None, None)
    assert (cpu.count, cpu.options, cpu.threads, cpu.trials_at_once) == (1, (("num_cpus", 1.0),), 2, 4)
    assert cpu.serves(EngineLayout.of(0, 2, None, 3)) and not cpu.serves(EngineLayout.of(0, 2, None, 5))
    gpus = EngineLayout.of(2, 16, None, None)  # the most that can share a GPU while the plan is not known
    assert (gpus.count, gpus.trials_at_once) == (2, 2 * MAX_SHARED_TRIALS_PER_GPU)
    assert dict(gpus.options) == {"num_gpus": 1, "num_cpus": 1}
    assert gpus.serves(EngineLayout.of(2, 16, 6, None))  # 6 per GPU fit in memory
    assert gpus.serves(EngineLayout.of(2, 16, MAX_SHARED_TRIALS_PER_GPU, None))
    assert not gpus.serves(EngineLayout.of(1, 16, 6, None)) and not gpus.serves(EngineLayout.of(0, 16, None, None))


def test_fused_search_end_to_end(local_ray, tmp_path: Path) -> None:
    argv = ["--num_samples", "4", "--num_train_epochs", "3", "--metric", "loss", "--mode", "min"]
    args = _args(*argv, "--storage_path", str(tmp_path), "--name", "fused", "--verbose", "0")
    outcome = run_search(args, *experiment_location(args))
    results = outcome.results
    assert len(results) == 4 and results.errors == []
    shared = []
    for result in results:
        frame = result.metrics_dataframe
        assert frame["training_iteration"].tolist() == list(range(1, len(frame) + 1))
        assert frame["epoch"].tolist() == [float(i) for i in range(1, len(frame) + 1)]
        assert frame["checkpoint_dir_name"].notna().all()
        shared += frame["trials_per_step"].tolist()
    assert max(shared) > 1, "no two trials ever shared a step"
    saved = json.loads((tmp_path / "fused" / METADATA_FILE).read_text())
    assert saved["tune"]["fused_trials"] is True and saved["resources"] == {"cpu": TRIAL_CPUS, "gpu": 0.0}

    exp = load_experiment(tmp_path / "fused")
    assert exp.best_checkpoint is not None
    packed = trial_table(exp).set_index("trial_id")["trials_per_step"]  # each trial's mean over its epochs
    for result in results:
        trial, frame = result.metrics["trial_id"], result.metrics_dataframe
        assert packed[trial] == pytest.approx(frame["trials_per_step"].mean())
    assert Predictor.from_dir(exp.best_checkpoint).predict(["I love it", "Broke after a day"])
    assert len(folder_files(exp.best_checkpoint)) >= 5  # adapter, its config, tokenizer, lorasent.json, state


def test_a_diverging_fused_trial_is_a_bad_result_not_an_error(local_ray, tmp_path: Path) -> None:
    space = json.dumps({"learning_rate": {"grid": [1e30, 1e-3]}, "lora_r": None, "per_device_train_batch_size": None})
    args = _args(
        *("--searcher", "grid", "--scheduler", "none", "--search_space", space, "--num_train_epochs", "2"),
        *("--metric", "loss", "--mode", "min", "--storage_path", str(tmp_path), "--name", "nan", "--verbose", "0"),
    )
    results = run_search(args, *experiment_location(args)).results
    assert len(results) == 2 and results.errors == []
    by_lr = {r.config["learning_rate"]: r.metrics_dataframe for r in results}
    assert by_lr[1e30]["diverged"].tolist() == [1.0] and by_lr[1e30]["loss"].tolist() == [math.inf]
    assert by_lr[1e-3]["diverged"].tolist() == [0.0, 0.0]
    assert all(math.isfinite(x) for x in by_lr[1e-3]["loss"])  # its rows shared steps with the diverging ones


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--search_space", '{"target_modules": {"choice": ["auto", "attention"]}}'], "cannot search target_modules"),
        (["--precision", "fp16"], "not fp16"),
        (["--torch_compile"], "torch_compile does not apply"),
        (["--evals_per_epoch", "2"], "evaluate once an epoch"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], "not a function of the step"),
        # the `full` preset's quarter-epoch rungs: each refusal names all the fix, never the other's undoing
        (["--evals_per_epoch", "2", "--grace_period", "0.25"], r"--evals_per_epoch 1 \(and a --grace_period of whole"),
        (["--grace_period", "0.25"], r"Use a multiple of 1 \(trials that share a base model evaluate once an epoch\)"),
    ],
)
def test_what_shared_trials_cannot_do_is_refused_before_anything_loads(argv: list[str], message: str, tmp_path) -> None:
    args = _args(*argv, "--storage_path", str(tmp_path), "--name", "refused")
    with pytest.raises(ConfigError, match=message):
        run_search(args, *experiment_location(args))
    assert not (tmp_path / "refused").exists()


def test_a_search_on_one_cpu_leaves_its_trials_room(tmp_path: Path) -> None:
    """`python tune/run.py --fused_trials --num_cpus 1` (a one-CPU container): an engine that took the one CPU left
    the trial processes none, and they stayed PENDING forever."""
    argv = ["--smoke-test", "--fused_trials", "--num_cpus", "1", "--num_samples", "2", "--num_train_epochs", "1"]
    log = tmp_path / "search.log"
    output = search_to_end([*argv, "--storage_path", str(tmp_path / "runs"), "--name", "one"], tmp_path, log, 300)
    assert "2 trials, 0 stopped early, 0 diverged, 0 errored" in output


def test_a_trial_reads_its_epochs_from_the_checkpoint_and_leaves_damage_to_the_engine() -> None:
    """A trial restored after its last epoch trains nothing more; a damaged lorasent.json is the engine's to name."""
    done = {"lorasent.json": json.dumps({"metrics": {"epoch": 3.0}}).encode()}
    assert engine_module._epochs_done(done) == 3.0
    for damaged in ({}, {"lorasent.json": b"\xff not json"}, {"lorasent.json": b"{}"}, {"lorasent.json": b"[]"}):
        assert engine_module._epochs_done(damaged) == 0.0
