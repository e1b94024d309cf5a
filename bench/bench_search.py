"""A whole search against the seed's way (goals 1 and 5), and trials packed on one GPU (goal 3).

Parts (--parts picks; each prints its rows as soon as it has them and saves --out after each):
  baseline  the seed-style sequential 9-config grid through a plain `Trainer` (fp32, padded to 512, 5 epochs,
            eval each epoch, one process). To fit a short GPU lease it measures the seed's config (lr 5e-4,
            batch 16) for all 5 epochs and one epoch + eval at batch 8 and 4, then EXTRAPOLATES to 9 configs x
            5 epochs (printed as such); --full-baseline runs all 9 configs instead.
  search    lorasent's search through `python tune/run.py --preset seed` on the same data and model: 27 trials
            over lr {1e-3, 5e-4, 3e-4} x batch {4, 8, 16} x LoRA r {2, 4, 8}, up to 5 epochs, 1,000 training
            reviews, ASHA + Optuna, fractional GPUs. Wall time of the whole command (Python start, tokenisation,
            Ray start-up and shutdown included). Ratio to the baseline: goal <= 1/8. Best validation accuracy
            next to the seed-style config's.
  packing   8 trials x 3 epochs (batch 16, lr searched) at 1/8 GPU each, against trials given a whole GPU each
            (so one at a time): trial throughput ratio, goal >= 5x.
  search and packing each run their trials in the ways --ways names, in that order (default the first two):
  `processes`, one process per trial (GPUs shared by fraction); `fused`, the same command with --fused_trials (one
  trial engine per GPU trains every running trial on one shared base model, as many at once as its memory plan
  gives it, up to the search's trials); `fused8` (search only), fused with 8 trials at once, as many as processes
  share a GPU. Rows of the fused ways end in "(fused trials)" and "(fused trials, 8 at once)".
  quickstart  (goal 5, CPU; not in the default) `python tune/run.py` as shipped: wall time, goal <= 5 minutes.
  rungs     (CPU; not in the default) ASHA's first rung a quarter of an epoch in (--evals_per_epoch 4
            --grace_period 0.25) against one evaluation an epoch (grace 1), and with twice the trials, on the
            quick-start's model and the whole training split, for each --search_seeds: wall time, trial-epochs
            trained, best validation accuracy.

    python bench/bench_search.py --smoke                 # CPU: tiny sizes, every code path
    python bench/bench_search.py --out results/search.json --gpus_per_trial 0.125
    python bench/bench_search.py --parts search packing --ways fused   # only the fused way (short GPU lease)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from data import REPO, Results, Workspace, add_common_args, section, workspace

SEARCH_SPACE = {  # the seed's lr x batch grid x three ranks, as tune/presets/seed.yaml has it
    "learning_rate": {"choice": [1e-3, 5e-4, 3e-4]},
    "per_device_train_batch_size": {"choice": [4, 8, 16]},
    "lora_r": {"choice": [2, 4, 8]},
}


def sizes(args: argparse.Namespace) -> dict[str, int]:
    if args.smoke:
        return {"train": 32, "validation": 16, "test": 16, "epochs": 2, "trials": 6, "packed": 4, "sequential": 2}
    return {
        "train": 1000,
        "validation": 1000,
        "test": 200,
        "epochs": 5,
        "trials": args.num_samples,
        "packed": 8,
        "sequential": args.sequential_trials,
    }


# ------------------------------------------------------------------------------------------------- baseline


def baseline(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    from seed import SEED_BATCHES, SEED_BEST, SEED_LRS, seed_splits, seed_style_run

    n = sizes(args)
    epochs = n["epochs"]
    model_dir = ws.model_dir()
    splits, tokenizer, labels = seed_splits(data_file, model_dir, train=n["train"], eval_=n["validation"], pad_to=512)

    def run(lr: float, batch: int, num_epochs: int, max_steps: int = -1) -> Any:
        return seed_style_run(
            model_dir,
            splits,
            tokenizer,
            labels,
            ws.run_dir("baseline"),
            learning_rate=lr,
            batch_size=batch,
            epochs=num_epochs,
            max_steps=max_steps,
        )

    run(5e-4, 16, 1, max_steps=3)  # warm-up (CUDA context, kernels): paid once by the real grid, left out here
    runs = []
    if args.full_baseline:
        start = time.perf_counter()
        runs = [run(lr, batch, epochs) for lr in SEED_LRS for batch in SEED_BATCHES]
        grid_s = time.perf_counter() - start
        seed_run = next(r for r in runs if (r.learning_rate, r.batch_size) == (5e-4, 16))
        results.add(f"seed-style grid, 9 configs x {epochs} epochs (MEASURED)", grid_s, "s", "fp32, padded to 512")
    else:
        seed_run = run(SEED_BEST["learning_rate"], SEED_BEST["per_device_train_batch_size"], epochs)
        runs = [seed_run] + [run(5e-4, batch, 1) for batch in SEED_BATCHES if batch != 16]
        per_epoch = {r.batch_size: sum(r.epoch_with_eval_s) / len(r.epoch_with_eval_s) for r in runs}
        setup = sum(r.setup_s for r in runs) / len(runs)
        grid_s = sum(len(SEED_LRS) * epochs * per_epoch[b] + len(SEED_LRS) * setup for b in SEED_BATCHES)
        for batch in SEED_BATCHES:
            results.add(
                f"seed-style epoch + eval, batch {batch} (measured)",
                per_epoch[batch],
                "s",
                f"fp32, padded to 512, {n['train']} train / {n['validation']} eval reviews",
            )
        results.add(
            f"seed-style grid, 9 configs x {epochs} epochs (EXTRAPOLATED)",
            grid_s,
            "s",
            "from the measured epochs above, x3 learning rates x epochs, + model set-up per config; "
            "--full-baseline measures it",
        )
    results.add(
        "seed-style config validation accuracy (lr 5e-4, batch 16, r 4)",
        seed_run.accuracy[-1],
        "",
        f"after {epochs} epochs; per epoch {[round(a, 4) for a in seed_run.accuracy]}",
    )
    curves = seed_config_through_lorasent(ws, data_file, n)
    results.add(
        "the seed config through lorasent's train(): validation accuracy",
        curves["length-grouped"][-1],
        "",
        f"per epoch {curves['length-grouped']} (length-grouped batches, as trials run), {curves['random order']} "
        f"(random order), seed-style {[round(a, 4) for a in seed_run.accuracy]}: whether a search's best falls "
        "short of the seed config because of ASHA or because of how lorasent trains",
    )
    results.extra["baseline"] = {
        "grid_s": grid_s,
        "extrapolated": not args.full_baseline,
        "runs": [r.summary() for r in runs],
        "lorasent_seed_config": curves,
    }


def seed_config_through_lorasent(ws: Workspace, data_file: Path, n: dict[str, int]) -> dict[str, list[float]]:
    """Per-epoch validation accuracy of the seed config trained by `lorasent.train.train()` (bf16 on GPUs, dynamic
    padding), with length-grouped batches as trials run and in random order, outside any search."""
    from bench_train import lorasent_args

    from lorasent.config import replace
    from lorasent.train import train

    curves = {}
    for name, grouped in (("length-grouped", True), ("random order", False)):
        data_args, model_args, train_args = lorasent_args(ws, data_file, n["train"], n["validation"])
        run_dir = ws.run_dir("seed-config-lorasent")
        train_args = replace(train_args, output_dir=str(run_dir), num_train_epochs=n["epochs"], group_by_length=grouped)
        result = train(data_args, model_args, train_args, save_final=False, work_dir=str(run_dir / "work"))
        curves[name] = [round(epoch["accuracy"], 4) for epoch in result.history]
    return curves


# --------------------------------------------------------------------------------------------- tune/run.py


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def search_share(args: argparse.Namespace) -> list[str]:
    """The search's `--gpus_per_trial` flag: none by default, so the plan shares GPUs by memory as users get it."""
    if not on_gpu():
        return ["--gpus_per_trial", "0"]
    return [] if args.gpus_per_trial is None else ["--gpus_per_trial", str(args.gpus_per_trial)]


