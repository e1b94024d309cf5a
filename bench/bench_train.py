"""One trial's speed: lorasent's training and prediction throughput against a hand-written loop (goal 2).

Prints, and writes to --out:
  - lorasent `train()` (its `Trainer` path): reviews/s and real (unpadded) tokens/s of a steady epoch;
  - the hand-written loop (bench/handloop.py) on the same model, data, batch size and length-grouped order, and
    the ratio lorasent / hand loop (goal >= 0.85);
  - `Predictor` throughput on the test reviews, and through `lorasent.serve` (bench_serve.py) from 1 and 16 clients;
  - how often an epoch through `train()`, the hand loop's epoch and `Predictor.predict` make the host wait for the
    GPU (reads of device values on any device; on CUDA every sync, blocking copies included);
  - host work per step of `train()` and of the hand loop on DistilBERT's modules at width 32, where a step is
    almost all host work: Python calls per step (the same on any machine) and milliseconds per step;
  - the issue's anchor cases on 1,000 reviews: the seed-style epoch (fp32, padded to 512, batch 16, plain
    `Trainer`), fp32 with dynamic padding, and the hand loop at fp32 / bf16 batch 16 and bf16 batch 64;
  - why bf16 through `Trainer` looked slower than fp32: `Trainer` epochs and evaluations at fp32 and bf16 timed
    separately, epoch 1 (first use) against epoch 2 (steady), in this warm process and in a fresh one where
    bf16 goes first; plus a kernel census (CUDA kernels and host time per training step) of both precisions;
  - the cold start of a fresh process: imports of torch / transformers / peft / lorasent and CUDA init.

    python bench/bench_train.py --smoke        # < 60 s on a CPU: every code path, tiny sizes
    python bench/bench_train.py --out results/train.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from data import (
    ModelSize,
    Results,
    Workspace,
    add_common_args,
    build_model_dir,
    describe_census,
    section,
    step_census,
    timed,
    workspace,
)

T = TypeVar("T")

SIZES = {  # reviews: (GPU run, --smoke)
    "train": (4000, 96),
    "validation": (256, 32),
    "test": (2000, 64),
    "anchor": (1000, 48),  # the anchor cases use 1,000 reviews
}
EPOCHS = 2  # epoch 1 carries the warm-up; epoch 2 is the steady state that is compared


def size(args: argparse.Namespace, name: str) -> int:
    return SIZES[name][1 if args.smoke else 0]


# ------------------------------------------------------------------------------------------------ arguments


def lorasent_args(ws: Workspace, data_file: Path, n_train: int, n_eval: int) -> tuple[Any, Any, Any]:
    """The three lorasent dataclasses of the seed's best config on the benchmark data."""
    from seed import SEED_LORA

    from lorasent.config import DataArguments, ModelArguments, TrainArguments

    data_args = DataArguments(
        dataset=str(data_file),
        max_length=512,
        max_train_samples=n_train,
        max_eval_samples=n_eval,
        cache_dir=str(ws.root / "cache"),
    )
    model_args = ModelArguments(model_name_or_path=str(ws.model_dir()), **SEED_LORA)
    train_args = TrainArguments(
        output_dir=str(ws.run_dir("train")), learning_rate=5e-4, per_device_train_batch_size=16, num_train_epochs=EPOCHS
    )
    return data_args, model_args, train_args


# ------------------------------------------------------------------------------------------------ the parts


