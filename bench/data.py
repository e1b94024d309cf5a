"""Shared pieces of the benchmarks: the model, the reviews, timing, and how results are printed and saved.

The benchmarks must run where the Hugging Face hub is unreachable (the GPU machine reaches nothing), so:

- the model is a random-init `distilbert-base-uncased` architecture (DistilBertConfig defaults: 6 layers,
  768 dim, 30,522-token vocabulary) with the bert-base-uncased WordPiece vocabulary taken from the offline
  all-MiniLM-L6-v2 folder, which uses that same uncased vocabulary;
- the reviews are synthetic but Amazon-like: each is a run of real Amazon review sentences (VADER's
  human-rated snippets, the offline default's source) of one polarity, with some off-polarity and neutral
  sentences mixed in, grown to a length drawn from a log-normal distribution of ~100 tokens mean (12..400).
  The label is the review's polarity, so the task is learnable and accuracies can be compared.

Both assets come from `bench_assets()`: a folder holding `vocab.txt` and the VADER sentences file, exported
here once with `python bench/data.py export-assets` (into the ignored `.whl/bench-assets`, which travels to the
GPU machine with the wheels), or read from their installed sources when that folder is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # lorasent, tune and analysis from this checkout when it is not pip-installed
    sys.path.append(str(REPO))
ASSETS_ENV = "BENCH_ASSETS"
DEFAULT_ASSETS = REPO / ".whl" / "bench-assets"
VOCAB_FILE = "vocab.txt"
VADER_FILE = "amazonReviewSnippets_GroundTruth.txt"

MEAN_TOKENS = 100  # target mean review length in tokens (Amazon Polarity title + content is about this)
MIN_TOKENS, MAX_TOKENS = 12, 400
ON_POLARITY = 0.8  # share of a review's sentences that carry its own polarity; the rest is noise


# ------------------------------------------------------------------------------------------------ assets


def bench_assets() -> Path:
    """The folder with vocab.txt and the VADER sentences: $BENCH_ASSETS, else .whl/bench-assets, else built."""
    folder = Path(os.environ.get(ASSETS_ENV) or DEFAULT_ASSETS)
    if (folder / VOCAB_FILE).is_file() and (folder / VADER_FILE).is_file():
        return folder
    return export_assets(folder)


def export_assets(dest: Path) -> Path:
    """Copy the WordPiece vocabulary (offline MiniLM package) and the VADER sentences (lorasent cache) to `dest`."""
    from lorasent.assets import offline_model_path, vader_amazon_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(offline_model_path() / VOCAB_FILE, dest / VOCAB_FILE)
    shutil.copyfile(vader_amazon_file(), dest / VADER_FILE)
    return dest


# ------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSize:
    """DistilBERT shape; the defaults are distilbert-base-uncased's."""

    n_layers: int = 6
    dim: int = 768
    n_heads: int = 12
    hidden_dim: int = 3072


FULL_MODEL = ModelSize()
SMOKE_MODEL = ModelSize(n_layers=2, dim=64, n_heads=2, hidden_dim=128)  # for --smoke on a 2-core CPU


