"""Search space, searcher and scheduler: the parts of a search that decide which trials run and which stop.

Optuna's TPE (seeded, with starting points) proposes configs, ASHA stops the weak trials at rungs counted in
epochs (or in fractions of one, with evaluations within epochs). Every impossible combination is refused here,
before any trial starts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from lorasent.config import DataArguments, ModelArguments, TrainArguments, replace
from lorasent.errors import ConfigError
from tune.config import (
    SEARCHABLE,
    ParamSpec,
    SearchSpace,
    TuneArguments,
    distinct_configurations,
    parse_search_space,
    typed_value,
)
from tune.resumable import ResumableASHA, ResumableSearchGenerator, ResumableVariantGenerator

if TYPE_CHECKING:
    from lorasent.footprint import TrainingFootprint


def _owner(name: str, model_args: ModelArguments, train_args: TrainArguments) -> ModelArguments | TrainArguments:
    """The arguments object that holds searchable parameter `name`."""
    return model_args if SEARCHABLE[name][0] is ModelArguments else train_args


def _check_values(spec: ParamSpec, model_args: ModelArguments, train_args: TrainArguments) -> None:
    """Run each candidate (or range end) through its dataclass's validation, so a bad value fails now."""
    owner = _owner(spec.name, model_args, train_args)
    for value in spec.values:
        try:
            replace(owner, **{spec.name: value})
        except ConfigError as e:
            raise ConfigError(f"search_space.{spec.name}: {value!r} is not allowed: {e}") from None


def _domain(spec: ParamSpec, searcher: str) -> Any:
    integer = SEARCHABLE[spec.name][1] is int
    low, high = spec.values[0], spec.values[-1]
    if spec.distribution == "loguniform":
        return tune.lograndint(low, high + 1) if integer else tune.loguniform(low, high)
    if spec.distribution == "uniform":
        return tune.randint(low, high + 1) if integer else tune.uniform(low, high)
    # Grid search walks every value of every list; random search expands `grid` lists; Optuna samples them.
    if searcher == "grid" or (spec.distribution == "grid" and searcher == "random"):
        return tune.grid_search(list(spec.values))
    return tune.choice(list(spec.values))


def build_param_space(
    tune_args: TuneArguments, model_args: ModelArguments, train_args: TrainArguments
) -> tuple[SearchSpace, dict[str, Any]]:
    """The validated search space and Ray's `param_space` for the chosen searcher."""
    space = parse_search_space(tune_args.search_space)
    if not space:
        raise ConfigError(
            "The search space is empty: nothing to search. Give at least one parameter, e.g. "
            '--search_space \'{"learning_rate": {"loguniform": [1e-4, 1e-2]}}\', or use a --preset.'
        )
    ranges = sorted(name for name, spec in space.items() if spec.is_range)
    if tune_args.searcher == "grid" and ranges:
        raise ConfigError(
            f"Grid search needs a finite list of values, but {ranges} are continuous (loguniform/uniform). Give "
            "them as grid or choice lists, or use --searcher optuna / random."
        )
    for spec in space.values():
        _check_values(spec, model_args, train_args)
    return space, {name: _domain(spec, tune_args.searcher) for name, spec in space.items()}


def max_epochs(tune_args: TuneArguments, space: SearchSpace, train_args: TrainArguments) -> int:
    """The most epochs any trial can run, ASHA's time budget: --max_epochs caps the trials' own (searched) epochs,
    and above them counts for nothing (a grace period past every trial's end would otherwise pass its check, and
    ASHA never stop a trial)."""
    spec = space.get("num_train_epochs")
    longest = int(max(spec.values) if spec else train_args.num_train_epochs)
    return min(tune_args.max_epochs or longest, longest)