def lorasent_vs_hand_loop(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    import torch
    from handloop import describe, hand_loop

    from lorasent.train import train

    n_train, n_eval = size(args, "train"), size(args, "validation")
    data_args, model_args, train_args = lorasent_args(ws, data_file, n_train, n_eval)
    hand = hand_loop(
        data_args,
        model_args,
        batch_size=16,
        epochs=EPOCHS,
        learning_rate=5e-4,
        pad_to_multiple_of=8 if torch.cuda.is_available() else None,
    )
    result = train(data_args, model_args, train_args)
    steady = result.history[-1]
    lorasent_tps = steady["train_tokens_per_second"]
    lorasent_rps = n_train / steady["train_seconds"]
    hand_rates = hand.rates(-1)
    results.add(
        "lorasent train(), batch 16, steady epoch",
        lorasent_rps,
        "reviews/s",
        f"{lorasent_tps:,.0f} real tokens/s; {n_train} reviews, epoch {len(result.history)} of {EPOCHS}",
    )
    results.add(
        "lorasent train(), whole run (training steps only)",
        result.train_samples_per_second,
        "reviews/s",
        f"{result.train_tokens_per_second:,.0f} tokens/s incl. epoch-1 warm-up; wall {result.wall_seconds:.1f} s "
        "with data, model, eval, checkpoints",
    )
    results.add(
        f"hand loop ({hand.precision}, fused AdamW), batch 16, steady epoch",
        hand_rates["samples_per_s"],
        "reviews/s",
        f"{hand_rates['real_tokens_per_s']:,.0f} real tokens/s; same data, length-grouped batches; "
        f"attention {hand.attention}",
    )
    results.add(
        "ratio lorasent / hand loop (steady epoch)", lorasent_tps / hand_rates["real_tokens_per_s"], "x", "goal >= 0.85"
    )
    results.add(
        "lorasent validation accuracy (seed config, 2 epochs)",
        result.best_metrics.get("accuracy"),
        "",
        f"on {n_eval} validation reviews; random-init DistilBERT",
    )
    results.extra["lorasent_train"] = {
        "history": result.history,
        "train_seconds": result.train_seconds,
        "wall_seconds": result.wall_seconds,
    }
    results.extra["hand_loop"] = describe(hand)
    results.extra["final_model_dir"] = str(result.output_dir)


def predictor(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    import pandas as pd
    from bench_serve import served

    from lorasent.predict import Predictor

    model_dir = results.extra.get("final_model_dir")
    if not model_dir:
        raise RuntimeError("no trained model folder: the training part failed")
    frame = pd.read_csv(data_file)
    texts = frame.loc[frame["split"] == "test", "text"].tolist()[: size(args, "test")]
    with timed() as load:
        pred = Predictor.from_dir(model_dir)
    pred.predict(texts[:64])  # warm-up: kernels and allocator
    with timed() as t:
        out = pred.predict(texts)
    errors = sum(p.error is not None for p in out)
    results.add(
        "Predictor.predict (default batch 64, length-sorted)",
        len(texts) / t["s"],
        "reviews/s",
        f"{len(texts)} test reviews; load {load['s']:.1f} s; {errors} errors",
    )
    served(model_dir, texts, results)


def syncs_of(block: Callable[[], Any]) -> dict[str, Any]:
    """What `block()` read back from its device: `reads`, lorasent's DeviceReads (any device; values only), and on
    CUDA `syncs`, every wait torch's sync debug mode saw, blocking host-to-device copies included (a copy without
    non_blocking waits until the GPU has run everything queued)."""
    import torch

    from lorasent.device_reads import DeviceReads

    cuda = torch.cuda.is_available()
    with warnings.catch_warnings(record=True) as caught, DeviceReads() as reads:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            block()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    found: dict[str, Any] = {
        "reads": reads.total,
        "read_sites": [f"{n} x {op} at {site}" for (op, site), n in reads.sites.most_common(6)],
    }
    if cuda:
        found["syncs"] = sum("synchronizing" in str(w.message) for w in caught)
    return found


def half_and_whole_epoch(
    measure: Callable[[Callable[[], Any]], T], epoch: Callable[[int], Any], n: int, batch: int
) -> tuple[T, T, int]:
    """`measure` of an epoch of n // 2 reviews and of one of n, and the steps the second has over the first: their
    difference over those steps is what one step adds (loading, evaluation and checkpoints are the same in both)."""
    half, whole = measure(lambda: epoch(n // 2)), measure(lambda: epoch(n))
    return half, whole, math.ceil(n / batch) - math.ceil(n // 2 / batch)


def device_syncs(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """How often lorasent's training steps and prediction make the host wait for the GPU (reads of device values
    and, on CUDA, blocking copies), against the hand loop's steps. A step that waits lets the GPU idle while the host
    queues the next step's kernels. Per step: what an epoch of n reviews adds over one of n / 2 (loading, evaluation
    and checkpoints are the same in both); then one `Predictor.predict` call with the model trained on n."""
    import pandas as pd
    from handloop import hand_loop

    from lorasent.config import replace
    from lorasent.predict import Predictor
    from lorasent.train import train

    n, batch = size(args, "anchor"), 16

    def lorasent_epoch(reviews: int) -> None:
        data_args, model_args, train_args = lorasent_args(ws, data_file, reviews, size(args, "validation"))
        train(
            data_args,
            model_args,
            replace(train_args, num_train_epochs=1, output_dir=str(ws.run_dir(f"syncs{reviews}"))),
        )

    def hand_epoch(reviews: int) -> None:
        data_args, model_args, _ = lorasent_args(ws, data_file, reviews, size(args, "validation"))
        hand_loop(data_args, model_args, batch_size=batch, epochs=1)

    for case, epoch in (("lorasent train() step", lorasent_epoch), ("hand loop step", hand_epoch)):
        half, whole, steps = half_and_whole_epoch(syncs_of, epoch, n, batch)
        per_step = {key: (whole[key] - half[key]) / steps for key in ("syncs", "reads") if key in whole}
        note = f"epochs of {n // 2} and {n} reviews at batch {batch}: " + ", ".join(
            f"{key} {half[key]} and {whole[key]}" for key in per_step
        )
        _add_syncs(results, f"{case}, per step", {**whole, **per_step}, note)
        results.save(args.out)  # a step cut by its timeout keeps the cases that finished
    frame = pd.read_csv(data_file)
    texts = frame.loc[frame["split"] == "test", "text"].tolist()[: size(args, "test")]
    predictor = Predictor.from_dir(ws.root / "runs" / f"syncs{n}")
    found = syncs_of(lambda: predictor.predict(texts))
    batches = math.ceil(len(texts) / predictor.batch_size)
    _add_syncs(results, "Predictor.predict, one call", found, f"{len(texts)} reviews in {batches} batches")


def _add_syncs(results: Results, case: str, found: dict[str, Any], note: str) -> None:
    note = "; ".join([note, *found["read_sites"][:3]])
    if "syncs" in found:
        results.add(f"{case}: syncs (CUDA sync debug mode)", found["syncs"], "", note)
    results.add(f"{case}: reads of device values", found["reads"], "", note)
    results.extra.setdefault("device_syncs", {})[case] = found


def python_calls_of(block: Callable[[], Any]) -> int:
    """Python function calls `block()` made (a generator's every resumption counts): host work in a measure that
    neither the machine's speed nor its load changes."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        block()
    finally:
        sys.setprofile(None)
    return calls


def median_step_ms(block: Callable[[], Any]) -> float:
    """Median milliseconds between successive optimizer steps in `block()`: a step's whole cycle (batch, forward,
    backward, update), robust to the bursts of load on a shared machine that swing whole-epoch timings."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    hook = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        block()
    finally:
        hook.remove()
    return 1000 * statistics.median(b - a for a, b in itertools.pairwise(stamps))


def host_work(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """Host work per training step, lorasent's `train()` against the hand loop, on DistilBERT's modules at width 32
    and reviews cut to 32 tokens, where a step is almost all host work (a stand-in for a launch-bound GPU step at
    small batches): Python calls per step (what an epoch of n reviews adds over one of n / 2) and the median step."""
    from handloop import hand_loop

    from lorasent.config import replace
    from lorasent.train import train

    layers = ws.model_size.n_layers
    narrow = build_model_dir(ws.root / "models" / f"distilbert-l{layers}-d32", ModelSize(layers, 32, 2, 64))
    n, batch = size(args, "anchor"), 16

    def narrow_args(reviews: int) -> tuple[Any, Any, Any]:
        data_args, model_args, train_args = lorasent_args(ws, data_file, reviews, size(args, "validation"))
        return replace(data_args, max_length=32), replace(model_args, model_name_or_path=str(narrow)), train_args

    def lorasent_run(reviews: int, epochs: int) -> Any:
        data_args, model_args, train_args = narrow_args(reviews)
        run_args = replace(train_args, num_train_epochs=epochs, output_dir=str(ws.run_dir(f"host{reviews}")))
        return train(data_args, model_args, run_args, save_final=False)

    def hand_run(reviews: int, epochs: int) -> Any:
        data_args, model_args, _ = narrow_args(reviews)
        return hand_loop(data_args, model_args, batch_size=batch, epochs=epochs)

    for case, run in (("lorasent train()", lorasent_run), ("hand loop", hand_run)):
        for reviews in (n // 2, n):  # first calls import lazily and tokenise each size once: not counted
            run(reviews, 1)
        half, whole, steps = half_and_whole_epoch(python_calls_of, lambda r, run=run: run(r, 1), n, batch)
        results.add(
            f"{case} step, {layers} layers at width 32: Python calls",
            (whole - half) / steps,
            "calls/step",
            f"epochs of {n // 2} and {n} reviews at batch {batch}: {half:,} and {whole:,} calls",
        )
        results.save(args.out)
    lorasent_ms = median_step_ms(lambda: lorasent_run(n, EPOCHS))
    hand_ms = median_step_ms(lambda: hand_run(n, EPOCHS))
    for case, ms in (("lorasent train()", lorasent_ms), ("hand loop", hand_ms)):
        results.add(f"{case} step, {layers} layers at width 32: time", ms, "ms/step", f"median step, batch {batch}")
    results.add("ratio lorasent / hand loop, steps per second, width 32", hand_ms / lorasent_ms, "x", "host-bound")


def anchors(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """The issue's table on 1,000 reviews: seed-style, dynamic padding, precision and batch size."""
    import torch
    from handloop import hand_loop
    from seed import seed_splits, seed_style_run

    n = size(args, "anchor")
    model_dir = ws.model_dir()
    padded, tokenizer, labels = seed_splits(data_file, model_dir, train=n, eval_=size(args, "validation"), pad_to=512)
    dynamic, _, _ = seed_splits(data_file, model_dir, train=n, eval_=size(args, "validation"), pad_to=None)
    for name, splits in (("padded to 512", padded), ("dynamic padding", dynamic)):
        run = seed_style_run(
            model_dir,
            splits,
            tokenizer,
            labels,
            ws.run_dir("seed-epoch"),
            learning_rate=5e-4,
            batch_size=16,
            epochs=EPOCHS,
            evaluate=False,
        )
        results.add(
            f"plain Trainer fp32, {name}, batch 16, {n} reviews",
            run.train_s[-1],
            "s/epoch",
            f"{n / run.train_s[-1]:,.0f} reviews/s (steady epoch; first {run.train_s[0]:.2f} s)",
        )
        results.extra.setdefault("anchors", {})[f"trainer_fp32_{name}"] = run.summary()
    cuda = torch.cuda.is_available()
    for precision, batch in (("fp32", 16), ("auto", 16), ("auto", 64)):
        data_args, model_args, _ = lorasent_args(ws, data_file, n, size(args, "validation"))
        run = hand_loop(
            data_args,
            model_args,
            batch_size=batch,
            epochs=EPOCHS,
            precision=precision,
            pad_to_multiple_of=8 if cuda else None,
        )
        rates = run.rates(-1)
        results.add(
            f"hand loop {run.precision}, length-grouped, batch {batch}, {n} reviews",
            rates["seconds"],
            "s/epoch",
            f"{rates['real_tokens_per_s']:,.0f} real tokens/s, padding {rates['padding_share']:.0%}",
        )
        results.extra.setdefault("anchors", {})[f"hand_{run.precision}_b{batch}"] = run.__dict__


def trainer_precision(
    ws: Workspace,
    data_file: Path,
    args: argparse.Namespace,
    results: Results,
    order: tuple[str, ...] = ("fp32", "bf16"),
    label: str = "warm process",
) -> None:
    """Plain `Trainer` epochs + evaluations, batch 16, dynamic padding, at each precision in `order`."""
    import torch
    from seed import seed_splits, seed_style_run

    n = size(args, "anchor")
    model_dir = ws.model_dir()
    splits, tokenizer, labels = seed_splits(data_file, model_dir, train=n, eval_=size(args, "anchor"), pad_to=None)
    for precision in order:
        if precision == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            results.add(f"Trainer bf16 ({label})", "skipped", "", "no bf16-capable GPU")
            continue
        run = seed_style_run(
            model_dir,
            splits,
            tokenizer,
            labels,
            ws.run_dir(f"precision-{precision}"),
            learning_rate=5e-4,
            batch_size=16,
            epochs=EPOCHS,
            precision=precision,
        )
        results.extra.setdefault("trainer_precision", {})[f"{precision} ({label})"] = run.summary()
        per_epoch = ", ".join(f"{t:.2f}+{e:.2f}" for t, e in zip(run.train_s, run.eval_s, strict=False))
        results.add(
            f"Trainer {precision} epoch+eval, batch 16, dynamic padding ({label})",
            run.epoch_with_eval_s[-1],
            "s",
            f"train+eval per epoch: {per_epoch} s; setup {run.setup_s:.1f} s",
        )


def kernel_census(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """CUDA kernels and host (CPU) time per training step at fp32 and bf16: is a step launch-bound?"""
    import torch
    from handloop import autocast_dtype, one_batch_setup, train_step

    if not torch.cuda.is_available():
        results.add("kernel census", "skipped", "", "needs CUDA")
        return
    data_args, model_args, _ = lorasent_args(ws, data_file, size(args, "anchor"), size(args, "validation"))
    model, optimizer, params, batch = one_batch_setup(
        data_args, model_args, range(16), learning_rate=5e-4, device=torch.device("cuda")
    )

    census = {}
    for precision in ("fp32", "bf16"):
        dtype = autocast_dtype(precision)
        census[precision] = step_census(lambda dtype=dtype: train_step(model, optimizer, params, batch, dtype))
        census[precision]["seq_len"] = int(batch["input_ids"].shape[1])
        results.add(
            f"kernel census {precision}, batch 16 (one step)",
            census[precision]["kernels_per_step"],
            "kernels",
            describe_census(census[precision]),
        )
    results.extra["kernel_census"] = census


def fresh_process(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """A new Python process: what its imports and CUDA init cost, then bf16 before fp32 through `Trainer`."""
    command = [sys.executable, __file__, "--probe", "--workdir", args.workdir, "--out", "/dev/null"]
    if args.smoke:
        command.append("--smoke")
    start = time.perf_counter()
    env = {**os.environ, SPAWN_ENV: repr(time.time())}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.probe_timeout, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    probe = json.loads(lines[-1].removeprefix("PROBE "))
    results.add(
        "cold start: python + import torch, transformers, peft", probe["import_s"], "s", "fresh process, from its spawn"
    )
    results.add(
        "cold start: + CUDA init (first tensor on the GPU)",
        probe["cuda_init_s"],
        "s",
        "0 on a CPU machine" if not probe["cuda"] else "",
    )
    results.add("cold start: + import lorasent.train (datasets, sklearn)", probe["lorasent_import_s"], "s", "")
    for row in probe["rows"]:
        results.add(**row)
    results.extra["fresh_process"] = {**probe, "process_wall_s": wall}


def probe(args: argparse.Namespace) -> None:
    """Runs in the fresh process of `fresh_process`: timed imports, then `Trainer` bf16 first, fp32 second."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import_s = time.time() - float(os.environ[SPAWN_ENV])
    t1 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    import lorasent.train  # noqa: F401

    t3 = time.perf_counter()
    ws = workspace(args)
    results = Results("probe", args.smoke)
    trainer_precision(ws, ws_data(ws, args), args, results, order=("bf16", "fp32"), label="fresh process, bf16 first")
    print(
        "PROBE "
        + json.dumps(
            {
                "import_s": import_s,
                "cuda_init_s": t2 - t1,
                "lorasent_import_s": t3 - t2,
                "cuda": cuda,
                "rows": results.rows,
                "trainer": results.extra.get("trainer_precision", {}),
            }
        ),
        flush=True,
    )


def ws_data(ws: Workspace, args: argparse.Namespace) -> Path:
    """The benchmark's review file (train / validation / test), built once and shared by every part."""
    anchor = size(args, "anchor")
    sizes = {
        "train": max(size(args, "train"), anchor),
        "validation": max(size(args, "validation"), anchor),
        "test": size(args, "test"),
    }
    return ws.reviews("reviews", sizes)


def repeated_trial(ws: Workspace, data_file: Path, args: argparse.Namespace, results: Results) -> None:
    """The seed config's one-epoch trial three times in one process, as a Ray worker reused by Tune runs them.

    Run first in its own process: the first call pays what a fresh trial process pays (CUDA start, the first launch
    of every kernel); the later ones are what every further trial on a reused actor pays. Wall = set-up + training
    + evaluation + checkpoint.
    """
    from lorasent.config import replace
    from lorasent.train import train

    n = size(args, "anchor")  # a seed-search trial: 1,000 training and 1,000 validation reviews
    data_args, model_args, train_args = lorasent_args(ws, data_file, n, n)
    runs = []
    for attempt in range(3):
        with timed() as wall:
            result = train(data_args, model_args, replace(train_args, num_train_epochs=1), save_final=False)
        epoch = result.history[0]
        runs.append({"wall_s": wall["s"], **{k: epoch.get(k) for k in ("setup_seconds", "train_seconds",
                                                                        "eval_seconds")}})  # fmt: skip
        results.add(
            f"one-epoch trial in one process, call {attempt + 1} of 3 ({'cold' if attempt == 0 else 'warm'})",
            wall["s"],
            "s",
            f"set-up {epoch['setup_seconds']:.2f} s, training {epoch['train_seconds']:.2f} s, evaluation "
            f"{epoch.get('eval_seconds', float('nan')):.2f} s, rest (checkpoint) "
            f"{wall['s'] - epoch['setup_seconds'] - epoch['train_seconds'] - epoch.get('eval_seconds', 0):.2f} s",
        )
    results.extra["repeated_trial"] = runs


SPAWN_ENV = "BENCH_SPAWN_TIME"  # when the parent spawned the fresh process (epoch seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/bench_train.json")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the fresh-process half
    parser.add_argument("--probe_timeout", type=float, default=240, help="Seconds the fresh process may take.")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="Parts to skip: repeat, train, predict, syncs, host, anchors, precision, census, fresh.",
    )
    args = parser.parse_args()
    if args.probe:
        probe(args)
        return
    ws = workspace(args)
    results = Results("bench_train", args.smoke)
    with timed() as prep:
        data_file = ws_data(ws, args)
        ws.model_dir()
    results.extra["prep_seconds"] = prep["s"]
    parts: dict[str, Callable[[], Any]] = {
        "repeat": lambda: repeated_trial(ws, data_file, args, results),  # first: CUDA must still be cold
        "train": lambda: lorasent_vs_hand_loop(ws, data_file, args, results),
        "predict": lambda: predictor(ws, data_file, args, results),
        "syncs": lambda: device_syncs(ws, data_file, args, results),
        "host": lambda: host_work(ws, data_file, args, results),
        "anchors": lambda: anchors(ws, data_file, args, results),
        "precision": lambda: trainer_precision(ws, data_file, args, results),
        "census": lambda: kernel_census(ws, data_file, args, results),
        "fresh": lambda: fresh_process(ws, data_file, args, results),
    }
    for name, fn in parts.items():
        if name not in args.skip:
            section(results, args.out, name, fn)
    results.write(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
