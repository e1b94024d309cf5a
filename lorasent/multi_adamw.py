"""AdamW with gradient clipping for several trials at once: the same few multi-tensor calls, whatever their number.

Trials on one shared base (`lorasent.fused`) each clip their own gradients and keep their own learning rate and AdamW
moments. With one `torch.optim.AdamW` and one `clip_grad_norm_` per trial, each step pays their Python overhead once
per trial: 0.9 ms a trial on a 2-core CPU, 7 of the 34 ms that a step of 8 trials took on the benchmark's tiny model,
and on a GPU host time that a launch-bound step cannot hide. torch steps one param group per call, with one learning
rate each. Here the tensors of every trial go through the `torch._foreach_*` calls of torch's own foreach AdamW
(`torch.optim.adam._multi_tensor_adam`, whose step size and bias correction are per tensor already) with a learning
rate and weight decay per tensor too, after each trial's gradients are clipped to its own norm as `clip_grad_norm_`
clips them. tests/test_multi_adamw.py checks it step for step against torch's AdamW and clipping.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's AdamW defaults, which lorasent's Trainer path uses too
CLIP_EPS = 1e-6  # as clip_grad_norm_: the gradients are scaled by max_norm / (norm + 1e-6) when that is below 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # the state's names in torch's AdamW, kept for the saved files


class TrialAdamW:
    """One trial's trained tensors, their AdamW moments and step count, its weight decay and clipping norm."""

    def __init__(
        self, named: Sequence[tuple[str, torch.nn.Parameter]], *, weight_decay: float, max_grad_norm: float
    ) -> None:
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.weight_decay = [0.0 if name.endswith("bias") else weight_decay for name in self.names]  # as Trainer
        self.max_grad_norm = max_grad_norm
        self.moments = {key: [torch.zeros_like(p) for p in self.params] for key in MOMENTS}
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments by tensor name, `<name>::exp_avg` and `<name>::exp_avg_sq`."""
        return {f"{name}::{key}": m[i] for key, m in self.moments.items() for i, name in enumerate(self.names)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], steps: int) -> None:
        """Moments `state_dict` wrote, after `steps` steps; a missing or misshapen one is a KeyError / ValueError."""
        with torch.no_grad():
            for key, m in self.moments.items():
                for i, name in enumerate(self.names):
                    saved = state[f"{name}::{key}"]
                    if saved.shape != m[i].shape:
                        raise ValueError(f"{name}::{key} has shape {tuple(saved.shape)}, not {tuple(m[i].shape)}")
                    m[i].copy_(saved)
        self.steps = steps


@functools.lru_cache(maxsize=64)
def _clip_layout(
    counts: tuple[int, ...], max_norms: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(which trial each tensor is of, each trial's max norm) on the device: cached, as the same trials step together
    step after step, and a tensor built on the host each step would be copied to the GPU each step."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    return owner, torch.tensor(max_norms, dtype=torch.float32).to(device)


@torch.no_grad()
def step_all(optimizers: Sequence[TrialAdamW], learning_rates: Sequence[float]) -> None:
    """Clip each trial's gradients to its max_grad_norm, take one AdamW step of each at its learning rate, and clear
    the gradients."""
    params = [p for o in optimizers for p in o.params]
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise ValueError("step_all needs a gradient for every trained tensor: run the backward pass first.")
    owner, max_norms = _clip_layout(
        tuple(len(o.params) for o in optimizers), tuple(o.max_grad_norm for o in optimizers), params[0].device
    )
    norms = torch.zeros_like(max_norms).index_add_(0, owner, torch.stack(torch._foreach_norm(grads)).square()).sqrt()
    for o, coef in zip(optimizers, (max_norms / (norms + CLIP_EPS)).clamp(max=1.0).unbind(), strict=True):
        torch._foreach_mul_([p.grad for p in o.params], coef)

    for o in optimizers:
        o.steps += 1
    per_tensor = [(o, lr, wd) for o, lr in zip(optimizers, learning_rates, strict=True) for wd in o.weight_decay]
    decay = [1 - lr * wd for _, lr, wd in per_tensor]
    if any(factor != 1 for factor in decay):
        torch._foreach_mul_(params, decay)
    exp_avg = [m for o in optimizers for m in o.moments["exp_avg"]]
    exp_avg_sq = [v for o in optimizers for v in o.moments["exp_avg_sq"]]
    torch._foreach_lerp_(exp_avg, grads, 1 - BETA1)
    torch._foreach_mul_(exp_avg_sq, BETA2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - BETA2)
    step_size = [(lr / (1 - BETA1**o.steps)) * -1 for o, lr, _ in per_tensor]
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, [(1 - BETA2**o.steps) ** 0.5 for o, _, _ in per_tensor])
    torch._foreach_add_(denom, EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, step_size)
    for o in optimizers:
        o.zero_grad()
