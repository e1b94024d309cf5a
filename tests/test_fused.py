"""Several trials on one shared base (`lorasent.fused`): every trial gets exactly its own gradients, its checkpoint is
an ordinary peft model folder, a resumed slot goes on where it stopped, and trials learn side by side."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_modes_right, forward_modes
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import set_seed

from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.errors import CheckpointError, ConfigError
from lorasent.fused import FUSED_STATE, EpochBatches, RoutedHead, SharedBase, StepRows, TrialSlot, train_together
from lorasent.model import build_model, load_base, load_model_dir, model_meta
from lorasent.tokenize import load_tokenizer

DATA = DataArguments(max_train_samples=48, max_eval_samples=32, max_test_samples=32, max_length=32)
MODEL = ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4)
# Three trials as a search samples them: other ranks, alphas, learning rates, batch sizes and LoRA dropouts.
TRIALS = [
    (dict(lora_r=2, lora_alpha=8, lora_dropout=0.0), dict(learning_rate=1e-3, per_device_train_batch_size=4)),
    (dict(lora_r=4, lora_alpha=16, lora_dropout=0.1), dict(learning_rate=3e-3, per_device_train_batch_size=8)),
    (dict(lora_r=8, lora_alpha=8, lora_dropout=0.2), dict(learning_rate=5e-4, per_device_train_batch_size=16)),
]


def _args(k: int, **train_changes) -> tuple[ModelArguments, TrainArguments]:
    model_changes, train_values = TRIALS[k]
    model_args = ModelArguments(**{**vars(MODEL), **model_changes})
    return model_args, TrainArguments(**{"num_train_epochs": 2, **train_values, **train_changes})


@pytest.fixture(scope="module")
def shared(tiny_model_dir: Path, vader_file: Path) -> SharedBase:
    return SharedBase(DATA, MODEL, TrainArguments(use_cpu=True))


@pytest.fixture(params=["one matmul", "slot by slot"])
def head_path(request: pytest.FixtureRequest, shared: SharedBase) -> Iterator[str]:
    """Both ways a routed head runs: a Linear head as one matmul for all slots, any other module slot by slot (here
    forced onto the tiny model's Linear heads)."""
    heads = [m for m in shared.model.modules() if isinstance(m, RoutedHead)]
    assert heads and all(head.linear for head in heads)
    for head in heads:
        head.linear = request.param == "one matmul"
    yield request.param
    for head in heads:
        head.linear = True


def _slots(shared: SharedBase, **train_changes) -> list[TrialSlot]:
    return [shared.new_slot(f"t{k}", *_args(k, **train_changes)) for k in range(len(TRIALS))]


def _save(shared: SharedBase, slot: TrialSlot, folder: Path) -> Path:
    meta = model_meta(DATA.label_names, data_args=DATA, model_args=slot.model_args, train_args=slot.train_args)
    return shared.save_slot(slot, folder, meta)


def test_each_trial_gets_the_gradients_it_gets_alone(shared: SharedBase, head_path: str, tmp_path: Path) -> None:
    """One fused backward over three trials' rows (unequal batch sizes) against each trial alone through peft."""
    slots = _slots(shared)
    with torch.no_grad():  # lora_B starts at zero, which would make lora_A's gradient zero and the check weak
        for slot in slots:
            for b in slot.lora_B:
                b.normal_(0, 0.05)
    groups = [list(range(k, k + 2 + 3 * k)) for k in range(len(slots))]  # 2, 5 and 8 rows
    batch = shared._batch(shared.train_data, groups)
    labels = batch.pop("labels")
    shared.model.eval()  # dropout off on both sides: the same function of the same weights
    with shared._routing(slots, [len(g) for g in groups]) as rows:
        logits = shared.model(**batch).logits
    rows.slot_losses(logits, labels).sum().backward()  # each slot's mean over its own rows, as the step takes it

    for k, (slot, (a, b)) in enumerate(zip(slots, rows.spans, strict=True)):
        folder = _save(shared, slot, tmp_path / f"t{k}")
        alone = PeftModel.from_pretrained(load_base(slot.model_args, DATA.label_names), folder, is_trainable=True)
        alone.eval()
        inputs = {key: value[a:b] for key, value in batch.items()}
        out = alone(**inputs, labels=labels[a:b])
        torch.testing.assert_close(out.logits, logits[a:b].detach(), rtol=1e-5, atol=1e-6)
        out.loss.backward()
        theirs = {n: p.grad for n, p in alone.named_parameters() if p.requires_grad}
        mine = dict(slot.named_parameters())
        assert len(theirs) == len(mine)
        for name, p in mine.items():
            # peft names the trained head copy `modules_to_save.default`, the adapter `default`: both saved without
            peft_name = next(n for n in theirs if n.replace(".default", "").replace(".modules_to_save", "") == name)
            torch.testing.assert_close(p.grad, theirs[peft_name], rtol=1e-4, atol=1e-7)
    for slot in slots:
        slot.optimizer.zero_grad()


def _grads_of(
    shared: SharedBase, slots: list[TrialSlot], groups: list[list[int]], k: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Slot k's gradients from one shared forward and backward of `slots` over `groups` (dropout off), and every
    slot's loss."""
    shared.model.eval()
    losses, _ = shared.backward(slots, groups)
    grads = {name: p.grad.clone() for name, p in slots[k].named_parameters()}
    for slot in slots:
        slot.optimizer.zero_grad()
    return grads, losses.detach()


@pytest.mark.parametrize("poison", [math.nan, math.inf, 1e30])
def test_a_diverged_neighbour_changes_nothing_for_the_others(shared: SharedBase, head_path: str, poison: float) -> None:
    """The stacked matmuls sum over every row: a neighbour with NaN, inf or huge weights must still add exactly 0, and
    its own loss must still say that it diverged."""
    bad, good = _slots(shared)[:2]
    with torch.no_grad():
        for p in bad.parameters():
            p.fill_(poison)
        for b in good.lora_B:
            b.normal_(0, 0.05)
    alone, _ = _grads_of(shared, [good], [[4, 5, 6]], 0)
    beside, losses = _grads_of(shared, [bad, good], [[0, 1, 2, 3], [4, 5, 6]], 1)
    for name, g in alone.items():
        torch.testing.assert_close(beside[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert not math.isfinite(losses[0]) and math.isfinite(losses[1]), losses


def test_a_trial_whose_activations_overflow_says_so_in_its_loss(shared: SharedBase, head_path: str) -> None:
    """Finite but huge adapters: its rows overflow before the head, whose weights are fine. Its loss must not come out
    finite (the head's shared matmul reads non-finite rows as 0), while its neighbour's gradients stay its own."""
    bad, good = _slots(shared)[:2]
    with torch.no_grad():
        for p in [*bad.lora_A, *bad.lora_B]:
            p.fill_(1e30)
    alone, _ = _grads_of(shared, [good], [[4, 5, 6]], 0)
    beside, losses = _grads_of(shared, [bad, good], [[0, 1, 2, 3], [4, 5, 6]], 1)
    for name, g in alone.items():
        torch.testing.assert_close(beside[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert all(torch.isfinite(p).all() for p in bad.parameters())
    assert not math.isfinite(losses[0]) and math.isfinite(losses[1]), losses


@pytest.mark.parametrize("shape", [(), (5,)], ids=["pooled rows", "every token"])
def test_a_linear_head_as_one_matmul_gives_each_row_its_own_slots_head(shared: SharedBase, shape: tuple) -> None:
    """On pooled rows (BERT, DistilBERT) and on every token (e.g. Llama's `score`, whose logits are pooled after it)."""
    slots = _slots(shared)
    name = next(n for n, head in shared.heads.items() if isinstance(head, torch.nn.Linear))
    routed = getattr(shared.model, name)
    x = torch.randn(2 + 5 + 8, *shape, shared.heads[name].in_features, requires_grad=True)
    shared.rows = StepRows(slots, [2, 5, 8], shared.device)
    try:
        routed.linear = False
        each = routed(x)
        routed.linear = True
        together = routed(x)
    finally:
        shared.rows = None
    torch.testing.assert_close(together, each)
    x_grad = torch.autograd.grad(together.square().sum(), x)[0]
    torch.testing.assert_close(x_grad, torch.autograd.grad(each.square().sum(), x)[0])


def test_a_slot_starts_from_the_head_a_trial_alone_starts_from(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A model whose head was trained for these labels already (an SST-2 checkpoint, say) keeps it, as a trial alone
    (`lorasent.train`) keeps it; a new head is the one a trial alone draws under the same seed."""
    trained = load_base(MODEL, DATA.label_names)
    with torch.no_grad():
        for p in trained.classifier.parameters():
            p.fill_(0.5)
    trained.save_pretrained(tmp_path / "sst")
    load_tokenizer(MODEL).save_pretrained(tmp_path / "sst")
    for model_args in (MODEL, ModelArguments(**{**vars(MODEL), "model_name_or_path": str(tmp_path / "sst")})):
        set_seed(TrainArguments().seed)
        alone = build_model(model_args, DATA.label_names)
        theirs = {n.replace(".modules_to_save.default", ""): p for n, p in alone.named_parameters() if p.requires_grad}
        slot = SharedBase(DATA, model_args, TrainArguments(use_cpu=True)).new_slot("a", model_args, TrainArguments())
        heads = [(name, p) for name, p in slot.named_parameters() if ".lora_" not in name]
        assert {name for name, _ in heads} == {n for n in theirs if ".lora_" not in n}
        for name, p in heads:
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_loads_as_an_ordinary_model_folder(shared: SharedBase, tmp_path: Path) -> None:
    slot = _slots(shared)[1]
    train_together(shared, [slot], epochs=1)
    folder = _save(shared, slot, tmp_path / "model")
    loaded = load_model_dir(folder, device="cpu")
    assert loaded.model.peft_config["default"].r == slot.model_args.lora_r
    batch = shared._batch(shared.eval_data, [list(range(6))])
    labels = batch.pop("labels")
    shared.model.eval()
    with torch.no_grad(), shared._routing([slot], [6]):
        mine = shared.model(**batch).logits
    torch.testing.assert_close(loaded.model(**batch).logits, mine, rtol=1e-5, atol=1e-6)
    assert labels.shape == (6,)


def test_a_resumed_slot_goes_on_exactly(shared: SharedBase, tmp_path: Path) -> None:
    """Two epochs straight against one epoch, save, load, one more: the same weights and metrics (fp32, CPU)."""
    model_args, train_args = _args(1)  # LoRA dropout on: its draws must repeat too
    straight = shared.new_slot("a", model_args, train_args)
    two = train_together(shared, [straight], epochs=2)

    first = shared.new_slot("b", model_args, train_args)
    one = train_together(shared, [first], epochs=1)
    folder = _save(shared, first, tmp_path / "epoch1")
    resumed = shared.load_slot("b", model_args, train_args, folder)
    assert (resumed.step, resumed.epoch) == (first.step, 1)
    then = train_together(shared, [resumed], epochs=1)
    assert one[0][0]["accuracy"] == two[0][0]["accuracy"]
    assert then[0][0]["loss"] == two[0][1]["loss"]
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_trials_side_by_side_learn(offline_model_dir: Path, vader_file: Path) -> None:
    """On real sentences the loss of every trial falls while it shares its steps with the others: with a real model
    (BERT's `query,value` targets), as the tiny random one hardly learns (its loss wanders around 0.68 whatever the
    head's initial draw)."""
    data = DataArguments(max_train_samples=160, max_eval_samples=64, max_length=32)
    minilm = {"model_name_or_path": "offline:all-MiniLM-L6-v2"}
    trials = [_args(k, learning_rate=5e-3, num_train_epochs=3) for k in range(3)]
    trials = [(ModelArguments(**{**vars(model_args), **minilm}), train_args) for model_args, train_args in trials]
    shared = SharedBase(data, trials[0][0], TrainArguments())
    slots = [shared.new_slot(f"t{k}", *trial) for k, trial in enumerate(trials)]
    history = train_together(shared, slots, epochs=3)
    for trial in history:
        assert trial[-1]["train_loss"] < trial[0]["train_loss"]


def test_steps_run_every_module_in_training_mode_and_evaluations_none(tiny_model_dir: Path, vader_file: Path) -> None:
    """A step walks the modules to set their mode only after an evaluation, not every time."""
    with forward_modes() as seen:
        shared = SharedBase(
            DataArguments(max_train_samples=48, max_eval_samples=32, max_length=32), MODEL, TrainArguments()
        )
        train_together(shared, [shared.new_slot(f"t{k}", *_args(k)) for k in range(2)], epochs=2)
    assert_modes_right(seen)


def test_each_batch_is_taken_once_in_own_order_or_nearest_a_width() -> None:
    lengths = list(range(1, 41))
    batches = [[i, i + 1] for i in range(0, 40, 2)]  # widths 2, 4, ..., 40
    order = [batches[k] for k in (5, 0, 19, 10, 3, 7, 1, 15, 12, 9, 2, 18, 4, 14, 6, 17, 8, 11, 16, 13)]
    epoch = EpochBatches(order, lengths)
    taken = []

    def take(i: int) -> list[int]:
        epoch.take(i)
        taken.append(epoch.rows(i))
        return taken[-1]

    first = epoch.in_order()
    assert (epoch.rows(first), epoch.width(first)) == ([10, 11], 12)
    assert epoch.in_order() == first and epoch.remaining == 20, "picking takes nothing"
    take(first)
    assert epoch.rows(epoch.nearest(21)) == [18, 19]  # widths 20 and 22 are as near: the narrower
    assert take(epoch.nearest(21)) == [18, 19]
    assert take(epoch.nearest(1)) == [0, 1]  # taken now, so own order skips it below
    assert take(epoch.nearest(100)) == [38, 39]  # taken now, so own order skips it below
    assert take(epoch.in_order()) == [20, 21]
    with pytest.raises(ValueError, match="taken already"):
        epoch.take(first)
    while epoch:
        take(epoch.nearest(30) if len(taken) % 2 else epoch.in_order())
    assert sorted(taken) == sorted(batches) and epoch.remaining == 0


def test_a_step_that_fails_changes_no_slot(shared: SharedBase) -> None:
    """A step that fails halfway through its backward pass (as one out of GPU memory does) takes no batch, leaves no
    gradient behind and moves no weight, so the same slots step again, alone or in smaller groups, as if it never
    ran: the next step gives exactly what slots that never failed get."""
    failing, clean = _slots(shared), _slots(shared)
    for slot in failing + clean:
        slot.begin_epoch(shared.lengths)
    weights = [p.detach().clone() for slot in failing for p in slot.parameters()]
    second_layer = next(m for name, m in shared.model.named_modules() if name.endswith("layer.1"))
    pending = []

    def out_of_memory(module, grad_input, grad_output) -> None:
        pending.append(any(p.grad is not None for slot in failing for p in slot.parameters()))
        raise torch.OutOfMemoryError("CUDA out of memory (raised in the second layer's backward pass)")

    hook = second_layer.register_full_backward_hook(out_of_memory)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            shared.step(failing)
    finally:
        hook.remove()
    assert pending == [True], "adapters after the failing layer had their gradients when it failed"
    assert all(p.grad is None for slot in failing for p in slot.parameters())
    assert [s.batches.remaining for s in failing] == [s.batches.remaining for s in clean]
    for before, p in zip(weights, (p for slot in failing for p in slot.parameters()), strict=True):
        assert torch.equal(before, p)

    shared.step(failing[:1])  # the step again, as the engine retries it: in smaller groups
    shared.step(failing[1:])
    shared.step(clean[:1])
    shared.step(clean[1:])
    for again, never in zip(failing, clean, strict=True):
        assert (again.step, again.batches.remaining) == (never.step, never.batches.remaining)
        for (name, p), (_, q) in zip(again.named_parameters(), never.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_refusals(shared: SharedBase, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot search target_modules"):
        other_targets = ModelArguments(model_name_or_path=TINY_MODEL, target_modules="all-linear")
        shared.new_slot("x", other_targets, TrainArguments())
    with pytest.raises(ConfigError, match="not fp16"):
        SharedBase(DATA, MODEL, TrainArguments(precision="fp16"))
    with pytest.raises(ConfigError, match="exceeds the 48"):
        shared.new_slot("x", MODEL, TrainArguments(per_device_train_batch_size=64))
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / FUSED_STATE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="Re-run the trial"):
        shared.load_slot("x", MODEL, TrainArguments(), folder)
    # a state file without the optimizer's moments would go on with fresh ones, silently: it is refused
    slot = shared.new_slot("x", MODEL, TrainArguments())
    folder = _save(shared, slot, tmp_path / "no_moments")
    state = load_file(str(folder / FUSED_STATE))
    save_file({key: value for key, value in state.items() if "::" not in key}, str(folder / FUSED_STATE))
    with pytest.raises(CheckpointError, match="optimizer state"):
        shared.load_slot("x", MODEL, TrainArguments(), folder)
