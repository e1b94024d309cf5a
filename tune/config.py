"""What a search runs: `TuneArguments`, the search space, the named presets, and the command line that joins them.

A search is four dataclasses: `TuneArguments` (how to search) plus lorasent's `DataArguments`, `ModelArguments`
and `TrainArguments` (what each trial trains). `parse_args` fills them from layers, each overriding the one
before: dataclass defaults < preset (`tune/presets/NAME.yaml`) < `--config FILE.yaml` < command-line flags.
The search space merges parameter by parameter across the layers; a parameter set to null is removed.

Every experiment directory keeps the four dataclasses in `lorasent_search.json`, so `--resume` and the analysis
step rebuild exactly what the search ran.
"""

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lorasent.config import (
    MAX_SEED,
    DataArguments,
    ModelArguments,
    TrainArguments,
    UnreadOptions,
    differs_from_default,
    read_yaml,
    replace,
    to_dict,
    unread_options,
)
from lorasent.errors import ConfigError
from lorasent.metrics import metric_names

if TYPE_CHECKING:  # transformers' parser: the driver needs it, the trial processes (which import this) do not
    from lorasent.cli import ArgumentParser

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "quickstart"
COMMAND_LINE_ONLY = frozenset({"config", "resume"})
SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "none")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
METADATA_FILE = "lorasent_search.json"
# What a URI's path holds as it is (RFC 3986's pchar, less percent-encoding, which pyarrow would decode in the URIs
# lorasent builds and Ray would not in the folder it names)
URI_NAME = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

# The searchable hyperparameters: the dataclass that owns each one, and the type of its values.
SEARCHABLE: dict[str, tuple[type, type]] = {
    "learning_rate": (TrainArguments, float),
    "per_device_train_batch_size": (TrainArguments, int),
    "num_train_epochs": (TrainArguments, int),
    "warmup_ratio": (TrainArguments, float),
    "weight_decay": (TrainArguments, float),
    "lora_r": (ModelArguments, int),
    "lora_alpha": (ModelArguments, int),
    "lora_dropout": (ModelArguments, float),
    "target_modules": (ModelArguments, str),
}

# Options that only say how to reach Ray, or what the console shows; everything else is fixed once an experiment has
# started.
SESSION_FIELDS = frozenset(
    {"resume", "address", "num_cpus", "num_gpus", "include_dashboard", "dashboard_host", "dashboard_port", "verbose"}
)

SEARCH_SPACE_HELP = (
    "Search space as JSON (in a --config file, a YAML mapping) {parameter: {distribution: values}}, merged per "
    "parameter over the preset's space. Distributions: "
    "loguniform: [low, high], uniform: [low, high] (whole numbers for integer parameters, both ends included), "
    "choice: [v1, v2, ...], grid: [v1, v2, ...] (every value; Optuna treats it as a choice). "
    f"Parameters: {', '.join(SEARCHABLE)}. Layers merge per parameter and null removes one, e.g. "
    '--search_space \'{"lora_r": {"choice": [4, 8]}, "lora_dropout": null}\'. '
    "Parameters not searched take their flag's value (e.g. --lora_alpha); a parameter given a value in a later "
    "layer than the space that searches it is fixed at that value (--lora_r 16 over a preset's search of lora_r)."
)


def _json(value: Any, kind: type) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, kind):
        raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {value!r}")
    return kind(value)


class JsonObject:
    """Argparse type of `--search_space '{...}'`: builds a plain dict from JSON (or copies a YAML mapping)."""

    def __new__(cls, value: Any = None) -> dict:  # type: ignore[misc]
        return _json({} if value is None else value, dict)


class JsonList:
    """Argparse type of `--points_to_evaluate '[...]'`: builds a plain list from JSON (or copies a YAML list)."""

    def __new__(cls, value: Any = None) -> list:  # type: ignore[misc]
        return _json([] if value is None else value, list)


