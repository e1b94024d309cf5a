"""Trial engines: one Ray actor per GPU trains every trial sent to it on one shared base model (`lorasent.fused`).

With `--fused_trials`, Tune trials stay trials: Optuna samples them, ASHA stops them, and retries and `--resume`
restart them from their last checkpoint. They just do not train themselves: for each epoch a trial sends its
hyperparameters and the files of its last checkpoint to an engine, and gets back the epoch's metrics and the new
checkpoint's files, which it reports to Tune as usual. An engine keeps no trial's state between epochs, so an ASHA
stop, a retry or a lost engine loses nothing that a checkpoint does not hold.

Inside an engine, one thread steps every trial that has an epoch to run, one batch each per step, as one forward and
backward pass over all their rows. A trial joins at the next step and leaves when its epoch's batches run out.
Trials whose epochs end at the same step are evaluated together. The trial processes stay light: this module
imports torch only inside the engine.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune

from lorasent.config import DataArguments, ModelArguments, TrainArguments, to_dict
from lorasent.errors import CheckpointError, ConfigError
from lorasent.paths import META_FILE
from lorasent.process import import_modules
from tune.cluster import MAX_SHARED_TRIALS_PER_GPU, ResourcePlan, local_cpus, trials_sharing_a_gpu
from tune.config import TuneArguments, apply_trial_config
from tune.reporting import epoch_reporter
from tune.resumable import restorable

TRIAL_CPUS = 0.01  # what a trial process reserves: it waits on its engine, which does the work
# A lost engine (e.g. killed for memory) comes back, and the epochs it was running run again there: a request holds
# all an epoch needs (the hyperparameters and the last checkpoint), so running it twice is harmless.
ENGINE_RESTARTS = 3
ENGINE_START_S = 900  # an engine that cannot start by then (no free GPU, a hung download) is an error, not a wait


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """Every file of a model folder, by name: how a checkpoint travels between a trial and its engine (which may
    run on another machine)."""
    return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def write_files(files: dict[str, bytes], folder: str | Path) -> Path:
    """Write what `folder_files` read into `folder` (created); names with a path in them are refused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"Refusing the file name {name!r} in a checkpoint: it is not a plain file name.")
        (folder / name).write_bytes(data)
    return folder


