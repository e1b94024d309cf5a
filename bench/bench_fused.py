"""Several trials in one process on one shared base model: how much faster than one process per trial? (goals 1, 3)

G3 packed 8 trial processes on one H100 and got ~1.8x the trial-epochs of one: at batch 4-16 each step is a few
ms of small, launch-bound kernels, and processes time-slice the GPU. Trials of one search differ only in their
LoRA adapters, heads and hyperparameters; the frozen base is the same. So K trials could run as one forward over
their K batches concatenated, each row going through its own trial's adapter and head. This script measures
that idea before anything is built on it: per step of K trials (forward, backward, AdamW; bf16 autocast on a GPU)

  solo        K peft models stepped one after another in one process (what one trial per process does, summed)
  processes   the same K solo trials in K processes at once on the device (what lorasent's packing does now)
  processes_mps  the same under NVIDIA MPS, where the machine has it (kernels of the K processes run side by side)
  peft_mixed  one peft model with K adapters, rows routed by peft's own mixed-batch forward (`adapter_names`)
  concat      the K adapters of each target layer stacked into one matrix pair: x @ A_all, masked to each row's own
              trial (the mask also carries rank and alpha / r), @ B_all; heads run per trial on their own rows
  shared_base what was built on concat, as shipped: `lorasent.fused.SharedBase.step` over K trial slots, on real
              tokenised reviews (batches width-aligned across slots, padded per step; its row says how much of the
              padded tokens were real), with its per-slot clipping, schedule and isolation of a diverging trial

and checks first, in fp32 with dropout off, that the prototypes (peft_mixed, concat) give every trial the gradients
it gets alone (tests/test_fused.py checks the shipped step's).

    python bench/bench_fused.py --smoke               # CPU, tiny model, ~1 minute
    python bench/bench_fused.py --trials 8 --batch 4 16 --out results/fused.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from data import (
    Results,
    Workspace,
    add_common_args,
    describe_census,
    dispatched_ops,
    load_tokenizer,
    section,
    step_census,
    sync,
    workspace,
)
from peft import LoraConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import AutoModelForSequenceClassification

if TYPE_CHECKING:  # imported where used: the K spawned trial processes re-import this script and need none of it
    from lorasent.fused import SharedBase

RANKS = (2, 4, 8)  # three LoRA ranks around the seed's r 4, cycled over the K trials
SEED_BATCHES = (4, 8, 16)  # the seed grid's batch sizes
MPS_DIRS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
TARGETS = ["q_lin", "v_lin"]
HEAD = ("pre_classifier", "classifier")  # DistilBERT's classification head, trained in full as in lorasent
ALPHA = 16
DROPOUT = 0.1  # LoRA dropout of the timed trials
MIN_LENGTH = 0.9  # shared_base trains on reviews of at least this share of --length tokens (truncated at --length)


def lora_config(r: int, dropout: float) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=TARGETS,
        modules_to_save=list(HEAD),  # peft appends its own head names to the list it is given
    )


def load_base(model_dir: Any, no_dropout: bool) -> torch.nn.Module:
    extra = {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0} if no_dropout else {}
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, **extra)


def batches(sizes: Sequence[int], length: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One batch per trial, of that trial's size: random ids of `length` tokens (no padding), random labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, vocab, (size, length), generator=g),
            "labels": torch.randint(0, 2, (size,), generator=g),
        }
        for size in sizes
    ]


def on_device(data: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in batch.items()} for batch in data]


# ------------------------------------------------------------------------------------------------ the ways


class Way:
    """One way of stepping K trials: `loss_and_backward` differs, the optimizer step is the same."""

    optimizers: list[torch.optim.Optimizer]

    def loss_and_backward(self, data: list[dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def step(self, data: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
        with autocast(dtype):
            self.loss_and_backward(data)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def trained(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """A peft model's trained tensors of one adapter, named without the adapter or peft's prefix, so that every way
    names trial k's tensors alike (`distilbert...q_lin.lora_A.weight`, `classifier.modules_to_save.bias`)."""
    tag = f".{adapter}"
    return {
        name.replace(tag, "").replace("base_model.model.", ""): p
        for name, p in model.named_parameters()
        if p.requires_grad and tag + "." in name + "."
    }