@dataclass
class TuneArguments:
    """How to search: presets and config files, search space, searcher, scheduler, resources, Ray and storage."""

    _argument_group_name = "search (Ray Tune)"

    preset: str = field(
        default=DEFAULT_PRESET,
        metadata={"help": "Named starting configuration (tune/presets/NAME.yaml); see the list below."},
    )
    config: str | None = field(
        default=None,
        metadata={"help": "YAML file of option: value pairs (any option of this command); overrides the preset."},
    )
    smoke_test: bool = field(
        default=False,
        metadata={"help": "Run the 'smoke' preset (in place of --preset): a tiny model and a few samples, in seconds."},
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "Continue an interrupted search from its experiment directory (or STORAGE_PATH/latest). "
            "Finished trials are kept, unfinished and errored ones resume from their last checkpoint. Only the "
            "Ray connection options and --verbose may change; the command that started the search, with --resume "
            "added, is taken as it was."
        },
    )
    search_space: JsonObject = field(default_factory=JsonObject, metadata={"help": SEARCH_SPACE_HELP})
    points_to_evaluate: JsonList = field(
        default_factory=JsonList,
        metadata={
            "help": "Configs to try first, as a JSON list of {parameter: value}; searched parameters a point "
            "leaves out take their flag's value. Not for grid search, which tries every point anyway."
        },
    )
    searcher: str = field(
        default="optuna",
        metadata={
            "help": "optuna (TPE, seeded by --search_seed), random (seeded), or grid (every combination of the "
            "choice/grid values once; it takes no --num_samples, --search_seed or --points_to_evaluate). Over a "
            "finite space (choice lists, whole-number ranges), optuna and random propose each configuration once, "
            "and --num_samples is cut to the number of configurations."
        },
    )
    scheduler: str = field(
        default="asha",
        metadata={"help": "asha (stop weak trials early at epoch rungs) or none (run every trial to the end)."},
    )
    num_samples: int = field(default=8, metadata={"help": "Trials to run (optuna and random searchers)."})
    max_concurrent_trials: int | None = field(
        default=None,
        metadata={
            "help": "Trials running at once (None: as many as the cluster's CPUs and GPUs allow; on an autoscaling "
            "cluster, as many as its autoscaler can reach, or every trial at once when it does not say)."
        },
    )
    grace_period: float = field(
        default=1,
        metadata={
            "help": "ASHA: epochs every trial runs before it can be stopped; with --evals_per_epoch N any multiple of "
            "1/N (0.25 with N = 4: the first rung a quarter of an epoch in)."
        },
    )
    reduction_factor: float = field(
        default=2.0, metadata={"help": "ASHA: keep the best 1/reduction_factor of the trials at each rung."}
    )
    max_epochs: int | None = field(
        default=None,
        metadata={
            "help": "Most epochs a trial runs, and ASHA's budget: caps num_train_epochs (None, or more than the "
            "largest num_train_epochs of the search: that)."
        },
    )
    metric: str = field(
        default="accuracy",
        metadata={"help": "Validation metric to optimise: accuracy, f1_macro, loss, precision_macro, ..."},
    )
    mode: str | None = field(
        default=None,
        metadata={"help": "max or min: whether a larger metric is better (None: min for a loss, max otherwise)."},
    )
    search_seed: int = field(
        default=0, metadata={"help": "Seed of the searcher (Optuna's TPE sampler, random search)."}
    )
    cpus_per_trial: float = field(
        default=1.0, metadata={"help": "CPUs reserved per trial; torch uses this many threads unless --torch_threads."}
    )
    gpus_per_trial: float | None = field(
        default=None,
        metadata={
            "help": "GPUs per trial; a fraction packs trials onto one GPU (0.25: four per GPU). None: on a local "
            "Ray's GPUs, as many trials per GPU as fit its memory (up to 8), from one trial's estimated footprint "
            "(largest batch and LoRA rank, max_length, eval batch); on a cluster's GPUs 0.25; without GPUs 0. An "
            "autoscaling cluster that does not say which nodes it can add asks you to choose. A trial that asks for "
            "a GPU and sees none fails at once."
        },
    )
    fused_trials: bool = field(
        default=False,
        metadata={
            "help": "Train the trials that run at once on one shared copy of the base model per GPU (a trial engine): "
            "each step is one forward and backward over all their batches, each row through its own trial's LoRA "
            "adapter and head, so small-batch trials fill the GPU instead of taking turns on it. Trials stay Tune "
            "trials (ASHA, Optuna, checkpoints, --resume); target_modules cannot be searched, precision is bf16 or "
            "fp32. Trials at once: --max_concurrent_trials, else per GPU 1 / --gpus_per_trial or as many as fit its "
            "memory with the base model counted once (up to 32, and no more than the search holds), else 4 on CPUs "
            "(one CPU engine also with --gpus_per_trial 0)."
        },
    )
    max_failures: int = field(
        default=2, metadata={"help": "Retries of a failed trial, each from its last checkpoint (FailureConfig)."}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "LoRA-adapter checkpoints kept per trial: the best by --metric, plus the latest."}
    )
    storage_path: str = field(
        default="runs/tune",
        metadata={
            "help": "Where experiments are written: a local folder (made absolute; a `latest` link points at the "
            "newest experiment), or a URI (s3://, gs://) / shared folder for multi-node clusters."
        },
    )
    name: str | None = field(
        default=None,
        metadata={
            "help": "Experiment directory name under storage_path (None: PRESET-YYYYmmdd-HHMMSS, with -2, -3, ... "
            "after it for searches started in the same second)."
        },
    )
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join: 'auto', 'HOST:PORT' or 'ray://HOST:10001' (default: $RAY_ADDRESS, "
            "else start a local Ray). A cluster with token authentication needs its token (`ray get-auth-token` on "
            "the head) in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; RAY_AUTH_MODE=token is then set for you unless "
            "RAY_AUTH_MODE is set. On an autoscaling cluster the plan follows --cpus_per_trial/--gpus_per_trial, "
            "not the nodes up at start."
        },
    )
    num_cpus: int | None = field(
        default=None,
        metadata={"help": "CPUs of a local Ray (None: those this process may use, within a container's CPU quota)."},
    )
    num_gpus: int | None = field(default=None, metadata={"help": "GPUs of a local Ray (None: all visible ones)."})
    include_dashboard: bool | None = field(
        default=None,
        metadata={"help": "Start Ray's dashboard with a local Ray (None: on); a cluster's is its head's own."},
    )
    dashboard_host: str = field(
        default="127.0.0.1",
        metadata={"help": "Interface the local dashboard listens on; anything but loopback exposes it."},
    )
    dashboard_port: int | None = field(
        default=None, metadata={"help": "Dashboard port (None: 8265, or the next free one)."}
    )
    reuse_actors: bool = field(
        default=True, metadata={"help": "Run the next trial in a finished trial's process, saving its start-up."}
    )
    verbose: int = field(
        default=1, metadata={"help": "Console output: 0 silent, 1 trial table, 2 every result and the trials' logs."}
    )

    def __post_init__(self) -> None:
        self.mode = self.mode or natural_mode(self.metric)
        for name, value, valid in (
            ("searcher", self.searcher, SEARCHERS),
            ("scheduler", self.scheduler, SCHEDULERS),
            ("mode", self.mode, ("max", "min")),
        ):
            if value not in valid:
                raise ConfigError(f"Unknown {name} {value!r}. Valid: {', '.join(valid)}.")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}.")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials must be >= 1, or unset to use the whole cluster.")
        if not (math.isfinite(self.grace_period) and self.grace_period > 0):
            raise ConfigError(f"grace_period must be > 0 epochs, got {self.grace_period}.")
        if not self.reduction_factor > 1:
            raise ConfigError(f"reduction_factor must be > 1, got {self.reduction_factor}.")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be >= 1, got {self.max_epochs}.")
        if not (math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise ConfigError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}.")
        gpus = self.gpus_per_trial
        if gpus is not None and not (gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
            raise ConfigError(
                f"gpus_per_trial must be a fraction in [0, 1] or a whole number, got {gpus}. Use e.g. 0.25 to "
                "pack four trials onto each GPU."
            )
        if self.max_failures < 0 or self.keep_checkpoints < 1:
            raise ConfigError("max_failures must be >= 0 and keep_checkpoints >= 1.")
        if self.name is not None and (self.name in ("", ".", "..", "latest") or "/" in self.name):
            raise ConfigError(
                f"name {self.name!r} is not allowed: give a plain folder name other than 'latest' ('.' and '..' would "
                "put the experiment in the storage folder itself, or outside it)."
            )
        # Each of these was Ray's or Optuna's traceback once the checks had passed, or (--num_cpus 0) every CPU
        if not 0 <= self.search_seed <= MAX_SEED:
            raise ConfigError(
                f"search_seed must lie in [0, 2**32 - 1] ({MAX_SEED}), got {self.search_seed}. Pass e.g. "
                "--search_seed 42."
            )
        if (self.num_cpus is not None and self.num_cpus < 1) or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError(
                f"num_cpus must be >= 1 and num_gpus >= 0, got {self.num_cpus} and {self.num_gpus}. Leave them unset "
                "to use all of this machine's."
            )
        if self.dashboard_port is not None and not 1 <= self.dashboard_port <= 65535:
            raise ConfigError(
                f"dashboard_port must be a port number in [1, 65535], got {self.dashboard_port}. Leave it unset for "
                "8265, or the next free one."
            )
        if self.verbose not in (0, 1, 2):
            raise ConfigError(f"verbose must be 0, 1 or 2, got {self.verbose}.")
        if not self.storage_path:
            raise ConfigError("storage_path is empty. Give a folder (e.g. runs/tune) or a URI (s3://bucket/tune).")
        if self.name is not None and "://" in self.storage_path and not URI_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name {self.name!r} cannot be part of the storage URI {self.storage_path}: a URI holds letters, "
                "digits and -._~!$&'()*+,;=:@ as they are, and a space, '#', '?', '%' or a non-ASCII letter would "
                "break or change the experiment's address. Pick a name of those, or use a local --storage_path."
            )
        parse_search_space({k: v for k, v in self.search_space.items() if v is not None})  # None: removed by a layer


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: a distribution and its bounds or values."""

    name: str
    distribution: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (low, high) for loguniform/uniform; the candidates for choice/grid

    @property
    def is_range(self) -> bool:
        return self.distribution in ("loguniform", "uniform")


SearchSpace = dict[str, ParamSpec]


class SearchArguments(NamedTuple):
    """The four dataclasses of one search."""

    tune: TuneArguments
    data: DataArguments
    model: ModelArguments
    train: TrainArguments


def typed_value(name: str, value: Any) -> Any:
    """`value` as the type parameter `name` takes (YAML reads 1e-4 as a string, so numeric strings are accepted)."""
    kind = SEARCHABLE[name][1]
    try:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ValueError
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return float(value) if kind is float else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}. Give {kind.__name__} values.") from None


def parse_search_space(raw: Mapping[str, Any]) -> SearchSpace:
    """Validate the search-space mapping's shape and value types; values are checked against the dataclasses later."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"search_space must be a mapping {{parameter: {{distribution: values}}}}, got {raw!r}.")
    space: SearchSpace = {}
    for name, spec in raw.items():
        if name not in SEARCHABLE:
            raise ConfigError(f"search_space: unknown parameter {name!r}. Searchable: {', '.join(SEARCHABLE)}.")
        if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(
                f"search_space.{name}: expected one of {{{'|'.join(DISTRIBUTIONS)}: values}}, got {spec!r}. "
                f'Example: {{"{name}": {{"choice": [...]}}}}.'
            )
        distribution, values = next(iter(spec.items()))
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"search_space.{name}.{distribution}: expected a non-empty list, got {values!r}.")
        values = tuple(typed_value(name, v) for v in values)
        if distribution in ("loguniform", "uniform"):
            if SEARCHABLE[name][1] is str or len(values) != 2 or not values[0] < values[1]:
                raise ConfigError(
                    f"search_space.{name}.{distribution}: expected numeric [low, high] with low < high, got "
                    f"{list(values)}."
                )
            if distribution == "loguniform" and values[0] <= 0:
                raise ConfigError(f"search_space.{name}.loguniform: the lower bound must be > 0, got {values[0]}.")
        elif len(set(values)) < len(values):  # a grid would train each repeat again; a choice would weigh it double
            repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
            raise ConfigError(
                f"search_space.{name}.{distribution}: {', '.join(map(repr, repeated))} listed more than once in "
                f"{list(values)}. List each value once."
            )
        space[name] = ParamSpec(name, distribution, values)
    return space


