"""One LoRA fine-tuning run through `transformers.Trainer`, reporting metrics and a model folder every epoch.

`train()` is the single entry point used by the command line, the Ray Tune trainable and retrain-best:
tokenised data comes from the on-disk cache (never re-tokenised per trial), every epoch (or every
1/evals_per_epoch of one) ends with an evaluation and a checkpoint that is a self-contained model folder
(adapter + tokenizer + lorasent.json, plus optimizer, scheduler and RNG state for an exact resume), and
`on_epoch` hears about it. A run whose loss turns NaN or infinite stops cleanly and says so (`diverged`) instead
of raising.

    python -m lorasent.train --config run.yaml --learning_rate 1e-3 --num_train_epochs 2
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import (
    BatchEncoding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
    set_seed,
)
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType
from transformers.utils import logging as hf_logging

from lorasent.cli import ArgumentParser, PreParser
from lorasent.config import (
    ARGUMENT_CLASSES,
    DataArguments,
    ModelArguments,
    TrainArguments,
    read_yaml,
    refuse_unread_defaults_changed,
    unread_options,
)
from lorasent.cpus import capped_torch_threads
from lorasent.data import SPLITS, describe_rows
from lorasent.errors import CheckpointError, ConfigError, LorasentError
from lorasent.metrics import metric_names, metrics_fn
from lorasent.model import (
    AUTOCAST_DTYPES,
    build_model,
    check_lora_rank,
    check_model_dir,
    check_output_dir,
    device_precision,
    meta_model,
    model_meta,
    read_meta,
    resolve_target_modules,
    sdpa_attention_mask,
    write_meta,
    write_model_dir,
)
from lorasent.process import exit_process
from lorasent.tokenize import (
    PackedSplit,
    PadToLongest,
    load_tokenizer,
    make_collator,
    source_identity,
    tokenized_splits,
)

logger = logging.getLogger("lorasent.train")  # not __name__, which is "__main__" under `python -m lorasent.train`

LOG_EVERY_STEPS = 50  # the training loss is read (one device sync) this often, and at every epoch end
SAVE_TOTAL_LIMIT = 2  # checkpoints kept: the best and the latest
MEGA_BATCHES = 50  # batches sorted by length together before they are shuffled (see ShuffledLengthGroupedSampler)
_TRAINER_SPEED_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


@dataclass
class EpochReport:
    """What `on_epoch` receives after every epoch (and, with evals_per_epoch > 1, at each evaluation within one)."""

    epoch: float  # epochs trained when reported: 1.0, 2.0, ...; 0.25, 0.5, ... with evals_per_epoch 4
    # validation metrics (no eval_ prefix), train_loss, epoch, diverged, throughput, and where the time went:
    # train_seconds and eval_seconds of the epoch (or of its part since the last report), setup_seconds (call to
    # first step) on a process's first report; on a GPU, gpu_memory_peak_gib (the most the allocator held since the
    # run started)
    metrics: dict[str, float]
    checkpoint_dir: Path  # a self-contained model folder: load_model_dir / Predictor read it


@dataclass
class TrainResult:
    """The outcome of `train()`. Throughput counts real (unpadded) tokens over pure training time."""

    output_dir: Path | None  # the final model folder (None with save_final=False or nothing good to save)
    history: list[dict[str, float]]  # one metrics dict per report (epoch), as reported to on_epoch
    best_metrics: dict[str, float]
    best_epoch: float  # as EpochReport.epoch
    diverged: bool
    train_seconds: float  # training steps only: no evaluation, checkpointing or start-up
    train_samples_per_second: float
    train_tokens_per_second: float
    best_checkpoint: Path | None = None
    wall_seconds: float = 0.0  # the whole call: data, model, training, evaluation, saving
    trainable_parameters: int = 0
    total_parameters: int = 0


# ------------------------------------------------------------------------------------------ device set-up


def resolve_precision(train_args: TrainArguments) -> str:
    """The precision `train_args` trains in on this machine (see `lorasent.model.device_precision`)."""
    cuda = torch.cuda.is_available() and not train_args.use_cpu
    return device_precision(train_args.precision, torch.device("cuda" if cuda else "cpu"))


def lr_schedule(name: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' learning-rate schedule `name` over a placeholder optimizer, for what it says of each step."""
    placeholder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # get_scheduler wants an optimizer
    return get_scheduler(name, placeholder, num_warmup_steps=warmup, num_training_steps=total)


