"""AdamW with clipping for several trials in one pass: each trial gets what torch's AdamW and clipping give it alone."""

from __future__ import annotations

import math

import pytest
import torch

from lorasent.multi_adamw import TrialAdamW, step_all

SHAPES = {"lora_A.weight": (4, 12), "lora_B.weight": (12, 4), "classifier.weight": (2, 12), "classifier.bias": (2,)}


def _trial(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in SHAPES.items()]


def _set_grads(named: list[tuple[str, torch.nn.Parameter]], step: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for _, p in named:
        p.grad = scale * torch.randn(p.shape, generator=generator)


def _named(optimizer: TrialAdamW) -> list[tuple[str, torch.nn.Parameter]]:
    return list(zip(optimizer.names, optimizer.params, strict=True))


# (weight decay, max grad norm, gradient scale, learning rates by step): clipped every step or never, with and
# without weight decay, learning rates that change from step to step as a schedule's do
TRIALS = [
    (0.0, 1.0, 5.0, [1e-3, 2e-3, 1.5e-3, 1e-3, 5e-4, 0.0]),
    (0.01, 100.0, 0.1, [5e-4] * 6),
    (0.1, 0.5, 1.0, [3e-3, 3e-3, 2e-3, 1e-3, 1e-4, 1e-5]),
]


def test_every_trial_steps_as_torch_steps_it_alone() -> None:
    mine = [TrialAdamW(_trial(k), weight_decay=wd, max_grad_norm=norm) for k, (wd, norm, *_) in enumerate(TRIALS)]
    theirs = []
    for k, (wd, *_) in enumerate(TRIALS):
        named = _trial(k)
        decay = [p for name, p in named if not name.endswith("bias")]
        no_decay = [p for name, p in named if name.endswith("bias")]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        theirs.append((named, torch.optim.AdamW(groups, lr=1.0)))
    for step in range(len(TRIALS[0][3])):
        for k, (_, norm, scale, lrs) in enumerate(TRIALS):
            _set_grads(_named(mine[k]), step, scale)
            named, optimizer = theirs[k]
            _set_grads(named, step, scale)
            torch.nn.utils.clip_grad_norm_([p for _, p in named], norm)
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            optimizer.step()
        step_all(mine, [lrs[step] for *_, lrs in TRIALS])
        for o, (named, optimizer) in zip(mine, theirs, strict=True):
            assert o.steps == step + 1
            moments = o.state_dict()
            for (name, p), (_, q) in zip(_named(o), named, strict=True):
                assert p.grad is None  # cleared for the next backward pass
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"step {step}, {name}")
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(moments[f"{name}::{key}"], optimizer.state[q][key], rtol=1e-6, atol=1e-8)


def test_a_reloaded_state_goes_on_exactly() -> None:
    straight = TrialAdamW(_trial(0), weight_decay=0.01, max_grad_norm=1.0)
    for step in range(3):
        _set_grads(_named(straight), step, 2.0)
        step_all([straight], [1e-3])
    saved = {name: t.clone() for name, t in straight.state_dict().items()}
    copies = [(name, torch.nn.Parameter(p.detach().clone())) for name, p in _named(straight)]
    resumed = TrialAdamW(copies, weight_decay=0.01, max_grad_norm=1.0)
    resumed.load_state_dict(saved, steps=straight.steps)
    for o in (straight, resumed):
        _set_grads(_named(o), 3, 2.0)
        step_all([o], [1e-3])
    for p, q in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(KeyError):
        resumed.load_state_dict({}, steps=3)
    wrong = {name: t[..., :1] for name, t in saved.items()}
    with pytest.raises(ValueError, match="shape"):
        resumed.load_state_dict(wrong, steps=3)


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_trial_with_broken_gradients_leaves_the_others_alone(poison: float) -> None:
    alone = TrialAdamW(_trial(0), weight_decay=0.01, max_grad_norm=1.0)
    beside = TrialAdamW(_trial(0), weight_decay=0.01, max_grad_norm=1.0)
    broken = TrialAdamW(_trial(1), weight_decay=0.01, max_grad_norm=1.0)
    _set_grads(_named(alone), 0, 3.0)
    _set_grads(_named(beside), 0, 3.0)
    for p in broken.params:
        p.grad = torch.full_like(p, poison)
    step_all([alone], [1e-3])
    step_all([broken, beside], [1e-3, 1e-3])
    for p, q in zip(alone.params, beside.params, strict=True):
        assert torch.equal(p, q)
    assert not all(torch.isfinite(p).all() for p in broken.params)