def starting_points(
    tune_args: TuneArguments, space: SearchSpace, model_args: ModelArguments, train_args: TrainArguments
) -> list[dict[str, Any]]:
    """`points_to_evaluate`, each completed with the base value of every searched parameter it leaves out."""
    points = []
    for i, point in enumerate(tune_args.points_to_evaluate):
        if not isinstance(point, dict):
            raise ConfigError(f"points_to_evaluate[{i}] must be a mapping {{parameter: value}}, got {point!r}.")
        unknown = sorted(set(point) - set(space))
        if unknown:
            raise ConfigError(
                f"points_to_evaluate[{i}] sets {unknown}, which are not searched. Searched: {', '.join(space)}."
            )
        full = {}
        for name, spec in space.items():
            value = typed_value(name, point.get(name, getattr(_owner(name, model_args, train_args), name)))
            inside = spec.values[0] <= value <= spec.values[1] if spec.is_range else value in spec.values
            if not inside and name not in point:
                raise ConfigError(
                    f"points_to_evaluate[{i}] leaves out {name}, so it takes --{name}'s value {value!r}, which lies "
                    f"outside its search space {spec.distribution} {list(spec.values)}. Give {name} in the point."
                )
            if not inside:
                raise ConfigError(
                    f"points_to_evaluate[{i}]: {name}={value!r} lies outside its search space {spec.distribution} "
                    f"{list(spec.values)}. Add it to the space or change the point."
                )
            full[name] = value
        if full in points:
            raise ConfigError(
                f"points_to_evaluate[{i}] is points_to_evaluate[{points.index(full)}] again once completed with the "
                f"flags' values ({full}): it would train the same model twice. Remove one."
            )
        points.append(full)
    samples = num_samples(tune_args, space)
    if tune_args.searcher != "grid" and len(points) > samples:  # Optuna would drop the rest, Ray's random run them
        raise ConfigError(
            f"points_to_evaluate holds {len(points)} points, but the search runs {samples} trial(s) (--num_samples "
            f"{tune_args.num_samples}) and each point is one of them. Raise --num_samples to at least {len(points)}, "
            "or give fewer points."
        )
    return points


def build_searcher(
    tune_args: TuneArguments, space: SearchSpace, points: list[dict[str, Any]], max_concurrent: int
) -> ResumableSearchGenerator | ResumableVariantGenerator:
    """Optuna TPE behind a ConcurrencyLimiter (TPE learns little from many pending trials), or seeded random/grid;
    either restores consistent with the trials on --resume (`tune.resumable`).
    Over a finite space, each configuration is proposed once until all have been tried (`DistinctSampler` around
    TPE, or around Optuna's random sampler: random search without replacement, as scikit-learn's ParameterSampler
    does over lists)."""
    distinct = distinct_configurations(tune_args, space) is not None
    if tune_args.searcher == "optuna" or distinct:
        import optuna

        from tune.sampler import DistinctSampler

        seed = tune_args.search_seed
        if tune_args.searcher == "optuna":
            sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=seed)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        if distinct:  # over the distributions the searcher itself converts the space to, so that they match
            domains = {name: _domain(spec, tune_args.searcher) for name, spec in space.items()}
            sampler = DistinctSampler(sampler, OptunaSearch.convert_search_space(domains), seed=seed)
        optuna_search = OptunaSearch(points_to_evaluate=points or None, sampler=sampler)
        limiter = ConcurrencyLimiter(optuna_search, max_concurrent=max_concurrent)
        return ResumableSearchGenerator(limiter, tune_args.metric, tune_args.mode)
    return ResumableVariantGenerator(
        points_to_evaluate=(points or None) if tune_args.searcher == "random" else None,
        max_concurrent=max_concurrent,
        random_state=tune_args.search_seed,
    )


def build_scheduler(tune_args: TuneArguments, epochs: int, evals_per_epoch: int = 1) -> TrialScheduler | None:
    """ASHA on reports (`training_iteration` counts one per evaluation: `evals_per_epoch` an epoch), its grace period
    and budget given in epochs; or None for FIFO."""
    if tune_args.scheduler == "none":
        return None
    if tune_args.grace_period > epochs:
        raise ConfigError(
            f"grace_period={tune_args.grace_period:g} exceeds the {epochs} epoch(s) a trial runs, so ASHA could never "
            "stop a trial. Lower --grace_period or raise --num_train_epochs / --max_epochs."
        )
    grace_reports = tune_args.grace_period * evals_per_epoch
    if abs(grace_reports - round(grace_reports)) > 1e-6 or round(grace_reports) < 1:
        raise ConfigError(
            f"grace_period={tune_args.grace_period:g} epochs does not end at an evaluation: with evals_per_epoch "
            f"{evals_per_epoch} trials are evaluated every 1/{evals_per_epoch} epoch. Use a multiple of "
            f"{1 / evals_per_epoch:g}"
            + (
                " (trials that share a base model evaluate once an epoch)."
                if tune_args.fused_trials
                else ", or raise --evals_per_epoch."
            )
        )
    return ResumableASHA(
        time_attr="training_iteration",
        max_t=epochs * evals_per_epoch,
        grace_period=round(grace_reports),
        reduction_factor=tune_args.reduction_factor,
    )