def usable_schedules() -> list[str]:
    """transformers' learning-rate schedules that need no arguments beyond warm-up and total steps, which are all
    lorasent passes (cosine_with_min_lr, for one, also needs a minimum)."""
    usable = []
    for schedule in SchedulerType:
        try:
            lr_schedule(schedule.value, warmup=1, total=2)
        except (ValueError, TypeError):
            continue
        usable.append(schedule.value)
    return usable


def check_schedule(train_args: TrainArguments) -> None:
    """Refuse a learning-rate schedule transformers does not have, or one that needs arguments lorasent does not
    pass (either would fail only once training starts)."""
    usable = usable_schedules()
    if train_args.lr_scheduler_type not in usable:
        known = train_args.lr_scheduler_type in {schedule.value for schedule in SchedulerType}
        what = "needs arguments lorasent does not pass" if known else "is unknown"
        raise ConfigError(f"lr_scheduler_type {train_args.lr_scheduler_type!r} {what}; valid: {', '.join(usable)}.")


def ignores_warmup(name: str) -> bool:
    """Whether transformers' schedule `name` starts at the full learning rate whatever its warm-up steps."""
    first_factor = lr_schedule(name, warmup=1, total=2).optimizer.param_groups[0]["lr"]
    return first_factor == 1.0


def check_warmup(train_args: TrainArguments, searched: bool = False) -> None:
    """Refuse a warm-up the schedule ignores (constant, reduce_lr_on_plateau): it trained without one, not a word
    said, and a search over `warmup_ratio` (`searched`) trained every value alike. A new run's check only: a saved
    run's settings stay as they ran."""
    check_schedule(train_args)
    name = train_args.lr_scheduler_type
    if (searched or train_args.warmup_ratio > 0) and ignores_warmup(name):
        given = "search_space.warmup_ratio" if searched else f"warmup_ratio {train_args.warmup_ratio:g}"
        instead = "search other parameters" if searched else "--warmup_ratio 0"
        raise ConfigError(
            f"{given} does nothing: lr_scheduler_type {name!r} has no warm-up. Use --lr_scheduler_type "
            f"constant_with_warmup (or linear, cosine, ...), or {instead}."
        )


def frozen_dtype(train_args: TrainArguments) -> torch.dtype | None:
    """The dtype the frozen base weights are stored in: the autocast dtype (see `half_precision_base`), or None."""
    if not train_args.half_precision_base:
        return None
    return AUTOCAST_DTYPES.get(resolve_precision(train_args))


def training_arguments(train_args: TrainArguments, work_dir: Path, *, evaluate: bool) -> TrainingArguments:
    """`TrainingArguments` for one run: epoch-wise eval and checkpoints, and little per-step overhead.

    Evaluations within an epoch (evals_per_epoch > 1) are asked for by `EpochCallback`: Trainer's "steps" strategy
    counts steps across epochs, so its evaluations would not fall on epoch ends.

    Per-step costs removed: the loss is read from the device every LOG_EVERY_STEPS steps, not every step
    (Trainer's NaN filter would sync each step and also hide a diverging loss); batches are copied to the GPU
    without waiting for it; no reporting integrations.
    """
    cuda = torch.cuda.is_available() and not train_args.use_cpu
    precision = resolve_precision(train_args)
    return TrainingArguments(
        output_dir=str(work_dir),
        learning_rate=train_args.learning_rate,
        per_device_train_batch_size=train_args.per_device_train_batch_size,
        per_device_eval_batch_size=train_args.per_device_eval_batch_size,
        num_train_epochs=train_args.num_train_epochs,
        warmup_steps=train_args.warmup_ratio,  # a float in [0, 1) is a share of all steps
        weight_decay=train_args.weight_decay,
        lr_scheduler_type=train_args.lr_scheduler_type,
        max_grad_norm=train_args.max_grad_norm,
        seed=train_args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="epoch",
        save_only_model=False,  # optimizer, scheduler and RNG state make a resume exact
        save_total_limit=SAVE_TOTAL_LIMIT,
        load_best_model_at_end=evaluate,
        metric_for_best_model=train_args.metric_for_best_model if evaluate else None,
        logging_strategy="steps",
        logging_steps=LOG_EVERY_STEPS,
        logging_nan_inf_filter=False,
        remove_unused_columns=False,  # batches come gathered, with the model's columns only (GatheredBatches)
        report_to="none",
        train_sampling_strategy="group_by_length" if train_args.group_by_length else "random",
        torch_compile=train_args.torch_compile,
        dataloader_num_workers=train_args.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        # Batches go up from pinned memory without blocking: a blocking copy waits until the GPU has run everything
        # queued, so the host could not queue step N+1 while the GPU runs step N (as the hand loop does).
        accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda,  # said outright: transformers refuses bf16 on a CPU-only machine unless told
        disable_tqdm=not sys.stderr.isatty(),
    )


