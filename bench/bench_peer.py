"""lorasent's search against transformers' own `Trainer.hyperparameter_search(backend="ray")`, on the same work.

Both search the quick-start's space (tune/presets/quickstart.yaml: all-MiniLM-L6-v2 with LoRA on `query`/`value`,
600 training and 300 validation VADER sentences at max_length 64; learning rate x batch size x LoRA rank; 8 trials
of up to 3 epochs under ASHA, grace 1 and reduction factor 2; Optuna's TPE; 1 CPU a trial, Ray started locally), each
as a fresh process, and this prints for each: the wall time of the whole process (imports, data, Ray start-up and
shutdown included), the trial-epochs run, the best validation accuracy of any trial-epoch, and the bytes the search
left on disk (Tune's experiment folder; for the peer also the `Trainer`'s own `output_dir`).

The peer is written the way its documentation shows: a `Trainer` with `model_init` (here building the peft model, the
rank from the trial), `eval_strategy`/`save_strategy` "epoch", `compute_objective` = validation accuracy, data
tokenised with `datasets.map` and padded by `DataCollatorWithPadding`.

    python bench/bench_peer.py                    # both, ~5 min on 2 CPU cores
    python bench/bench_peer.py --smoke            # the smoke-test sizes (tiny random DistilBERT): seconds a search
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data import REPO, Results, add_common_args, section, workspace


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_child(command: list[str], timeout: float) -> tuple[float, str]:
    """A fresh process's wall time and output; an error if it failed."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, text=True, capture_output=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command[1]} exited {done.returncode} after {wall:.0f} s:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def epoch_results(experiment: Path, metric: str) -> list[float]:
    """`metric` of every trial-epoch reported in a Tune experiment folder (its trials' result.json lines)."""
    values = []
    for results in experiment.rglob("result.json"):
        for line in results.read_text().splitlines():
            if line.strip() and metric in (row := json.loads(line)):
                values.append(float(row[metric]))
    return values


def lorasent_search(out: Path, args: argparse.Namespace, results: Results) -> None:
    storage = out / "lorasent"
    command = [sys.executable, "tune/run.py", "--storage_path", str(storage), "--name", "search"]
    command += ["--include_dashboard", "false"] + (["--smoke-test"] if args.smoke else [])
    wall, output = run_child(command, args.timeout)
    accuracies = epoch_results(storage / "search", "accuracy")
    add_rows(results, "lorasent (python tune/run.py)", wall, accuracies, {"experiment": folder_bytes(storage)})
    finished = re.search(r"Search finished in (\d+) s", output)
    results.extra["lorasent"] = {"wall_s": wall, "search_s": float(finished.group(1)) if finished else None}


def peer_search(out: Path, args: argparse.Namespace, results: Results) -> None:
    command = [sys.executable, "bench/bench_peer.py", "--child", str(out / "peer")] + (
        ["--smoke"] if args.smoke else []
    )
    wall, output = run_child(command, args.timeout)
    summary = json.loads(output.strip().splitlines()[-1])
    accuracies = epoch_results(out / "peer" / "ray", "eval_accuracy")
    places = {"experiment": folder_bytes(out / "peer" / "ray"), "Trainer output_dir": folder_bytes(out / "peer" / "hf")}
    add_rows(results, "transformers Trainer.hyperparameter_search(backend='ray')", wall, accuracies, places)
    results.extra["peer"] = {"wall_s": wall, **summary}


def add_rows(results: Results, who: str, wall: float, accuracies: list[float], places: dict[str, int]) -> None:
    written = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in places.items())
    results.add(f"{who}: whole process", wall, "s", f"{len(accuracies)} trial-epochs")
    results.add(f"{who}: best validation accuracy", max(accuracies, default=float("nan")), "", "any trial-epoch")
    results.add(f"{who}: bytes left on disk", sum(places.values()) / 1e6, "MB", written)


def peer_child(out: Path, smoke: bool) -> None:
    """The peer search, in this process: what a transformers user writes for the preset's search (the same data,
    model, LoRA settings, space, trials, epochs, ASHA and Optuna seed as lorasent's run of that preset)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    from seed import seed_splits
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lorasent.config import ModelArguments, read_yaml
    from lorasent.metrics import metrics_fn
    from lorasent.model import build_model
    from tune.config import TuneArguments, preset_path

    preset = read_yaml(preset_path("smoke" if smoke else "quickstart"))
    splits, tokenizer, label_names = seed_splits(
        preset["dataset"],
        preset["model_name_or_path"],
        train=preset["max_train_samples"],
        eval_=preset["max_eval_samples"],
        pad_to=None,
        max_length=preset["max_length"],
    )
    samplers = {"loguniform": lambda bounds: tune.loguniform(*bounds), "choice": tune.choice}
    space = {
        name: samplers[kind](values) for name, spec in preset["search_space"].items() for kind, values in spec.items()
    }

    def model_init(trial: dict[str, Any] | None) -> Any:
        rank = trial["lora_r"] if trial else ModelArguments.lora_r
        return build_model(ModelArguments(model_name_or_path=preset["model_name_or_path"], lora_r=rank), label_names)

    epochs = preset["num_train_epochs"]
    training = TrainingArguments(
        output_dir=str(out / "hf"),
        num_train_epochs=epochs,
        per_device_eval_batch_size=preset["per_device_eval_batch_size"],
        eval_strategy="epoch",
        save_strategy="epoch",
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(
        model_init=model_init,
        args=training,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_fn(label_names),
    )
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)  # as lorasent's local Ray
    seed = TuneArguments().search_seed
    asha = ASHAScheduler(metric="objective", mode="max", max_t=epochs, grace_period=preset["grace_period"],
                         reduction_factor=preset["reduction_factor"])  # fmt: skip
    best = trainer.hyperparameter_search(
        hp_space=lambda _: space,
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        n_trials=preset["num_samples"],
        direction="maximize",
        backend="ray",
        resources_per_trial={"cpu": preset["cpus_per_trial"]},
        scheduler=asha,
        search_alg=OptunaSearch(metric="objective", mode="max", seed=seed),
        storage_path=str(out / "ray"),
        name="search",
    )
    ray.shutdown()
    print(json.dumps({"best_objective": best.objective, "best_hyperparameters": best.hyperparameters}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/bench_peer.json")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds one search process may take.")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # the peer's own process
    args = parser.parse_args()
    if args.child is not None:
        peer_child(args.child, args.smoke)
        return
    ws = workspace(args)
    out = ws.root / "peer"
    shutil.rmtree(out, ignore_errors=True)  # each search counts what its folders hold: start from none
    results = Results("bench_peer", args.smoke)
    for name, fn in (("lorasent", lorasent_search), ("peer", peer_search)):
        section(results, args.out, name, lambda fn=fn: fn(out, args, results))
    results.write(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
