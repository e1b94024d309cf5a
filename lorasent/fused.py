"""Several LoRA trials on one frozen base model: each step is one forward and backward over all their batches.

Trials of one search differ only in their adapters, heads and hyperparameters; the frozen base is the same. On a GPU
a batch-16 step is a few milliseconds of small, launch-bound kernels, and trial processes sharing a GPU take turns
(bench/RESULTS.md, G3: eight processes gave ~1.8x the throughput of one). Here the batches of K trials go through the
base as one batch of all their rows. Every LoRA target Linear adds the K adapters stacked into one matrix pair, and a
per-row mask keeps each row to its own trial's columns (the mask also carries alpha / r). Every head module gives
each trial's rows that trial's own copy (a Linear head as one matmul of every copy over every row). Each trial's loss
is the mean over its own rows, so it gets exactly the gradients it would get alone (tests/test_fused.py).

`SharedBase` holds the model once. A `TrialSlot` is one trial's trainable tensors, AdamW, learning-rate schedule and
batch order. `SharedBase.step` advances any set of slots by one batch each, so trials join and leave at step
boundaries, and `SharedBase.evaluate` scores several slots on the validation split at once. A slot is saved as an
ordinary lorasent model folder (peft adapter files, tokenizer, lorasent.json) plus its optimizer state in
`fused_state.safetensors`, so analysis, retrain and predict read it like any other checkpoint.
"""

from __future__ import annotations

import bisect
import collections
import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file

from lorasent.config import DataArguments, ModelArguments, TrainArguments
from lorasent.errors import CheckpointError, ConfigError
from lorasent.metrics import scores
from lorasent.model import (
    ADAPTER_WEIGHTS,
    head_module_names,
    load_base,
    lora_config,
    sdpa_attention_mask,
    store_frozen_weights_in,
    write_meta,
)
from lorasent.multi_adamw import TrialAdamW, step_all
from lorasent.paths import atomic_dir
from lorasent.tokenize import PackedSplit, load_tokenizer, make_collator, source_identity, tokenized_splits
from lorasent.train import (
    ShuffledLengthGroupedSampler,
    check_batch_fits,
    check_schedule,
    epoch_generator,
    longest_first,
    lr_schedule,
    packed_inputs,
    resolve_precision,
)

FUSED_STATE = "fused_state.safetensors"  # a slot's optimizer state and step count, next to its adapter
PEFT_PREFIX = "base_model.model."  # how peft names a wrapped model's tensors in adapter_model.safetensors
# Hyperparameters that must be the same for every trial on one SharedBase: they shape the shared model or data.
SHARED_MODEL_FIELDS = ("model_name_or_path", "target_modules", "trust_remote_code")


def fused_precision(train_args: TrainArguments) -> str:
    """bf16 or fp32: one step's loss is the sum of several trials', and fp16's loss scaling would couple them."""
    if train_args.precision == "fp16":
        raise ConfigError(
            "Trials that share a base model train in bf16 or fp32, not fp16 (its loss scaling would couple the "
            "trials). Use --precision bf16 (or auto) or fp32, or train each trial on its own."
        )
    precision = resolve_precision(train_args)  # a forced bf16 on a GPU without it is refused there
    return "fp32" if precision == "fp16" else precision  # 'auto' on a GPU without bf16


def check_shareable(train_args: TrainArguments, searched: Iterable[str] = ()) -> None:
    """Refuse, before anything loads, what trials sharing one base model cannot do."""
    fused_precision(train_args)
    check_schedule(train_args)  # an unknown schedule named as such, before asking whether it is one of the step
    _schedule_function(train_args.lr_scheduler_type, 0, 1)
    if train_args.torch_compile:
        raise ConfigError("torch_compile does not apply to trials that share a base model; leave it off.")
    if train_args.evals_per_epoch != 1:
        raise ConfigError(
            "Trials that share a base model evaluate once an epoch: set --evals_per_epoch 1 (and a --grace_period of "
            "whole epochs), or search without --fused_trials."
        )
    shared = sorted(set(searched) & set(SHARED_MODEL_FIELDS))
    if shared:
        raise ConfigError(
            f"Trials that share a base model cannot search {', '.join(shared)}: every trial adapts the same layers "
            "of one model. Fix it with a flag (e.g. --target_modules attention), or search without --fused_trials."
        )