# ------------------------------------------------------------------------------------------ the Trainer


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends on (seed, epoch) alone: an epoch's batch order, the same in a resumed process."""
    return torch.Generator().manual_seed(hash((seed, epoch)) & (2**63 - 1))


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped batches, from mega-batches of 50 batches, visited in random order.

    transformers sorts each mega-batch of up to 50 batches longest first and chains the mega-batches, so an epoch
    walks from long texts to short ones and back, a few times over. On 1,000 real review sentences at batch 16 that
    ordering cost 0.025 validation accuracy after the first epoch, where ASHA's first rung judges trials (in the
    quick-start's smaller setting no difference showed either way; bench/RESULTS.md, C8). Shuffling the batches
    keeps each batch as it is, and so the padding it saves, and drops the ordering.
    With the order gone, the mega-batches are always 50 batches (`MEGA_BATCHES`): transformers cuts them to a quarter
    of the data below 200 batches' worth (four long-to-short walks an epoch), which sorts fewer texts together: at
    batch 32 on the quick-start's 600 sentences 30% of the tokens were padding, against 7% (bench/RESULTS.md, C14).
    The batch with the longest text stays first (too large a batch fails at the first step, not late in an epoch)
    and a short last batch stays last (the DataLoader cuts the index stream into batch-size pieces).
    Given a `seed`, an epoch's order follows from (seed, epoch) alone once Trainer has called `set_epoch`: a run
    resumed from a checkpoint within an epoch then skips exactly the batches it had trained on.
    """

    def __init__(
        self, batch_size: int, lengths: list[int], seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(batch_size, lengths=lengths, generator=generator)
        self.seed = seed
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = self.generator
        if self.seed is not None and self.epoch is not None:
            generator = epoch_generator(self.seed, self.epoch)
        indices = get_length_grouped_indices(
            self.lengths, self.batch_size, mega_batch_mult=MEGA_BATCHES, generator=generator
        )
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        movable = len(batches) - 1 if len(batches[-1]) == self.batch_size else len(batches) - 2
        order = [0, *(torch.randperm(max(movable, 0), generator=generator) + 1).tolist()]
        order += range(len(order), len(batches))
        return iter([i for b in order for i in batches[b]])


def packed_inputs(split: datasets.Dataset) -> PackedSplit:
    """The columns of a tokenised split that the model takes (all but `length`, which only orders batches), packed."""
    return PackedSplit.of(split.select_columns([c for c in split.column_names if c != "length"]))


class GatheredBatches(torch.utils.data.Dataset):
    """A tokenised split whose batches are gathered from its arrays in a few numpy calls (`PadToLongest.gather`), not
    built row by row: `DataLoader` hands `__getitems__` a whole batch's rows. A batch of 256 reviews of ~100 tokens
    comes in 0.5 ms instead of 5.3 ms on a 2-core CPU, host time that sits between two GPU steps."""

    def __init__(self, split: datasets.Dataset, collator: PadToLongest) -> None:
        self.rows = packed_inputs(split)
        self.collator = collator

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> BatchEncoding:
        return self.collator.gather(self.rows, rows)


def as_gathered(batch: BatchEncoding) -> BatchEncoding:
    """The collator of `GatheredBatches`: its batches arrive whole."""
    return batch


@contextlib.contextmanager
def walk_free_steps(model: torch.nn.Module, trained: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Bind to `model` a `train` that walks its modules only when the mode changes and a `zero_grad` that clears
    only the trained tensors (the frozen ones never get a gradient), as accelerate binds its autocast `forward`.

    Trainer calls both on every step. Every module is put in training mode first (peft adds LoRA layers in
    training mode to a base loaded in eval mode), so from then on the model's own flag speaks for all of them:
    Trainer changes modes only through the model itself (`eval()` is `train(False)`).
    """
    walk, clear = type(model).train, type(model).zero_grad
    walk(model, True)

    def train_mode(mode: bool = True) -> torch.nn.Module:
        if mode != model.training:
            walk(model, mode)
        return model

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            return clear(model, set_to_none)
        for parameter in trained:
            parameter.grad = None

    model.train, model.zero_grad = train_mode, zero_grad
    try:
        yield
    finally:
        del model.train, model.zero_grad