@dataclass
class _EpochRequest:
    """One trial's request for one epoch, from its arrival to its result (or error)."""

    key: str
    model_args: ModelArguments
    train_args: TrainArguments
    files: dict[str, bytes] | None
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[dict[str, float], dict[str, bytes]] | None = None
    error: BaseException | None = None
    slot: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    started: float = 0.0  # its epoch's first step
    steps: int = 0
    trials_stepped: int = 0  # summed over its steps: how many trials each step trained

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class TrialEngine:
    """A Ray actor (threaded: each waiting trial holds one of its threads) that owns one device's shared base.

    Starting it imports torch, transformers and peft and claims its device, which needs no data, so a search starts
    its engines while the driver is still checking and tokenising; `prepare` then loads the base model and the splits.
    """

    def __init__(self, data: dict[str, Any], model: dict[str, Any], train: dict[str, Any], threads: int) -> None:
        import_modules(["lorasent.fused"])  # the heavy imports now rather than when the data is ready, frozen
        import torch

        torch.set_num_threads(threads)
        self.data_args = DataArguments(**data)
        self._base_args = (ModelArguments(**model), TrainArguments(**train))
        if torch.cuda.is_available() and not self._base_args[1].use_cpu:
            torch.ones(1, device="cuda")  # CUDA's context, a second or more, while the driver works
        self.shared: Any = None  # lorasent.fused.SharedBase, once loaded
        self._loading = threading.Lock()
        self._requests: queue.SimpleQueue[_EpochRequest] = queue.SimpleQueue()
        self._running = 0
        self._running_lock = threading.Lock()  # each waiting trial's call runs in a thread of its own
        self.max_trials_per_step = sys.maxsize  # lowered when a step of that many runs out of GPU memory

    def prepare(self) -> str:
        """Load the base model and the cached splits (once: the driver asks when the splits are cached, a restarted
        engine's first trial asks again) and start stepping; returns the device and base this engine trains on."""
        from lorasent.fused import SharedBase

        with self._loading:
            if self.shared is None:
                self.shared = SharedBase(self.data_args, *self._base_args)
                threading.Thread(target=self._serve, name="lorasent-engine", daemon=True).start()
        return f"{self.shared.device} ({len(self.shared.targets)} LoRA layers, {self.shared.dtype or 'fp32'})"

    def load(self) -> int:
        """Trials waiting for or running an epoch here."""
        return self._running

    def run_epoch(
        self, key: str, model: dict[str, Any], train: dict[str, Any], files: dict[str, bytes] | None
    ) -> tuple[dict[str, float], dict[str, bytes]]:
        """Train trial `key` for one epoch from its checkpoint `files` (None: from the start); returns the epoch's
        metrics and the files of its new checkpoint."""
        self.prepare()
        request = _EpochRequest(key, ModelArguments(**model), TrainArguments(**train), files)
        with self._running_lock:
            self._running += 1
        try:
            self._requests.put(request)
            request.done.wait()
        finally:
            with self._running_lock:
                self._running -= 1
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    # ----------------------------------------------------------------------------------- the stepping thread

    def _serve(self) -> None:
        """Step the running trials for as long as the engine lives. Should the loop itself fail (a bug, not a trial's
        error), the process exits: Ray restarts the engine and runs its requests again, where a dead thread in a live
        actor would leave every trial waiting forever."""
        try:
            self._step_forever()
        except BaseException:
            traceback.print_exc()
            os._exit(1)

    def _step_forever(self) -> None:
        running: list[_EpochRequest] = []
        while True:
            for request in self._arrivals(wait=not running):
                if self._start(request):
                    running.append(request)
            if not running:
                continue
            running = self._step(running)
            ended = [r for r in running if not r.slot.batches]
            if ended:
                running = [r for r in running if r.slot.batches]
                self._finish(ended)

    def _step(self, running: list[_EpochRequest]) -> list[_EpochRequest]:
        """One step of every running trial, in groups of at most `max_trials_per_step`; the trials still running.

        A step that runs out of GPU memory changes no trial, so its group steps again as two halves, and from then on
        the engine steps at most that many trials together: the trials go on, only less packed. A trial that does not
        fit alone fails, saying what to lower; any other error fails the trials of its step, and Tune retries them.
        """
        import torch

        going: list[_EpochRequest] = []
        while running:
            group, rest = running[: self.max_trials_per_step], running[self.max_trials_per_step :]
            try:
                self.shared.step([r.slot for r in group])
            except torch.OutOfMemoryError:
                self._release_memory()
                if len(group) > 1:
                    self.max_trials_per_step = (len(group) + 1) // 2  # two halves, also of an odd group
                    print(
                        f"lorasent engine: out of GPU memory stepping {len(group)} trials together; from now on at "
                        f"most {self.max_trials_per_step} per step (to start with fewer: --max_concurrent_trials).",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                group[0].fail(
                    RuntimeError(
                        "The GPU ran out of memory in a step of this trial alone. Lower per_device_train_batch_size "
                        "or max_length, or store the base in half precision (--half_precision_base)."
                    )
                )
            except Exception as e:
                error = RuntimeError(f"A step shared by {len(group)} trials failed: {e!r}")
                for request in group:
                    request.fail(error)
                self._release_memory()
            else:
                for request in group:
                    request.steps += 1
                    request.trials_stepped += len(group)
                going += group
            running = rest
        return going

    def _arrivals(self, wait: bool) -> list[_EpochRequest]:
        arrivals = []
        try:
            arrivals.append(self._requests.get(block=wait))
            while True:
                arrivals.append(self._requests.get_nowait())
        except queue.Empty:
            pass
        return arrivals

    def _start(self, request: _EpochRequest) -> bool:
        """Build the request's slot (fresh, or from its checkpoint files) and begin its epoch; False if that failed."""
        from lorasent.model import read_meta

        try:
            if request.files is None:
                request.slot = self.shared.new_slot(request.key, request.model_args, request.train_args)
            else:
                with tempfile.TemporaryDirectory(prefix="lorasent-engine-") as folder:
                    write_files(request.files, folder)
                    request.history = list(read_meta(folder).get("history", []))
                    request.slot = self.shared.load_slot(request.key, request.model_args, request.train_args, folder)
                request.files = None  # its bytes are not needed any more
            request.slot.begin_epoch(self.shared.lengths)
        except Exception as e:
            request.fail(e)
            return False
        request.started = time.perf_counter()
        return True

    def _finish(self, ended: list[_EpochRequest]) -> None:
        """Evaluate the trials whose epochs just ended, together; send each its metrics and checkpoint."""
        import torch

        from lorasent.model import model_meta

        if self.shared.device.type == "cuda":
            torch.cuda.synchronize(self.shared.device)
        finished = time.perf_counter()
        try:
            results = self._end_epochs([r.slot for r in ended])
        except Exception as e:
            for request in ended:
                request.fail(e)
            self._release_memory()
            return
        eval_seconds = time.perf_counter() - finished
        for request, metrics in zip(ended, results, strict=True):
            train_seconds = finished - request.started
            metrics.update(
                train_seconds=train_seconds,
                eval_seconds=eval_seconds,
                setup_seconds=request.started - request.arrived,  # waiting for the step, and building the slot
                train_tokens_per_second=request.slot.tokens / max(train_seconds, 1e-9),
                trials_per_step=request.trials_stepped / max(request.steps, 1),
                real_token_share=request.slot.tokens / max(request.slot.padded_tokens, 1),  # the rest was padding
            )
            if self.shared.device.type == "cuda":
                metrics["gpu_memory_peak_gib"] = torch.cuda.max_memory_reserved(self.shared.device) / 2**30
            slot = request.slot
            meta = model_meta(
                self.data_args.label_names,
                data_args=self.data_args,
                model_args=slot.model_args,
                train_args=slot.train_args,
                source=self.shared.source,
            )
            meta.update(metrics=metrics, history=[*request.history, metrics])
            try:
                with tempfile.TemporaryDirectory(prefix="lorasent-engine-") as folder:
                    checkpoint = self.shared.save_slot(slot, Path(folder) / "checkpoint", meta)
                    request.result = (metrics, folder_files(checkpoint))
            except Exception as e:
                request.fail(e)
                continue
            request.slot = None
            request.done.set()

    def _end_epochs(self, slots: list[Any]) -> list[dict[str, float]]:
        """`end_epoch` of `slots`; out of GPU memory, again with half the rows per evaluation pass (kept from then on),
        as long as each slot still has more than one row in it. Evaluation changes no slot until it has succeeded."""
        import torch

        while True:
            try:
                return self.shared.end_epoch(slots)
            except torch.OutOfMemoryError:
                self._release_memory()
                if self.shared.eval_rows < 2 * len(slots):
                    raise
                self.shared.eval_rows //= 2
                print(
                    f"lorasent engine: out of GPU memory evaluating {len(slots)} trials; from now on at most "
                    f"{self.shared.eval_rows} rows per evaluation pass.",
                    file=sys.stderr,
                    flush=True,
                )

    def _release_memory(self) -> None:
        import torch

        if self.shared.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- driver side


@dataclass
class EnginePlan:
    """The engines of a search and how many trials run at once."""

    engines: list[Any]  # actor handles
    trials_at_once: int
    gpus: float  # of the cluster: the engines' share of them
    why: str = ""  # how many trials share a GPU, and why, when that was automatic

    @property
    def resources_per_trial(self) -> dict[str, float]:
        """What a trial holds, as `lorasent_search.json` records it for the analysis: its share of the GPUs."""
        return {"cpu": TRIAL_CPUS, "gpu": len(self.engines) / self.trials_at_once if self.gpus else 0.0}

    def describe(self) -> str:
        where = f"{len(self.engines)} GPU(s)" if self.gpus else "the CPUs"
        why = f"\n  {self.why}" if self.why else ""
        return (
            f"Fused trials: {len(self.engines)} engine(s) on {where}, up to {self.trials_at_once} trial(s) at once "
            f"sharing each base model; each trial process reserves {TRIAL_CPUS:g} CPU.{why}"
        )

    def shutdown(self) -> None:
        """Stop the engines (they hold a GPU each, and nothing a checkpoint does not hold)."""
        for engine in self.engines:
            ray.kill(engine)


@dataclass(frozen=True)
class EngineLayout:
    """Where the engines run: one per GPU (one on the CPUs when there is none, or with --gpus_per_trial 0)."""

    count: int
    gpus: float  # of the cluster, 0 for a CPU engine
    options: tuple[tuple[str, float], ...]  # the actor's resources
    threads: int
    trials_at_once: int

    @classmethod
    def of(cls, gpus: float, cpus: float, trials_per_gpu: int | None, trials_at_once: int | None) -> EngineLayout:
        """Trials at once: `trials_at_once`, else `trials_per_gpu` (if None, MAX_SHARED_TRIALS_PER_GPU) per GPU, else
        4 on the CPUs. The engines leave at least half the CPUs to the trial processes: on one CPU an engine that
        took it whole left the trials none, and they waited forever."""
        count = int(gpus)
        if count:
            options, threads = (("num_gpus", 1), ("num_cpus", min(1.0, cpus / (2 * count)))), 2
            per_engine = trials_per_gpu or MAX_SHARED_TRIALS_PER_GPU
        else:  # the rest of the CPUs for Tune and the light trial processes
            options, threads, per_engine = (("num_cpus", max(cpus - 1, cpus / 2)),), max(1, math.floor(cpus)), 4
        return cls(max(count, 1), float(count), options, threads, trials_at_once or per_engine * max(count, 1))

    def launch(self, data_args: DataArguments, model_args: ModelArguments, train_args: TrainArguments) -> list[Any]:
        """The engine actors, starting (see TrialEngine): nothing waits for them yet."""
        train = to_dict(train_args) | {"use_cpu": train_args.use_cpu or not self.gpus}
        actor = ray.remote(TrialEngine).options(
            **dict(self.options),
            max_concurrency=self.trials_at_once + 4,
            max_restarts=ENGINE_RESTARTS,
            max_task_retries=ENGINE_RESTARTS,
        )
        args = (to_dict(data_args), to_dict(model_args), train, self.threads)
        return [actor.remote(*args) for _ in range(self.count)]

    def serves(self, other: EngineLayout) -> bool:
        """Whether engines launched as `self` can run the search planned as `other`."""
        fits = other.trials_at_once <= self.trials_at_once
        return fits and replace(other, trials_at_once=self.trials_at_once) == self


@dataclass
class LaunchedEngines:
    """Engines started before the search's plan was known (on the Ray started early), to be taken if they fit it."""

    layout: EngineLayout
    engines: list[Any]

    def discard(self) -> None:
        for engine in self.engines:
            ray.kill(engine)


def launch_engines_early(
    data_args: DataArguments, model_args: ModelArguments, train_args: TrainArguments, tune_args: TuneArguments
) -> LaunchedEngines:
    """Start a local search's engines on the Ray it just started, before its checks: as the plan will place them
    (the GPUs Ray counted, unless --gpus_per_trial 0), with room for as many trials as the plan can give them."""
    gpus = ray.cluster_resources().get("GPU", 0.0) if tune_args.gpus_per_trial != 0 else 0.0
    per_gpu = trials_sharing_a_gpu(tune_args.gpus_per_trial)  # None: from memory, the most that can share a GPU
    layout = EngineLayout.of(gpus, local_cpus(tune_args), per_gpu, tune_args.max_concurrent_trials)
    return LaunchedEngines(layout, layout.launch(data_args, model_args, train_args))


def start_engines(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    plan: ResourcePlan,
    *,
    trials_at_once: int | None = None,
    launched: LaunchedEngines | None = None,
) -> EnginePlan:
    """The search's engines, each holding its base model: those `launched` early if they fit the plan, else new ones;
    waits until every engine has loaded it, so a model that does not load fails here, before any trial starts.

    Trials per engine: `trials_at_once` spread over the engines, else the plan's trials per GPU (from memory, or
    1 / --gpus_per_trial), else MAX_SHARED_TRIALS_PER_GPU on a GPU and 4 on the CPUs.
    """
    if plan.autoscaler is not None:
        raise ConfigError(
            "--fused_trials starts one engine per GPU of the cluster as it is now, but this cluster autoscales. Start "
            "the GPU nodes first (or give the cluster fixed workers), or search without --fused_trials."
        )
    gpus = plan.gpus if plan.gpus_per_trial else 0.0  # --gpus_per_trial 0 asks for CPU trials: a CPU engine
    layout = EngineLayout.of(gpus, plan.cpus, plan.trials_per_gpu, trials_at_once)
    if launched is not None and launched.layout.serves(layout):
        engines = launched.engines
    else:
        if launched is not None:
            launched.discard()
        engines = layout.launch(data_args, model_args, train_args)
    try:
        ray.get([engine.prepare.remote() for engine in engines], timeout=ENGINE_START_S)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        for engine in engines:
            ray.kill(engine)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise ConfigError(
                f"The {layout.count} trial engine(s) did not start within {ENGINE_START_S} s: the cluster has no free "
                f"{'GPU' if gpus else 'CPUs'} for them, or loading the base model hangs. Check `ray status`."
            ) from None
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e  # `prepare` raised it, or the engine died
        raise ConfigError(f"The trial engine could not load the base model: {type(cause).__name__}: {cause}") from None
    return EnginePlan(engines, layout.trials_at_once, gpus, why="" if trials_at_once or not gpus else plan.gpu_sharing)


def fused_train_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial trained by the engines: per epoch a request with its last checkpoint's files, then a report."""
    model_args, train_args = apply_trial_config(
        ModelArguments(**base["model"]), TrainArguments(**base["train"]), config
    )
    report = epoch_reporter(base["metric"], base["mode"])
    key = tune.get_context().get_trial_id()
    files = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            files = folder_files(folder)
        if _epochs_done(files) >= train_args.num_train_epochs:
            return  # restored after its last epoch was saved: nothing left to train (as `Trainer` would do)
    engines = base["engines"]
    while True:
        engine = engines[0] if len(engines) == 1 else min(engines, key=lambda e: ray.get(e.load.remote()))
        metrics, files = ray.get(engine.run_epoch.remote(key, to_dict(model_args), to_dict(train_args), files))
        with tempfile.TemporaryDirectory(prefix="lorasent-trial-") as folder:
            report(metrics, write_files(files, folder))
        if metrics["diverged"] or metrics["epoch"] >= train_args.num_train_epochs:
            return


def _epochs_done(files: dict[str, bytes]) -> float:
    """The epochs a checkpoint's lorasent.json says were trained; 0 when it cannot say (the engine then refuses the
    damaged checkpoint with a CheckpointError naming the file)."""
    try:
        return float(json.loads(files[META_FILE])["metrics"]["epoch"])
    except (KeyError, TypeError, ValueError):  # missing, not JSON (JSONDecodeError is a ValueError), no epoch
        return 0.0


def make_fused_trainable(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    *,
    metric: str,
    mode: str,
    plan: EnginePlan,
) -> Any:
    """`fused_train_trial` bound to its engines and base arguments, with a trial's small CPU reservation."""
    base = {
        "data": to_dict(data_args),
        "model": to_dict(model_args),
        "train": to_dict(train_args),
        "metric": metric,
        "mode": mode,
        "engines": plan.engines,
    }
    return restorable(tune.with_resources(tune.with_parameters(fused_train_trial, base=base), {"cpu": TRIAL_CPUS}))
