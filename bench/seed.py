"""The seed's way, replicated as the baseline: a plain `Trainer`, fp32, every review padded to 512, eval each epoch.

The seed report's grid: lr {1e-3, 5e-4, 3e-4} x batch {4, 8, 16}, LoRA r=4 / alpha 32 / dropout 0.01 on `q_lin`,
5 epochs, 1,000 training reviews, evaluated every epoch, one config after another in one process. The replica
saves no checkpoints (which favours the baseline) and evaluates on the same validation split the search uses.
The model, the LoRA wrapper and the metrics are lorasent's, so the two sides differ only in how they train.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from lorasent.config import DataArguments, ModelArguments
from lorasent.data import load_splits
from lorasent.metrics import metrics_fn
from lorasent.model import build_model
from lorasent.tokenize import load_tokenizer

SEED_LORA = {"lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.01, "target_modules": "q_lin"}
SEED_BEST = {"learning_rate": 5e-4, "per_device_train_batch_size": 16, **SEED_LORA}
SEED_LRS = (1e-3, 5e-4, 3e-4)
SEED_BATCHES = (4, 8, 16)


class EpochClock(TrainerCallback):
    """Per-epoch wall seconds of training and of the evaluation that follows it (GPU work included)."""

    def __init__(self) -> None:
        self.train_s: list[float] = []
        self.eval_s: list[float] = []
        self._t = 0.0

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._t = self._now()

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        now = self._now()
        self.train_s.append(now - self._t)
        self._t = now

    def on_evaluate(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.eval_s.append(self._now() - self._t)


@dataclass
class SeedRun:
    """What one seed-style run measured."""

    learning_rate: float
    batch_size: int
    epochs: int
    setup_s: float
    train_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    @property
    def epoch_with_eval_s(self) -> list[float]:
        return [t + e for t, e in zip(self.train_s, self.eval_s, strict=False)]

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_splits(
    data_file: Path | str, model_dir: Path | str, *, train: int, eval_: int, pad_to: int | None, max_length: int = 512
) -> Any:
    """train / validation tokenised the seed's way (`datasets.map` over the tokenizer call): truncated at
    `max_length` (the seed's 512) and, with `pad_to`, padded to it.

    `data_file` and `model_dir` are whatever lorasent accepts: a file or folder, or a name such as
    `offline:vader-amazon` / `offline:all-MiniLM-L6-v2`."""
    data_args = DataArguments(
        dataset=str(data_file), max_length=max_length, max_train_samples=train, max_eval_samples=eval_
    )
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    padding = "max_length" if pad_to else False

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=pad_to or max_length, padding=padding)

    splits = load_splits(data_args)
    keep = ("train", "validation")
    tokenized = {s: splits[s].map(encode, batched=True, remove_columns=["text"]) for s in keep}
    return tokenized, tokenizer, data_args.label_names


def seed_style_run(
    model_dir: Path | str,
    splits: Any,
    tokenizer: Any,
    label_names: list[str],
    out_dir: Path,
    *,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    precision: str = "fp32",
    evaluate: bool = True,
    max_steps: int = -1,
    lora: dict[str, Any] | None = None,
    seed: int = 42,
) -> SeedRun:
    """One seed-style Trainer run; times each epoch's training and evaluation separately."""
    import torch

    start = time.perf_counter()
    set_seed(seed)  # before the LoRA and head weights are drawn, as lorasent's train() does
    model_args = ModelArguments(model_name_or_path=str(model_dir), **(lora or SEED_LORA))
    model = build_model(model_args, label_names)
    clock = EpochClock()
    args = TrainingArguments(
        output_dir=str(out_dir),
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps,
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="no",
        logging_strategy="epoch",
        report_to=[],
        disable_tqdm=True,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_fn(label_names),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # no per-epoch dicts on stdout
    setup_s = time.perf_counter() - start
    trainer.train()
    accuracy = [log["eval_accuracy"] for log in trainer.state.log_history if "eval_accuracy" in log]
    return SeedRun(learning_rate, batch_size, epochs, setup_s, clock.train_s, clock.eval_s, accuracy)
