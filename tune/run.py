"""Search LoRA sentiment classifiers with Ray Tune: parallel trials, ASHA early stopping, Optuna TPE.

    python tune/run.py                          # quick-start: offline MiniLM + VADER sentences, ~2 min on 2 CPUs
    python tune/run.py --smoke-test             # seconds: a tiny model, a few samples
    python tune/run.py --preset seed --gpus_per_trial 0.25
    python tune/run.py --preset seed --fused_trials  # trials on a GPU step together on one shared base model
    python tune/run.py --resume runs/tune/latest
    python tune/run.py --help                   # every option

Flow: parse the arguments -> start a local Ray (and with --fused_trials its trial engines) while a thread imports
torch & co. -> validate everything and tokenise once into the on-disk cache (a refusal stops that Ray, and prints
only the error) -> plan resources, or join a cluster -> Tuner.fit (or Tuner.restore) -> print the best trial, its
adapter and the next commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import pickle
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

STARTED = time.perf_counter()  # the wall time users see includes the heavy imports below


class CtrlC:
    """Ctrl-C before Tune takes SIGINT over: a KeyboardInterrupt, and remembered. Python swallows one raised inside a
    `__del__` or a weakref callback (which the garbage collector runs at any moment, imports included), and the search
    went on as if none was pressed; `check()` raises it again."""

    pressed = False

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        cls.pressed = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.pressed:
            raise KeyboardInterrupt


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # nohup: ignored
    signal.signal(signal.SIGINT, CtrlC.handle)

if __package__ in (None, ""):
    # Run as `python tune/run.py`: import the `tune` package from the repository root, never this folder's
    # modules as top-level names (Ray workers inherit the driver's sys.path).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

NOTHING_TO_RESUME = "Interrupted before the search started: no trial ran, there is nothing to resume."
CLAIM_FILE = ".lorasent-claim"  # in a local experiment's folder from the moment its search starts; locked while it runs

try:  # Ctrl-C during these imports (seconds on a slow machine) ends as cleanly as one during the checks in main()
    from lorasent.errors import ConfigError, ExperimentError, LorasentError
    from lorasent.process import exit_process, import_modules
    from tune.cluster import (
        EarlyRay,
        ResourcePlan,
        check_bucket,
        is_uri,
        join_location,
        location_uri,
        newest_experiment_state,
        read_trial_data,
        resolve_storage_path,
        sample_number,
        saved_trial_statuses,
        split_location,
    )
    from tune.config import METADATA_FILE, SearchArguments, TuneArguments, experiment_metadata, parse_args

    CtrlC.check()
except KeyboardInterrupt:
    print(f"\n{NOTHING_TO_RESUME}", file=sys.stderr)
    sys.exit(130)

EXAMPLE_TEXT = "Works great, would buy again."


def _can_restore(path: str) -> bool:
    """Whether `path` holds a Ray Tune experiment; storage that does not answer is a ConfigError, before Ray starts."""
    from ray.tune import Tuner

    try:
        return Tuner.can_restore(path)
    except OSError as e:  # an unknown bucket, no credentials, no network: pyarrow says which
        raise ConfigError(
            f"Cannot reach the experiment storage {path}: {e}. Check the URI, your network and the storage "
            "credentials, or use a local --storage_path."
        ) from None
    except ValueError as e:  # pyarrow.ArrowInvalid: a URI it cannot parse (a space, a non-ASCII letter)
        raise ConfigError(
            f"Cannot parse the storage URI {path}: {e}. Percent-encode what a URI cannot hold as it is (a space as "
            "%20), or use a local --storage_path."
        ) from None


def _experiment_location(args: SearchArguments, storage_path: str) -> tuple[str, str]:
    """(storage path, experiment name) of a new search; refuses to write into an existing experiment."""
    if args.tune.name is None:
        name = _default_name(args.tune.preset, storage_path)
    else:
        name = args.tune.name
        path = join_location(storage_path, name)
        if _can_restore(path):
            raise ConfigError(
                f"Experiment {path} already exists. Continue it with --resume {path}, or pick another --name."
            )
    if is_uri(storage_path):
        check_bucket(storage_path)
    return storage_path, name


def _default_name(preset: str, storage_path: str) -> str:
    """PRESET-YYYYmmdd-HHMMSS, with -2, -3, ... after it where that name is taken: searches started in the same
    second (two terminals, a script) got one name, and all but the first were refused, told to pick another --name
    they had not given."""
    base = f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while not _reserve(join_location(storage_path, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def _reserve(path: str) -> bool:
    """Whether a new search may take `path`: a local folder is made here, exclusively, so that no other search takes
    it before this one claims it (`_claim`); a URI holds no experiment yet."""
    if is_uri(path):
        return not _can_restore(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    return True


def _claim(folder: Path, new: bool = True) -> int:
    """Hold `folder` for this search, or refuse: returns its claim file's descriptor, locked (flock) until it is closed,
    when the search ends or this process dies, however it dies.

    A new search creates the claim file exclusively: Ray writes tuner.pkl, which `_can_restore` looks for, only once
    the search starts, seconds later, so two searches given one --name would both pass that check and write their
    trials into one experiment. The lock refuses a --resume while another process runs the experiment (its first run,
    or another --resume): both would train its unfinished trials and sample new ones into the same folder, and each
    overwrite the other's saved state."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        claim = os.open(folder / CLAIM_FILE, os.O_CREAT | os.O_WRONLY | (os.O_EXCL if new else 0))
    except FileExistsError:
        raise ConfigError(
            f"Experiment {folder} is taken by another search started with this name. Pick another --name (if no "
            f"search is running there, one was killed while it started: delete {folder})."
        ) from None
    try:
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(claim)
        holder = (folder / CLAIM_FILE).read_text(encoding="utf-8").strip() or "?"
        raise ConfigError(
            f"Experiment {folder} is being run right now by another process (pid {holder}): a second run would train "
            "its trials again. Wait for that one to end, or stop it, then --resume."
        ) from None
    os.ftruncate(claim, 0)
    os.write(claim, f"{os.getpid()}\n".encode())
    return claim