class LorasentTrainer(Trainer):
    """`Trainer` with six costs removed, per run, per step or per save.

    - Length grouping reads the cached `length` column; Trainer would drop that column first and then
      measure every example again in Python (minutes per trial on millions of reviews).
    - Evaluation walks a length-sorted split in order, so dynamic padding pads almost nothing.
    - The FLOP count that Trainer adds up every step uses a parameter count taken once, not recounted by
      walking all modules on every step.
    - The padding mask reaches attention in 4D (`sdpa_attention_mask`), so no step waits on the GPU to learn
      whether a batch is padded.
    - A step touches the trained tensors only. Trainer walks all of the model's modules three times a step, to
      set training mode, clip the gradients and clear them: host time that a launch-bound GPU step waits for
      (~1.4 ms a step on a CPU for DistilBERT-base's 224 modules; LoRA trains 28 of its 132 tensors).
    - A checkpoint's save asks the hub nothing. peft's default asks it, at every save, whether the base (named by its
      hub name) had its vocabulary resized, which lorasent never does: a hub that does not answer held each save.
    """

    def __init__(
        self,
        *args: Any,
        train_lengths: list[int] | None = None,
        moved_best: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._train_lengths = train_lengths
        self._moved_best = moved_best
        self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        self._trained = [p for p in self.model.parameters() if p.requires_grad]
        self.model.save_pretrained = functools.partial(self.model.save_pretrained, save_embedding_layers=False)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with walk_free_steps(self.model, self._trained):
            return super().train(*args, **kwargs)

    def _load_callback_state(self) -> None:
        # Trainer calls this right after reading a resumed state, where it dropped a best checkpoint it could not find
        if self.state.best_model_checkpoint is None and self._moved_best is not None:
            logger.warning("The best checkpoint moved with the one resumed from: it is %s", self._moved_best)
            self.state.best_model_checkpoint = str(self._moved_best)
        super()._load_callback_state()

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(self._trained, self.args.max_grad_norm)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if "attention_mask" in inputs:  # training and evaluation steps both come here, on the device
            inputs = {**inputs, "attention_mask": sdpa_attention_mask(model.config, inputs["attention_mask"])}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset: GatheredBatches | None = None) -> torch.utils.data.Sampler | None:
        if self.args.train_sampling_strategy == "group_by_length" and self._train_lengths is not None:
            return ShuffledLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self._train_lengths,
                seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset: GatheredBatches) -> torch.utils.data.Sampler | None:
        return SequentialSampler(eval_dataset)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 6 * inputs["input_ids"].numel() * self._flop_parameters


