"""The hand-written training loop that lorasent's `Trainer` path is measured against (goal 2: >= 85% of it).

Same model (lorasent's `build_model`), same tokenised data (`tokenized_splits`), same batches (dynamic padding,
gathered from the split's arrays by lorasent's `GatheredBatches`), same batch order policy (lorasent's
`ShuffledLengthGroupedSampler`, which its `Trainer` uses under `group_by_length`), same gradient clipping. What it
leaves out is everything a `Trainer` adds: callbacks, logging, the learning-rate schedule object, accelerate's
wrapping. bf16 autocast on GPUs that support it, fp32 on the CPU; fused AdamW on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from lorasent.config import DataArguments, ModelArguments
from lorasent.model import AUTOCAST_DTYPES, build_model, device_precision, sdpa_attention_mask
from lorasent.tokenize import load_tokenizer, make_collator, tokenized_splits
from lorasent.train import GatheredBatches, ShuffledLengthGroupedSampler, as_gathered


def autocast_dtype(precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on this machine's training device, as lorasent trains (None: fp32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AUTOCAST_DTYPES.get(device_precision(precision, device))


@dataclass
class LoopRun:
    """What one hand-loop run measured; epoch 1 carries the warm-up, the last epoch is steady state."""

    batch_size: int
    precision: str
    epoch_s: list[float] = field(default_factory=list)
    samples: int = 0  # per epoch
    real_tokens: int = 0  # per epoch, padding excluded
    padded_tokens: int = 0  # per epoch, padding included
    steps: int = 0  # per epoch
    attention: str = ""  # the attention implementation transformers chose (sdpa, eager, ...)
    half_precision_base: bool = False  # frozen base weights stored in the autocast dtype

    def rates(self, epoch: int = -1) -> dict[str, float]:
        seconds = self.epoch_s[epoch]
        return {
            "seconds": seconds,
            "samples_per_s": self.samples / seconds,
            "real_tokens_per_s": self.real_tokens / seconds,
            "padding_share": 1 - self.real_tokens / max(self.padded_tokens, 1),
        }


def hand_loop(
    data_args: DataArguments,
    model_args: ModelArguments,
    *,
    batch_size: int,
    epochs: int = 2,
    learning_rate: float = 5e-4,
    precision: str = "auto",
    max_grad_norm: float = 1.0,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
    half_precision_base: bool = False,
) -> LoopRun:
    """Train `epochs` epochs of data_args' train split; each epoch is timed with the GPU synchronised.

    half_precision_base: frozen base weights stored in the autocast dtype (lorasent's `half_precision_base`).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    dtype = autocast_dtype(precision)
    split = tokenized_splits(data_args, model_args)["train"]
    lengths = split["length"][:]
    train = GatheredBatches(split, make_collator(load_tokenizer(model_args), pad_to_multiple_of=pad_to_multiple_of))
    loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=ShuffledLengthGroupedSampler(
            batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)
        ),
        collate_fn=as_gathered,
        pin_memory=device.type == "cuda",  # as lorasent's Trainer does
    )
    frozen = dtype if half_precision_base else None
    model = build_model(model_args, data_args.label_names, frozen_dtype=frozen).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=device.type == "cuda")
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    run = LoopRun(batch_size, str(dtype).removeprefix("torch.") if dtype else "fp32", half_precision_base=bool(frozen))
    run.attention = model.get_base_model().config._attn_implementation
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        steps = 0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            train_step(model, optimizer, params, batch, dtype, max_grad_norm)
            schedule.step()
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.epoch_s.append(time.perf_counter() - start)
        run.steps = steps
    run.samples = len(train)
    run.real_tokens = int(sum(lengths))
    run.padded_tokens = padded_token_count(lengths, batch_size, seed, pad_to_multiple_of)
    return run


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    max_grad_norm: float = 1.0,
) -> None:
    """One optimizer step of the hand loop: forward under autocast (none when dtype is None), backward, clipping."""
    batch = {**batch, "attention_mask": sdpa_attention_mask(model.config, batch["attention_mask"])}  # as lorasent
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def one_batch_setup(
    data_args: DataArguments,
    model_args: ModelArguments,
    indices: Sequence[int],
    *,
    learning_rate: float,
    device: torch.device,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.nn.Parameter], dict[str, torch.Tensor]]:
    """(model, AdamW, its parameters, one batch of the train split's rows `indices` padded to a multiple of 8) on
    `device`, for timing or profiling single `train_step`s."""
    rows = tokenized_splits(data_args, model_args)["train"].remove_columns("length").select(indices)
    collate = make_collator(load_tokenizer(model_args), pad_to_multiple_of=8)
    batch = {k: v.to(device) for k, v in collate(list(rows)).items()}
    model = build_model(model_args, data_args.label_names).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=device.type == "cuda")
    return model, optimizer, params, batch


def padded_token_count(lengths: list[int], batch_size: int, seed: int, multiple: int | None = None) -> int:
    """Tokens an epoch processes, padding included, under the length-grouped order (one draw of it)."""
    order = list(
        ShuffledLengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
    )
    total = 0
    for start in range(0, len(order), batch_size):
        longest = max(lengths[i] for i in order[start : start + batch_size])
        if multiple:
            longest = -(-longest // multiple) * multiple
        total += longest * len(order[start : start + batch_size])
    return total


def describe(run: LoopRun) -> dict[str, Any]:
    return {**run.__dict__, "steady": run.rates(-1), "first_epoch": run.rates(0)}
