"""`DistinctSampler` on plain Optuna studies, asked and told as Ray Tune's OptunaSearch does (eight trials pending at
once): every configuration of a finite space once, TPE's own proposals until TPE repeats itself."""

from __future__ import annotations

import itertools
import pickle
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tune.sampler import DistinctSampler, finite_values


def _choices(space: dict[str, list]) -> dict[str, CategoricalDistribution]:
    return {name: CategoricalDistribution(values) for name, values in space.items()}


SEED_GRID = _choices(
    {"learning_rate": [1e-3, 5e-4, 3e-4], "per_device_train_batch_size": [4, 8, 16], "lora_r": [2, 4, 8]}
)
ALL_OF_THE_SEED_GRID = sorted(itertools.product(*(finite_values(d) for d in SEED_GRID.values())))


@pytest.fixture(autouse=True)
def quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def _search(sampler: optuna.samplers.BaseSampler, space: dict, trials: int, at_once: int = 8, seed: int = 0) -> list:
    """The configurations of `trials` trials over `space` ({name: distribution}), `at_once` of them pending while
    each finishes in random order with a noisy score, the middle config enqueued first (Ray's points_to_evaluate)."""
    values = {name: finite_values(distribution) for name, distribution in space.items()}
    study = optuna.create_study(direction="maximize", sampler=sampler)
    first = {name: choices[len(choices) // 2] for name, choices in values.items()}
    study.enqueue_trial(first)
    rng = random.Random(seed)
    running: list[optuna.Trial] = []
    asked = 0
    while asked < trials or running:
        while asked < trials and len(running) < at_once:
            running.append(study.ask(fixed_distributions=space))
            asked += 1
        trial = running.pop(rng.randrange(len(running)))
        score = sum(choices.index(trial.params[name]) for name, choices in values.items())
        study.tell(trial, score + rng.gauss(0, 1))
    configs = [tuple(t.params[name] for name in space) for t in study.trials]
    assert configs[0] == tuple(first.values())  # the enqueued point runs as given
    return configs


@pytest.mark.parametrize("seed", range(5))
def test_every_configuration_of_the_grid_once(seed: int) -> None:
    sampler = DistinctSampler(optuna.samplers.TPESampler(seed=seed), SEED_GRID, seed=seed)
    configs = _search(sampler, SEED_GRID, trials=27, seed=seed)
    assert sorted(configs) == ALL_OF_THE_SEED_GRID


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_when_tpe_insists_the_nearest_untried_configuration_runs() -> None:
    """A sampler that proposes the seed config every time: the others follow in order of how many parameters differ
    from it (6 differ in one, 12 in two, 8 in all three), each once."""
    seed_config = {"learning_rate": 5e-4, "per_device_train_batch_size": 8, "lora_r": 4}
    insists = optuna.samplers.PartialFixedSampler(seed_config, optuna.samplers.RandomSampler(seed=0))
    configs = _search(DistinctSampler(insists, SEED_GRID, seed=0), SEED_GRID, trials=27, at_once=1)
    changed = [sum(a != b for a, b in zip(config, seed_config.values(), strict=True)) for config in configs]
    assert changed == [0] + [1] * 6 + [2] * 12 + [3] * 8
    assert len(set(configs)) == 27


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_huge_space_is_never_enumerated() -> None:
    """10^10 configurations and a sampler that insists: the nearest untried ones are its neighbours, found at once."""
    space = {f"p{i}": IntDistribution(0, 9) for i in range(10)}
    insists = optuna.samplers.PartialFixedSampler({name: 5 for name in space}, optuna.samplers.RandomSampler(seed=0))
    configs = _search(DistinctSampler(insists, space, seed=0), space, trials=40)
    assert len(set(configs)) == 40
    assert all(sum(value != 5 for value in config) <= 1 for config in configs)  # 90 neighbours differ in one


def test_a_used_up_space_repeats_rather_than_fails() -> None:
    space = _choices({"lora_r": [2, 4], "per_device_train_batch_size": [8, 16]})
    sampler = DistinctSampler(optuna.samplers.TPESampler(seed=0), space, seed=0)
    configs = _search(sampler, space, trials=7, at_once=2)
    assert len(set(configs[:4])) == 4 and len(configs) == 7


def test_tpe_proposals_are_kept_until_tpe_repeats_itself() -> None:
    """The wrapper changes nothing until plain TPE (same seed) proposes a configuration a second time: the search is
    still TPE's, without its repeats."""
    space = _choices({"a": list(range(6)), "b": [0.1, 0.2, 0.3, 0.4, 0.5], "c": list(range(4))})
    plain = _search(optuna.samplers.TPESampler(seed=2), space, trials=30, at_once=1)
    distinct = _search(DistinctSampler(optuna.samplers.TPESampler(seed=2), space, seed=2), space, trials=30, at_once=1)
    first_repeat = next(i for i, config in enumerate(plain) if config in plain[:i])
    assert first_repeat > 10  # past TPE's 10 random start-up trials: its model proposed the repeat
    assert distinct[:first_repeat] == plain[:first_repeat]
    assert len(set(distinct)) == 30


def test_the_sampler_survives_pickling() -> None:
    """Ray saves the searcher, study and sampler included, by pickling it; a resumed search goes on without repeats."""
    sampler = DistinctSampler(optuna.samplers.TPESampler(seed=1), SEED_GRID, seed=1)
    restored = pickle.loads(pickle.dumps(sampler))
    assert sorted(_search(restored, SEED_GRID, trials=27)) == ALL_OF_THE_SEED_GRID


def test_whole_number_ranges_are_finite_too() -> None:
    """lora_r from 2 to 7 (log scale, as Ray converts `lograndint`), batch 8 to 32 in steps of 8, and a choice: all 48
    configurations once each; real-number ranges are refused, since their configurations cannot be listed."""
    space = {
        "lora_r": IntDistribution(2, 7, log=True),
        "per_device_train_batch_size": IntDistribution(8, 32, step=8),
        "lora_dropout": CategoricalDistribution([0.0, 0.1]),
    }
    assert finite_values(space["per_device_train_batch_size"]) == [8, 16, 24, 32]
    configs = _search(DistinctSampler(optuna.samplers.TPESampler(seed=0), space, seed=0), space, trials=48)
    assert sorted(configs) == sorted(itertools.product(range(2, 8), (8, 16, 24, 32), (0.0, 0.1)))
    with pytest.raises(ValueError, match=r"\['learning_rate'\] take real numbers"):
        DistinctSampler(optuna.samplers.TPESampler(), {**space, "learning_rate": FloatDistribution(1e-4, 1e-2)})