class EpochCallback(TrainerCallback):
    """Turns each evaluation's checkpoint into a model folder and a report, tracks loss and throughput, stops on
    divergence.

    A report covers the steps since the last one (its `segment`): the epoch, or 1/evals_per_epoch of it, for which
    this callback asks Trainer for an evaluation and a checkpoint at evenly spaced steps within the epoch.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        metric: str | None,
        greater_is_better: bool,
        tokens_per_epoch: int,
        samples_per_epoch: int,
        on_epoch: Callable[[EpochReport], None] | None,
        history: list[dict[str, float]],
        started: float,
        evals_per_epoch: int = 1,
    ) -> None:
        self.meta = meta
        self.started = started  # perf_counter() when train() was called
        self.setup_seconds: float | None = None  # until reported once
        self.metric = metric
        self.worst = -math.inf if greater_is_better else math.inf
        self.tokens_per_epoch = tokens_per_epoch
        self.samples_per_epoch = samples_per_epoch
        self.on_epoch = on_epoch
        self.history = history
        self.evals_per_epoch = evals_per_epoch
        self.reports: dict[str, dict[str, float]] = {}  # checkpoint folder name -> metrics
        self.diverged = False
        self.train_seconds = 0.0
        self.epochs_trained = 0.0
        self._steps_per_epoch = 0
        self._mid_epoch_steps: set[int] = set()  # steps into an epoch after which a report is due
        self._start_segment(0.0)

    def _start_segment(self, epoch: float) -> None:
        self._segment_start_time = time.perf_counter()
        self._segment_start = epoch
        self._segment_seconds = 0.0
        self._loss_sum = 0.0
        self._loss_steps = 0
        self._eval_metrics: dict[str, float] = {}

    def _end_segment(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        if args.device.type == "cuda":  # not merely visible: a CPU run must not start CUDA on a GPU it did not reserve
            torch.cuda.synchronize(args.device)  # queued GPU work belongs to this segment's time
        self._segment_seconds = time.perf_counter() - self._segment_start_time
        self.train_seconds += self._segment_seconds
        self.epochs_trained += state.epoch - self._segment_start
        control.should_log = True  # log the loss of the steps since the last log before evaluating

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_logged_step = state.global_step
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)  # a reused trial process reports this run's peak only
        self.setup_seconds = time.perf_counter() - self.started  # data, model, Trainer, resumed state
        self._steps_per_epoch = state.max_steps // math.ceil(args.num_train_epochs)
        n, steps = self.evals_per_epoch, self._steps_per_epoch
        self._mid_epoch_steps = {round(j * steps / n) for j in range(1, n)} - {0, steps}

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start_segment(state.epoch or 0.0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._mid_epoch_steps and state.global_step % self._steps_per_epoch in self._mid_epoch_steps:
            self._end_segment(args, state, control)
            control.should_evaluate = self.metric is not None
            control.should_save = True

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" in self.reports:
            # Stopped (diverged) at an evaluation within the epoch: that step was evaluated and reported already.
            control.should_evaluate = control.should_save = False
            return
        self._end_segment(args, state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        steps = state.global_step - self._last_logged_step
        self._last_logged_step = state.global_step
        self._loss_sum += logs["loss"] * steps
        self._loss_steps += steps
        if not math.isfinite(logs["loss"]):
            self.diverged = True
            control.should_training_stop = True

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._eval_metrics = {
            key.removeprefix("eval_"): float(value)
            for key, value in (metrics or {}).items()
            if key.removeprefix("eval_") not in _TRAINER_SPEED_KEYS
        }
        if metrics and "eval_runtime" in metrics:
            self._eval_metrics["eval_seconds"] = float(metrics["eval_runtime"])
        if not math.isfinite(self._eval_metrics.get("loss", 0.0)):
            # The step just before broke the weights: the training loss, taken before each step, cannot show it.
            self.diverged = True
            control.should_training_stop = True
        if self.diverged and self.metric is not None:
            # A diverged model must never become Trainer's best checkpoint, whatever its accuracy.
            metrics[f"eval_{self.metric}"] = self.worst

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        epoch = round(state.epoch, 4)
        fraction = state.epoch - self._segment_start
        metrics = {
            **self._eval_metrics,
            "epoch": epoch,
            "train_loss": self._loss_sum / self._loss_steps if self._loss_steps else math.nan,
            "diverged": float(self.diverged),
            "train_seconds": self._segment_seconds,
            "train_tokens_per_second": self.tokens_per_epoch * fraction / max(self._segment_seconds, 1e-9),
        }
        if args.device.type == "cuda":  # what the caching allocator held at most: checks the planned footprint
            metrics["gpu_memory_peak_gib"] = torch.cuda.max_memory_reserved(args.device) / 2**30
        if self.setup_seconds is not None:
            metrics["setup_seconds"] = self.setup_seconds
            self.setup_seconds = None
        self.history.append(metrics)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        write_meta(checkpoint, {**self.meta, "metrics": metrics, "history": self.history})
        self.reports[checkpoint.name] = metrics
        if self.on_epoch is not None:
            self.on_epoch(EpochReport(epoch=epoch, metrics=dict(metrics), checkpoint_dir=checkpoint))
        self._start_segment(state.epoch)


# ------------------------------------------------------------------------------------------ train()


def _check_request(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    train_splits: Sequence[str],
    eval_split: str | None,
    resume_from_checkpoint: str | None,
    save_final: bool,
) -> None:
    """Refuse impossible requests before any data is read or model loaded."""
    valid_metrics = metric_names(data_args.label_names)
    if train_args.metric_for_best_model.removeprefix("eval_") not in valid_metrics:
        raise ConfigError(
            f"Unknown metric_for_best_model {train_args.metric_for_best_model!r}; valid: {', '.join(valid_metrics)}."
        )
    unknown = [s for s in (*train_splits, eval_split) if s is not None and s not in SPLITS]
    if unknown or not train_splits:
        raise ConfigError(f"Unknown or no splits {unknown or list(train_splits)}; valid splits: {', '.join(SPLITS)}.")
    if eval_split in train_splits:
        raise ConfigError(f"eval_split {eval_split!r} is also trained on; its metrics would mean nothing.")
    resolve_precision(train_args)
    check_schedule(train_args)
    if resume_from_checkpoint is not None:
        if not (Path(resume_from_checkpoint) / "trainer_state.json").is_file():
            raise CheckpointError(
                f"Cannot resume from {resume_from_checkpoint}: it is not a training checkpoint (no "
                "trainer_state.json). Pass a checkpoint-<step> folder written by an earlier run of this training."
            )
        saved = check_model_dir(resume_from_checkpoint)  # a truncated adapter fails here, not deep inside Trainer
        _check_resumed_run_matches(saved, resume_from_checkpoint, data_args, model_args)
    if save_final:
        check_output_dir(train_args.output_dir)


def _check_resumed_run_matches(
    saved: dict[str, Any], checkpoint: str, data_args: DataArguments, model_args: ModelArguments
) -> None:
    """A checkpoint continues the run that wrote it: another base, adapter or label set would fail on a shape deep
    inside the load (or, where the shapes happen to fit, train another model from its weights), and other data
    would continue the epoch on other rows."""
    now = {**dataclasses.asdict(model_args), "label_names": list(data_args.label_names), "dataset": data_args.dataset}
    then = {**saved.get("model", {}), "label_names": saved.get("label_names"), "dataset": saved["data"]["dataset"]}
    differ = [f"{key} {then[key]!r} there, {now[key]!r} now" for key in now if key in then and then[key] != now[key]]
    if differ:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: it was written by another run ({'; '.join(differ)}). Resume with that "
            "run's settings, or start a new run without --resume_from_checkpoint."
        )


def check_batch_fits(train_args: TrainArguments, examples: int, train_splits: Sequence[str] = ("train",)) -> None:
    """Refuse a training batch larger than the data it is drawn from, and more evaluations an epoch than it has
    steps."""
    if train_args.per_device_train_batch_size > examples:
        raise ConfigError(
            f"per_device_train_batch_size {train_args.per_device_train_batch_size} exceeds the {examples} "
            f"training examples of {'+'.join(train_splits)}. Use a smaller batch or more data (max_train_samples)."
        )
    check_evals_fit(train_args.evals_per_epoch, train_args.per_device_train_batch_size, examples)


def check_evals_fit(evals_per_epoch: int, batch_size: int, examples: int) -> None:
    """Refuse more evaluations an epoch than an epoch has steps: two would fall on one step, so fewer reports came
    than `evals_per_epoch` promised, and a search that counts reports as fractions of an epoch (ASHA's rungs,
    --max_epochs) would read them as other epochs than they were."""
    steps = math.ceil(examples / batch_size)
    if evals_per_epoch > steps:
        raise ConfigError(
            f"evals_per_epoch {evals_per_epoch} asks for more evaluations an epoch than its {steps} step(s) (batches "
            f"of {batch_size} over {examples} training examples). Use --evals_per_epoch {steps} or fewer, smaller "
            "batches, or more data."
        )


def longest_first(split: datasets.Dataset) -> datasets.Dataset:
    """The split ordered by length, longest first, so each evaluation batch pads little and memory peaks early.

    The order is kept in memory: many trials share the cache folder, and an indices file written there would race.
    """
    order = np.argsort(-np.asarray(split["length"][:]), kind="stable")
    return split.select(order, keep_in_memory=True)


def moved_best(checkpoint: str | Path) -> Path | None:
    """The best checkpoint a resumed state names, found beside `checkpoint` where it is not at the path the state
    records: the checkpoints moved (another machine, a renamed folder) or the path is relative to another working
    folder. Trainer would drop it, and end the run with its last epoch as the best."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    recorded = state.get("best_model_checkpoint")
    if recorded is None or Path(recorded).is_dir():
        return None
    beside = Path(checkpoint).parent / Path(recorded).name
    return beside if beside.is_dir() else None


