"""How much accelerator memory one LoRA training run needs, known before any GPU is touched.

A search packs several trials onto one GPU, as processes or as trials sharing one base model (`--fused_trials`), and
how many fit follows from this estimate (`tune/cluster.py`).
Activations are not guessed from a formula per architecture: the model runs one forward pass on the meta device
(shapes only: no memory, milliseconds) while autograd's saved-tensor hooks add up what a real training step keeps
for its backward pass. A forward pass on real tensors keeps the same tensors; a test compares the two on the CPU.
An evaluation batch's peak is measured the same way, by following which tensors are alive during a forward pass
without gradients. Both are counted in fp32, so under bf16/fp16 autocast they are upper bounds (about twice the truth).
On the meta device PyTorch's SDPA falls back to its math path, which stores every attention probability; on a GPU it
runs a fused kernel (flash or memory-efficient attention) that keeps one float per query instead, and so does the
estimate (`FusedAttention`). Architectures on eager attention are counted as they run, probabilities and all.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedModel

from lorasent.config import ModelArguments
from lorasent.errors import ConfigError
from lorasent.model import add_lora, meta_model, store_frozen_weights_in

GIB = 2**30
# Per process, outside what the model allocates: CUDA context, cuBLAS workspaces, allocator rounding. An allowance
# (a CUDA 12 context alone is ~0.5 GiB); each trial's reports carry its real peak to check it against.
RUNTIME_BYTES = GIB


@dataclass(frozen=True)
class TrainingFootprint:
    """Bytes one training run needs on its accelerator, by what holds them."""

    frozen_weights: int  # the base model's frozen parameters, as stored
    trained_weights: int  # the LoRA adapter and the head
    optimizer: int  # the trained parameters' gradients and AdamW's two moments (fp32)
    train_batch: int  # what the largest training batch keeps for its backward pass
    eval_batch: int  # the peak of an evaluation batch's forward pass
    runtime: int = RUNTIME_BYTES

    @property
    def weights(self) -> int:
        return self.frozen_weights + self.trained_weights

    @property
    def activations(self) -> int:
        """Training and evaluation take turns: the larger of the two."""
        return max(self.train_batch, self.eval_batch)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in ENTRIES)
        return f"~{self.total / GIB:.1f} GiB ({parts} GiB)"

    @property
    def per_shared_trial(self) -> int:
        """What each run adds where several train side by side on one shared base model (`lorasent.fused`): its
        adapter, head, optimizer state and training batch."""
        return self.trained_weights + self.optimizer + self.train_batch

    def shared_total(self, trials: int) -> int:
        """Bytes of `trials` runs on one shared base model: the frozen base and the runtime once, each run's own, and
        an evaluation pass where it needs more than the runs' batches (it evaluates eval-batch rows at a time)."""
        own = trials * (self.trained_weights + self.optimizer)
        return self.frozen_weights + self.runtime + own + max(trials * self.train_batch, self.eval_batch)


ENTRIES = ("weights", "optimizer", "activations", "runtime")  # how `describe` breaks a footprint down


def training_footprint(
    model_args: ModelArguments,
    *,
    batch_size: int,
    max_length: int,
    eval_batch_size: int,
    num_labels: int = 2,
    frozen_dtype: torch.dtype | None = None,
) -> TrainingFootprint:
    """The footprint of training `model_args`' model on batches of `batch_size` x `max_length` tokens.

    `frozen_dtype`: the dtype the frozen base weights are stored in (`half_precision_base`), None for fp32.
    Raises ConfigError when the architecture cannot run on the meta device (a data-dependent forward pass).
    """
    model = add_lora(meta_model(model_args, num_labels), model_args)
    if frozen_dtype is not None:
        store_frozen_weights_in(model, frozen_dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        # Parameters that the backward pass needs are saved as they are: the 1-token pass measures them, and little
        # else, so the difference is what the batch itself adds.
        with FusedAttention():
            per_batch = saved_bytes(model, batch_size, max_length) - saved_bytes(model, 1, 1)
            model.eval()
            eval_peak = peak_forward_bytes(model, eval_batch_size, max_length)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        raise ConfigError(
            f"Cannot estimate the memory of model '{model_args.model_name_or_path}' on the meta device ({e}). Set "
            "--gpus_per_trial (e.g. 0.25 packs four trials per GPU) instead of leaving it automatic."
        ) from None
    trained = sum(p.numel() * p.element_size() for p in trainable)
    return TrainingFootprint(
        frozen_weights=sum(p.numel() * p.element_size() for p in model.parameters()) - trained,
        trained_weights=trained,
        optimizer=sum(3 * p.numel() * 4 for p in trainable),
        train_batch=int(per_batch),
        eval_batch=int(eval_peak),
    )


def _inputs(model: torch.nn.Module, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """Token ids and labels on the model's device. No attention mask: with one, transformers inspects the mask's
    values, which meta tensors do not have; a mask changes which kernel runs, not what a pass keeps."""
    device = next(model.parameters()).device
    return {
        "input_ids": torch.zeros(batch_size, length, dtype=torch.long, device=device),
        "labels": torch.zeros(batch_size, dtype=torch.long, device=device),
    }


def saved_bytes(model: torch.nn.Module, batch_size: int, length: int) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass of this shape, on the device
    the model is on (the meta device for an estimate)."""
    saved: dict[int, int] = {}  # id -> bytes: a tensor saved twice counts once (the graph keeps it alive)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _forward(model, batch_size, length)
    return sum(saved.values())


def peak_forward_bytes(model: torch.nn.Module, batch_size: int, length: int) -> int:
    """The most bytes of new tensors alive at once during a forward pass without gradients (views not counted)."""
    tracker = _LiveTensors()
    with torch.no_grad(), tracker:
        _forward(model, batch_size, length)
    return tracker.peak


def _forward(model: torch.nn.Module, batch_size: int, length: int) -> None:
    """One forward pass of `_inputs`, without the look at token values that GPT-2 and DeBERTa take, only to warn,
    when a batch has no mask: whether it ends in padding. Meta tensors have no values to look at."""
    checks = [module for module in model.modules() if isinstance(module, PreTrainedModel)]
    for module in checks:
        module.warn_if_padding_and_no_attention_mask = _no_warning
    try:
        model(**_inputs(model, batch_size, length))
    finally:
        for module in checks:
            del module.warn_if_padding_and_no_attention_mask


def _no_warning(*args: Any, **kwargs: Any) -> None:
    return None


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of every tensor an operator creates until Python frees it, and the peak of that count."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for tensor, returned in zip(outputs, func._schema.returns, strict=False):
            if isinstance(tensor, torch.Tensor) and returned.alias_info is None:  # a view allocates nothing
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


class FusedAttention(TorchFunctionMode):
    """Runs `scaled_dot_product_attention` as a fused GPU kernel would keep memory: an output, and for the backward
    pass the query, key, value, output and one float per query row (its log-sum-exp). Values are not computed, so
    it serves estimates on the meta device only."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value = (*args, *(kwargs[name] for name in ("query", "key", "value")[len(args) :]))[:3]
            return _FusedAttentionMemory.apply(query, key, value)
        return func(*args, **kwargs)


class _FusedAttentionMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
