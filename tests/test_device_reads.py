"""`lorasent.device_reads` finds on a CPU the reads that make a GPU's host wait, and holds lorasent to none per
step: a training step through `Trainer`, a fused step of several trials, and a whole `Predictor.predict` but one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.device_reads import DeviceReads
from lorasent.fused import SharedBase
from lorasent.predict import Predictor
from lorasent.train import LOG_EVERY_STEPS, train

READS: dict[str, Callable[[torch.Tensor], object]] = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool((x > 0).any()),
    "float": lambda x: float(x[0, 0]),
    "int of an argmax": lambda x: int(x.argmax()),
    "as an index": lambda x: [0, 1, 2][x.argmax() % 3],
    "cpu": lambda x: x.cpu(),
    "cpu, then numpy": lambda x: x.cpu().numpy(),
    "tolist": lambda x: x.tolist(),
    "numpy.asarray": lambda x: np.asarray(x),
    "nonzero": lambda x: x.nonzero(),
    "boolean mask": lambda x: x[x > 0],
    "equal": lambda x: torch.equal(x, x + 0),
    "allclose": lambda x: torch.allclose(x, x + 0),
    "unique": lambda x: x.unique(),
    "repeat_interleave by counts": lambda x: torch.repeat_interleave(x[0], (x[1] > 0).long()),
}
NOT_READS: dict[str, Callable[[torch.Tensor], object]] = {
    "arithmetic": lambda x: (x @ x.t()).softmax(-1).sum(),
    "where": lambda x: torch.where(x > 0, x, 0.0),
    "indexing by position": lambda x: x[torch.tensor([0, 2])],
    "repeat_interleave with its output size": lambda x: torch.repeat_interleave(
        x[0], torch.tensor([1, 0, 2, 1]), output_size=4
    ),
    "a host value": lambda x: torch.ones(3).sum().item(),
}


@pytest.mark.parametrize("inference", [False, True], ids=["", "inference mode"])
@pytest.mark.parametrize("read", READS.values(), ids=READS)
def test_each_way_of_reading_a_device_value_counts_once(
    read: Callable[[torch.Tensor], object], inference: bool
) -> None:
    with torch.inference_mode(inference), DeviceReads() as reads:
        read(reads.mark(torch.randn(4, 4)))
    assert reads.total == 1, reads.sites


@pytest.mark.parametrize("work", NOT_READS.values(), ids=NOT_READS)
def test_device_work_and_host_values_count_nothing(work: Callable[[torch.Tensor], object]) -> None:
    with DeviceReads() as reads:
        work(reads.mark(torch.randn(4, 4)))
    assert reads.total == 0, reads.sites


def test_what_is_moved_to_the_device_is_followed_through_the_backward_pass() -> None:
    model = torch.nn.Linear(4, 2)
    with DeviceReads() as reads:
        model.to("cpu")  # as Trainer and load_model_dir move a model to its device
        model(torch.randn(3, 4).to("cpu")).square().sum().backward()
        assert reads.total == 0
        grad = model.weight.grad
        grad.tolist()
        grad.tolist()  # on the host already
        grad.mul_(2)
        grad.tolist()  # changed on the device since
    assert reads.total == 2, reads.sites
    site = next(iter(reads.sites))[1]
    assert Path(__file__).name in site  # where the read happened, for the reader of a failed test


TRAIN_DATA = DataArguments(max_eval_samples=32, max_test_samples=32, max_length=32)


def _training_reads(texts: int, tmp: Path) -> DeviceReads:
    data = DataArguments(**{**vars(TRAIN_DATA), "max_train_samples": texts})
    args = TrainArguments(output_dir=str(tmp / "model"), num_train_epochs=2, per_device_train_batch_size=4)
    with DeviceReads() as reads:
        train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args, save_final=False)
    return reads


def test_a_training_step_reads_nothing_from_the_device(vader_file: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Runs of 24 and 48 steps (both fewer than LOG_EVERY_STEPS, after which the loss is read) read the same
    values: those of the epochs' evaluations and ends. One read inside a step (transformers' `mask.all()` was one,
    C9) adds 24."""
    assert LOG_EVERY_STEPS > 2 * 96 // 4  # the longer run's steps
    short, long = _training_reads(48, tmp_path / "short"), _training_reads(96, tmp_path / "long")
    assert short.total > 0
    assert long.sites == short.sites


def test_a_fused_step_reads_nothing_and_an_epoch_end_a_few_values_per_trial(
    vader_file: Path, tiny_model_dir: Path
) -> None:
    data = DataArguments(max_train_samples=48, max_eval_samples=32, max_test_samples=32, max_length=32)
    with DeviceReads() as reads:
        shared = SharedBase(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), TrainArguments(use_cpu=True))
        slots = [
            shared.new_slot(f"t{k}", ModelArguments(model_name_or_path=TINY_MODEL, lora_r=r, lora_dropout=dropout),
                            TrainArguments(per_device_train_batch_size=batch))
            for k, (r, dropout, batch) in enumerate([(2, 0.0, 4), (4, 0.1, 8), (8, 0.2, 16)])
        ]  # fmt: skip
        for slot in slots:
            slot.begin_epoch(shared.lengths)
        reads.clear()
        steps = 0
        while active := [slot for slot in slots if slot.batches]:
            shared.step(active)
            steps += 1
        assert steps == 12
        assert reads.total == 0, reads.sites
        shared.end_epoch(slots)
    # each trial's validation loss, predictions and training loss, the labels and every trial's weights' finiteness:
    # not one read per tensor
    assert 0 < reads.total <= 3 * len(slots) + 2, reads.sites


def test_predict_reads_the_device_once_whatever_the_batches(
    vader_file: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = TrainArguments(output_dir=str(tmp_path / "model"), num_train_epochs=1, per_device_train_batch_size=16)
    data = DataArguments(max_train_samples=32, max_eval_samples=16, max_test_samples=16, max_length=32)
    folder = train(data, ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4), args).output_dir
    texts = [f"review number {i} says it is {'good' if i % 2 else 'bad'}" + " really" * (i % 7) for i in range(40)]
    with DeviceReads() as reads:
        predictor = Predictor.from_dir(folder, device="cpu", batch_size=4)
        reads.clear()
        predictions = predictor.predict(texts)
    assert all(p.label is not None for p in predictions)
    assert reads.total == 1, reads.sites
