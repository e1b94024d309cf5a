"""A lorasent process's fixed costs: its imports and its exit, with Python's garbage collector as is and as lorasent
runs them (goal 1's fixed costs; goal 5).

torch, transformers, peft and Ray build ~500k objects that live as long as the process. With collection on, the
collector walks them several times while they are imported, at each later full collection (`Trainer` runs one at each
training start) and once more at exit. `lorasent.process` pauses collection over the imports and freezes what they
built (`import_modules`), and skips the exit's walk (`exit_process`). Each case runs in fresh processes, the two ways
taking turns, and prints the median of --repeats:

  worker   a trial process's imports (`lorasent.train`; Ray is imported before, as in a Ray worker)
  driver   what `tune/run.py` imports beside Ray's start (its CHECK_MODULES)
  for each: the imports, one full collection after them, and the exit (from the last line of the script until the
  process is gone)

    python bench/bench_startup.py --smoke        # 2 repeats, ~1 minute on a 2-core CPU
    python bench/bench_startup.py --repeats 5 --out results/startup.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data import Results, add_common_args, section

REPO = Path(__file__).resolve().parents[1]
CASES = {  # case: (imported before the timing starts, timed imports)
    "worker": (["ray", "ray.tune"], ["lorasent.train"]),
    "driver": (["ray"], ["lorasent.fused", "lorasent.tokenize", "tune.search", "tune.trainable"]),
}
WAYS = ("collected", "lorasent")  # Python's default; lorasent.process


def child(way: str, before: list[str], timed: list[str]) -> None:
    """One fresh process: the imports, one full collection, then exit the way's way; the parent times the exit."""
    from lorasent.process import exit_process, import_modules

    for name in before:
        importlib.import_module(name)
    start = time.perf_counter()
    if way == "lorasent":
        import_modules(timed)
    else:
        for name in timed:
            importlib.import_module(name)
    imported = time.perf_counter()
    gc.collect()
    collected = time.perf_counter()
    line = {"import_s": imported - start, "collect_s": collected - imported, "objects": len(gc.get_objects())}
    print("CHILD " + json.dumps({**line, "frozen": gc.get_freeze_count(), "ended": time.time()}), flush=True)
    if way == "lorasent":
        exit_process(0)
    sys.exit(0)


def run_child(way: str, case: str) -> dict[str, float]:
    before, timed = CASES[case]
    argv = [sys.executable, __file__, "--child", way, ",".join(before), ",".join(timed)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True)
    gone = time.time()
    line = next(text for text in proc.stdout.splitlines() if text.startswith("CHILD "))
    figures = json.loads(line.removeprefix("CHILD "))
    return {**figures, "exit_s": gone - figures.pop("ended")}


def measure(case: str, repeats: int, results: Results) -> None:
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for _ in range(repeats):
        for way in WAYS:  # taking turns, so a drift in the machine's speed hits both
            runs[way].append(run_child(way, case))
    for key, what in (("import_s", "imports"), ("collect_s", "a full collection after them"), ("exit_s", "exit")):
        medians = {way: statistics.median(run[key] for run in runs[way]) for way in WAYS}
        spread = {way: f"{min(r[key] for r in runs[way]):.2f}-{max(r[key] for r in runs[way]):.2f}" for way in WAYS}
        for way in WAYS:
            results.add(f"{case}: {what}, {way}", medians[way], "s", f"range {spread[way]} over {repeats}")
        results.add(f"{case}: {what}, saved", medians["collected"] - medians["lorasent"], "s")
    results.extra.setdefault("runs", {})[case] = runs


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        way, before, timed = sys.argv[2:5]
        child(way, before.split(","), timed.split(","))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "results/startup.json")
    parser.add_argument("--repeats", type=int, default=None, help="Fresh processes per way and case (5; 2 --smoke).")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.smoke else 5)
    results = Results("bench_startup", args.smoke)
    for case in CASES:
        section(results, args.out, case, lambda case=case: measure(case, repeats, results))
    results.write(args.out)


if __name__ == "__main__":
    main()