def tune_command(ws: Workspace, data_file: Path, args: argparse.Namespace, name: str, *extra: str) -> list[str]:
    """`python tune/run.py --preset seed` pointed at the benchmark's model and data, no dashboard."""
    n = sizes(args)
    command = [
        sys.executable,
        str(REPO / "tune" / "run.py"),
        "--preset",
        "seed",
        "--dataset",
        str(data_file),
        "--model_name_or_path",
        str(ws.model_dir()),
        "--max_train_samples",
        str(n["train"]),
        "--max_eval_samples",
        str(n["validation"]),
        "--max_test_samples",
        str(n["test"]),
        "--num_train_epochs",
        str(n["epochs"]),
        "--cache_dir",
        str(ws.root / "cache"),
        "--storage_path",
        str(ws.root / "tune"),
        "--name",
        name,
        "--include_dashboard",
        "false",
        "--verbose",
        "1",
    ]
    if args.smoke:
        command += ["--num_cpus", "2", "--per_device_eval_batch_size", "32"]
    return command + list(extra) + args.tune_args


def run_tune(command: list[str], ws: Workspace, name: str, timeout: float) -> dict[str, Any]:
    """Run one search as a fresh process; its wall time covers Python start, tokenisation, Ray and shutdown."""
    import shutil

    from analysis.results import configurations_tried, load_experiment

    shutil.rmtree(ws.root / "tune" / name, ignore_errors=True)
    print("$ " + " ".join(command), flush=True)
    start, started_at = time.perf_counter(), time.time()
    # Streamed, so a log cut short by a timeout still shows how far the search got.
    proc = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    returncode = proc.wait()
    watchdog.cancel()
    wall = time.perf_counter() - start
    output = "".join(lines)
    try:  # a search cut short (timeout) still has finished trials worth reporting
        exp = load_experiment(ws.root / "tune" / name)
    except Exception as e:
        raise RuntimeError(f"tune/run.py exited {returncode} after {wall:.0f} s:\n{output[-2000:]}") from e
    trials, epochs = exp.trials, exp.epochs
    starts = epochs["timestamp"] - epochs["time_total_s"]  # each trial's start, by its own clock
    finished = re.search(r"Search finished in (\d+) s", output)
    return {
        "complete": returncode == 0,  # False: killed at the timeout or failed; the figures cover what finished
        "wall_s": wall,
        "search_s": float(finished.group(1)) if finished else None,  # tune/run.py's own count (after imports)
        "trials_span_s": float(epochs["timestamp"].max() - starts.min()),  # first trial start to last result
        # Tune's timestamps are whole seconds: these two are +-1 s
        "startup_s": float(starts.min() - started_at),  # the command's start to the first trial's
        "winddown_s": float(started_at + wall - epochs["timestamp"].max()),  # the last result to the command's end
        "trials": len(trials),
        "distinct_configs": configurations_tried(exp),
        "trial_epochs": float(trials["epochs"].sum()),  # epochs trained; reports may be more (evals_per_epoch)
        "reports": len(epochs),
        "early_stopped": int(trials["early_stopped"].sum()),
        "errors": int(trials["error"].astype(bool).sum()),
        "best_accuracy": float(exp.best_trial[exp.best_column]),
        "best_config": exp.best_config,
        "trial_table": trials[
            [c for c in ("trial_id", "status", *exp.params, exp.best_column, "epochs") if c in trials]
        ].to_dict("records"),
        "experiment": str(exp.path),
        "plan": resource_plan(lines),
        "time_split": time_split(epochs),
        # GPU trials only: the most memory any trial's allocator held (NaN on CPUs); fused: the engine's, all trials'
        "gpu_memory_peak_gib": float(epochs["gpu_memory_peak_gib"].max()) if "gpu_memory_peak_gib" in epochs else None,
        # fused trials only: how many trials shared a step, on average over trial-epochs
        "trials_per_step": float(epochs["trials_per_step"].mean()) if "trials_per_step" in epochs else None,
    }