class EpochBatches:
    """One slot's batches of one epoch: taken in their own (random) order, or the one nearest a given width.

    A shared step pads every slot's rows to the longest of them all. Were each slot's batch drawn on its own, a step
    of four trials would pad to the longest of four random batches: on the quick-start's sentences 0.58 of the padded
    tokens would be real, against 0.9 for a trial alone. So one slot (the lead) draws its next batch in its own
    order, and every other slot takes its remaining batch nearest that width; each still takes every batch once in
    the epoch, and the widths follow the lead's random order.
    """

    def __init__(self, batches: list[list[int]], lengths: Sequence[int]) -> None:
        self._batches = batches
        self._widths = [max(lengths[i] for i in batch) for batch in batches]
        self._taken = [False] * len(batches)
        self._next = 0  # the first batch in own order that may still be untaken
        self._by_width: dict[int, collections.deque[int]] = collections.defaultdict(collections.deque)
        for i, width in enumerate(self._widths):
            self._by_width[width].append(i)
        self._sorted_widths = sorted(self._by_width)
        self.remaining = len(batches)

    def __bool__(self) -> bool:
        return self.remaining > 0

    def in_order(self) -> int:
        """The next untaken batch in this slot's own order (by index; `take` takes it)."""
        while self._taken[self._next]:
            self._next += 1
        return self._next

    def nearest(self, width: int) -> int:
        """The untaken batch whose width is nearest `width` (the narrower one on a tie), first in own order."""
        while True:
            at = bisect.bisect_left(self._sorted_widths, width)
            best = min(self._sorted_widths[max(at - 1, 0) : at + 1], key=lambda w: (abs(w - width), w))
            queue = self._by_width[best]
            while queue and self._taken[queue[0]]:
                queue.popleft()
            if queue:
                return queue[0]
            self._sorted_widths.remove(best)  # every batch of this width was taken (some in own order)

    def rows(self, i: int) -> list[int]:
        return self._batches[i]

    def width(self, i: int) -> int:
        return self._widths[i]

    def take(self, i: int) -> None:
        """Mark batch `i` as trained on: a step takes its batches only once it has succeeded, so a failed one (out of
        GPU memory) can run again, in smaller groups, on the same batches."""
        if self._taken[i]:
            raise ValueError(f"Batch {i} was taken already.")
        self._taken[i] = True
        self.remaining -= 1


class RowLayout(NamedTuple):
    """Where each row of a step's batch belongs, as tensors on the device."""

    own: torch.Tensor  # [rows, 1, sum of ranks], bool: row i keeps only its slot's adapter columns
    row_scale: torch.Tensor  # the same, times that slot's alpha / r
    dropout: float | None  # the one LoRA dropout rate of all slots, None where they differ
    keep: torch.Tensor | None  # [rows, 1, 1]: each row's LoRA keep probability, where the rates differ
    owner: torch.Tensor  # [rows]: each row's slot
    row_weight: torch.Tensor  # [rows]: 1 / its slot's rows, so that a slot's loss is the mean over its own rows


