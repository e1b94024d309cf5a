"""Does lorasent's fast training path keep accuracy? The same config trained the seed's way and lorasent's way.

The speed benchmarks use a random-init model on synthetic reviews, where accuracy only compares configurations
with each other. This one uses pretrained weights on real review sentences (the offline default: all-MiniLM-L6-v2
on VADER's Amazon sentences), on whatever device torch picks, CPU included. One config, several seeds, three
ways:

  - seed-style: a plain `Trainer` (random batch order, transformers' padding collator, fp32), as the seed ran it
    (padded per batch rather than to 512: padding does not change the arithmetic, only the time);
  - lorasent `train()` as trials run it: length-grouped batches, numpy padding, eval over a length-sorted split,
    and on a GPU bf16 autocast and fused AdamW;
  - lorasent `train()` in random batch order, which separates the effect of length grouping from the rest.

Prints the validation accuracy after each epoch (mean over seeds) and, per way, the last epoch's mean and spread;
the gap to the seed-style mean is what an optimisation costs or gains.

    python bench/bench_accuracy.py --smoke          # < 2 minutes on a 2-core CPU: every code path, tiny sizes
    python bench/bench_accuracy.py --seeds 42 43 44 --out results/accuracy.json
    python bench/bench_accuracy.py --ways length-grouped --seeds 42 43 44 45 46   # one way only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from data import Results, add_common_args, section, workspace

DATASET = "offline:vader-amazon"
MODEL = "offline:all-MiniLM-L6-v2"
# LoRA r 4 on query + value (chosen by architecture), lorasent's default alpha and dropout: the quick-start's region.
# (The seed's own config, r 4 / alpha 32 on the query alone at lr 5e-4, leaves this model at chance for 3 epochs
# whichever way it is trained, which tells nothing.)
LORA = {"lora_r": 4}
WAYS = ("seed-style Trainer", "lorasent, length-grouped", "lorasent, random order")  # --ways: seed-style length random


def lorasent_run(args: argparse.Namespace, seed: int, grouped: bool, run_dir: str) -> list[float]:
    """Per-epoch validation accuracy of one lorasent `train()` run."""
    from lorasent.config import DataArguments, ModelArguments, TrainArguments
    from lorasent.train import train

    data_args = DataArguments(
        dataset=DATASET, max_length=512, max_train_samples=args.train, max_eval_samples=args.validation
    )
    train_args = TrainArguments(
        output_dir=run_dir,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        group_by_length=grouped,
        seed=seed,
    )
    result = train(data_args, ModelArguments(model_name_or_path=MODEL, **LORA), train_args, save_final=False)
    return [epoch["accuracy"] for epoch in result.history]


def compare(args: argparse.Namespace, results: Results) -> None:
    from seed import seed_splits, seed_style_run

    ws = workspace(args)
    splits, tokenizer, labels = seed_splits(DATASET, MODEL, train=args.train, eval_=args.validation, pad_to=None)
    ways = [way for way in WAYS if way.split(",")[-1].split()[0] in args.ways]
    curves: dict[str, list[list[float]]] = {way: [] for way in ways}
    seconds = dict.fromkeys(ways, 0.0)
    for seed in args.seeds:
        for way in ways:
            start = time.perf_counter()
            run_dir = ws.run_dir("accuracy")
            if way == "seed-style Trainer":
                run = seed_style_run(
                    MODEL,
                    splits,
                    tokenizer,
                    labels,
                    run_dir,
                    learning_rate=args.learning_rate,
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    lora=LORA,
                    seed=seed,
                )
                curve = run.accuracy
            else:
                curve = lorasent_run(args, seed, grouped=way.endswith("grouped"), run_dir=str(run_dir))
            seconds[way] += time.perf_counter() - start
            curves[way].append(curve)
            print(f"[bench_accuracy] seed {seed}, {way}: {[round(a, 4) for a in curve]}", flush=True)
    baseline = statistics.mean(curve[-1] for curve in curves.get(WAYS[0], [[math.nan]]))
    for way, runs in curves.items():
        last = [curve[-1] for curve in runs]
        mean = statistics.mean(last)
        spread = statistics.stdev(last) if len(last) > 1 else 0.0
        per_epoch = [round(statistics.mean(epoch), 4) for epoch in zip(*runs, strict=True)]
        results.add(
            f"validation accuracy after {args.epochs} epochs: {way}",
            mean,
            "",
            f"sd {spread:.4f} over seeds {args.seeds}; vs seed-style {mean - baseline:+.4f}; mean per epoch "
            f"{per_epoch}; {seconds[way] / len(runs):.0f} s a run",
        )
    results.extra["curves"] = curves
    results.extra["config"] = {
        "dataset": DATASET,
        "model": MODEL,
        **LORA,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train": args.train,
        "validation": args.validation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/bench_accuracy.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="One run per way and seed.")
    parser.add_argument("--train", type=int, default=1000, help="Training sentences (the seed used 1,000).")
    parser.add_argument("--validation", type=int, default=500, help="Validation sentences.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs of every run.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Learning rate of every run.")
    parser.add_argument("--batch_size", type=int, default=16, help="Batch size of every run (the seed's best).")
    parser.add_argument(
        "--ways", nargs="+", default=["seed-style", "length-grouped", "random"],
        choices=["seed-style", "length-grouped", "random"], help="Which ways to run (default all three).",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.train, args.validation, args.epochs = args.seeds[:2], 64, 32, 1
    results = Results("bench_accuracy", args.smoke)
    section(results, args.out, "compare", lambda: compare(args, results))
    results.write(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