def _default_work_dir(train_args: TrainArguments) -> Path:
    output = Path(train_args.output_dir)
    return output.with_name(f"{output.name}-checkpoints")


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    resume_from_checkpoint: str | None = None,
    train_splits: Sequence[str] = ("train",),
    eval_split: str | None = "validation",
    save_final: bool = True,
    work_dir: str | None = None,
) -> TrainResult:
    """Fine-tune one LoRA adapter; evaluate and checkpoint every epoch; optionally save the best model.

    `train_splits` are concatenated (retrain-best uses ("train", "validation") with eval_split=None: no
    per-epoch evaluation, the last epoch is the result). Checkpoints go to `work_dir` (default: a sibling
    `<output_dir>-checkpoints`); the final model folder to `train_args.output_dir`, written atomically.
    """
    started = time.perf_counter()
    _check_request(data_args, model_args, train_args, train_splits, eval_split, resume_from_checkpoint, save_final)
    with capped_torch_threads(train_args.torch_threads):
        tokenizer = load_tokenizer(model_args)
        source = source_identity(data_args.dataset)  # what lorasent.json records; the cache's key holds it too
        splits = tokenized_splits(data_args, model_args, tokenizer, source)
        logger.info(describe_rows(data_args, {name: len(rows) for name, rows in splits.items()}))
        parts = [splits[name] for name in train_splits]
        train_dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        check_batch_fits(train_args, len(train_dataset), train_splits)
        eval_dataset = longest_first(splits[eval_split]) if eval_split else None
        train_lengths = train_dataset["length"][:]

        set_seed(train_args.seed)  # the LoRA and head initialisation depend on it
        model = build_model(model_args, data_args.label_names, frozen_dtype=frozen_dtype(train_args))
        trainable, total = model.get_nb_trainable_parameters()

        work = Path(work_dir) if work_dir is not None else _default_work_dir(train_args)
        trainer_args = train_args
        if eval_dataset is not None:  # Trainer sizes each evaluation step's loss buffer by the batch size, not its
            # rows: one batch holds the split at most (a huge --per_device_eval_batch_size failed every evaluation)
            rows = min(train_args.per_device_eval_batch_size, len(eval_dataset))
            trainer_args = dataclasses.replace(train_args, per_device_eval_batch_size=rows)
        args = training_arguments(trainer_args, work, evaluate=eval_dataset is not None)
        history = list(read_meta(resume_from_checkpoint).get("history", [])) if resume_from_checkpoint else []
        callback = EpochCallback(
            meta=model_meta(
                data_args.label_names,
                data_args=data_args,
                model_args=model_args,
                train_args=train_args,
                train_splits=train_splits,
                source=source,
            ),
            metric=train_args.metric_for_best_model.removeprefix("eval_") if eval_dataset is not None else None,
            greater_is_better=bool(args.greater_is_better),
            tokens_per_epoch=int(sum(train_lengths)),
            samples_per_epoch=len(train_dataset),
            on_epoch=on_epoch,
            history=history,
            started=started,
            evals_per_epoch=train_args.evals_per_epoch,
        )
        cuda = torch.cuda.is_available() and not train_args.use_cpu
        collator = make_collator(tokenizer, pad_to_multiple_of=8 if cuda else None)
        trainer = LorasentTrainer(
            model=model,
            args=args,
            train_dataset=GatheredBatches(train_dataset, collator),
            eval_dataset=GatheredBatches(eval_dataset, collator) if eval_dataset is not None else None,
            processing_class=tokenizer,
            data_collator=as_gathered,
            compute_metrics=metrics_fn(data_args.label_names),
            callbacks=[callback],
            train_lengths=train_lengths,
            moved_best=moved_best(resume_from_checkpoint) if resume_from_checkpoint else None,
        )
        if args.disable_tqdm:
            trainer.remove_callback(PrinterCallback)  # logs go to on_epoch and the result, not stdout dicts
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)

        best_checkpoint = Path(trainer.state.best_model_checkpoint) if trainer.state.best_model_checkpoint else None
        if best_checkpoint is not None and best_checkpoint.name in callback.reports:
            best_metrics = callback.reports[best_checkpoint.name]
        elif best_checkpoint is not None:  # chosen before a resume: its folder says how it scored
            best_metrics = read_meta(best_checkpoint)["metrics"]
        else:
            best_metrics = history[-1] if history else {}
        output_dir = None
        # A run that diverged before any good epoch has nothing worth saving: its weights are NaN.
        if save_final and not (callback.diverged and best_checkpoint is None):
            meta = {**callback.meta, "metrics": dict(best_metrics)}
            output_dir = write_model_dir(trainer.model, tokenizer, train_args.output_dir, meta)
        seconds = callback.train_seconds
        return TrainResult(
            output_dir=output_dir,
            history=history,
            best_metrics=best_metrics,
            best_epoch=best_metrics.get("epoch", 0.0),
            diverged=callback.diverged,
            train_seconds=seconds,
            train_samples_per_second=callback.samples_per_epoch * callback.epochs_trained / max(seconds, 1e-9),
            train_tokens_per_second=callback.tokens_per_epoch * callback.epochs_trained / max(seconds, 1e-9),
            best_checkpoint=best_checkpoint,
            wall_seconds=time.perf_counter() - started,
            trainable_parameters=trainable,
            total_parameters=total,
        )


