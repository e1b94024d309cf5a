"""Full scale (goal 4): tokenisation throughput on many reviews, and a large-batch training epoch's tokens/s.

Prints, and writes to --out:
  - lorasent's tokenisation (`tokenized_splits`, the cache every trial on a node reuses) of N synthetic
    Amazon-like reviews (400k by default; the `full` preset's 3.6M reviews would take 9x as long): reading and
    checking the file, tokenising (reviews/s; goal >= 100k/s on 16 cores) as users get it, then forced into threads
    of one process and into encoder processes, and the cache hit a second trial sees;
  - (part `tokenise_map`, not run by default) the previous way on the same reviews, `datasets.map` over
    `tokenizer(...)` in up to 8 processes, and the speed-up of lorasent's tokenisation over it;
  - (part `epoch`) a training epoch of lorasent `train()` at batch 256, bf16 where the GPU has it, length-grouped,
    on 20k reviews: real (unpadded) tokens/s (goal >= 1M/s on one H100) and the share of the chip's bf16 peak that
    implies; the hand-written loop at the same batch; the same epoch with `half_precision_base`; and the kernels
    that take a step's GPU time (after an untimed warm-up epoch);
  - (part `epoch_compile`, not run by default) the same epoch with `torch_compile`;
  - (part `cores`, not run by default) the tokenizer alone in one process and in one process per core: how many
    cores' worth of throughput the machine really gives.

    python bench/bench_scale.py --smoke
    python bench/bench_scale.py --reviews 400000 --out results/scale.json
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from data import Results, Workspace, add_common_args, section, timed, workspace

BF16_PEAK = 790e12  # bf16 dense matmul FLOP/s measured on this workplace's H100 and H200 (KINDS.md)


def scale_args(ws: Workspace, args: argparse.Namespace) -> tuple[Any, Any, float]:
    """Data and model arguments of the scale reviews file (built on first use) and the seconds building it took."""
    from lorasent.config import DataArguments, ModelArguments

    held_out = min(2000, args.reviews // 10)
    sizes = {"train": args.reviews - 2 * held_out, "validation": held_out, "test": held_out}
    with timed() as gen:
        data_file = ws.reviews("scale", sizes, suffix=".parquet")
    data_args = DataArguments(dataset=str(data_file), max_length=512, cache_dir=str(ws.root / "cache"))
    return data_args, ModelArguments(model_name_or_path=str(ws.model_dir())), gen["s"]


def cold_tokenisation(data_args: Any, model_args: Any, workers: str = "auto") -> tuple[Any, float]:
    """`tokenized_splits` on an empty cache (a cache hit from an earlier run would measure nothing): splits, s.

    workers: "auto" (what users get: processes for large splits), "threads" or "processes".
    """
    import lorasent.tokenize as tokenize

    shutil.rmtree(tokenize.tokenized_cache_dir(data_args, tokenize.load_tokenizer(model_args)), ignore_errors=True)
    rule = tokenize.PROCESS_MIN_ROWS
    if workers != "auto":
        tokenize.PROCESS_MIN_ROWS = 0 if workers == "processes" else 1 << 62
    try:
        with timed() as cold:
            splits = tokenize.tokenized_splits(data_args, model_args)
    finally:
        tokenize.PROCESS_MIN_ROWS = rule
    return splits, cold["s"]


def tokenisation(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    from lorasent.data import load_splits
    from lorasent.tokenize import tokenized_splits

    data_args, model_args, generate_s = scale_args(ws, args)
    load_splits(data_args)  # a process's first read costs 1-2 s more at 200k reviews; tokenisation's read is not one
    with timed() as load:
        load_splits(data_args)
    splits, cold_s = cold_tokenisation(data_args, model_args)
    with timed() as warm:
        tokenized_splits(data_args, model_args)
    # Both ways on the same machine: threads of one process (GIL-bound beyond a few cores) and encoder processes.
    forced = {workers: cold_tokenisation(data_args, model_args, workers)[1] for workers in ("threads", "processes")}
    n = args.reviews
    tokens = sum(sum(splits[s]["length"][:]) for s in splits)
    cores = len(os.sched_getaffinity(0))  # lorasent tokenises with one worker per core it may run on
    load_average = os.getloadavg()[0]  # other processes' share of those cores, on a shared machine

    def rate_note(seconds: float) -> str:
        return (
            f"{seconds:.1f} s, {cores} cores ({n / seconds / cores:,.0f}/s per core), {tokens / n:.0f} tokens/review, "
            f"{tokens / seconds / 1e6:.2f}M tokens/s; load average {load_average:.1f}"
        )

    tokenise_s = max(cold_s - load["s"], 1e-9)
    results.add(f"synthetic reviews generated and written ({n:,})", generate_s, "s", "not part of the figures below")
    results.add("read + check the data file (load_splits)", n / load["s"], "reviews/s", f"{load['s']:.1f} s")
    results.add(
        "tokenisation (tokenized_splits cold, minus the read)",
        n / tokenise_s,
        "reviews/s",
        f"goal >= 100k/s on 16 cores; {rate_note(tokenise_s)}",
    )
    for workers, seconds in forced.items():
        results.add(
            f"tokenisation in {workers} (forced)",
            n / max(seconds - load["s"], 1e-9),
            "reviews/s",
            rate_note(max(seconds - load["s"], 1e-9)),
        )
    results.add("whole cold tokenized_splits (read + tokenise + save)", n / cold_s, "reviews/s", f"{cold_s:.1f} s")
    results.add("cache hit (what every later trial on the node pays)", warm["s"], "s", "memory-mapped Arrow")
    results.extra["tokenisation"] = {"reviews": n, "tokens": tokens, "load_s": load["s"], "cold_s": cold_s,
                                     "threads_cold_s": forced["threads"], "processes_cold_s": forced["processes"],
                                     "warm_s": warm["s"], "generate_s": generate_s, "cores": cores,
                                     "load_average": load_average}  # fmt: skip
    results.extra["scale_file"] = data_args.dataset


def _encode_texts(texts: list[str], encode: Any = None) -> float:
    """Seconds one process takes to encode `texts` on one thread, by `encode` or else the fork-inherited one."""
    import time

    encode = encode or _CORE_ENCODER
    start = time.perf_counter()
    for begin in range(0, len(texts), 1000):
        encode(texts[begin : begin + 1000])
    return time.perf_counter() - start


_CORE_ENCODER: Any = None  # set before forking the probe processes


def with_new_words(texts: list[str], share: float, seed: int = 0) -> list[str]:
    """`texts` with `share` of their words replaced by made-up words, each new: a long tail that a word cache keeps
    missing (the synthetic reviews repeat ~5k distinct words of VADER's; a real corpus brings new ones throughout)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for text in texts:
        words = text.split(" ")
        for i in np.flatnonzero(rng.random(len(words)) < share).tolist():
            words[i] = "".join(rng.choice(letters, int(rng.integers(4, 12))))
        out.append(" ".join(words))
    return out


def core_scaling(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    """How many cores' worth of encoder throughput this machine gives: the tokenisation goal's ceiling.

    The same texts encoded in one process by the Rust tokenizer alone, by lorasent's encoder in threads (printable
    ASCII texts by a twin without BERT's normaliser) and by an encoder process's (a word cache in front of the
    WordPiece; once more with 1% of the words new, a long tail), then by encoder processes, one per core at once
    (forked, each with a cold cache). A cgroup CPU quota or shared hyperthreads show as a total far below cores x
    the one-process rate.
    """
    import multiprocessing
    from pathlib import Path

    from data import load_tokenizer, synthetic_reviews

    from lorasent.encoding import backend_encoder

    global _CORE_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(ws.model_dir())
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    texts, _ = synthetic_reviews(2_000 if args.smoke else 20_000, tokenizer)
    raw = _encode_texts(texts, backend.encode_batch_fast)
    twin = _encode_texts(texts, backend_encoder(backend))
    by_word = _encode_texts(texts, backend_encoder(backend, by_word=True))
    rare = _encode_texts(with_new_words(texts, 0.01), backend_encoder(backend, by_word=True))
    cores = len(os.sched_getaffinity(0))
    _CORE_ENCODER = backend_encoder(backend, by_word=True)  # each forked process gets it with an empty cache
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        many = pool.map(_encode_texts, [texts] * cores)
    wall = max(many)
    quota = Path("/sys/fs/cgroup/cpu.max")
    n = len(texts)
    results.add("tokenizer alone, one process, one thread", n / raw, "reviews/s", f"{n:,} reviews")
    results.add("lorasent's encoder in a thread, one thread", n / twin, "reviews/s", "printable ASCII twin")
    results.add("lorasent's encoder process, one thread", n / by_word, "reviews/s", "word cache, cold at the start")
    results.add("the same, 1% of the words new", n / rare, "reviews/s", f"~{n:,} words its cache never saw")
    results.add(
        f"lorasent's encoder processes, {cores} at once (one per core)",
        cores * n / wall,
        "reviews/s",
        f"{cores * n / wall / (n / by_word):.1f} cores' worth of the one-process rate; slowest process "
        f"{wall:.1f} s; cgroup cpu.max: {quota.read_text().strip() if quota.exists() else 'n/a'}",
    )


def tokenisation_by_map(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    """The way lorasent tokenised before (run G1): `datasets.map` over `tokenizer(...)`, up to 8 processes."""
    import datasets

    from lorasent.data import load_splits
    from lorasent.tokenize import effective_max_length, load_tokenizer

    data_args, model_args, _ = scale_args(ws, args)
    splits = load_splits(data_args)
    tokenizer = load_tokenizer(model_args)
    max_length = effective_max_length(data_args, tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    workers = min(8, len(os.sched_getaffinity(0))) if len(splits["train"]) >= 50_000 else 1  # its old rule
    with timed() as mapped:
        for split in splits.values():
            features = datasets.Features(
                input_ids=datasets.List(datasets.Value("int32")),
                attention_mask=datasets.List(datasets.Value("int8")),
                label=split.features["label"],
                length=datasets.Value("int32"),
            )
            split.map(encode, batched=True, batch_size=1000, remove_columns=["text"], features=features,
                      num_proc=workers if len(split) >= 50_000 else None)  # fmt: skip
    n = args.reviews
    results.add(
        f"previous tokenisation: datasets.map + tokenizer(), {workers} process(es) for train",
        n / mapped["s"],
        "reviews/s",
        f"{mapped['s']:.1f} s, in memory (not saved); what run G1 measured at 18,250/s on the H200",
    )
    try:
        now = results.value("tokenisation (tokenized_splits cold, minus the read)")
    except StopIteration:  # the tokenise part did not run in this process
        return
    results.add("tokenisation speed-up: lorasent now / previous", now / (n / mapped["s"]), "x", "same data, same run")


def epoch_args(ws: Workspace, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Data, model and training arguments of the large-batch epoch: 20k reviews, batch 256, 2 epochs."""
    from lorasent.config import DataArguments, ModelArguments, TrainArguments

    data_file = ws.reviews("epoch", {"train": args.epoch_reviews, "validation": 1000, "test": 100}, suffix=".parquet")
    data_args = DataArguments(
        dataset=str(data_file), max_length=512, max_eval_samples=1000, cache_dir=str(ws.root / "cache")
    )
    model_args = ModelArguments(model_name_or_path=str(ws.model_dir()), lora_r=8, lora_alpha=16)
    train_args = TrainArguments(
        output_dir=str(ws.run_dir("scale-train")),
        learning_rate=1e-3,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512,
        num_train_epochs=2,
    )
    return data_args, model_args, train_args


def flop_per_token(ws: Workspace) -> int:
    """Frozen base: forward (2) + input gradients (2) FLOP per weight, as the issue counts (~170 MFLOP, DistilBERT)."""
    model = ws.model_size
    return 4 * model.n_layers * (4 * model.dim**2 + 2 * model.dim * model.hidden_dim)


def lorasent_epoch(ws: Workspace, args: argparse.Namespace, results: Results, label: str, **changes: Any) -> float:
    """One lorasent `train()` of 2 epochs with `changes` to the training arguments: the steady epoch's tokens/s."""
    import torch

    from lorasent.config import replace
    from lorasent.train import train

    data_args, model_args, train_args = epoch_args(ws, args)
    result = train(data_args, model_args, replace(train_args, **changes), save_final=False)
    steady = result.history[-1]
    tps = steady["train_tokens_per_second"]
    flop = flop_per_token(ws)
    chip = f"{tps * flop / BF16_PEAK:.1%} of a {BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak"
    chip = chip if torch.cuda.is_available() else "CPU"
    results.add(
        f"lorasent train() epoch, batch {args.batch_size}, {args.epoch_reviews:,} reviews, {label}",
        tps,
        "real tokens/s",
        f"goal >= 1M/s on one H100; steady epoch {steady['train_seconds']:.1f} s (epoch 1: "
        f"{result.history[0]['train_seconds']:.1f} s); {chip} at {flop / 1e6:.1f} MFLOP/token; accuracy "
        f"{steady.get('accuracy', float('nan')):.3f}",
    )
    results.extra.setdefault("large_batch", {})[label] = result.history
    results.save(args.out)  # a step cut by its timeout keeps the epochs that finished
    return tps


def large_batch(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    """lorasent's epoch as shipped, the hand loop on the same data, bf16 base weights, and a step's kernels.

    An untimed hand-loop epoch goes first: every kernel and shape of this data is then loaded and tuned in this
    process, so no variant pays that for the others (run G4 measured its first variant with that cost in it).
    """
    import torch
    from handloop import hand_loop

    data_args, model_args, _ = epoch_args(ws, args)
    multiple = 8 if torch.cuda.is_available() else None
    hand_loop(data_args, model_args, batch_size=args.batch_size, epochs=1, pad_to_multiple_of=multiple)  # warm-up
    tps = lorasent_epoch(ws, args, results, "as shipped (fp32 base weights)")
    hand = hand_loop(data_args, model_args, batch_size=args.batch_size, epochs=2, learning_rate=1e-3,
                     pad_to_multiple_of=multiple)  # fmt: skip
    rates = hand.rates(-1)
    results.add(
        f"hand loop ({hand.precision}, fused AdamW), batch {args.batch_size}, same data",
        rates["real_tokens_per_s"],
        "real tokens/s",
        f"steady epoch {rates['seconds']:.1f} s; padding {rates['padding_share']:.0%}; lorasent/hand "
        f"{tps / rates['real_tokens_per_s']:.2f} (goal 2: >= 0.85)",
    )
    results.extra["hand_loop"] = hand.__dict__
    results.save(args.out)
    lorasent_epoch(ws, args, results, "half_precision_base (bf16 base weights)", half_precision_base=True)
    step_profile(ws, args, results)


def compiled_epoch(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    lorasent_epoch(ws, args, results, "torch_compile (epoch 1 includes compiling)", torch_compile=True)


def step_profile(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    """Where a batch-256 training step's time goes: the kernels (CPU ops without a GPU) with the most self time."""
    import torch
    from handloop import autocast_dtype, one_batch_setup, train_step
    from torch.profiler import ProfilerActivity, profile

    from lorasent.tokenize import tokenized_splits

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    data_args, model_args, _ = epoch_args(ws, args)
    lengths = tokenized_splits(data_args, model_args)["train"]["length"][:]
    typical = sorted(range(len(lengths)), key=lengths.__getitem__)[len(lengths) // 2 :][: args.batch_size]  # median up
    model, optimizer, params, batch = one_batch_setup(data_args, model_args, typical, learning_rate=1e-3, device=device)
    dtype = autocast_dtype()

    def step() -> None:
        train_step(model, optimizer, params, batch, dtype)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]

    def self_us(event: Any) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    events.sort(key=self_us, reverse=True)
    total_us = sum(self_us(e) for e in events)
    tokens = int(batch["attention_mask"].sum())
    results.add(
        f"batch step profile, {args.batch_size} x {batch['input_ids'].shape[1]} tokens ({'GPU' if cuda else 'CPU'})",
        total_us / 1e3,
        "ms",
        f"{tokens / (total_us / 1e6):,.0f} real tokens/s at this busy time; "
        + "; ".join(f"{e.key[:60]} {self_us(e) / 1e3:.2f} ms x{e.count}" for e in events[:8]),
    )
    results.extra["step_profile"] = [{"kernel": e.key, "ms": self_us(e) / 1e3, "count": e.count} for e in events[:40]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/bench_scale.json")
    parser.add_argument("--reviews", type=int, default=None, help="Reviews to tokenise (default 400k; smoke 6k).")
    parser.add_argument("--epoch_reviews", type=int, default=None, help="Reviews per training epoch (20k; smoke 1k).")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["tokenise", "epoch"],
        choices=["tokenise", "tokenise_map", "epoch", "epoch_compile", "cores"],
    )
    args = parser.parse_args()
    args.reviews = args.reviews or (6000 if args.smoke else 400_000)
    args.epoch_reviews = args.epoch_reviews or (1024 if args.smoke else 20_000)
    ws = workspace(args)
    results = Results("bench_scale", args.smoke)
    parts = {
        "tokenise": tokenisation,
        "tokenise_map": tokenisation_by_map,
        "epoch": large_batch,
        "epoch_compile": compiled_epoch,
        "cores": core_scaling,
    }
    for name in args.parts:
        section(results, args.out, name, lambda fn=parts[name]: fn(ws, args, results))
    results.write(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