def _release(experiment_path: str) -> None:
    """A search stopped before it started leaves nothing behind: its claim and record, and its folder if nothing else
    is in it."""
    if _can_restore(experiment_path):  # it started: the claim stays with the experiment
        return
    for name in (CLAIM_FILE, METADATA_FILE):
        (Path(experiment_path) / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(experiment_path).rmdir()


def _resume_location(path: str) -> tuple[str, str]:
    """(storage path, experiment name) of an experiment to resume; follows the `latest` link."""
    if not is_uri(path):
        path = str(Path(path).expanduser().resolve())
    if not _can_restore(path):
        raise ConfigError(
            f"Nothing to resume at {path}: no Ray Tune experiment state (tuner.pkl) there. Give the experiment "
            "directory printed by the interrupted run, or STORAGE_PATH/latest."
        )
    if not is_uri(path):
        _check_experiment_state(Path(path))
    return split_location(path)


def experiment_location(args: SearchArguments) -> tuple[str, str]:
    """(storage path, experiment name): the experiment to resume, or a new one, which must not exist yet."""
    if args.tune.resume:
        return _resume_location(args.tune.resume)
    return _experiment_location(args, resolve_storage_path(args.tune.storage_path))


def _damaged_state(path: str | Path, filename: str, error: BaseException) -> ExperimentError:
    return ExperimentError(
        f"Cannot resume {path}: its Ray Tune state file {filename} is damaged ({type(error).__name__}: {error}). "
        f"The trials' own results and checkpoints are untouched: read them with `python -m analysis report {path}`, "
        "and start a new search to go on (--points_to_evaluate can start it from the best config)."
    )


def _check_experiment_state(path: Path) -> None:
    """Refuse an experiment whose newest experiment_state file does not parse, or whose searcher's saved wrappers
    were cut short (a kill while Ray copied them): Ray would silently start it afresh. (Optuna's own file, cut
    short, is rebuilt from the trials: `tune.resumable`.)"""
    newest = newest_experiment_state(str(path))
    if newest is not None:
        try:
            read_trial_data(*newest)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise _damaged_state(path, Path(newest[1]).name, e) from None
    for pattern in ("search_gen_state-*.json", "basic-variant-state-*.json"):  # pickles, whatever the name says
        files = sorted(path.glob(pattern))
        if files and not files[-1].read_bytes().endswith(pickle.STOP):  # the newest, as Ray picks it
            raise _damaged_state(path, files[-1].name, EOFError("the file was cut short"))


def _check_same_data(experiment_path: str, dataset: str, now: dict[str, Any]) -> None:
    """Refuse to resume a search whose data changed since its trials trained on it: each checkpoint's lorasent.json
    records the data's identity (`source_identity`, a file's sha256), which is `now` no longer, so the rest would
    train and be scored on other splits than the finished trials, and the search rank them together. Checked in
    local experiments."""
    from lorasent.paths import META_FILE

    if is_uri(experiment_path):
        return
    for meta in Path(experiment_path).glob(f"*/checkpoint_*/{META_FILE}"):
        try:
            then = json.loads(meta.read_text(encoding="utf-8"))["source"]
        except (OSError, ValueError, KeyError, TypeError):  # cut short by a kill: another checkpoint says
            continue
        if then != now:
            raise ConfigError(
                f"Cannot resume {experiment_path}: its data {dataset} changed since its trials trained on it "
                f"({then} then, {now} now), so the rest would train and be scored on other splits than the finished "
                "ones. Put the data back as it was, or start a new search on the new data."
            )
        return


def _summary(outcome: SearchOutcome, args: SearchArguments, seconds: float) -> int:
    """Print the best trial, its adapter and the next commands.

    Exit codes: 0 done; 1 no trial produced the metric; 130 interrupted (Ctrl-C), resumable.
    """
    results, experiment_path = outcome.results, outcome.experiment_path
    metric, mode = args.tune.metric, args.tune.mode
    statuses = saved_trial_statuses(experiment_path)
    if statuses is None:  # no saved state to read: Ray's own count
        finished = results.num_terminated + results.num_errors
    else:  # Ray's last snapshot can miss a final failure (a trial still RUNNING there): the driver knows it errored
        errored = {Path(r.path).name for r in results if r.error is not None}
        finished = sum(status in ("TERMINATED", "ERROR") or name in errored for name, status in statuses.items())
    if finished < outcome.expected_trials:
        print(
            f"\nSearch interrupted after {seconds:.0f} s with {finished} of {outcome.expected_trials} trials "
            "finished; nothing is lost. Continue it with:\n"
            f"  python tune/run.py --resume {shlex.quote(experiment_path)}",
            file=sys.stderr,
        )
        return 130
    trials = list(results)
    errors = [r for r in trials if r.error is not None]
    last = {r.path: r.metrics or {} for r in trials if r.error is None}
    diverged = [path for path, m in last.items() if m.get("diverged")]
    # ASHA's work: trials that ended before their own epochs (searched or fixed; --max_epochs caps them all), without
    # diverging
    own = {r.path: r.config.get("num_train_epochs", args.train.num_train_epochs) for r in trials}
    planned = {path: min(epochs, outcome.epochs) for path, epochs in own.items()}
    early = [p for p, m in last.items() if p not in diverged and _epochs_trained(m) < planned[p]]
    print(
        f"\nSearch finished in {seconds:.0f} s: {len(trials)} trials, {len(early)} stopped early, "
        f"{len(diverged)} diverged, {len(errors)} errored."
    )
    for r in errors:
        print(f"  errored: {location_uri(experiment_path, r.path)} ({type(r.error).__name__}); see error.txt there")
    found = _best_epoch(trials, metric, mode)
    if found is None:
        print(f"error: no trial reported a finite {metric!r}; see the errors above.", file=sys.stderr)
        return 1
    best, shown_metrics, checkpoint = found
    shown = dict.fromkeys((metric, "accuracy", "f1_macro", "loss"))  # ordered, without duplicates
    later = f" (it diverged at epoch {_epochs_trained(last[best.path]):g})" if best.path in diverged else ""
    print(f"Best trial {Path(best.path).name}, epoch {_epochs_trained(shown_metrics):g}{later}:")
    config = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    print(f"  config:     {config}")
    print("  validation: " + ", ".join(f"{k}={shown_metrics[k]:.4f}" for k in shown if k in shown_metrics))
    print(f"  adapter:    {location_uri(experiment_path, checkpoint.path) if checkpoint else '(no checkpoint kept)'}")
    print(f"Experiment:   {experiment_path}")
    print("Next:")
    print(f"  python -m analysis report {shlex.quote(experiment_path)}")
    if is_uri(experiment_path):  # lorasent.predict reads a local folder: the retrain writes one, and says how
        print(f"  python -m analysis retrain {shlex.quote(experiment_path)}")
    elif checkpoint:
        print(f'  python -m lorasent.predict {shlex.quote(str(checkpoint.path))} --text "{EXAMPLE_TEXT}"')
    print(f"  tensorboard --logdir {shlex.quote(experiment_path)} --host 127.0.0.1")
    return 0


def _epochs_trained(metrics: dict[str, Any]) -> float:
    """Epochs a trial had trained when it reported `metrics` (lorasent reports `epoch`; a report is an epoch
    without it)."""
    return float(metrics.get("epoch", metrics.get("training_iteration", 0)))


def _best_epoch(trials: list[Any], metric: str, mode: str) -> tuple[Any, dict[str, Any], Any] | None:
    """(result, metrics, checkpoint) of the best epoch of all trials, or None when no epoch has a finite score.

    A diverged epoch reports the worst value (+-inf), so it is never the best; the epochs its trial finished before
    it are finished models like any other (their checkpoints are kept, and a retrain stops at the best epoch).

    Ties go to an epoch with a kept checkpoint, then to the earlier epoch, then to the trial sampled first
    (`sample_number`), as `analysis.results` ranks trials (the report and retrain-best), so the trial printed here is
    the one they use; Ray's own pick would follow its trial order.
    """
    sign = -1 if mode == "max" else 1
    epochs = []
    for result in trials:
        for m, checkpoint in _epochs(result):
            if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric]):
                trial_id = m.get("trial_id", "")
                rank = (sign * m[metric], checkpoint is None, m["training_iteration"])
                rank += (sample_number(Path(result.path).name, trial_id), trial_id)
                epochs.append((*rank, result, m, checkpoint))
    if not epochs:
        return None
    *_, result, metrics, checkpoint = min(epochs, key=lambda epoch: epoch[:5])
    return result, metrics, checkpoint