# ------------------------------------------------------------------------------------------ command line


@dataclass
class RunArguments:
    """Options of the command line itself."""

    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (flat keys); command-line flags override it."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-<step> folder of an interrupted run to continue exactly."}
    )


def _yaml_defaults(parser: ArgumentParser, path: str) -> dict[str, Any]:
    """The `--config` file's values as defaults, each read as its flag would be: a null, list or mapping where the
    option takes none is refused here, before any data is read, not by a traceback (or a wrong value) later."""
    values = read_yaml(path)
    valid = {f.name for cls in (*ARGUMENT_CLASSES, RunArguments) for f in dataclasses.fields(cls)} - {"config"}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {path}. Valid keys: {', '.join(sorted(valid))}.")
    return parser.config_defaults(values, f"config file {path}")


def parse_cli(argv: Sequence[str] | None = None) -> tuple[DataArguments, ModelArguments, TrainArguments, RunArguments]:
    """Parse `--config file.yaml` (if any) into defaults, then the command line over them."""
    parser = ArgumentParser((*ARGUMENT_CLASSES, RunArguments), prog="python -m lorasent.train")
    pre = PreParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    data_args, model_args, train_args, run_args = parser.parse_dataclasses(sys.argv[1:] if argv is None else argv)
    refuse_unread_defaults_changed((data_args, train_args), unread_options(data_args, train_args))
    return data_args, model_args, train_args, run_args


