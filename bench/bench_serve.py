"""Predictions served over HTTP (`python -m lorasent.serve`, its own process, on a free port): reviews/s with one
review a request, from one client and from several at once (the server scores the requests waiting when its model
is free together), beside one `Predictor.predict` call over all of them in this process.

    python bench/bench_serve.py runs/tune/latest/final_model           # the quick-start's final model
    python bench/bench_serve.py MODEL_DIR --reviews 2000 --clients 1 16 64

The reviews are VADER's Amazon review sentences (the offline data's source), in file order.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from data import VADER_FILE, Results, bench_assets, timed


def vader_sentences(n: int) -> list[str]:
    lines = (bench_assets() / VADER_FILE).read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[2] for line in lines if line.count("\t") >= 2][:n]


def served(model_dir: str, texts: list[str], results: Results, clients: Sequence[int] = (1, 16)) -> None:
    """Rows of reviews/s through the server, one review a request, for each number of clients at once."""
    server = subprocess.Popen(
        [sys.executable, "-m", "lorasent.serve", model_dir, "--port", "0", "--max_texts", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # one access-log line a request
        text=True,
    )
    try:
        found = re.search(r" at (http://\S+)$", server.stdout.readline().strip())
        if not found:
            raise RuntimeError(f"the server did not start (exit status {server.poll()})")
        base = found[1]

        def post(text: str) -> None:
            request = urllib.request.Request(f"{base}/predict", data=json.dumps({"texts": [text]}).encode())
            with urllib.request.urlopen(request, timeout=120) as answer:
                answer.read()

        def calls() -> int:
            with urllib.request.urlopen(f"{base}/health", timeout=60) as answer:
                return json.loads(answer.read())["predict_calls"]

        post(texts[0])  # warm-up
        for n in clients:
            before = calls()
            with ThreadPoolExecutor(n) as pool, timed() as t:
                list(pool.map(post, texts))
            results.add(
                f"served, one review a request, {n} client(s) at once",
                len(texts) / t["s"],
                "reviews/s",
                f"{len(texts)} requests in {calls() - before} Predictor calls",
            )
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="A lorasent model folder (e.g. runs/tune/latest/final_model).")
    parser.add_argument("--reviews", type=int, default=1000, help="Reviews to send (default: %(default)s).")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 16], help="Clients at once, one run each (default: 1 16)."
    )
    parser.add_argument("--out", default="results/bench_serve.json", help="JSON file the results are written to.")
    args = parser.parse_args()
    from lorasent.predict import Predictor

    results = Results("bench_serve", smoke=False)
    texts = vader_sentences(args.reviews)
    predictor = Predictor.from_dir(args.model_dir)
    predictor.predict(texts[:64])  # warm-up
    with timed() as t:
        predictor.predict(texts)
    results.add("Predictor.predict, one call, in this process", len(texts) / t["s"], "reviews/s", "batch 64")
    served(args.model_dir, texts, results, args.clients)
    results.write(args.out)


if __name__ == "__main__":
    main()