def resource_plan(lines: list[str]) -> str:
    """The plan tune/run.py printed: its first line, and the indented line saying how GPUs are shared, if any.
    With --fused_trials it prints the engines ("Fused trials: ...") instead."""
    for i, line in enumerate(lines):
        if line.startswith(("Resource plan", "Fused trials:")):
            why = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("  ") else ""
            return line.strip() + (f"; {why}" if why else "")
    return ""


def time_split(epochs: Any) -> dict[str, float]:
    """Trial-seconds summed over every reported epoch, split by what `train()` says it spent them on.

    `other` is what lies outside train(): the checkpoint write, Tune's report round trip, the trial's start.
    """
    total = float(epochs["time_this_iter_s"].sum())
    split = {key: float(epochs[key].sum()) if key in epochs else 0.0 for key in SPLIT_KEYS}
    return {"trial_seconds": total, **split, "other_seconds": total - sum(split.values())}


SPLIT_KEYS = ("setup_seconds", "train_seconds", "eval_seconds")


def describe_split(split: dict[str, float]) -> str:
    total = max(split["trial_seconds"], 1e-9)
    parts = [f"{key.removesuffix('_seconds')} {split[key]:.0f} s ({split[key] / total:.0%})"
             for key in (*SPLIT_KEYS, "other_seconds")]  # fmt: skip
    return ", ".join(parts)


