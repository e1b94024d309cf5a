"""The function every Ray Tune trial runs: one `lorasent.train.train()` that reports and checkpoints each epoch.

Only `ray.tune.*` APIs (and Ray core's runtime context) appear here (`tune.report`, `tune.get_checkpoint`,
`tune.Checkpoint`): under Ray Train V2 the `ray.train.*` ones raise inside a Tune function. The trial receives small
dicts only; the tokenised data is read from lorasent's on-disk cache, which the driver fills once before the first
trial starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil
from ray import tune

from lorasent.config import DataArguments, ModelArguments, TrainArguments, replace, to_dict
from lorasent.metrics import metric_names
from lorasent.process import import_modules
from tune.config import apply_trial_config
from tune.reporting import epoch_reporter
from tune.resumable import restorable


def require_gpu(gpus: float) -> None:
    """A trial that reserved a GPU must not silently train on the CPU."""
    import torch

    if gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError(
            f"This trial reserved {gpus:g} GPU but torch sees none (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}). Install a CUDA build of torch "
            "on every worker node, or run on CPUs with --gpus_per_trial 0."
        )


def out_of_memory_help(gpus_per_trial: float) -> str:
    """What to change when a trial ran out of GPU memory (Tune retries it as it is, so it would fail again)."""
    larger = f"give each trial a larger share (--gpus_per_trial {min(1.0, 2 * gpus_per_trial):g}), or "
    return (
        f"The GPU ran out of memory with {gpus_per_trial:g} GPU per trial: {larger if gpus_per_trial < 1 else ''}"
        "lower per_device_train_batch_size, per_device_eval_batch_size or max_length, or use --half_precision_base. "
        "Each epoch's gpu_memory_peak_gib in the results says what finished trials needed."
    )


def work_root() -> Path:
    """Where trials on this machine keep their Trainer checkpoints until Tune has copied them to storage."""
    user = os.getuid() if hasattr(os, "getuid") else "user"  # a uid: containers often run one without a name
    return Path(tempfile.gettempdir()) / f"lorasent-trials-{user}"


def sweep_abandoned_work_dirs(root: Path) -> list[Path]:
    """Remove the work folders (`<pid>-<random>`) of trial processes that no longer run, and return them.

    A worker killed by SIGKILL or the out-of-memory killer cannot remove its own folder; its retry (or the next
    trial on the machine) does. Tune has already copied every reported checkpoint to storage, so nothing is lost.
    """
    removed = []
    for folder in root.iterdir():
        pid = folder.name.split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def train_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the base arguments with `config` (the sampled hyperparameters) put in.

    `base` holds the three lorasent dataclasses as dicts plus `metric`, `mode` and `gpus_per_trial`. A trial
    restarted by Tune (retry, `--resume`) continues from its last reported checkpoint. A diverging trial reports
    its last epoch with `diverged=1` and the worst metric, then returns: a bad result, not an error.
    """
    # torch, transformers and peft: imported with garbage collection paused, then frozen, in the first trial of
    # this process (Tune reuses it for the next ones), saving 1-2 s of its ~5 s import on a 2-core CPU and ~0.3 s a
    # trial (`Trainer` runs a full collection at each training start). See lorasent.process.
    import_modules(["lorasent.train"])
    import torch

    from lorasent.train import train

    require_gpu(base["gpus_per_trial"])
    model_args, train_args = apply_trial_config(
        ModelArguments(**base["model"]), TrainArguments(**base["train"]), config
    )
    report = epoch_reporter(base["metric"], base["mode"])
    checkpoint = tune.get_checkpoint()
    root = work_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_work_dirs(root)
    with (
        tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=root) as work_dir,
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir,
    ):
        try:
            train(
                DataArguments(**base["data"]),
                model_args,
                train_args,
                on_epoch=lambda epoch: report(epoch.metrics, epoch.checkpoint_dir),
                resume_from_checkpoint=resume_dir,
                save_final=False,
                work_dir=work_dir,
            )
        except torch.OutOfMemoryError as e:
            if not base["gpus_per_trial"]:  # another accelerator's (MPS): its own message is all there is to say
                raise
            raise RuntimeError(out_of_memory_help(base["gpus_per_trial"])) from e


def trial_train_arguments(
    data_args: DataArguments, train_args: TrainArguments, *, metric: str, cpus_per_trial: float, gpus_per_trial: float
) -> TrainArguments:
    """What each trial trains with; refused here, on the driver, when no trial could train with it."""
    from lorasent.train import check_schedule, resolve_precision

    trial_train_args = replace(
        train_args,
        use_cpu=train_args.use_cpu or gpus_per_trial == 0,  # a CPU trial must not touch a GPU it did not reserve
        torch_threads=train_args.torch_threads or max(1, math.floor(cpus_per_trial)),
        # the epoch a trial calls best is the one Tune ranks it by (train_loss is not a validation metric)
        metric_for_best_model=(
            metric if metric in metric_names(data_args.label_names) else train_args.metric_for_best_model
        ),
    )
    check_schedule(trial_train_args)
    if trial_train_args.use_cpu:  # GPU trials may run on GPUs the driver lacks: only they can check their precision
        resolve_precision(trial_train_args)
    return trial_train_args


def make_trainable(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    *,
    metric: str,
    mode: str,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> Any:
    """`train_trial` with its base arguments (small dicts, via the object store) and its per-trial resources."""
    trial_train_args = trial_train_arguments(
        data_args, train_args, metric=metric, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial
    )
    base = {
        "data": to_dict(data_args),
        "model": to_dict(model_args),
        "train": to_dict(trial_train_args),
        "metric": metric,
        "mode": mode,
        "gpus_per_trial": gpus_per_trial,
    }
    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    return restorable(tune.with_resources(tune.with_parameters(train_trial, base=base), resources))