class Solo(Way):
    """K peft models, one step each in turn."""

    def __init__(self, base: torch.nn.Module, ranks: list[int], dropout: float, device: torch.device) -> None:
        self.models = [get_peft_model(copy.deepcopy(base), lora_config(r, dropout)).to(device).train() for r in ranks]
        self.optimizers = [adamw(m.parameters(), device) for m in self.models]

    def loss_and_backward(self, data: list[dict[str, torch.Tensor]]) -> None:
        for model, batch in zip(self.models, data, strict=True):
            model(**batch).loss.backward()

    def grads(self, k: int) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in trained(self.models[k], "default").items()}

    def load(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in trained(self.models[k], "default").items():
                p.copy_(weights[name])


class PeftMixed(Way):
    """One peft model with K adapters; each row runs through its trial's adapter and head (peft's mixed batch)."""

    def __init__(self, base: torch.nn.Module, ranks: list[int], dropout: float, device: torch.device) -> None:
        self.names = [f"t{k}" for k in range(len(ranks))]
        model = get_peft_model(copy.deepcopy(base), lora_config(ranks[0], dropout), adapter_name=self.names[0])
        for name, r in zip(self.names[1:], ranks[1:], strict=True):
            model.add_adapter(name, lora_config(r, dropout))
        model.base_model.set_requires_grad(self.names, True)  # peft trains only the active adapter by default
        self.model = model.to(device).train()
        # peft refuses `adapter_names` in training mode at the top level; the layers themselves take it.
        self.inner = model.base_model.model
        self.routed = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self.optimizers = [adamw([p for p in model.parameters() if p.requires_grad], device)]

    def loss_and_backward(self, data: list[dict[str, torch.Tensor]]) -> None:
        rows = [name for name, batch in zip(self.names, data, strict=True) for _ in range(len(batch["labels"]))]
        hooks = [m.register_forward_pre_hook(_route(rows), with_kwargs=True) for m in self.routed]
        try:
            logits = self.inner(input_ids=torch.cat([b["input_ids"] for b in data])).logits
        finally:
            for hook in hooks:
                hook.remove()
        per_trial_loss(logits, data).backward()

    def grads(self, k: int) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in trained(self.model, self.names[k]).items()}

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in trained(self.model, self.names[k]).items()}


def _route(rows: list[str]) -> Callable[..., Any]:
    def pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = rows
        return args, kwargs

    return pre_forward