def configurations(space: SearchSpace) -> int | None:
    """How many distinct configurations the space holds (choices, and the whole numbers of an integer parameter's
    range), or None where a parameter takes real numbers from a range."""
    counts = []
    for name, spec in space.items():
        if spec.is_range and SEARCHABLE[name][1] is not int:
            return None
        counts.append(spec.values[1] - spec.values[0] + 1 if spec.is_range else len(spec.values))
    return math.prod(counts)


def distinct_configurations(tune_args: TuneArguments, space: SearchSpace) -> int | None:
    """How many configurations the searcher draws from, each at most once, or None where it may repeat one: Optuna
    over a finite space, and random search over one without grid lists (Ray expands those itself)."""
    if tune_args.searcher == "random" and any(spec.distribution == "grid" for spec in space.values()):
        return None
    return configurations(space) if tune_args.searcher in ("optuna", "random") else None


def merge_search_spaces(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones parameter by parameter; a parameter set to None is removed."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for name, spec in (layer or {}).items():
            if spec is None:
                merged.pop(name, None)
            else:
                merged[name] = spec
    return merged


def apply_trial_config(
    model_args: ModelArguments, train_args: TrainArguments, config: Mapping[str, Any]
) -> tuple[ModelArguments, TrainArguments]:
    """The arguments of one trial: the base arguments with the trial's sampled hyperparameters put in."""
    unknown = sorted(set(config) - set(SEARCHABLE))
    if unknown:
        raise ConfigError(f"Trial config has unknown parameter(s) {unknown}. Searchable: {', '.join(SEARCHABLE)}.")
    per_owner: dict[type, dict[str, Any]] = {ModelArguments: {}, TrainArguments: {}}
    for name, value in config.items():
        per_owner[SEARCHABLE[name][0]][name] = value
    return replace(model_args, **per_owner[ModelArguments]), replace(train_args, **per_owner[TrainArguments])


def natural_mode(metric: str) -> str:
    """min for a loss, max for a score: transformers' rule for greater_is_better."""
    return "min" if metric.endswith("loss") else "max"


def check_metric(tune_args: TuneArguments, data_args: DataArguments) -> None:
    """Refuse a metric no trial reports, or a mode that searches for its worst value, before any trial has run."""
    valid = [*metric_names(data_args.label_names), "train_loss"]
    if tune_args.metric not in valid:
        raise ConfigError(f"Unknown metric {tune_args.metric!r}. Trials report: {', '.join(valid)}.")
    natural = natural_mode(tune_args.metric)
    if tune_args.mode != natural:
        better = "smaller" if natural == "min" else "larger"
        raise ConfigError(
            f"mode {tune_args.mode!r} would search for the worst {tune_args.metric!r}, which is better {better}. Use "
            f"--mode {natural}, or leave --mode unset to have it follow the metric."
        )


# ---------------------------------------------------------------------------------------------------------------
# Presets and YAML


# Where a search's models go instead of lorasent.train's --output_dir (its refusal and --help say it)
OUTPUT_ELSEWHERE = "a search writes into --storage_path/--name; `python -m analysis retrain` writes the final model"


def _refuse_ignored_options(tune_args: TuneArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """Refuse an option of `python -m lorasent.train` that a search would silently replace."""
    replaced = {"output_dir": OUTPUT_ELSEWHERE}
    if tune_args.metric in metric_names(data_args.label_names):  # (train_loss is no validation metric: it stays)
        replaced["metric_for_best_model"] = f"--metric ({tune_args.metric}) also picks each trial's best epoch"
    for name, instead in replaced.items():
        if differs_from_default(train_args, name):
            raise ConfigError(f"--{name} has no effect in a search: {instead}.")


def _refuse_unused_options(args: SearchArguments, preset: str | None, given: Mapping[str, int]) -> None:
    """Refuse an option the user gave that the search would not read, as another setting decides.

    `given`: the layer each option was set in, 1 the config file, 2 the command line; a preset's values are the
    preset's own. A flag may turn off what the config file set up (`--scheduler none` over its ASHA settings), but an
    option given in the setting's layer or a later one is refused, not ignored. `preset`: the preset asked for.
    """
    t = args.tune
    asha = "it is an option of ASHA, and none runs every trial to the end"
    grid_runs = "it runs every combination of the space once, in order"
    unused = [
        UnreadOptions(("preset",), "smoke_test", True, t.smoke_test and preset not in (None, "smoke"),
                      "it runs the 'smoke' preset instead", f"drop --smoke_test to run preset {preset!r}"),
        UnreadOptions(("grace_period", "reduction_factor"), "scheduler", t.scheduler, t.scheduler != "asha", asha,
                      "use --scheduler asha"),
        UnreadOptions(("num_samples", "search_seed", "points_to_evaluate"), "searcher", t.searcher,
                      t.searcher == "grid", grid_runs, "use --searcher optuna or random"),
        UnreadOptions(("dashboard_port", "dashboard_host"), "include_dashboard", False, t.include_dashboard is False,
                      "no dashboard starts", "drop --include_dashboard false"),
        UnreadOptions(("torch_threads", "dataloader_num_workers"), "fused_trials", True, t.fused_trials,
                      "the trial engines set their own threads and gather batches without a DataLoader",
                      "search without --fused_trials"),
        *unread_options(args.data, args.train),
    ]  # fmt: skip
    for rule in unused:
        refused = [
            name for name in rule.options if rule.unread and given.get(name, 0) >= max(given.get(rule.setting, 0), 1)
        ]
        if refused:
            raise rule.refusal(refused[0])


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of preset `name`: one of `preset_names()`, never a path (an experiment is named after its preset)."""
    if name not in preset_names():
        raise ConfigError(f"Unknown preset {name!r}. Presets: {', '.join(preset_names())}.")
    return PRESET_DIR / f"{name}.yaml"


def _preset_summary(name: str) -> str:
    first = preset_path(name).read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").strip()


# ---------------------------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each option's default, and the epilog's preset list and examples as written."""


def build_parser() -> "ArgumentParser":
    """The parser of `python tune/run.py`: TuneArguments plus the three lorasent dataclasses."""
    from lorasent.cli import ArgumentParser

    presets = "\n".join(f"  {name:<11} {_preset_summary(name)}" for name in preset_names())
    parser = ArgumentParser(
        (TuneArguments, DataArguments, ModelArguments, TrainArguments),
        prog="python tune/run.py",
        description="Ray Tune search over LoRA sentiment classifiers: parallel trials, ASHA early stopping, "
        "Optuna TPE. Values come from: defaults < --preset < --config YAML < flags.",
        epilog=f"presets (tune/presets/NAME.yaml; copy one as a --config starting point):\n{presets}\n\n"
        "examples:\n"
        "  python tune/run.py                                  # quick-start search, offline, CPU\n"
        "  python tune/run.py --preset seed --gpus_per_trial 0.25\n"
        "  python tune/run.py --config my.yaml --num_samples 32 --address auto\n"
        '  python tune/run.py --search_space \'{"lora_r": {"choice": [4, 8, 16]}}\'\n'
        "  python tune/run.py --resume runs/tune/latest",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    actions = _dests(parser)  # two of lorasent.train's options, which a search replaces
    actions["output_dir"].help = f"Refused in a search: {OUTPUT_ELSEWHERE}."
    actions["metric_for_best_model"].help = (
        "Validation metric that picks each trial's best epoch where --metric is train_loss (no validation metric); "
        "refused otherwise, as --metric picks it."
    )
    return parser


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _coerce_layer(parser: "ArgumentParser", values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check a preset/YAML mapping's keys and read its values as the same flags would be (`config_defaults`: a
    null, list or mapping an option does not take is refused, naming it); JSON options take their structure."""
    actions = _dests(parser)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}. Valid keys: {', '.join(sorted(actions))}.")
    misplaced = sorted(set(values) & COMMAND_LINE_ONLY)
    if misplaced:  # they choose the layers (or the saved experiment), so a layer cannot set them
        flags = " / ".join(f"--{key}" for key in misplaced)
        raise ConfigError(f"{source}: {misplaced} can only be given on the command line ({flags}).")
    structured = {key for key in values if actions[key].type in (JsonObject, JsonList)}
    coerced = parser.config_defaults({k: v for k, v in values.items() if k not in structured}, source, SEARCHABLE)
    for key in structured:
        try:
            coerced[key] = actions[key].type(values[key])
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{source}: {key} is invalid ({e}). See `python tune/run.py --help`.") from None
    return coerced


def _pre_parse(argv: Sequence[str]) -> argparse.Namespace:
    """Read the options that decide which layers apply, before the full parse."""
    from transformers.hf_argparser import string_to_bool

    from lorasent.cli import PreParser

    pre = PreParser(prog="python tune/run.py", add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    pre.add_argument("--resume")
    pre.add_argument("--smoke_test", "--smoke-test", nargs="?", const=True, type=string_to_bool)
    known, _ = pre.parse_known_args(list(argv))
    return known


def _parse(parser: "ArgumentParser", argv: Sequence[str]) -> SearchArguments:
    return SearchArguments(*parser.parse_dataclasses(argv))


def _flags_given(parser: "ArgumentParser", argv: Sequence[str]) -> set[str]:
    """The options `argv` sets, as argparse reads it without abbreviations: a word that names an option (or
    `--option=value`) is that option, never another's value."""
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {dests[arg.partition("=")[0]] for arg in argv if arg.partition("=")[0] in dests}


def parse_args(argv: Sequence[str] | None = None) -> SearchArguments:
    """Arguments of `python tune/run.py`: defaults < preset < YAML < flags, or a saved experiment's for --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _pre_parse(argv)
    if pre.resume:
        return _resume_args(build_parser(), argv, pre.resume)
    return _new_search_args(argv, pre)


def _new_search_args(argv: Sequence[str], pre: argparse.Namespace) -> SearchArguments:
    """A new search's arguments: the preset's, then the config file's, then the flags (`pre`: `_pre_parse(argv)`)."""
    from transformers.hf_argparser import string_to_bool

    parser = build_parser()
    config = _coerce_layer(parser, read_yaml(pre.config), f"config file {pre.config}") if pre.config else {}
    given = {**dict.fromkeys(config, 1), **dict.fromkeys(_flags_given(parser, argv), 2)}  # see _refuse_unused_options
    smoke_test = pre.smoke_test if pre.smoke_test is not None else string_to_bool(config.get("smoke_test", False))
    asked = pre.preset if pre.preset is not None else config.get("preset")
    if asked is not None:
        preset_path(asked)  # known, though --smoke-test replaces it
    preset = "smoke" if smoke_test else (asked or DEFAULT_PRESET)
    layers = [_coerce_layer(parser, read_yaml(preset_path(preset)), f"preset {preset!r}"), config]
    spaces = [layer.pop("search_space", None) for layer in layers]
    defaults: dict[str, Any] = {}
    for layer in layers:
        defaults.update(layer)
    parser.set_defaults(**{**defaults, "preset": preset})
    args = _parse(parser, argv)
    spaces.append(args.tune.search_space)
    pinned = _pinned(spaces, given)
    tune_args = replace(
        args.tune,
        preset=preset,
        search_space=merge_search_spaces(*spaces, dict.fromkeys(pinned)),
        points_to_evaluate=_without(args.tune.points_to_evaluate, pinned, given.get("points_to_evaluate", 0)),
    )
    check_metric(tune_args, args.data)
    _refuse_ignored_options(tune_args, args.data, args.train)
    args = args._replace(tune=tune_args)
    _refuse_unused_options(args, asked, given)
    return args


def _pinned(spaces: Sequence[Mapping[str, Any] | None], given: Mapping[str, int]) -> dict[str, int]:
    """The searched parameters that a later layer than their space's gives a value: fixed at it, since a later layer
    overrides an earlier one (`--lora_r 16` over the preset's search of lora_r was ignored). {name: its layer}.

    `spaces`: the search spaces of the preset, the config file and the flags (layers 0, 1, 2); `given`: the layer
    each option was given in (1 the config file, 2 the flags). A value in the same layer as the space stays what it
    was: the value a point of `--points_to_evaluate` that leaves the parameter out takes.
    """
    searched_in = {  # the last layer that gives each searched parameter its space
        name: max(layer for layer, space in enumerate(spaces) if (space or {}).get(name) is not None)
        for name in merge_search_spaces(*spaces)
    }
    return {name: given[name] for name, layer in searched_in.items() if given.get(name, 0) > layer}


def _without(points: list[Any], pinned: Mapping[str, int], layer: int) -> list[Any]:
    """`points` (given in `layer`) without the parameters pinned in a later layer (a point left empty is dropped);
    a point that sets one pinned in its own layer or a later one is refused."""
    kept = []
    for i, point in enumerate(points):
        if isinstance(point, Mapping):
            fixed = sorted(name for name in point if name in pinned and pinned[name] <= layer)
            if fixed:
                raise ConfigError(
                    f"points_to_evaluate[{i}] sets {fixed[0]}, which --{fixed[0]} fixes: a value given over an earlier "
                    f"layer's search of a parameter fixes it. Drop {fixed[0]} from the point, or drop --{fixed[0]}."
                )
            point = {name: value for name, value in point.items() if name not in pinned}
            if not point:
                continue
        kept.append(point)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Saved arguments of an experiment (for --resume and the analysis step)


def experiment_metadata(args: SearchArguments, resources: Mapping[str, float] | None = None) -> str:
    """The JSON saved as `lorasent_search.json` in the experiment directory: the four argument sets, plus the
    per-trial `resources` ({"cpu": ..., "gpu": ...}) the search resolved, since `gpus_per_trial` stays None when
    it was automatic."""
    record: dict[str, Any] = {"version": 1, **{k: to_dict(v) for k, v in args._asdict().items()}}
    if resources is not None:
        record["resources"] = dict(resources)
    return json.dumps(record, indent=2)


def arguments_from_metadata(text: str, source: str) -> SearchArguments:
    """Rebuild (and re-validate) the four dataclasses from a saved `lorasent_search.json`.

    An automatic `gpus_per_trial` comes back as the share the search resolved, so a resumed search (perhaps on
    another cluster) gives its trials what the first run gave them.
    """
    try:
        saved = json.loads(text)
        tune_values = saved["tune"]
        if tune_values.get("gpus_per_trial") is None and "resources" in saved:
            tune_values = {**tune_values, "gpus_per_trial": saved["resources"]["gpu"]}
        return SearchArguments(
            TuneArguments(**tune_values),
            DataArguments(**saved["data"]),
            ModelArguments(**saved["model"]),
            TrainArguments(**saved["train"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{source} is not a readable lorasent search record ({type(e).__name__}: {e}). Was this experiment "
            "started by `python tune/run.py`?"
        ) from None


def load_search_arguments(experiment_path: str) -> SearchArguments:
    """The four dataclasses an experiment ran with, from its `lorasent_search.json` (local folder or URI)."""
    from tune.cluster import read_experiment_file

    text = read_experiment_file(experiment_path, METADATA_FILE)
    return arguments_from_metadata(text, f"{experiment_path}/{METADATA_FILE}")


def _resume_args(parser: "ArgumentParser", argv: Sequence[str], path: str) -> SearchArguments:
    """The saved experiment's arguments, with only the Ray connection options taken from the command line.

    Other options may be given only as they were: over the saved values, or as the first run's whole command line
    (presets, config file and search-space layers read as a new search reads them), so that the command that
    started a search, with `--resume` added, continues it.
    """
    saved = load_search_arguments(path)
    defaults: dict[str, Any] = {}
    for args in saved:
        defaults.update(to_dict(args))
    parser.set_defaults(**defaults)
    given = _parse(parser, argv)
    changed = _changed_options(saved, given)
    if changed:
        first_run = _without_resume(argv)
        try:
            again = _new_search_args(first_run, _pre_parse(first_run))
        except ConfigError:  # not a command line a new search takes either: the options given are what changed
            again = None
        again_changed = _changed_options(saved, again) if again is not None else changed
        if len(again_changed) < len(changed):
            given, changed = again, again_changed
    if changed:
        raise ConfigError(
            f"--resume continues the experiment exactly as it was started; these options cannot change: {changed}. "
            f"Only {', '.join(sorted(SESSION_FIELDS - {'resume'}))} may. Start a new search to change the others."
        )
    session = {name: getattr(given.tune, name) for name in SESSION_FIELDS}
    return saved._replace(tune=dataclasses.replace(saved.tune, **{**session, "resume": path}))


def _changed_options(saved: SearchArguments, given: SearchArguments) -> list[str]:
    """Options of `given` that would run the experiment otherwise than `saved` records it. The record holds what the
    first run resolved: the trials it cut --num_samples to, and the GPU share it chose for an automatic
    --gpus_per_trial, which the options that asked for them still match."""
    changed = sorted(
        f.name
        for old, new in zip(saved, given, strict=True)
        for f in dataclasses.fields(old)
        if f.name not in SESSION_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    )
    if "num_samples" in changed and _runs_the_recorded_trials(saved.tune, given.tune):
        changed.remove("num_samples")
    if "gpus_per_trial" in changed and given.tune.gpus_per_trial is None:
        changed.remove("gpus_per_trial")
    return changed


def _without_resume(argv: Sequence[str]) -> list[str]:
    """`argv` less its `--resume PATH` (or `--resume=PATH`)."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            rest.append(arg)
    return rest


def _runs_the_recorded_trials(saved: TuneArguments, given: TuneArguments) -> bool:
    """Whether `given`'s --num_samples runs the trials the experiment recorded. A search over a finite space records
    the count it cut --num_samples to (the space's size), so its original command line, given again, asks for more."""
    held = distinct_configurations(saved, parse_search_space(saved.search_space))
    return held is not None and min(given.num_samples, held) == saved.num_samples