@functools.lru_cache(maxsize=256)
def _row_layout(layout: tuple[tuple[int, float, float, int], ...], device: torch.device) -> RowLayout:
    """The RowLayout of slots of (rank, alpha / r, LoRA dropout, rows) in step order. Cached: the same slots step
    with the same batch sizes step after step, and a tensor built on the host would be copied to the GPU (and wait
    for it) every step."""
    ranks = torch.tensor([rank for rank, *_ in layout])
    sizes = torch.tensor([rows for *_, rows in layout])
    owner = torch.repeat_interleave(torch.arange(len(layout)), sizes)
    column_owner = torch.repeat_interleave(torch.arange(len(layout)), ranks)
    column_scale = torch.repeat_interleave(torch.tensor([scaling for _, scaling, _, _ in layout]), ranks)
    own = (owner[:, None] == column_owner[None, :]).unsqueeze(1)
    rates = [rate for _, _, rate, _ in layout]
    keep = None if len(set(rates)) == 1 else (1 - torch.tensor(rates))[owner].view(-1, 1, 1).to(device)
    return RowLayout(
        own=own.to(device),
        row_scale=(own * column_scale).to(device),
        dropout=rates[0] if keep is None else None,
        keep=keep,
        owner=owner.to(device),
        row_weight=(1 / sizes[owner]).to(device),
    )