def check_target_modules(space: SearchSpace, model_args: ModelArguments) -> None:
    """Refuse LoRA target modules the model does not have, and LoRA ranks above the width of the layers they adapt,
    before the data is tokenised (minutes for a large dataset), since every trial would fail on them after its
    retries (or, for a rank, train in vain)."""
    from lorasent.model import check_lora_rank, meta_model, resolve_target_modules

    targets, ranks = space.get("target_modules"), space.get("lora_r")
    rank = int(max(ranks.values)) if ranks else model_args.lora_r
    architecture = meta_model(model_args)
    for spec in targets.values if targets else (model_args.target_modules,):
        try:
            names = resolve_target_modules(architecture, spec)
        except ConfigError as e:
            raise ConfigError(f"search_space.target_modules: {spec!r}: {e}" if targets else str(e)) from None
        try:
            check_lora_rank(architecture, names, rank)
        except ConfigError as e:  # (the message names the layers, and so which target_modules)
            raise ConfigError(f"search_space.lora_r: {e}" if ranks else str(e)) from None


def check_batches_fit(space: SearchSpace, train_args: TrainArguments, train_examples: int) -> None:
    """Refuse a batch larger than the train split, which every trial would fail on after its retries, and more
    evaluations an epoch than the largest batch leaves steps (see `check_evals_fit`)."""
    from lorasent.train import check_evals_fit

    batch = space.get("per_device_train_batch_size")
    largest = int(max(batch.values)) if batch else train_args.per_device_train_batch_size
    if largest > train_examples:
        where = "search_space.per_device_train_batch_size" if batch else "per_device_train_batch_size"
        raise ConfigError(
            f"{where}: a batch of {largest} exceeds the {train_examples} training examples. Use smaller batches or "
            "more data (max_train_samples)."
        )
    check_evals_fit(train_args.evals_per_epoch, largest, train_examples)


def trial_footprint(
    space: SearchSpace, data_args: DataArguments, model_args: ModelArguments, train_args: TrainArguments
) -> TrainingFootprint:
    """The GPU memory of the hungriest trial the space holds: its largest batch and LoRA rank."""
    import torch

    from lorasent.footprint import training_footprint

    def largest(name: str, base: int) -> int:
        spec = space.get(name)
        return int(max(spec.values)) if spec else base

    return training_footprint(
        replace(model_args, lora_r=largest("lora_r", model_args.lora_r)),
        batch_size=largest("per_device_train_batch_size", train_args.per_device_train_batch_size),
        max_length=data_args.max_length,
        eval_batch_size=train_args.per_device_eval_batch_size,
        num_labels=len(data_args.label_names),
        frozen_dtype=torch.bfloat16 if train_args.half_precision_base else None,  # 2 bytes, as fp16 would be
    )


def expected_trials(tune_args: TuneArguments, space: SearchSpace) -> int:
    """How many trials the finished search holds (at least): each sample walks the grid lists, and a point to
    evaluate takes a sample's place as one trial (it sets every searched parameter), as Ray's variant generator
    counts them."""
    if tune_args.searcher == "optuna":
        return num_samples(tune_args, space)
    walked = [s for s in space.values() if tune_args.searcher == "grid" or s.distribution == "grid"]
    points = len(tune_args.points_to_evaluate) if tune_args.searcher == "random" else 0
    return points + (num_samples(tune_args, space) - points) * math.prod(len(s.values) for s in walked)


def num_samples(tune_args: TuneArguments, space: SearchSpace) -> int:
    """Grid search runs each grid point once; a searcher that draws each configuration at most once, at most as
    many trials as there are configurations (a second trial of one trains with the same seed: the same result
    again); otherwise --num_samples trials."""
    if tune_args.searcher == "grid":
        return 1
    held = distinct_configurations(tune_args, space)
    return min(tune_args.num_samples, held) if held is not None else tune_args.num_samples


def fewer_trials_note(tune_args: TuneArguments, space: SearchSpace) -> str | None:
    """Why the search runs fewer trials than --num_samples asked for, or None where it runs them all."""
    trials = num_samples(tune_args, space)
    if tune_args.searcher == "grid" or trials >= tune_args.num_samples:
        return None
    held, running = ("1 configuration", "1 trial") if trials == 1 else (f"{trials} configurations", f"{trials} trials")
    return (
        f"The search space holds {held}: running {running}, not --num_samples {tune_args.num_samples} (a second "
        "trial of a configuration would train the same model again)."
    )