def build_model_dir(out_dir: Path, size: ModelSize = FULL_MODEL, seed: int = 0) -> Path:
    """A random-init DistilBERT classifier folder (safetensors + tokenizer) that lorasent loads by path.

    Built once per folder: an existing folder with config.json is reused.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    lines = (bench_assets() / VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    tokenizer = DistilBertTokenizerFast(vocab={token: i for i, token in enumerate(lines)}, model_max_length=512)
    config = DistilBertConfig(
        n_layers=size.n_layers,
        dim=size.dim,
        n_heads=size.n_heads,
        hidden_dim=size.hidden_dim,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    if config.vocab_size != len(tokenizer):
        raise RuntimeError(f"vocab.txt holds {len(tokenizer)} tokens, DistilBERT expects {config.vocab_size}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DistilBertForSequenceClassification(config)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------- reviews


def _vader_pools(tokenizer: Any) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """VADER sentences, their token counts (no special tokens), and the sentence ids of each polarity pool."""
    sentences, ratings = [], []
    for line in (bench_assets() / VADER_FILE).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            ratings.append(float(parts[1]))
            sentences.append(parts[2].strip())
    counts = np.array([len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]])
    r = np.array(ratings)
    pools = {"pos": np.flatnonzero(r >= 0.5), "neg": np.flatnonzero(r <= -0.5), "neu": np.flatnonzero(abs(r) < 0.5)}
    return sentences, counts, pools


def synthetic_reviews(n: int, tokenizer: Any, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """`n` Amazon-like reviews and their 0/1 labels (balanced), lengths ~ log-normal, mean ~MEAN_TOKENS tokens.

    Vectorised (400k reviews in seconds): every review draws up to `slots` sentences at once and keeps the
    shortest prefix that reaches its target length (dropping the last one if it would pass MAX_TOKENS).
    """
    rng = np.random.default_rng(seed)
    sentences, counts, pools = _vader_pools(tokenizer)
    labels = rng.permutation(np.arange(n) % 2)
    sigma = 0.55
    overshoot = 18  # the last sentence ends past the target: half a sentence, plus [CLS] and [SEP]
    median = (MEAN_TOKENS - overshoot) / np.exp(sigma**2 / 2)
    targets = np.clip(rng.lognormal(np.log(median), sigma, n), MIN_TOKENS, MAX_TOKENS - 2)
    slots = 64
    u = rng.random((n, slots))
    own = np.where(labels[:, None] == 1, 0, 1)  # pool order: pos, neg, neu
    pool_of = np.where(u < ON_POLARITY, own, np.where(u < ON_POLARITY + 0.12, 2, 1 - own))
    ids = np.empty((n, slots), dtype=np.int64)
    for k, name in enumerate(("pos", "neg", "neu")):
        mask = pool_of == k
        ids[mask] = pools[name][rng.integers(len(pools[name]), size=int(mask.sum()))]
    cumulative = np.cumsum(counts[ids], axis=1)
    keep = np.minimum((cumulative < targets[:, None]).sum(axis=1) + 1, slots)
    too_long = cumulative[np.arange(n), keep - 1] > MAX_TOKENS - 2
    keep = np.where(too_long & (keep > 1), keep - 1, keep)
    texts = [" ".join(sentences[j] for j in row[:k]) for row, k in zip(ids.tolist(), keep.tolist(), strict=True)]
    return texts, labels


def write_reviews(path: Path, tokenizer: Any, sizes: dict[str, int], seed: int = 0) -> Path:
    """A local data file (.csv or .parquet) with text, label and split columns, for lorasent's file loader."""
    import pandas as pd

    path = Path(path)
    if path.is_file():
        return path
    total = sum(sizes.values())
    texts, labels = synthetic_reviews(total, tokenizer, seed)
    split = np.repeat(list(sizes), list(sizes.values()))
    frame = pd.DataFrame({"text": texts, "label": labels, "split": split})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    tmp.rename(path)
    return path


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------- the workspace


@dataclass
class Workspace:
    """Where a benchmark builds its model, data and runs; `smoke` shrinks everything for a 2-core CPU."""

    root: Path
    smoke: bool = False

    @property
    def model_size(self) -> ModelSize:
        return SMOKE_MODEL if self.smoke else FULL_MODEL

    def model_dir(self) -> Path:
        s = self.model_size
        return build_model_dir(self.root / "models" / f"distilbert-l{s.n_layers}-d{s.dim}", s)

    def reviews(self, name: str, sizes: dict[str, int], suffix: str = ".csv", seed: int = 0) -> Path:
        """A review file named by its split sizes, so every benchmark reuses the same file."""
        key = "-".join(f"{k}{v}" for k, v in sizes.items())
        return write_reviews(
            self.root / "data" / f"{name}-{key}-s{seed}{suffix}", load_tokenizer(self.model_dir()), sizes, seed
        )

    def run_dir(self, name: str) -> Path:
        path = self.root / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        return path


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes so the code paths run in < 60 s on a CPU.")
    parser.add_argument("--out", default=default_out, help="JSON file the results are written to.")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("BENCH_WORKDIR", "/tmp/lorasent-bench"),
        help="Where the model, data and runs are built (reused between scripts).",
    )