def incomplete(found: dict[str, Any]) -> str:
    return "" if found["complete"] else " (INCOMPLETE: cut at the timeout or failed)"


WAYS = {  # way of running trials: tune/run.py's flags, what ends the name of each of its rows
    "processes": ([], ""),
    # one engine per GPU, as many trials at once as the plan gives it (memory, the search's trials)
    "fused": (["--fused_trials"], " (fused trials)"),
    # the same with 8 at once, as many as processes share a GPU: what the trials at once are worth (search only)
    "fused8": (["--fused_trials", "--max_concurrent_trials", "8"], " (fused trials, 8 at once)"),
}


def way_flags(way: str) -> list[str]:
    return WAYS[way][0]


def row_suffix(way: str) -> str:
    return WAYS[way][1]


def search(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    for way in args.ways:
        search_one_way(ws, data_file, args, results, way)
        results.save(args.out)  # a step cut by its timeout keeps the ways that finished


def search_one_way(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results, way: str) -> None:
    """The 27-trial search run one way; the process way keeps the row names of the runs before fused trials."""
    n = sizes(args)
    name, suffix = ("search" if way == "processes" else f"search-{way}"), row_suffix(way)
    command = tune_command(
        ws,
        data_file,
        args,
        name,
        "--num_samples",
        str(n["trials"]),
        *search_share(args),
        "--search_space",
        json.dumps(SEARCH_SPACE),
        *way_flags(way),
    )
    found = run_tune(command, ws, name, args.timeout)
    results.extra[name] = found
    results.add(
        f"lorasent search, {found['trials']} trials (ASHA + Optuna), whole command{suffix}{incomplete(found)}",
        found["wall_s"],
        "s",
        f"{found['distinct_configs']} distinct configs, {found['trial_epochs']:g} trial-epochs, "
        f"{found['early_stopped']} stopped early, {found['errors']} errors; {found['plan']}"
        f"{engine_memory(found) if suffix else ''}",
    )
    grid = results.extra.get("baseline", {}).get("grid_s")
    if grid:
        kind = "extrapolated" if results.extra["baseline"]["extrapolated"] else "measured"
        results.add(
            f"ratio search wall / seed-style grid{suffix}{incomplete(found)}",
            found["wall_s"] / grid,
            "x",
            f"goal <= 0.125 (1/8); grid {grid:.0f} s ({kind})",
        )
    results.add(f"where the whole command's time went{suffix}", found["wall_s"], "s",
                f"start-up {found['startup_s']:.0f} s (the command's start to the first trial's: imports, checks, "
                f"Ray, engines), trials {found['trials_span_s']:.0f} s, wind-down {found['winddown_s']:.0f} s (the "
                "last result to the exit); +-1 s")  # fmt: skip
    results.add(f"where the trials' time went{suffix}", found["time_split"]["trial_seconds"], "trial-s",
                describe_split(found["time_split"]))  # fmt: skip
    if found["trials_per_step"] is not None:
        results.add(f"trials per shared step, mean over trial-epochs{suffix}", found["trials_per_step"], "trials",
                    f"{found['trial_epochs']:g} trial-epochs")  # fmt: skip
    config = ", ".join(f"{k.split('/')[-1]}={v}" for k, v in found["best_config"].items())
    results.add(f"lorasent search best validation accuracy{suffix}", found["best_accuracy"], "", config)
    if way == "processes":  # the plan's per-trial footprint; an engine's peak is all its trials' (in the note above)
        memory_check(command, found, results)


def engine_memory(found: dict[str, Any]) -> str:
    """The trial engine's GPU memory peak (all its trials at once), for a fused row's note; nothing on CPUs."""
    peak = found["gpu_memory_peak_gib"]
    return f"; engine GPU memory peak {peak:.2f} GiB" if peak is not None and peak == peak else ""


def memory_check(command: list[str], found: dict[str, Any], results: Results) -> None:
    """The footprint the automatic GPU plan computes for this search (from the search's own arguments), against the
    peak its trials reported."""
    from lorasent.footprint import GIB
    from tune.config import parse_args
    from tune.search import build_param_space, trial_footprint

    searched = parse_args(command[2:])  # [python, tune/run.py, *flags]
    space, _ = build_param_space(searched.tune, searched.model, searched.train)
    footprint = trial_footprint(space, searched.data, searched.model, searched.train)
    planned = footprint.total / GIB
    results.add("planned GPU memory per trial (estimate, upper bound)", planned, "GiB", footprint.describe())
    peak = found["gpu_memory_peak_gib"]
    if peak is not None and peak == peak:  # measured on a GPU; the allocator's peak excludes the CUDA context
        estimate = (footprint.total - footprint.runtime) / GIB
        results.add("measured GPU memory peak of the hungriest trial", peak, "GiB",
                    f"allocator peak; the estimate without the runtime allowance is {estimate:.2f} GiB "
                    f"({estimate / max(peak, 1e-9):.2f}x the peak)")  # fmt: skip


def packing(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """Each way's packed run, then (once, after the first) the one-GPU-per-trial run both are compared with."""
    n = sizes(args)
    gpus = on_gpu()
    # Only the learning rate varies; batch 16 and rank 4 are pinned as one-value choices over the preset's lists.
    space = {"learning_rate": {"loguniform": [3e-4, 1e-3]}, "per_device_train_batch_size": {"choice": [16]}}
    space["lora_r"] = {"choice": [4]}
    common = ["--scheduler", "none", "--searcher", "random", "--num_train_epochs", "3"]
    common += ["--search_space", json.dumps(space), "--points_to_evaluate", "[]"]
    packed_gpus, packed_concurrency = (args.pack_fraction, n["packed"]) if gpus else (0.0, 2)
    cases = {  # name: (way of running its trials, trials, --gpus_per_trial, trials at once)
        "packed": ("processes", n["packed"], packed_gpus, packed_concurrency),
        # With --fused_trials the share places nothing (one engine per GPU); 1 / share is the trials per engine.
        "fused": ("fused", n["packed"], packed_gpus, packed_concurrency),
        "sequential": ("processes", n["sequential"], 1.0 if gpus else 0.0, 1),
    }

    def run(name: str) -> dict[str, Any]:
        way, trials, fraction, concurrency = cases[name]
        share = "one shared base per GPU" if name == "fused" else f"{fraction:g} GPU each"
        command = tune_command(
            ws,
            data_file,
            args,
            f"pack-{name}",
            *common,
            "--num_samples",
            str(trials),
            "--gpus_per_trial",
            str(fraction),
            "--max_concurrent_trials",
            str(concurrency),
            *way_flags(way),
        )
        f = found[name] = run_tune(command, ws, f"pack-{name}", args.timeout)
        suffix = row_suffix(way)
        fused_note = f"; {f['trials_per_step']:.2f} trials per step{engine_memory(f)}" if suffix else ""
        results.add(
            f"{name}: {trials} trials x 3 epochs, {share}, {concurrency} at once{suffix}{incomplete(f)}",
            f["trials"] / f["trials_span_s"] * 60,
            "trials/min",
            f"span {f['trials_span_s']:.1f} s (first trial start to last result); whole command {f['wall_s']:.1f} s; "
            + f"{f['time_split']['trial_seconds']:.0f} trial-seconds: {describe_split(f['time_split'])}{fused_note}",
        )
        results.extra["packing"] = found
        results.save(args.out)  # a step cut by its timeout keeps the runs that finished
        return f

    found: dict[str, dict[str, Any]] = {}
    for way in args.ways:
        if way not in ("processes", "fused"):  # fused8: 8 trials at once, the same as fused here
            continue
        packed = run("packed" if way == "processes" else way)
        seq = found.get("sequential") or run("sequential")
        packing_ratios(packed, seq, results, row_suffix(way))


def packing_ratios(packed: dict[str, Any], seq: dict[str, Any], results: Results, suffix: str) -> None:
    """Trial throughput of a packed run over the one-GPU-per-trial run's, whole commands and trials only."""
    # The same number of trials on both sides: the sequential wall is extended by its measured per-trial cost
    # (first trial start to last result, over its trials) when it ran fewer trials than the packed case.
    missing = packed["trials"] - seq["trials"]
    seq_wall = seq["wall_s"] + max(missing, 0) * seq["trials_span_s"] / seq["trials"]
    how = (
        f"sequential wall extrapolated from {seq['trials']} to {packed['trials']} trials" if missing > 0 else "measured"
    )
    suffix += incomplete(packed) or incomplete(seq)  # a run cut at its timeout: the ratio is not the goal's
    results.add(
        f"packing ratio: trial throughput packed / one GPU per trial (whole commands){suffix}",
        seq_wall / packed["wall_s"],
        "x",
        f"goal >= 5; {packed['trials']} trials: {seq_wall:.0f} s vs {packed['wall_s']:.0f} s, Ray start-up "
        f"included; {how}",
    )
    span_ratio = (seq["trials_span_s"] / seq["trials"]) / (packed["trials_span_s"] / packed["trials"])
    results.add(
        f"packing ratio, trials only (first trial start to last result){suffix}",
        span_ratio,
        "x",
        "excludes Ray start-up and the first cold start of each trial process",
    )


def quickstart_command(ws: Workspace, args: argparse.Namespace, name: str, *flags: str) -> list[str]:
    """`python tune/run.py` on its default, the quick-start preset (offline MiniLM), into this workspace."""
    command = [sys.executable, str(REPO / "tune" / "run.py"), "--storage_path", str(ws.root / "tune")]
    command += ["--name", name, "--include_dashboard", "false", *(["--smoke-test"] if args.smoke else [])]
    return [*command, *flags, *args.tune_args]


def quickstart(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """Goal 5: `python tune/run.py` as a newcomer runs it (quick-start preset, offline, CPU) within 5 minutes."""
    found = run_tune(quickstart_command(ws, args, "quickstart"), ws, "quickstart", args.timeout)
    results.extra["quickstart"] = found
    results.add(
        f"quick-start search{' (--smoke-test)' if args.smoke else ''}, whole command{incomplete(found)}",
        found["wall_s"],
        "s",
        f"goal <= 300 s on 2 CPU cores; {found['trials']} trials, {found['trial_epochs']:g} trial-epochs, best "
        f"accuracy {found['best_accuracy']:.3f}",
    )


def rungs(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """What evaluating within epochs buys ASHA where an epoch is long next to an evaluation (the `full` preset's
    3.6M reviews against 20k): trials it stops a quarter of an epoch in cost a quarter of the epoch."""
    data_flags = ["--max_train_samples", "none", "--max_eval_samples", "200"]
    quarters = ["--evals_per_epoch", "4", "--grace_period", "0.25"]
    ways = {  # (trials as a multiple of --rung_trials, flags)
        "once an epoch, grace 1 epoch": (1, ["--evals_per_epoch", "1", "--grace_period", "1"]),
        "4 times an epoch, grace 0.25 epoch": (1, quarters),
        "4 times an epoch, grace 0.25 epoch, 2x trials": (2, quarters),  # what the compute saved buys
    }
    for seed in args.search_seeds:
        for i, (way, (times, flags)) in enumerate(ways.items()):
            name = f"rungs-{seed}-{i}"
            flags = [*data_flags, *flags, "--num_samples", str(times * args.rung_trials), "--search_seed", str(seed)]
            found = run_tune(quickstart_command(ws, args, name, *flags), ws, name, args.timeout)
            results.extra[name] = found
            results.add(
                f"search seed {seed}, evaluated {way}{incomplete(found)}",
                found["wall_s"],
                "s",
                f"{found['trials']} trials, {found['trial_epochs']:g} trial-epochs in {found['reports']} reports, "
                f"{found['early_stopped']} stopped early, best accuracy {found['best_accuracy']:.3f}",
            )


WIDE_SPACE = {  # 125 configurations, of which a search of 30 trials sees a quarter
    "learning_rate": {"choice": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]},
    "per_device_train_batch_size": {"choice": [4, 8, 16, 32, 64]},
    "lora_r": {"choice": [2, 4, 8, 16, 32]},
}


def simulated_search(searcher: Any, param_space: dict[str, Any], trials: int, seed: int) -> tuple[list, float]:
    """Drive a Ray searcher as Tune does, without training: up to its ConcurrencyLimiter's trials pending, each
    finishing in random order with a made-up accuracy (an effect per value, a learning-rate x batch interaction,
    noise). Returns the configurations in the order proposed, and how far the best tried one falls short of the
    space's best (0: found)."""
    import itertools
    import random

    rng = random.Random(seed)
    names = list(param_space)
    values = [param_space[name].categories for name in names]
    effect = {(i, v): rng.gauss(0, 1) for i, choices in enumerate(values) for v in choices}
    pair = {(a, b): rng.gauss(0, 0.5) for a in values[0] for b in values[1]}

    def accuracy(config: tuple) -> float:
        return sum(effect[i, v] for i, v in enumerate(config)) + pair[config[0], config[1]]

    searcher.set_search_properties("accuracy", "max", param_space)
    proposed: list[tuple] = []
    pending: dict[str, tuple] = {}
    while len(proposed) < trials or pending:
        while len(proposed) < trials and (config := searcher.suggest(str(len(proposed)))) is not None:
            pending[str(len(proposed))] = tuple(config[name] for name in names)
            proposed.append(pending[str(len(proposed))])
        trial_id = rng.choice(list(pending))
        score = accuracy(pending.pop(trial_id)) + rng.gauss(0, 0.3)
        searcher.on_trial_complete(trial_id, {"accuracy": score, "training_iteration": 1})
    best = max(accuracy(config) for config in itertools.product(*values))
    return proposed, best - max(accuracy(config) for config in proposed)


def configs(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """Which configurations lorasent's searcher (what tune/run.py builds) proposes over spaces of choices, against
    Optuna's TPE alone (how it ran before `DistinctSampler`): --config_searches simulated searches each, 8 trials
    pending, the seed config first; no training, seconds on a CPU."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from tune import search as searching
    from tune.config import parse_args

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for label, space, trials in (("the seed grid, 27", SEARCH_SPACE, 27), ("5 x 5 x 5 choices, 30", WIDE_SPACE, 30)):
        figures: dict[str, list[tuple[int, float]]] = {"TPE alone": [], "lorasent": []}
        for seed in range(args.config_searches):
            a = parse_args(["--preset", "seed", "--search_space", json.dumps(space), "--search_seed", str(seed)])
            searched, param_space = searching.build_param_space(a.tune, a.model, a.train)
            points = searching.starting_points(a.tune, searched, a.model, a.train)
            tpe = OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=seed))
            ways = {
                "TPE alone": ConcurrencyLimiter(tpe, 8),
                "lorasent": searching.build_searcher(a.tune, searched, points, 8).searcher,
            }
            for way, searcher in ways.items():
                proposed, shortfall = simulated_search(searcher, param_space, trials, seed)
                figures[way].append((len(set(proposed)), shortfall))
        for way, runs in figures.items():
            distinct, shortfalls = [d for d, _ in runs], [s for _, s in runs]
            results.add(
                f"{label} trials, {way}: distinct configurations",
                statistics.mean(distinct),
                "configs",
                f"mean of {len(runs)} searches, {min(distinct)}-{max(distinct)}; the best one tried in "
                f"{sum(s == 0 for s in shortfalls)}, mean shortfall {statistics.mean(shortfalls):.3f}",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/bench_search.json")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["baseline", "search", "packing"],
        choices=["baseline", "search", "packing", "quickstart", "rungs", "configs"],
        help="quickstart (goal 5, CPU) and rungs are not in the default: they run the offline MiniLM search; nor is "
        "configs (simulated searches, no training).",
    )
    parser.add_argument("--search_seeds", type=int, nargs="+", default=[0, 1], help="Searches of the rungs part.")
    parser.add_argument("--config_searches", type=int, default=100, help="Simulated searches per way (configs).")
    parser.add_argument("--rung_trials", type=int, default=8, help="Trials of a rungs search (the third way: 2x).")
    parser.add_argument("--full-baseline", action="store_true", help="Run all 9 seed configs x 5 epochs.")
    parser.add_argument("--num_samples", type=int, default=27, help="Trials of the search (>= 27 for goal 1).")
    parser.add_argument(
        "--gpus_per_trial",
        type=float,
        default=None,
        help="GPU share of a search trial; default: automatic, the plan's share from GPU memory (at most 8 per GPU).",
    )
    parser.add_argument("--pack_fraction", type=float, default=0.125, help="GPU share of a packed trial.")
    parser.add_argument(
        "--sequential_trials",
        type=int,
        default=3,
        help="Trials of the one-GPU-per-trial case (fewer than 8 saves time; throughput is per trial).",
    )
    parser.add_argument(
        "--ways",
        nargs="+",
        default=["processes", "fused"],
        choices=list(WAYS),
        help="How search and packing run their trials, in this order: one process per trial, --fused_trials (one "
        "trial engine per GPU, one shared base model), and --fused_trials with 8 trials at once (search only).",
    )
    parser.add_argument("--timeout", type=float, default=600, help="Seconds one tune/run.py may take.")
    parser.add_argument(
        "--tune_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="Everything after this is passed on to tune/run.py (e.g. --cpus_per_trial 2).",
    )
    args = parser.parse_args()
    ws = workspace(args)
    n = sizes(args)
    data_file = ws.reviews("search", {"train": n["train"], "validation": n["validation"], "test": n["test"]})
    results = Results("bench_search", args.smoke)
    parts = {
        "baseline": baseline,
        "search": search,
        "packing": packing,
        "quickstart": quickstart,
        "rungs": rungs,
        "configs": configs,
    }
    for name in args.parts:
        section(results, args.out, name, lambda fn=parts[name]: fn(ws, data_file, args, results))
    results.write(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