class StepRows:
    """Which rows of the current batch belong to which slot: set by `SharedBase` around each forward pass."""

    def __init__(self, slots: Sequence[TrialSlot], sizes: Sequence[int], device: torch.device) -> None:
        self.slots = list(slots)
        self.spans = [(int(a), int(b)) for a, b in itertools.pairwise(np.cumsum([0, *sizes]))]
        layout = tuple(
            (s.rank, s.scaling, s.model_args.lora_dropout, size) for s, size in zip(slots, sizes, strict=True)
        )
        self.layout = _row_layout(layout, device)

    def slot_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[slots]: each slot's mean cross-entropy over its own rows, in a few kernels whatever the number of slots."""
        per_row = F.cross_entropy(logits.float(), labels, reduction="none") * self.layout.row_weight
        return torch.zeros(len(self.slots), device=per_row.device).index_add_(0, self.layout.owner, per_row)

    def lora_dropout(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if not training:
            return x
        rate, keep = self.layout.dropout, self.layout.keep
        if rate is not None:
            return F.dropout(x, rate, training=True) if rate else x
        return x * torch.bernoulli(keep.expand_as(x)) / keep


class StackedLoraLinear(torch.nn.Module):
    """A frozen Linear plus the LoRA adapters of every slot in the step, stacked: two matmuls for all of them."""

    def __init__(self, base: torch.nn.Linear, index: int, shared: SharedBase) -> None:
        super().__init__()
        self.base, self.index = base, index
        self._shared = [shared]  # a list: a Module attribute would register the owner as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._shared[0].rows
        out = self.base(x)
        if rows is None:  # a forward pass outside SharedBase.step / evaluate: the base alone
            return out
        # A diverging trial must not reach the others through the stacked matmuls, whose weight gradients sum over
        # every row, and 0 * NaN is NaN. So here its NaN or inf weights, inputs and incoming gradients count as 0,
        # and other rows' products with its columns are dropped, not multiplied by 0. Its own rows are NaN through
        # the base already, and `end_epoch` also checks its weights.
        # Each lora_B is stored transposed (see TrialSlot), so both stacks are concatenations along their first
        # dimension, whose gradient slices each slot's gradient takes as it is, without a copy.
        lora_a = _finite(torch.cat([s.lora_A[self.index] for s in rows.slots])).to(x.dtype)
        lora_b = _finite(torch.cat([s.lora_B[self.index].t() for s in rows.slots])).to(x.dtype)
        h = rows.lora_dropout(_finite(x), self.training) @ lora_a.t()
        h = torch.where(rows.layout.own, h * rows.layout.row_scale.to(x.dtype), 0.0)
        return out + _FiniteGradient.apply(h @ lora_b)


class _Finite(torch.autograd.Function):
    """NaN and inf set to 0, with the incoming gradient passed on as it is: it differs from nan_to_num's only where the
    input was not finite, i.e. in a diverging trial's own tensors and rows, and it spares nan_to_num's backward (a
    finiteness mask and a product: five kernels) in each of the three places a stacked layer sanitises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.nan_to_num(0.0, 0.0, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


_finite = _Finite.apply


class _FiniteGradient(torch.autograd.Function):
    """The identity, whose backward turns NaN and inf in the gradient into 0 (see StackedLoraLinear.forward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.nan_to_num(0.0, 0.0, 0.0)


class RoutedHead(torch.nn.Module):
    """A head module (e.g. `classifier`) that gives each slot's rows that slot's own copy: a Linear as one matmul of
    every slot's copy over every row, each row then taking its own slot's outputs (the head's compute is a rounding
    error beside the base's, and the kernels stay the same in number whatever the slots); any other module slot by
    slot, on its own rows."""

    def __init__(self, name: str, shared: SharedBase) -> None:
        super().__init__()
        self.name = name
        self.linear = type(shared.heads[name]) is torch.nn.Linear
        self._shared = [shared]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._shared[0].rows
        heads = [s.heads[self.name] for s in rows.slots]
        for head in heads:  # a slot's own copy lives outside the model, so the model's mode reaches it only here
            if head.training != self.training:
                head.train(self.training)
        if len(heads) == 1:
            return heads[0](x)
        if not self.linear:
            return torch.cat([head(x[a:b]) for head, (a, b) in zip(heads, rows.spans, strict=True)])
        # As in StackedLoraLinear, a diverging slot's weights and rows count as 0 in the products every row shares.
        # Its rows are then made NaN again, so that its loss says it diverged: `broken` sums each row's input and its
        # slot's weights, and 0 times that is 0, or NaN where something in it was not finite.
        weight = torch.cat([head.weight for head in heads])
        bias = torch.cat([head.bias for head in heads]) if heads[0].bias is not None else None
        every = F.linear(_finite(x), _finite(weight), None if bias is None else _finite(bias))
        every = every.unflatten(-1, (len(heads), -1))  # [rows, ..., slots, out]: a head may see every token
        per_row = (-1, *[1] * (x.dim() - 1))  # a row's value broadcast over its other dimensions
        index = rows.layout.owner.view(*per_row, 1).expand(*every.shape[:-2], 1, every.shape[-1])
        own = every.gather(-2, index).squeeze(-2)
        slot_sums = weight.view(len(heads), -1).sum(-1) + (0 if bias is None else bias.view(len(heads), -1).sum(-1))
        broken = x.sum(-1, keepdim=True) + slot_sums[rows.layout.owner].view(per_row)
        return own + broken * 0


def _schedule_function(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """transformers' learning-rate schedule `name` as a function of the step (the factor its LambdaLR applies)."""
    schedule = lr_schedule(name, warmup, total)
    if not hasattr(schedule, "lr_lambdas"):
        raise ConfigError(
            f"lr_scheduler_type {name!r} is not a function of the step, which trials that share a base model need. "
            "Use linear, cosine, constant_with_warmup or another step schedule."
        )
    return schedule.lr_lambdas[0]


class TrialSlot:
    """One trial on a SharedBase: its adapter and head, AdamW, schedule, batch order and loss of the epoch."""

    def __init__(self, key: str, shared: SharedBase, model_args: ModelArguments, train_args: TrainArguments) -> None:
        self.key, self.model_args, self.train_args = key, model_args, train_args
        self.rank = model_args.lora_r
        self.scaling = model_args.lora_alpha / model_args.lora_r
        generator = torch.Generator().manual_seed(train_args.seed)  # the same seed starts the same adapter
        # plain lists: every LoRA layer reads its adapter from each slot in every forward pass, and indexing a
        # ParameterList goes through Module.__getattr__ (~1.7 us a time, ~200 times a step of 8 trials on 12 layers)
        self.lora_A: list[torch.nn.Parameter] = []
        self.lora_B: list[torch.nn.Parameter] = []
        for linear in shared.targets.values():
            a = torch.empty(self.rank, linear.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as peft initialises lora_A
            self.lora_A.append(torch.nn.Parameter(a.to(shared.device)))
            # [out, r] as peft has it, laid out as its transpose: see StackedLoraLinear.forward
            b = torch.zeros(self.rank, linear.out_features, device=shared.device).t()
            self.lora_B.append(torch.nn.Parameter(b))
        # The head as the base loaded it, as `lorasent.train` starts from it: a checkpoint's own trained head where it
        # has one for these labels (re-initialising it threw that training away), else new, under the base's seed.
        self.heads = torch.nn.ModuleDict({name: copy.deepcopy(module) for name, module in shared.heads.items()})
        self.heads.to(shared.device)
        targets = list(shared.targets)
        self._named = [
            *((f"{PEFT_PREFIX}{name}.lora_A.weight", p) for name, p in zip(targets, self.lora_A, strict=True)),
            *((f"{PEFT_PREFIX}{name}.lora_B.weight", p) for name, p in zip(targets, self.lora_B, strict=True)),
            *((f"{PEFT_PREFIX}{name}", p) for name, p in self.heads.named_parameters()),
        ]
        for _, p in self._named:
            p.requires_grad_(True)
        self.optimizer = TrialAdamW(
            self._named, weight_decay=train_args.weight_decay, max_grad_norm=train_args.max_grad_norm
        )
        steps_per_epoch = math.ceil(shared.train_size / train_args.per_device_train_batch_size)
        total = steps_per_epoch * train_args.num_train_epochs
        warmup = math.ceil(total * train_args.warmup_ratio)  # as Trainer reads a warm-up ratio
        self.lr_lambda = _schedule_function(train_args.lr_scheduler_type, warmup, total)
        self.epoch = 0  # epochs finished
        self.batches = EpochBatches([], [])
        self._loss_sum = torch.zeros((), device=shared.device)  # this epoch's, read once at its end
        self._loss_steps = 0
        self.tokens = 0  # real tokens trained on in this epoch
        self.padded_tokens = 0  # what its rows took in the shared steps, padding included

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.optimizer.steps

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained tensors, named as peft names them in adapter_model.safetensors."""
        return list(self._named)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named]

    def begin_epoch(self, lengths: Sequence[int]) -> None:
        """This epoch's batches: length-grouped in random order (or plain random), seeded by (seed, epoch)."""
        generator = epoch_generator(self.train_args.seed, self.epoch)
        size = self.train_args.per_device_train_batch_size
        if self.train_args.group_by_length:
            order = list(ShuffledLengthGroupedSampler(size, lengths=list(lengths), generator=generator))
        else:
            order = torch.randperm(len(lengths), generator=generator).tolist()
        self.batches = EpochBatches([order[i : i + size] for i in range(0, len(order), size)], lengths)
        self._loss_sum.zero_()
        self._loss_steps = 0
        self.tokens = self.padded_tokens = 0

    def learning_rate(self) -> float:
        """The scheduled learning rate of the next step."""
        return self.train_args.learning_rate * self.lr_lambda(self.step)

    def record_step(self, loss: torch.Tensor, tokens: int, padded_tokens: int) -> None:
        """Count a step's loss (left on the device) and its real and padded tokens into this epoch's."""
        self._loss_sum += loss
        self._loss_steps += 1
        self.tokens += tokens
        self.padded_tokens += padded_tokens

    def train_loss(self) -> float:
        """Mean training loss of this epoch's steps (one device sync, at the epoch's end)."""
        return self._loss_sum.item() / max(self._loss_steps, 1)


class SharedBase:
    """The frozen base model once, with its LoRA targets and head routed per slot, and the tokenised data."""

    def __init__(
        self,
        data_args: DataArguments,
        model_args: ModelArguments,
        train_args: TrainArguments,
        device: torch.device | None = None,
    ) -> None:
        check_shareable(train_args)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() and not train_args.use_cpu else "cpu")
        self.data_args, self.model_args, self.train_args = data_args, model_args, train_args
        self.dtype = torch.bfloat16 if fused_precision(train_args) == "bf16" else None
        self.tokenizer = load_tokenizer(model_args)
        self.source = source_identity(data_args.dataset)  # what each trial's lorasent.json records
        splits = tokenized_splits(data_args, model_args, self.tokenizer, self.source)
        self.train_data = packed_inputs(splits["train"])
        self.eval_data = packed_inputs(longest_first(splits["validation"]))
        self.lengths = splits["train"]["length"][:]
        self.train_size = len(self.train_data)
        self.eval_rows = train_args.per_device_eval_batch_size  # per evaluation pass, all slots' rows together
        self.collate = make_collator(self.tokenizer, pad_to_multiple_of=8 if self.device.type == "cuda" else None)

        torch.manual_seed(train_args.seed)  # a new head starts as `lorasent.train` starts it, which seeds the same way
        model = load_base(model_args, data_args.label_names)
        self.config = model.config
        self.lora = lora_config(model, model_args)
        for p in model.parameters():
            p.requires_grad_(False)
        self.targets: dict[str, torch.nn.Linear] = {}
        for name, module in list(model.named_modules()):
            if name.split(".", 1)[0] in self.lora.modules_to_save or not check_target_module_exists(self.lora, name):
                continue
            if type(module) is not torch.nn.Linear:
                raise ConfigError(
                    f"LoRA target {name} is a {type(module).__name__}; trials that share a base model adapt Linear "
                    "layers only. Choose Linear target_modules, or train each trial on its own."
                )
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, StackedLoraLinear(module, len(self.targets), self))
            self.targets[name] = module
        self.heads = {name: getattr(model, name) for name in head_module_names(model)}
        for name in self.heads:
            setattr(model, name, RoutedHead(name, self))
        if self.dtype is not None and train_args.half_precision_base:
            store_frozen_weights_in(model, self.dtype)
        self.model = model.to(self.device).eval()  # every module in one mode: from here on the model's flag says it
        self.rows: StepRows | None = None

    # ----------------------------------------------------------------------------------------- slots

    def new_slot(self, key: str, model_args: ModelArguments, train_args: TrainArguments) -> TrialSlot:
        """A fresh trial on this base; refused when it differs from the base in what the base shares."""
        for name in SHARED_MODEL_FIELDS:
            if getattr(model_args, name) != getattr(self.model_args, name):
                raise ConfigError(
                    f"Trial {key} sets {name}={getattr(model_args, name)!r}, but the shared base model was built with "
                    f"{getattr(self.model_args, name)!r}; trials that share a base cannot search {name}."
                )
        check_schedule(train_args)
        check_batch_fits(train_args, self.train_size)
        return TrialSlot(key, self, model_args, train_args)

    def save_slot(self, slot: TrialSlot, folder: str | Path, meta: dict[str, Any]) -> Path:
        """Write `slot` as a lorasent model folder (loads with `load_model_dir`) plus its optimizer state."""
        weights = {name: p.detach().float().cpu().contiguous() for name, p in slot.named_parameters()}
        state = {"step": torch.tensor(slot.step), "epoch": torch.tensor(slot.epoch)}
        state.update({key: value.detach().cpu().contiguous() for key, value in slot.optimizer.state_dict().items()})
        config = copy.deepcopy(self.lora)
        config.r, config.lora_alpha = slot.model_args.lora_r, slot.model_args.lora_alpha
        config.lora_dropout = slot.model_args.lora_dropout
        config.base_model_name_or_path = self.config.name_or_path
        with atomic_dir(folder) as tmp:
            save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            config.save_pretrained(str(tmp))
            save_file(state, str(tmp / FUSED_STATE))
            self.tokenizer.save_pretrained(str(tmp))
            write_meta(tmp, meta)
        return Path(folder)

    def load_slot(
        self, key: str, model_args: ModelArguments, train_args: TrainArguments, folder: str | Path
    ) -> TrialSlot:
        """A slot that goes on from a folder `save_slot` wrote (the same trial's hyperparameters)."""
        folder = Path(folder)
        slot = self.new_slot(key, model_args, train_args)
        try:
            weights = load_file(str(folder / ADAPTER_WEIGHTS))
            state = load_file(str(folder / FUSED_STATE))
        except Exception as e:  # safetensors raises its own error types, OSError and others for damaged files
            raise CheckpointError(
                f"Cannot resume trial {key} from {folder}: its adapter or {FUSED_STATE} is missing or corrupt ({e}). "
                "Re-run the trial from the start."
            ) from e
        named = list(slot.named_parameters())
        missing = [name for name, _ in named if name not in weights]
        if missing:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} lacks {missing[:3]}: it was not written for this model.")
        with torch.no_grad():
            for name, p in named:
                if weights[name].shape != p.shape:
                    raise CheckpointError(
                        f"{name} in {folder} has shape {tuple(weights[name].shape)}, this trial needs {tuple(p.shape)}."
                    )
                p.copy_(weights[name])
        try:
            slot.optimizer.load_state_dict(state, steps=int(state["step"]))
            slot.epoch = int(state["epoch"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"{folder / FUSED_STATE} does not hold this trial's optimizer state ({e}). Re-run the trial from the "
                "start."
            ) from e
        return slot

    # ----------------------------------------------------------------------------------------- training

    @contextmanager
    def _routing(self, slots: Sequence[TrialSlot], sizes: Sequence[int]) -> Iterator[StepRows]:
        """Rows of each slot known to the patched layers, under autocast, for one forward pass."""
        self.rows = StepRows(slots, sizes, self.device)
        try:
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                yield self.rows
        finally:
            self.rows = None

    def _batch(self, data: PackedSplit, groups: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """The rows of every group, in order, padded to the longest of them all, on the device."""
        batch = self.collate.gather(data, [i for group in groups for i in group]).items()
        if self.device.type == "cuda":  # from pinned memory the copy neither blocks nor waits for the GPU
            on_device = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch}
        else:
            on_device = {k: v.to(self.device) for k, v in batch}
        on_device["attention_mask"] = sdpa_attention_mask(self.config, on_device["attention_mask"])
        return on_device

    def backward(self, slots: Sequence[TrialSlot], groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """One forward and backward pass of each slot over its group of training rows, in the model's current mode:
        every slot's loss, and the width the rows were padded to."""
        batch = self._batch(self.train_data, groups)
        labels = batch.pop("labels")
        with self._routing(slots, [len(g) for g in groups]) as rows:
            logits = self.model(**batch).logits
        losses = rows.slot_losses(logits, labels)
        losses.sum().backward()
        return losses, batch["input_ids"].shape[1]

    def _seed_dropout(self, seed: int) -> None:
        """Seed the host's generator and the device's, as `torch.manual_seed` does, without its cost every step: it
        also seeds each device type not in use (XPU, MTIA and, on a CPU, CUDA) by queueing the call with a formatted
        stack trace, 0.2-0.4 ms a step on a CPU."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)

    def step(self, slots: Sequence[TrialSlot]) -> None:
        """One optimizer step of every slot, each on its next batch; a slot whose epoch has no batch left is refused.
        A step that fails before the optimizer step (out of memory, say) changes no slot."""
        if not all(slot.batches for slot in slots):
            raise ValueError(f"Slots {[s.key for s in slots if not s.batches]} have no batch left: begin_epoch first.")
        # Dropout draws follow from the slots stepping together and their step counts alone: a trial resumed among
        # the same trials goes on exactly (among others, its dropout and batch order follow them: README).
        self._seed_dropout(hash(tuple((slot.train_args.seed, slot.step) for slot in slots)) & (2**63 - 1))
        lead, *others = slots
        picks = [lead.batches.in_order()]
        width = lead.batches.width(picks[0])
        picks += [slot.batches.nearest(width) for slot in others]
        groups = [slot.batches.rows(i) for slot, i in zip(slots, picks, strict=True)]
        if not self.model.training:  # after an evaluation: a walk over every module, not one a step
            self.model.train()
        try:
            losses, padded_width = self.backward(slots, groups)
        except BaseException:  # e.g. out of GPU memory: leave every slot as it was, to step again (fewer at once)
            for slot in slots:
                slot.optimizer.zero_grad()
            raise
        step_all([slot.optimizer for slot in slots], [slot.learning_rate() for slot in slots])
        for slot, loss, group, pick in zip(slots, losses.detach().unbind(), groups, picks, strict=True):
            slot.batches.take(pick)
            slot.record_step(loss, int(sum(self.lengths[i] for i in group)), len(group) * padded_width)

    def end_epoch(self, slots: Sequence[TrialSlot]) -> list[dict[str, float]]:
        """Close the epochs of `slots` (their batches have run out): validation metrics, `train_loss`, `diverged`
        (a NaN or infinite training loss) and `epoch`, per slot."""
        results = self.evaluate(slots)
        # whether each slot's weights are all finite, in one read from the device rather than one per tensor
        finite = torch.stack([torch.stack([torch.isfinite(p).all() for p in s.parameters()]).all() for s in slots])
        for slot, metrics, weights_finite in zip(slots, results, finite.tolist(), strict=True):
            slot.epoch += 1
            loss = slot.train_loss()
            diverged = not math.isfinite(loss) or not weights_finite
            metrics.update(epoch=float(slot.epoch), train_loss=loss, diverged=float(diverged))
        return results

    @torch.no_grad()
    def evaluate(self, slots: Sequence[TrialSlot]) -> list[dict[str, float]]:
        """Validation metrics of each slot (as the Trainer path reports them, `loss` included), in one pass."""
        per_slot = max(1, self.eval_rows // len(slots))
        n = len(self.eval_data)
        logits: list[list[torch.Tensor]] = [[] for _ in slots]
        labels = []
        self.model.eval()
        for start in range(0, n, per_slot):
            chunk = list(range(start, min(n, start + per_slot)))
            batch = self._batch(self.eval_data, [chunk] * len(slots))
            chunk_labels = batch.pop("labels")
            labels.append(chunk_labels[: len(chunk)])
            with self._routing(slots, [len(chunk)] * len(slots)) as rows:
                out = self.model(**batch).logits.float()
            for k, (a, b) in enumerate(rows.spans):
                logits[k].append(out[a:b])
        truth = torch.cat(labels)
        results = []
        for slot_logits in logits:
            all_logits = torch.cat(slot_logits)
            loss = F.cross_entropy(all_logits, truth).item()
            predicted = all_logits.argmax(-1).cpu().numpy()
            results.append({**scores(truth.cpu().numpy(), predicted, self.data_args.label_names), "loss": loss})
        return results


def train_together(shared: SharedBase, slots: Sequence[TrialSlot], epochs: int) -> list[list[dict[str, float]]]:
    """Train `slots` side by side for `epochs` epochs, all stepping together until each one's batches run out: the
    in-process way to use a SharedBase (the Ray engine, `tune.engine`, interleaves trials that come and go)."""
    history: list[list[dict[str, float]]] = [[] for _ in slots]
    for _ in range(epochs):
        for slot in slots:
            slot.begin_epoch(shared.lengths)
        while active := [s for s in slots if s.batches]:
            shared.step(active)
        for k, metrics in enumerate(shared.end_epoch(slots)):
            history[k].append(metrics)
    return history