def workspace(args: argparse.Namespace) -> Workspace:
    """Set the process up for a benchmark (lorasent cache and hub offline) and return its workspace."""
    root = Path(args.workdir) / ("smoke" if args.smoke else "full")
    os.environ.setdefault("LORASENT_CACHE", str(root / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return Workspace(root, smoke=args.smoke)


# ------------------------------------------------------------------------------------------ measurement


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def sync() -> None:
    """Wait for queued GPU work, so a host clock reads the time the work took."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_census(step: Callable[[], None], steps: int = 10) -> dict[str, float]:
    """Where one training step's time goes between host and GPU (CUDA only): its kernels, the host's time to enqueue
    it, its wall time and the GPU's busy time. Host time near wall time and GPU busy time well below it: the GPU
    waits on the host (launch-bound). `step` must not wait for the GPU itself."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host_s = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    wall_s = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "kernels_per_step": len(kernels),
        "host_ms": host_s * 1e3,
        "wall_ms": wall_s * 1e3,
        "gpu_busy_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
    }


def dispatched_ops(step: Callable[[], None]) -> int:
    """The ATen ops one call of `step` dispatches below autograd, backward included, views left out: about the
    kernels it launches on a GPU, counted on any device (a CPU run shows what a change does to the launch count)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not (func.is_view or func is torch.ops.aten._unsafe_view.default):  # a view: no kernel
                self.ops += 1
            return func(*args, **(kwargs or {}))

    step()  # a warm step first: caches (row layouts, lazy state) filled, as in the timed steps
    with Count() as count:
        step()
    return count.ops


def describe_census(census: dict[str, float]) -> str:
    return (
        f"host {census['host_ms']:.1f} ms, wall {census['wall_ms']:.1f} ms, GPU busy {census['gpu_busy_ms']:.1f} ms "
        "per step"
    )


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """`with timed() as t: ...` then `t["s"]` holds the wall seconds, GPU work included."""
    sync()
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        sync()
        result["s"] = time.perf_counter() - start


@dataclass
class Results:
    """The figures of one benchmark: printed as a table, written as JSON."""

    bench: str
    smoke: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, case: str, value: float | str | None, unit: str = "", note: str = "", **more: Any) -> None:
        self.rows.append({"case": case, "value": value, "unit": unit, "note": note, **more})
        print(f"[{self.bench}] {case}: {_fmt(value)} {unit}  {note}".rstrip(), flush=True)

    def value(self, case: str) -> Any:
        return next(row["value"] for row in self.rows if row["case"] == case)

    def save(self, out: str | Path) -> dict[str, Any]:
        """Write the JSON results file (again after every part, so a run cut short keeps what it measured)."""
        import torch
        import transformers

        payload = {
            "bench": self.bench,
            "smoke": self.smoke,
            "device": device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "rows": self.rows,
            **self.extra,
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
        return payload

    def write(self, out: str | Path) -> None:
        """Save, print the table, then end the process with status 1 if a part failed: `section` keeps the other
        parts going, but a run (or dry run) whose every step says "exit 0" must not hide a lost figure."""
        payload = self.save(out)
        print_table(f"{self.bench} on {payload['device']}{' (smoke sizes)' if self.smoke else ''}", self.rows)
        print(f"results written to {out}", flush=True)
        failed = [row["case"].removesuffix(FAILED) for row in self.rows if row["case"].endswith(FAILED)]
        if failed:
            raise SystemExit(f"[{self.bench}] failed: {', '.join(failed)} (see the traceback above each)")


FAILED = ": FAILED"  # ends the row of a part that raised


def section(results: Results, out: str, name: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is recorded as a row and the next part still runs. Results are saved after each."""
    started = time.perf_counter()
    try:
        fn()
    except Exception as e:  # a benchmark keeps going: every other figure is still worth having
        traceback.print_exc()
        results.add(f"{name}{FAILED}", f"{type(e).__name__}: {e}"[:300])
    results.extra.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
    results.save(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(title: str, rows: Sequence[dict[str, Any]], width: int = 160) -> None:
    """A plain-text table, one line per row, each cell cut to `width` characters."""
    cells = [(r["case"], f"{_fmt(r['value'])} {r['unit']}".strip(), r["note"]) for r in rows]
    cells = [tuple(" ".join(str(c).split())[:width] for c in row) for row in cells]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(("case", "figure", "note"))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}\n{line}")
    for i, row in enumerate([("case", "figure", "note"), *cells]):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print(line)
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-assets", help="Copy vocab.txt and the VADER sentences for the GPU machine.")
    export.add_argument("--dest", default=str(DEFAULT_ASSETS))
    sample = sub.add_parser("sample", help="Print a few synthetic reviews and the length distribution.")
    sample.add_argument("-n", type=int, default=2000)
    summary = sub.add_parser("summary", help="Print the tables of benchmark JSON files, one after another.")
    summary.add_argument("files", nargs="+")
    summary.add_argument("--width", type=int, default=72, help="Characters kept per cell (the notes are long).")
    args = parser.parse_args()
    if args.command == "export-assets":
        print(export_assets(Path(args.dest)))
        return
    if args.command == "summary":
        for file in args.files:
            try:
                payload = json.loads(Path(file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                print(f"\n{file}: unreadable ({e})")
                continue
            title = f"{payload['bench']} on {payload['device']} ({Path(file).name}, {payload['date']})"
            print_table(title, payload["rows"], width=args.width)
        return
    tokenizer = load_tokenizer(build_model_dir(Path("/tmp/lorasent-bench/smoke/models/distilbert-l2-d64"), SMOKE_MODEL))
    texts, labels = synthetic_reviews(args.n, tokenizer)
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    for text, label in list(zip(texts, labels, strict=True))[:3]:
        print(label, text[:300], "...")
    print(
        f"tokens: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, p5 {np.percentile(lengths, 5):.0f}, "
        f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}; positive share {labels.mean():.2f}"
    )


if __name__ == "__main__":
    main()