class StackedLora(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters stacked: two matmuls for all trials, a mask keeps each row to its own."""

    def __init__(self, base: torch.nn.Linear, ranks: list[int], dropout: float) -> None:
        super().__init__()
        self.base, self.r_max = base, max(ranks)
        width = len(ranks) * self.r_max
        self.lora_A = torch.nn.Parameter(torch.zeros(width, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, width))
        mask = torch.zeros(len(ranks), width)
        for k, r in enumerate(ranks):
            mask[k, k * self.r_max : k * self.r_max + r] = ALPHA / r
            torch.nn.init.kaiming_uniform_(self.lora_A[k * self.r_max : k * self.r_max + r], a=5**0.5)
        self.register_buffer("scale", mask)  # [K, K * r_max]: trial k's columns, times alpha / r_k
        self.dropout = torch.nn.Dropout(dropout)
        self.row_scale: torch.Tensor | None = None  # [rows, 1, K * r_max], set per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.dropout(x) @ self.lora_A.to(x.dtype).t()) * self.row_scale.to(x.dtype)
        return self.base(x) + h @ self.lora_B.to(x.dtype).t()


class Concat(Way):
    """The frozen base once; per target layer one StackedLora for all K trials; per trial its own head."""

    def __init__(self, base: torch.nn.Module, ranks: list[int], dropout: float, device: torch.device) -> None:
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: list[StackedLora] = []
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS:
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                stacked = StackedLora(module, ranks, dropout)
                setattr(parent, name.rsplit(".", 1)[-1], stacked)
                self.layers.append(stacked)
        self.heads = torch.nn.ModuleList(
            torch.nn.ModuleDict({h: copy.deepcopy(getattr(model, h)).requires_grad_(True) for h in HEAD}) for _ in ranks
        )
        self.ranks = ranks
        self.model = model.to(device).train()
        self.heads.to(device).train()
        self.head_dropout = model.dropout
        params = [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)] + list(self.heads.parameters())
        self.optimizers = [adamw(params, device)]

    def loss_and_backward(self, data: list[dict[str, torch.Tensor]]) -> None:
        sizes = [len(b["labels"]) for b in data]
        owner = torch.repeat_interleave(torch.arange(len(data)), torch.tensor(sizes)).to(data[0]["labels"].device)
        for layer in self.layers:
            layer.row_scale = layer.scale[owner].unsqueeze(1)
        hidden = self.model.distilbert(input_ids=torch.cat([b["input_ids"] for b in data])).last_hidden_state[:, 0]
        logits, start = [], 0
        for head, size in zip(self.heads, sizes, strict=True):  # DistilBertForSequenceClassification's head
            h = torch.relu(head["pre_classifier"](hidden[start : start + size]))
            logits.append(head["classifier"](self.head_dropout(h)))
            start += size
        per_trial_loss(torch.cat(logits), data).backward()

    def _trial_parts(self, k: int) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
        """(name as peft would save it, parameter, index of trial k's part in it) for each tensor trial k trains."""
        for name, module in self.model.named_modules():
            if isinstance(module, StackedLora):
                cols = slice(k * module.r_max, k * module.r_max + self.ranks[k])
                yield f"{name}.lora_A.weight", module.lora_A, cols
                yield f"{name}.lora_B.weight", module.lora_B, (slice(None), cols)
        for h in HEAD:
            for pname, p in self.heads[k][h].named_parameters():
                yield f"{h}.modules_to_save.{pname}", p, slice(None)

    def grads(self, k: int) -> dict[str, torch.Tensor]:
        """Trial k's slice of the stacked gradients, shaped as peft's lora_A / lora_B of rank r_k."""
        return {name: p.grad[index] for name, p, index in self._trial_parts(k)}

    def load(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        """Set trial k's adapter and head to `weights` (named as `grads` names them)."""
        with torch.no_grad():
            for name, p, index in self._trial_parts(k):
                p[index] = weights[name]


class SharedBaseWay:
    """The shipped fused step over K trial slots. Each slot draws its own batches of real reviews, so the `data` and
    `dtype` that `time_way` passes go unused (the shared base autocasts itself)."""

    def __init__(self, shared: SharedBase, ranks: list[int], sizes: list[int]) -> None:
        from lorasent.config import TrainArguments

        self.shared = shared
        self.slots = [
            shared.new_slot(
                f"t{k}",
                dataclasses.replace(shared.model_args, lora_r=r),
                TrainArguments(per_device_train_batch_size=size, learning_rate=1e-3, seed=k),
            )
            for k, (r, size) in enumerate(zip(ranks, sizes, strict=True))
        ]
        self.tokens = self.padded_tokens = 0  # of the epochs run out: begin_epoch zeroes a slot's counts

    def step(self, data: Any, dtype: torch.dtype | None) -> None:
        """One shared step; a slot whose batches ran out begins its epoch again first (the step refuses it)."""
        for slot in self.slots:
            if not slot.batches:
                self.tokens += slot.tokens
                self.padded_tokens += slot.padded_tokens
                slot.begin_epoch(self.shared.lengths)
        self.shared.step(self.slots)

    def real_token_share(self) -> float:
        """Real tokens over the tokens the slots' rows took, padding included, over every step run."""
        tokens = self.tokens + sum(slot.tokens for slot in self.slots)
        return tokens / max(1, self.padded_tokens + sum(slot.padded_tokens for slot in self.slots))


def per_trial_loss(logits: torch.Tensor, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The sum of each trial's mean loss: trials share no trained weight, so each gets exactly its own gradient."""
    losses, start = [], 0
    for batch in data:
        size = len(batch["labels"])
        losses.append(torch.nn.functional.cross_entropy(logits[start : start + size].float(), batch["labels"]))
        start += size
    return torch.stack(losses).sum()


def adamw(params: Any, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=1e-3, fused=device.type == "cuda")


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------------ the parts


def check_gradients(model_dir: Any, args: argparse.Namespace, results: Results) -> None:
    """Fused ways against solo, fp32, dropout off: the same weights in, the same gradients out for every trial."""
    base = load_base(model_dir, no_dropout=True)
    ranks = [RANKS[k % len(RANKS)] for k in range(args.trials)]
    cpu = torch.device("cpu")
    data = batches([2 + k % 3 for k in range(args.trials)], 16, base.config.vocab_size)  # unequal row counts
    torch.manual_seed(0)
    mixed = PeftMixed(base, ranks, 0.0, cpu)
    with torch.no_grad():  # LoRA B starts at zero, which would make A's gradient zero and the check weak
        for name, p in mixed.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    solo, concat = Solo(base, ranks, 0.0, cpu), Concat(base, ranks, 0.0, cpu)
    for k in range(args.trials):
        solo.load(k, mixed.weights(k))
        concat.load(k, mixed.weights(k))
    for way in (solo, mixed, concat):
        way.loss_and_backward(data)
    for name, way in (("peft_mixed", mixed), ("concat", concat)):
        worst = 0.0
        for k in range(args.trials):
            mine, alone = way.grads(k), solo.grads(k)
            if mine.keys() != alone.keys():
                raise RuntimeError(
                    f"{name}: trial {k}'s tensors differ from solo's: {sorted(mine.keys() ^ alone.keys())}"
                )
            for key, g in alone.items():
                worst = max(worst, ((mine[key] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item())
        results.add(f"gradient check {name}", worst, "max relative difference", f"{args.trials} trials vs solo, fp32")


def time_way(way: Any, data: list[dict[str, torch.Tensor]], dtype: torch.dtype | None, steps: int) -> float:
    """Seconds per step of all K trials, after warm-up steps."""
    for _ in range(3):
        way.step(data, dtype)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        way.step(data, dtype)
    sync()
    return (time.perf_counter() - start) / steps


def _solo_process(
    model_dir: str, r: int, sizes: list[int], length: int, steps: int, threads: int, barrier: Any, queue: Any
) -> None:
    """One trial in its own process; per case (its batch size in it): warm up, wait for the others, time `steps`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads)  # as Ray gives a 1-CPU trial one thread: K processes must not oversubscribe
    base = load_base(model_dir, no_dropout=False)
    way = Solo(base, [r], DROPOUT, device)
    dtype = bf16_or_none()
    for case, size in enumerate(sizes):
        data = on_device(batches([size], length, base.config.vocab_size), device)
        for _ in range(3):
            way.step(data, dtype)
        sync()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(steps):
            way.step(data, dtype)
        sync()
        queue.put((case, start, time.perf_counter()))


def time_processes(model_dir: Any, ranks: list[int], cases: list[list[int]], length: int, steps: int) -> list[float]:
    """Per case, seconds per step of all K trials when each runs in its own process at once (first start to last
    end); the K processes start once, as Tune's reused trial actors do."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(ranks)), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(ranks))
    procs = [
        ctx.Process(
            target=_solo_process,
            args=(str(model_dir), r, [case[k] for case in cases], length, steps, threads, barrier, queue),
        )
        for k, r in enumerate(ranks)
    ]
    for p in procs:
        p.start()
    spans = [queue.get(timeout=600) for _ in range(len(procs) * len(cases))]
    for p in procs:
        p.join()
    return [
        (max(e for c, _, e in spans if c == case) - min(s for c, s, _ in spans if c == case)) / steps
        for case in range(len(cases))
    ]


@contextlib.contextmanager
def mps_daemon() -> Iterator[None]:
    """NVIDIA's Multi-Process Service for the processes started inside: their kernels then share the GPU at once
    instead of taking turns. Needs nvidia-cuda-mps-control and a GPU whose compute mode allows it."""
    dirs = {name: tempfile.mkdtemp(prefix=f"lorasent-{name.lower()}-") for name in MPS_DIRS}
    env = {**os.environ, **dirs}
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=30)
    saved = {name: os.environ.get(name) for name in MPS_DIRS}
    os.environ.update(dirs)  # spawned processes take the parent's environment when they start
    try:
        yield
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, timeout=30, check=False)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bf16_or_none() -> torch.dtype | None:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def review_file(ws: Workspace, length: int, multiple: int) -> Path:
    """The workspace's synthetic reviews, the training ones cut to those of at least MIN_LENGTH x `length` tokens and
    to a multiple of `multiple` rows: truncated at `length`, shared_base's rows come near the other ways' `length`
    tokens, and every batch of a slot is full."""
    import pandas as pd

    source = ws.reviews("fused", {"train": 100 if ws.smoke else 3000, "validation": 32, "test": 32})
    shortest = math.ceil(MIN_LENGTH * length)
    path = source.with_name(f"{source.stem}-min{shortest}-x{multiple}{source.suffix}")
    if path.is_file():
        return path
    frame = pd.read_csv(source)
    ids = load_tokenizer(ws.model_dir())(frame["text"].tolist())["input_ids"]
    long_enough = pd.Series([len(row) for row in ids], index=frame.index) >= shortest
    train = frame[(frame["split"] == "train") & long_enough]
    frame = pd.concat([train.iloc[: len(train) // multiple * multiple], frame[frame["split"] != "train"]])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    tmp.rename(path)
    return path


def load_shared_base(ws: Workspace, length: int, cases: list[list[int]]) -> SharedBase:
    """lorasent's shared base on the benchmark model, with the trials' LoRA targets and dropout, and reviews of about
    `length` tokens; built before the cases, so the tokenised data and base load once."""
    from lorasent.config import DataArguments, ModelArguments, TrainArguments
    from lorasent.fused import SharedBase

    data_file = review_file(ws, length, math.lcm(*(size for sizes in cases for size in sizes)))
    data_args = DataArguments(dataset=str(data_file), max_length=length, cache_dir=str(ws.root / "cache"))
    model_args = ModelArguments(
        model_name_or_path=str(ws.model_dir()), lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=",".join(TARGETS)
    )
    return SharedBase(data_args, model_args, TrainArguments())


def time_shared_base(
    ws: Workspace, ranks: list[int], cases: list[list[int]], length: int, steps: int
) -> tuple[list[float], list[float], list[int], list[dict[str, float] | None]]:
    """Per case, seconds per step of all K trials through the shipped fused step, the real share of its tokens, the
    ops a step dispatches, and on a GPU its step census (host against GPU time: does the GPU wait on the host?)."""
    shared = load_shared_base(ws, length, cases)
    seconds, shares, ops, censuses = [], [], [], []
    for sizes in cases:
        way = SharedBaseWay(shared, ranks, sizes)
        seconds.append(time_way(way, [], None, steps))
        shares.append(way.real_token_share())
        ops.append(dispatched_ops(functools.partial(way.step, [], None)))
        censuses.append(_census(way))
        del way
        release_memory(shared.device)
    return seconds, shares, ops, censuses


def _census(way: SharedBaseWay) -> dict[str, float] | None:
    """The step census of the shipped step on a GPU; None on a CPU, or if the profiler fails (the timings stand)."""
    if not torch.cuda.is_available():
        return None
    try:
        return step_census(lambda: way.step([], None))
    except Exception:
        traceback.print_exc()
        return None


def release_memory(device: torch.device) -> None:
    """Hand a finished way's GPU memory back, so the next way starts from the same free memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def throughput(ws: Workspace, args: argparse.Namespace, results: Results) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = ws.model_dir()
    base = load_base(model_dir, no_dropout=False)
    ranks = [RANKS[k % len(RANKS)] for k in range(args.trials)]
    cases = [[batch] * args.trials for batch in args.batch]
    if args.mixed:  # the seed grid's batch sizes side by side, as a search runs them
        cases.append([SEED_BATCHES[k % len(SEED_BATCHES)] for k in range(args.trials)])
    in_processes = time_processes(model_dir, ranks, cases, args.length, args.steps) if args.processes else []
    under_mps: list[float] = []
    if args.processes and torch.cuda.is_available() and shutil.which("nvidia-cuda-mps-control"):
        try:  # before this process starts CUDA itself: it stays out of MPS
            with mps_daemon():
                under_mps = time_processes(model_dir, ranks, cases, args.length, args.steps)
        except Exception as e:  # MPS refused or a process stuck: the other ways are still worth having
            results.add("processes under MPS", f"not measured: {type(e).__name__}: {e}"[:200])
    dtype = bf16_or_none()  # after the processes: asking the device about bf16 starts CUDA in this process
    shipped: tuple[list[float], list[float], list[int], list[dict[str, float] | None]] = ([], [], [], [])
    try:
        shipped = time_shared_base(ws, ranks, cases, args.length, args.steps)
    except Exception as e:  # the other ways' figures are still worth having
        traceback.print_exc()
        results.add("shared_base", f"not measured: {type(e).__name__}: {e}"[:200])
    # Per case, before the in-process ways: a step cut by its timeout keeps these (seconds per step of all K trials).
    shared = dict(zip(("step_s", "real_token_share", "ops_per_step", "census"), shipped, strict=True))
    results.extra["measured"] = {"cases": cases, "processes_s": in_processes, "mps_s": under_mps, "shared_base": shared}
    results.save(args.out)
    for case, sizes in enumerate(cases):
        data = on_device(batches(sizes, args.length, base.config.vocab_size), device)
        seconds = {}
        for name, cls in (("solo", Solo), ("peft_mixed", PeftMixed), ("concat", Concat)):
            seconds[name] = time_way(cls(base, ranks, DROPOUT, device), data, dtype, args.steps)
            release_memory(device)
        notes = {}
        if shipped[0]:
            seconds["shared_base"] = shipped[0][case]
            census = shipped[3][case]
            notes["shared_base"] = (
                f"; real tokenised reviews of {math.ceil(MIN_LENGTH * args.length)}-{args.length} tokens padded per "
                f"step, real_token share {shipped[1][case]:.3f}; {shipped[2][case]} ops dispatched per step"
                + (f"; {census['kernels_per_step']} kernels, {describe_census(census)}" if census else "")
            )
        if in_processes:
            seconds["processes"] = in_processes[case]
        if under_mps:
            seconds["processes_mps"] = under_mps[case]
        label = f"batch {sizes[0]}" if len(set(sizes)) == 1 else f"batches {'/'.join(map(str, SEED_BATCHES))} mixed"
        for name, s in seconds.items():
            results.add(
                f"{label}, {args.trials} trials: {name}",
                args.trials / s,
                "trial-steps/s",
                f"{sum(sizes) / s:,.0f} reviews/s, {s * 1000:.1f} ms per step of all {args.trials}; "
                f"x{seconds['solo'] / s:.2f} of solo"
                + (f", x{seconds['processes'] / s:.2f} of processes" if "processes" in seconds else "")
                + notes.get(name, ""),
            )
        results.save(args.out)  # a step cut by its timeout keeps the cases that finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "results/fused.json")
    parser.add_argument("--trials", type=int, default=None, help="K trials (default 8; 3 with --smoke).")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16], help="Per-trial batch sizes to time.")
    parser.add_argument("--length", type=int, default=None, help="Tokens per review (default 100; 32 with --smoke).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per way (default 20; 3 with --smoke).")
    parser.add_argument(
        "--no_mixed", dest="mixed", action="store_false", help="Skip the case of batch sizes 4/8/16 side by side."
    )
    parser.add_argument(
        "--no_processes",
        dest="processes",
        action="store_false",
        help="Skip the K-process way (it starts K fresh processes, each importing torch and initialising CUDA).",
    )
    args = parser.parse_args()
    args.trials = args.trials or (3 if args.smoke else 8)
    args.length = args.length or (32 if args.smoke else 100)
    args.steps = args.steps or (3 if args.smoke else 20)
    ws = workspace(args)
    results = Results("bench_fused", args.smoke)
    model_dir = ws.model_dir()
    section(results, args.out, "gradients", lambda: check_gradients(model_dir, args, results))
    section(results, args.out, "throughput", lambda: throughput(ws, args, results))
    results.write(args.out)


if __name__ == "__main__":
    main()