def _epochs(result: Any) -> list[tuple[dict[str, Any], Any]]:
    """(metrics, checkpoint or None) of each epoch a trial reported: its kept checkpoints' metrics, then the rest."""
    kept = [(dict(m), c) for c, m in result.best_checkpoints]
    seen = {m["training_iteration"] for m, _ in kept}
    frame = result.metrics_dataframe
    rows = frame.to_dict("records") if frame is not None else []
    return kept + [(row, None) for row in rows if row.get("training_iteration") not in seen]


class SearchOutcome(NamedTuple):
    results: Any  # ray.tune.ResultGrid
    experiment_path: str
    epochs: int  # the most epochs a trial could run
    expected_trials: int  # fewer finished ones: the search was interrupted


# What the driver's checks and trials import (torch, transformers, peft, optuna, datasets through these): seconds
# that a thread spends while the main thread starts Ray.
CHECK_MODULES = ("lorasent.fused", "lorasent.tokenize", "tune.search", "tune.trainable")


def _import_meanwhile(modules: list[str]) -> Future[None]:
    """Import `modules` in a daemon thread (a Ctrl-C meanwhile need not wait for it); `.result()` waits, re-raising
    an import error."""
    done: Future[None] = Future()

    def run() -> None:
        try:
            import_modules(modules)
        except BaseException as e:  # handed to the main thread, which raises it
            done.set_exception(e)
        else:
            done.set_result(None)

    threading.Thread(target=run, name="lorasent-imports", daemon=True).start()
    return done