def _format(metrics: dict[str, float]) -> str:
    keys = ("accuracy", "f1_macro", "loss", "train_loss")
    shown = " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
    return f"{shown} ({metrics.get('train_tokens_per_second', 0):,.0f} tokens/s)"


def _whole_checkpoint(folder: Path) -> bool:
    """Whether `folder` still holds a whole checkpoint: Trainer deletes all but the best and the latest, and a Ctrl-C
    can stop it halfway through writing one."""
    try:
        check_model_dir(folder)
    except CheckpointError:
        return False
    return (folder / "trainer_state.json").is_file()


def _interrupted(output_dir: str, checkpoints: Sequence[Path]) -> str:
    """What a Ctrl-C during training left: the final model is written whole or not at all, so say where to resume
    (the latest whole one of `checkpoints`, this run's, oldest first)."""
    message = f"interrupted: the final model was not saved to {output_dir}"
    checkpoint = next((folder for folder in reversed(checkpoints) if _whole_checkpoint(folder)), None)
    if checkpoint is None:
        return f"{message}, and no epoch had finished (none checkpointed). Run the command again to start over."
    return (
        f"{message}. To continue from the last checkpoint, run the same command with --resume_from_checkpoint "
        f"{checkpoint}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 done, 1 no model saved (the loss diverged), 2 refused, 130 interrupted (Ctrl-C). It shows
    lorasent's own notes (rows per split, tokenising, LoRA) while it runs, and leaves the logger as it was."""
    notes = logging.getLogger("lorasent")
    level = notes.level
    logging.basicConfig(format="%(message)s")
    notes.setLevel(logging.INFO)
    try:
        return _run_cli(argv)
    finally:
        notes.setLevel(level)


def _run_cli(argv: Sequence[str] | None) -> int:
    hf_logging.disable_progress_bar()  # a bar for loading a few MB of weights is noise on a command line
    try:
        data_args, model_args, train_args, run_args = parse_cli(argv)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # this run's checkpoints, oldest first: where a Ctrl-C can resume from
    checkpoints = [Path(run_args.resume_from_checkpoint)] if run_args.resume_from_checkpoint else []
    try:
        # Refused before the data is read and tokenised (minutes for a large dataset), not after.
        architecture = meta_model(model_args)
        targets = resolve_target_modules(architecture, model_args.target_modules)
        check_lora_rank(architecture, targets, model_args.lora_r)
        check_warmup(train_args)

        def show(report: EpochReport) -> None:
            checkpoints.append(report.checkpoint_dir)
            flag = "  DIVERGED" if report.metrics.get("diverged") else ""
            print(f"epoch {report.epoch:g}: {_format(report.metrics)}  -> {report.checkpoint_dir}{flag}", flush=True)

        result = train(
            data_args, model_args, train_args, on_epoch=show, resume_from_checkpoint=run_args.resume_from_checkpoint
        )
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(train_args.output_dir, checkpoints), file=sys.stderr)
        return 130
    if result.diverged:
        print("training diverged (NaN/inf loss): lower the learning rate or raise warmup_ratio")
    if result.output_dir is None:
        print("no model saved: no epoch finished before the loss diverged")
        return 1
    share = 100 * result.trainable_parameters / max(result.total_parameters, 1)
    print(f"trainable parameters: {result.trainable_parameters:,} of {result.total_parameters:,} ({share:.2f}%)")
    print(f"best epoch {result.best_epoch:g}: {_format(result.best_metrics)}")
    print(f"model saved to {result.output_dir}")
    print(f"next: python -m lorasent.predict {result.output_dir} --text 'Works great, would buy again.'")
    return 0


if __name__ == "__main__":
    exit_process(main())