class CheckedSearch(NamedTuple):
    """What the checks built: the search's space, schedule and resource plan."""

    space: dict[str, Any]
    param_space: dict[str, Any]
    epochs: int
    scheduler: Any
    points: list[dict[str, Any]]
    plan_args: TuneArguments  # as planned
    plan: ResourcePlan | None  # of a local Ray; None when joining one


def _check_and_tokenise(args: SearchArguments, early: EarlyRay | None, source: dict[str, Any] | None) -> CheckedSearch:
    """Every check of the search that needs no running Ray, then the tokenisation (once, here: trials load the cached
    splits, never re-tokenise). `early` is the local Ray started for the search, if any; `source` the data's
    `source_identity` where the caller has it (else hashed with the tokenisation's key)."""
    from lorasent.data import describe_rows
    from lorasent.fused import check_shareable
    from lorasent.paths import CACHE_ENV
    from lorasent.tokenize import tokenized_splits
    from lorasent.train import check_warmup
    from tune import cluster, search
    from tune.trainable import trial_train_arguments

    t = args.tune
    if os.environ.get(CACHE_ENV):  # trials run in their own folders, where a relative path names another cache
        os.environ[CACHE_ENV] = str(Path(os.environ[CACHE_ENV]).expanduser().resolve())
    space, param_space = search.build_param_space(t, args.model, args.train)
    if t.fused_trials:  # first: its refusals say what else to change, where the scheduler's would not mention it
        check_shareable(args.train, searched=space)
    if not t.resume:
        check_warmup(args.train, searched="warmup_ratio" in space)
    epochs = search.max_epochs(t, space, args.train)
    scheduler = search.build_scheduler(t, epochs, args.train.evals_per_epoch)
    points = search.starting_points(t, space, args.model, args.train)
    search.check_target_modules(space, args.model)  # before the memory plan (which builds the model) and the data
    # The address answers, or the local Ray's plan fits (trials per GPU from one trial's memory; for trials that
    # share a base model, from the base's memory once and each trial's own, up to the trials the search holds):
    # before any trial. Trials that share engines hold almost nothing themselves: how many run at once is the
    # engines' to say.
    plan_args = dataclasses.replace(t, max_concurrent_trials=None) if t.fused_trials else t
    plan = cluster.preflight(
        plan_args,
        lambda: search.trial_footprint(space, args.data, args.model, args.train),
        early,
        shared_by=search.expected_trials(t, space) if t.fused_trials else None,
    )
    if plan is not None:  # a local Ray: its trials' resources are known, so is what they can train with
        resources = {"cpus_per_trial": plan.cpus_per_trial, "gpus_per_trial": plan.gpus_per_trial}
        trial_train_arguments(args.data, args.train, metric=t.metric, **resources)
    splits = tokenized_splits(args.data, args.model, source=source)
    search.check_batches_fit(space, args.train, len(splits["train"]))
    print(describe_rows(args.data, {split: len(rows) for split, rows in splits.items()}))
    return CheckedSearch(space, param_space, epochs, scheduler, points, plan_args, plan)


def run_search(args: SearchArguments, storage_path: str, name: str) -> SearchOutcome:
    """Run (or resume) the search at storage_path/name (see `_run_search`). A local experiment's folder is claimed
    first and held while the search runs (`_claim`); a new one is released if the search stops before it started."""
    experiment_path = join_location(storage_path, name)
    if is_uri(experiment_path):
        return _run_search(args, storage_path, name)
    claim = _claim(Path(experiment_path), new=not args.tune.resume)
    try:
        return _run_search(args, storage_path, name)
    except BaseException:
        if not args.tune.resume:
            _release(experiment_path)
        raise
    finally:
        os.close(claim)


def _run_search(args: SearchArguments, storage_path: str, name: str) -> SearchOutcome:
    """Validate everything, tokenise once, start or join Ray, then run (or resume) the search at storage_path/name.

    A local Ray starts first, while a thread imports what the checks need (torch, transformers, peft: seconds each),
    and with --fused_trials so do its engines; a refused search stops them before it says why. Where those modules
    are imported already, the checks come first and Ray after them.
    """
    from lorasent.assets import BUILTIN_MODELS, resolve_model_path
    from tune import cluster
    from tune.engine import launch_engines_early

    t = args.tune
    if args.model.model_name_or_path not in BUILTIN_MODELS:  # a missing folder, or a hub model the local cache lacks
        resolve_model_path(args.model.model_name_or_path)  # while the hub does not answer: refused in seconds, not
        # after the imports and Ray's start (~15 s on 2 cores)
    experiment_path = cluster.join_location(storage_path, name)
    # Ray starts first only where there are imports to hide it behind: a process that has them (a notebook's second
    # search, a test) runs the checks first, so that a refusal starts no Ray at all.
    to_import = [module for module in CHECK_MODULES if module not in sys.modules]
    imports = _import_meanwhile(to_import)
    early = cluster.start_early_ray(t) if to_import else None
    launched = None
    try:
        if early is not None and t.fused_trials:
            launched = launch_engines_early(args.data, args.model, args.train, t)
        imports.result()
        source = None  # the data's identity: hashed here only to resume, and then handed on, not hashed again
        if t.resume:
            from lorasent.tokenize import source_identity  # imported by now (CHECK_MODULES)

            source = source_identity(args.data.dataset)
            _check_same_data(experiment_path, args.data.dataset, source)
        CtrlC.check()
        checked = _check_and_tokenise(args, early, source)
        session = cluster.start_ray(checked.plan_args, checked.plan, early)
    except BaseException:
        if launched is not None:
            launched.discard()
        if early is not None:
            early.discard()
        raise
    from ray import tune

    from tune import search

    space, param_space, epochs, scheduler, points = checked[:5]
    engines = None
    try:
        fewer = None if t.resume else search.fewer_trials_note(t, space)  # a resumed search keeps its own count
        if fewer is not None:
            print(fewer)
            t = dataclasses.replace(t, num_samples=search.num_samples(t, space))
            args = args._replace(tune=t)  # the experiment's record plans the trials the search runs
        plan = session.plan
        cluster.check_storage_shared(plan, storage_path)
        if t.fused_trials:
            from tune.engine import make_fused_trainable, start_engines

            engines = start_engines(
                args.data,
                args.model,
                args.train,
                plan,
                trials_at_once=t.max_concurrent_trials,
                launched=launched if session.started_early else None,
            )
            print(engines.describe())
            trainable = make_fused_trainable(
                args.data, args.model, args.train, metric=t.metric, mode=t.mode, plan=engines
            )
            max_concurrent, resources = engines.trials_at_once, engines.resources_per_trial
        else:
            from tune.trainable import make_trainable

            print(plan.describe())
            trainable = make_trainable(
                args.data,
                args.model,
                args.train,
                metric=t.metric,
                mode=t.mode,
                cpus_per_trial=plan.cpus_per_trial,
                gpus_per_trial=plan.gpus_per_trial,
            )
            # None on an autoscaling cluster that does not say its size: every trial asks, max_workers caps the cost.
            max_concurrent = plan.max_concurrent_trials or search.expected_trials(t, space)
            resources = plan.resources_per_trial
        if not cluster.is_uri(storage_path):
            # A killed driver loses what happened since the last experiment snapshot: snapshot often (cheap locally,
            # so Ray's warning about frequent snapshots, meant for cloud storage, is noise here).
            os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
            os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if t.resume:
            print(f"Resuming {experiment_path}: finished trials are kept, the rest continue from their checkpoints.")
            from tune.resumable import AlreadyDeletedCheckpoint, resuming_at

            logging.getLogger(AlreadyDeletedCheckpoint.LOGGER).addFilter(AlreadyDeletedCheckpoint())
            resuming_at(storage_path, name)
            try:
                tuner = tune.Tuner.restore(
                    experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
                )
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
                raise _damaged_state(experiment_path, "tuner.pkl", e) from None  # Ray unpickles it as is
            if tuner._local_tuner is not None:  # Ray restores the first run's console verbosity with the rest
                tuner._local_tuner.get_run_config().verbose = t.verbose
        else:
            metadata = experiment_metadata(args, resources)
            cluster.write_experiment_file(experiment_path, METADATA_FILE, metadata)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=t.metric,
                    mode=t.mode,
                    search_alg=search.build_searcher(t, space, points, max_concurrent),
                    scheduler=scheduler,
                    num_samples=search.num_samples(t, space),
                    reuse_actors=t.reuse_actors,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    stop={"training_iteration": epochs * args.train.evals_per_epoch},  # --max_epochs, in reports
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=t.keep_checkpoints,
                        checkpoint_score_attribute=t.metric,
                        checkpoint_score_order=t.mode,
                    ),
                    failure_config=tune.FailureConfig(max_failures=t.max_failures),
                    verbose=t.verbose,
                ),
            )
            # Once Ray has written tuner.pkl (in Tuner()), so `latest` names only experiments that can be resumed,
            # and before the first trial, so a killed run resumes from it
            latest = cluster.update_latest_link(storage_path, name)
            if latest is not None:
                print(f"{latest} -> {name}")
        CtrlC.check()  # the last look before Tune's own handler: a Ctrl-C that was swallowed stops the search here
        results = tuner.fit()
    finally:
        if engines is not None:
            engines.shutdown()
        session.shutdown()
    return SearchOutcome(results, experiment_path, epochs, search.expected_trials(t, space))


def _interrupted(experiment_path: str | None) -> int:
    """Exit 130 without a traceback, saying whether there is anything to resume."""
    try:
        resumable = experiment_path is not None and _can_restore(experiment_path)
    except ConfigError:
        resumable = False
    if resumable:
        print(
            f"\nInterrupted; finished trials are saved. Continue the search with:\n"
            f"  python tune/run.py --resume {shlex.quote(experiment_path)}",
            file=sys.stderr,
        )
    else:
        print(f"\n{NOTHING_TO_RESUME}", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """`python tune/run.py`: 0 done, 1 no trial produced a result, 2 a user error, 130 interrupted."""
    experiment_path = None
    try:
        args = parse_args(argv)
        storage_path, name = experiment_location(args)
        experiment_path = join_location(storage_path, name)
        outcome = run_search(args, storage_path, name)
        return _summary(outcome, args, time.perf_counter() - STARTED)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before Tune takes SIGINT over, or a second one (Tune handles the first)
        return _interrupted(experiment_path)


if __name__ == "__main__":
    exit_process(main())
