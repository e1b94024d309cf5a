"""The encoder with its LoRA adapter: which modules get LoRA, building it, and saving / loading model folders.

A model folder (final model or per-epoch checkpoint) holds the peft adapter (`adapter_model.safetensors`,
`adapter_config.json`), the tokenizer and `lorasent.json` (label names, the three argument dataclasses and
metrics). The base weights are never copied: `load_model_dir` rebuilds the base from `lorasent.json`'s
`model_name_or_path`, so an adapter is megabytes, and `offline:` or hub names resolve on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from huggingface_hub import constants
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import _find_minimal_target_modules
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

import lorasent
from lorasent.assets import resolve_model_path
from lorasent.config import DataArguments, ModelArguments, Precision, TrainArguments
from lorasent.errors import CheckpointError, ConfigError, LorasentError
from lorasent.hub import WEIGHT_FILES
from lorasent.paths import META_FILE, atomic_dir, atomic_write_text, check_writable

logger = logging.getLogger(__name__)
# peft 0.21 asks transformers 5 for a renamed attribute on every wrap; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

TARGET_PRESETS = ("auto", "attention", "all-linear")
# peft's defaults per architecture, plus encoders it does not list (DistilBERT names its projections q_lin/v_lin).
AUTO_TARGETS: dict[str, list[str]] = {
    **{k: v for k, v in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items() if isinstance(v, list)},
    "distilbert": ["q_lin", "v_lin"],
    "albert": ["query", "value"],
    "camembert": ["query", "value"],
    "mpnet": ["q", "v"],
}
_LORA_LAYER_TYPES = (torch.nn.Linear, Conv1D, torch.nn.Embedding)
_NOISY_LOAD_LOGGERS = ("modeling_utils", "distributed.tensor_parallel")
_FIX_CHECKPOINT = "Re-run the training that produced it, or pick another checkpoint or model folder."


# ---------------------------------------------------------------------------------------------- target modules


def head_module_names(model: PreTrainedModel) -> list[str]:
    """Top-level modules outside the pretrained encoder: the task head, newly initialised, so trained in full."""
    body = getattr(model, model.base_model_prefix, None)
    return [
        name
        for name, child in model.named_children()
        if child is not body and any(True for _ in child.parameters(recurse=True))
    ]


def _lora_capable_modules(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    head = head_module_names(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _LORA_LAYER_TYPES) and name.split(".", 1)[0] not in head
    }


def _adapts(target: str, module_name: str) -> bool:
    """Whether LoRA target name `target` adapts the module `module_name`: the name, or its last dotted parts, as peft
    matches a plain name."""
    return module_name == target or module_name.endswith(f".{target}")


def _valid_names_hint(capable: dict[str, torch.nn.Module]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in capable})
    return f"valid module names of this model: {', '.join(leaves)} (or the presets {', '.join(TARGET_PRESETS)})"


def resolve_target_modules(model: PreTrainedModel, spec: str) -> list[str]:
    """The LoRA `target_modules` for `spec`: a preset ('auto', 'attention', 'all-linear') or a comma list.

    Presets become explicit, minimal module-name suffixes, so `adapter_config.json` says what was adapted.

    Unknown names are refused here, with the names the model does have, instead of by peft after loading.
    """
    spec = spec.strip()
    capable = _lora_capable_modules(model)
    model_type = model.config.model_type
    if spec in ("attention", "all-linear"):
        # Linear layers of the encoder (not the head); 'attention' keeps those on a path through an attention
        # block: q/k/v and the attention output projection.
        selected = {
            name
            for name, module in capable.items()
            if isinstance(module, (torch.nn.Linear, Conv1D))
            and (spec == "all-linear" or any("attention" in p.lower() or "attn" in p.lower() for p in name.split(".")))
        }
        if not selected:
            raise ConfigError(
                f"Found no {spec} layers in model type '{model_type}'. Set target_modules to a comma-separated "
                f"list; {_valid_names_hint(capable)}."
            )
        others = {name for name, _ in model.named_modules() if name and name not in selected}
        return sorted(_find_minimal_target_modules(selected, others))
    if spec == "auto":
        if model_type not in AUTO_TARGETS:
            raise ConfigError(
                f"No default LoRA target modules are known for model type '{model_type}'. Set target_modules to "
                f"'attention', 'all-linear' or a comma-separated list; {_valid_names_hint(capable)}."
            )
        names = AUTO_TARGETS[model_type]
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [n for n in names if not any(_adapts(n, full) for full in capable)]
    if unknown:
        raise ConfigError(
            f"Unknown LoRA target module(s) {unknown} for model type '{model_type}'; {_valid_names_hint(capable)}."
        )
    return names


def check_lora_rank(model: PreTrainedModel, target_modules: Iterable[str], rank: int) -> None:
    """Refuse a LoRA rank above the width of every layer in `target_modules`, before peft builds it: a rank-r update
    of an m x n weight has rank at most min(m, n), so a larger r only adds parameters and time (a rank of 10**20 was
    a crash inside torch; 100,000 on the tiny model, 32 wide, trained 25.6M LoRA parameters)."""
    capable = _lora_capable_modules(model)
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for name in sorted(set(target_modules)):
        shapes[name] = {tuple(module.weight.shape) for full, module in capable.items() if _adapts(name, full)}
    limit = max((min(shape) for found in shapes.values() for shape in found), default=rank)
    if rank <= limit:
        return
    by_shapes: dict[str, list[str]] = {}
    for name, found in shapes.items():
        by_shapes.setdefault(", ".join(" x ".join(map(str, shape)) for shape in sorted(found)), []).append(name)
    layers = "; ".join(f"{', '.join(names)}: {described}" for described, names in by_shapes.items())
    raise ConfigError(
        f"LoRA rank {rank} exceeds the width of every layer it adapts in this {model.config.model_type} model "
        f"({layers} weights): a rank-r update of an m x n weight has rank at most min(m, n), so a rank above {limit} "
        f"only adds parameters and time. Set lora_r to at most {limit}."
    )


# ---------------------------------------------------------------------------------------------- build


def _check_weights(path: str) -> None:
    """A local model folder must hold safetensors weights: refused before any data is tokenised or any trial starts,
    where transformers would fail at the first load (in every trial, after its retries)."""
    folder = Path(path)
    if not folder.is_dir() or any((folder / name).is_file() for name in WEIGHT_FILES):
        return
    pickles = ", ".join(sorted(p.name for p in folder.glob("*.bin")))
    raise ConfigError(
        f"Model folder {folder} holds no model.safetensors{f' (only {pickles})' if pickles else ''}: "
        "lorasent loads weights from safetensors only, never from pickle files, which can run code when loaded. "
        "Convert a checkpoint you trust once (`AutoModelForSequenceClassification.from_pretrained(folder)"
        ".save_pretrained(folder)` writes model.safetensors), or use a folder that holds model.safetensors."
    )


def _tokenizer_pad_token_id(path: str, trust_remote_code: bool) -> int | None:
    """The pad token of the model's tokenizer, for a config that names none (GPT-2, Llama, ...): their classifiers
    find each text's last token by it, and `Trainer` copies it into the config before training, so a model built
    for prediction or an estimate needs it too."""
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).pad_token_id


def load_base(model_args: ModelArguments, label_names: list[str]) -> PreTrainedModel:
    """The pretrained encoder with a fresh classification head for `label_names`.

    Attention is left to transformers' default, which is SDPA wherever the architecture supports it and eager
    otherwise; weights load from safetensors only.
    """
    path = resolve_model_path(model_args.model_name_or_path)
    _check_weights(path)
    # transformers' load report calls the new head MISSING and asks for training, on every load (prediction too,
    # where the adapter's head replaces it right after), and DistilBERT's tensor-parallel plan lists layers "not
    # sharded" where nothing is sharded: only encoder weights that are missing are news.
    quieted = [logging.getLogger(f"transformers.{name}") for name in _NOISY_LOAD_LOGGERS]
    levels = [log.level for log in quieted]
    for log in quieted:
        log.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            # id2label sets the number of labels; num_labels as well would warn on every load of a checkpoint whose
            # config names another number of labels.
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            # Set now, not by the first forward pass: under torch.compile that first pass changing the config
            # fails a guard and compiles the whole model a second time.
            problem_type="single_label_classification",
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=True,
            ignore_mismatched_sizes=True,  # a checkpoint fine-tuned on other labels gets a new head
            output_loading_info=True,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = _tokenizer_pad_token_id(path, model_args.trust_remote_code)
        if Path(path).is_relative_to(constants.HF_HUB_CACHE):
            # A hub model read from its cached snapshot is named as when it downloads, by its hub name (peft writes
            # it into adapter_config.json and the model card): the snapshot path is one machine's cache.
            model.name_or_path = model.config.name_or_path = model_args.model_name_or_path
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"Cannot load the model '{model_args.model_name_or_path}' ({path}): {e}. Use a folder with "
            "config.json and model.safetensors (lorasent loads safetensors only), a hub name, or "
            "'offline:all-MiniLM-L6-v2'; set trust_remote_code only for model code you trust."
        ) from e
    finally:
        for log, level in zip(quieted, levels, strict=True):
            log.setLevel(level)
    head = head_module_names(model)
    missing = sorted(key for key in info["missing_keys"] if key.split(".", 1)[0] not in head)
    if missing:
        logger.warning(
            "%s has no weights for %d encoder parameter(s), which start at random: %s",
            model_args.model_name_or_path,
            len(missing),
            ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
        )
    return model


def build_model(
    model_args: ModelArguments, label_names: list[str], *, frozen_dtype: torch.dtype | None = None
) -> PeftModel:
    """The encoder wrapped by peft LoRA; LoRA on the target modules, the classification head trained in full.

    `frozen_dtype` (e.g. bf16 under bf16 autocast) stores the frozen Linear and Embedding weights in that dtype.
    """
    base = load_base(model_args, label_names)
    model = add_lora(base, model_args)
    if frozen_dtype is not None:
        store_frozen_weights_in(model, frozen_dtype)
    trainable, total = trainable_parameters(model)
    logger.info(
        "LoRA r=%d on %s: %s of %s parameters trainable (%.2f%%), attention: %s",
        model_args.lora_r,
        model.peft_config["default"].target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        base.config._attn_implementation,
    )
    return model


def lora_config(base: PreTrainedModel, model_args: ModelArguments) -> LoraConfig:
    """peft's LoRA config for `base`: LoRA on the target modules, the classification head trained in full."""
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=resolve_target_modules(base, model_args.target_modules),
        modules_to_save=head_module_names(base),
    )


def add_lora(base: PreTrainedModel, model_args: ModelArguments) -> PeftModel:
    """`base` wrapped by peft as `lora_config` says."""
    config = lora_config(base, model_args)
    check_lora_rank(base, config.target_modules, config.r)
    return get_peft_model(base, config)


def meta_model(model_args: ModelArguments, num_labels: int = 2) -> PreTrainedModel:
    """The base model on the meta device: every module, shape and dtype from its config, no weights or memory.

    For checks before anything is loaded (target modules, memory footprint); reads only config.json, and the
    tokenizer's pad token where the config names none.
    """
    trust = model_args.trust_remote_code
    path = resolve_model_path(model_args.model_name_or_path)
    _check_weights(path)
    try:
        labels = {i: f"LABEL_{i}" for i in range(num_labels)}  # as load_base: no num_labels, no warning
        # The loss load_base's model computes (DeBERTa's own default picks the labelled rows with `nonzero`)
        problem = "single_label_classification"
        config = AutoConfig.from_pretrained(path, id2label=labels, problem_type=problem, trust_remote_code=trust)
        if config.pad_token_id is None:
            config.pad_token_id = _tokenizer_pad_token_id(path, trust)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read the configuration of model '{model_args.model_name_or_path}': {e}") from None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust)


def store_frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights of Linear and Embedding layers to `dtype`; everything trained stays fp32.

    Under autocast these weights are cast to the autocast dtype on every forward pass anyway (autocast caches only
    casts of weights that need gradients): stored in it, a step launches one cast kernel fewer per layer and the
    base takes half the GPU memory. LayerNorms stay fp32 (autocast computes them in fp32), and so do the LoRA
    adapter and the head, which the optimizer updates.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            for parameter in module.parameters(recurse=False):
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(dtype)


def trainable_parameters(model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts: the adapter and head against the whole model."""
    return model.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------- save / load


def model_meta(
    label_names: list[str],
    *,
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    train_splits: Sequence[str] = ("train",),
    metrics: dict[str, float] | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The content of `lorasent.json`: enough to rebuild the base, reload the data and read the results.

    `train_splits` are the splits the model learnt from: scores on them are optimistic (see `trained_splits`).
    `source` identifies the data's content (`lorasent.tokenize.source_identity`): its splits are carved again from
    the data when the model is evaluated, and are only the same splits if the content is.
    """
    return {
        "lorasent_version": lorasent.__version__,
        "label_names": list(label_names),
        "data": dataclasses.asdict(data_args),
        "source": dict(source or {}),
        "model": dataclasses.asdict(model_args),
        "train": dataclasses.asdict(train_args),
        "train_splits": list(train_splits),
        "metrics": dict(metrics or {}),
    }


def trained_splits(meta: dict[str, Any]) -> list[str]:
    """The splits a model folder learnt from, by its `lorasent.json`; a folder saved before lorasent.json recorded
    them learnt from train."""
    return list(meta.get("train_splits", ["train"]))


def write_meta(folder: str | Path, meta: dict[str, Any]) -> None:
    """Write `lorasent.json` into a model folder (atomically, so a reader never sees half of it)."""
    atomic_write_text(Path(folder) / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def check_output_dir(path: str | Path, marker: str = META_FILE) -> None:
    """Refuse to save a model over a folder that is not one: saving replaces the folder whole, and a mistyped
    --output_dir must never delete the user's files. A missing or empty folder, or one lorasent saved (`marker`: a
    run, or an export, saved again in the same place), may be replaced."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"Output folder {folder} is a file. Pick a folder name for the model.")
    check_writable(folder, "Pick another output folder.")  # saving renames it into place there
    if folder.is_dir() and not (folder / marker).is_file() and any(folder.iterdir()):
        raise ConfigError(
            f"Output folder {folder} holds files and is not a lorasent model folder (no {marker}): saving the "
            "model replaces the folder whole, which would delete them. Pick a new or empty output folder."
        )


def save_model_dir(
    model: PeftModel,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainArguments,
    train_splits: Sequence[str] = ("train",),
    metrics: dict[str, float] | None = None,
    source: dict[str, str] | None = None,
) -> Path:
    """Save adapter, tokenizer and `lorasent.json` to `out_dir`, all or nothing (write, then rename)."""
    meta = model_meta(
        data_args.label_names,
        data_args=data_args,
        model_args=model_args,
        train_args=train_args,
        train_splits=train_splits,
        metrics=metrics,
        source=source,
    )
    return write_model_dir(model, tokenizer, out_dir, meta)


def write_model_dir(model: PeftModel, tokenizer: Any, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """`save_model_dir` for a caller that holds the folder's `lorasent.json` already (`model_meta`'s)."""
    check_output_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
    return Path(out_dir)


@dataclass
class LoadedModel:
    """A model folder loaded for inference."""

    model: PeftModel
    tokenizer: Any
    label_names: list[str]
    meta: dict[str, Any]
    path: Path


def read_meta(path: str | Path) -> dict[str, Any]:
    """`lorasent.json` of a model folder, checked; CheckpointError names what is wrong and the fix."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder {folder} does not exist or is not a folder. {_FIX_CHECKPOINT}")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"{folder} is not a lorasent model folder: {META_FILE} is missing (a folder written by lorasent "
            f"training holds {META_FILE}, {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}). {_FIX_CHECKPOINT}"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt or truncated ({e}). {_FIX_CHECKPOINT}") from e
    missing = [key for key in ("label_names", "model", "data") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{meta_file} lacks {missing}; it was not written by lorasent. {_FIX_CHECKPOINT}")
    return meta


def _check_adapter_files(folder: Path) -> None:
    """Fail with a clear message on a missing or truncated adapter, before any model is built."""
    config_file = folder / ADAPTER_CONFIG
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}. {_FIX_CHECKPOINT}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is corrupt or truncated ({e}). {_FIX_CHECKPOINT}") from e
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS} (the LoRA weights). {_FIX_CHECKPOINT}")
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable); reading every tensor catches truncation
                f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}). {_FIX_CHECKPOINT}") from e


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """Validate a model folder's files (lorasent.json, adapter config and weights) without building a model.

    Returns its lorasent.json. Run before loading, resuming from or copying a folder, so that damage is a
    CheckpointError naming the file and the fix rather than a stack trace from inside peft or safetensors.
    """
    meta = read_meta(path)
    _check_adapter_files(Path(path))
    return meta


def _attends_all(config: Any) -> bool:
    """Whether every layer attends to every token: a masked-LM encoder without sliding-window layers. transformers
    takes a 4D mask as the whole mask, so for decoders (causal) and sliding windows it would drop their own."""
    full = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) and full


def sdpa_attention_mask(config: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """A 2D padding mask as the 4D boolean mask SDPA attention takes, for encoders that attend to all tokens with SDPA.

    transformers 5 passes a 4D mask to attention as it is; from a 2D one it builds the 4D one, first asking the
    device whether any token is padded (`mask.all()` in `masking_utils`), which makes the host wait for the GPU
    before every forward pass. The 4D mask is an expanded view: no memory, the same logits.
    """
    if getattr(config, "_attn_implementation", None) != "sdpa" or attention_mask.ndim != 2 or not _attends_all(config):
        return attention_mask
    mask = attention_mask.bool()
    return mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """'cpu' and each accelerator device torch can use on this machine, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return ["cpu"]
    return ["cpu", *(f"{accelerator.type}:{i}" for i in range(torch.accelerator.device_count()))]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto, checked before any loading: torch's own errors for a missing GPU are cryptic."""
    if device is None:
        return default_device()
    available = available_devices()
    fix = f"Use one of this machine's devices: {', '.join(available)}; leave it out for a GPU when there is one."
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"'{device}' is not a device name. {fix}") from e
    if resolved.type != "cpu" and f"{resolved.type}:{resolved.index or 0}" not in available:
        raise ConfigError(f"Device '{device}' is not available on this machine. {fix}")
    return resolved


def device_precision(precision: str, device: torch.device) -> str:
    """What `precision` means on `device`: 'auto' is bf16 on GPUs that support it, else fp16 on CUDA, else fp32; a
    forced choice the device cannot run is refused."""
    if precision not in get_args(Precision):
        raise ConfigError(f"Unknown precision {precision!r}; valid: {', '.join(get_args(Precision))}.")
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        # in hardware: torch's default also counts bf16 it emulates (slowly) on older GPUs, found by allocating there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision 'fp16' needs a CUDA GPU. Use --precision auto (fp32 on the CPU) or bf16.")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16. Use --precision auto (picks fp16 here) or fp32.")
    return precision


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def load_model_dir(
    path: str | Path, device: str | torch.device | None = None, *, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a model folder for inference: base from `lorasent.json`, adapter and head from the folder.

    The folder is validated first, so a missing or corrupt file is a CheckpointError naming the file and the fix
    rather than a stack trace from inside peft or safetensors. A model folder is data: one whose `lorasent.json`
    records trust_remote_code is refused unless the caller passes `trust_remote_code` too.
    """
    folder = Path(path)
    target = resolve_device(device)
    meta = check_model_dir(folder)
    try:
        model_args = ModelArguments(**meta["model"])
    except (TypeError, LorasentError) as e:
        raise CheckpointError(f"{folder / META_FILE} holds invalid model arguments ({e}). {_FIX_CHECKPOINT}") from e
    if model_args.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            f"{folder / META_FILE} records trust_remote_code for the base model '{model_args.model_name_or_path}', "
            "but a model folder cannot turn on running model code. Pass --trust_remote_code (in Python the "
            "trust_remote_code argument) only if you trust that model's code."
        )
    base_path = Path(model_args.model_name_or_path)
    if base_path.is_absolute() and not base_path.is_dir():  # a folder of the machine that trained it
        raise ConfigError(
            f"The base model of {folder}, the folder {base_path}, is not there (moved, or trained on another machine). "
            f"Put that model there, or set model.model_name_or_path in {folder / META_FILE} to where it is now (the "
            "same model: the adapter fits only it)."
        )
    label_names = list(meta["label_names"])
    base = load_base(model_args, label_names)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # onto the CPU, where the base is until the whole model moves: peft's default is "cuda" wherever a
            # GPU is visible, a CUDA context on GPU 0 for a model loaded for the CPU or for cuda:1
            model = PeftModel.from_pretrained(base, folder, is_trainable=False, torch_device="cpu")
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. shapes that do not fit the base model
        raise CheckpointError(
            f"The adapter in {folder} does not fit the base model '{model_args.model_name_or_path}' ({e}). "
            f"{_FIX_CHECKPOINT}"
        ) from e
    for warning in caught:
        # peft only warns when the adapter file lacks some of the adapter's weights: those layers would then run
        # with fresh, untrained LoRA weights and predict as if never fine-tuned.
        if "missing adapter keys" in str(warning.message):
            raise CheckpointError(
                f"{folder / ADAPTER_WEIGHTS} lacks adapter weights: {warning.message} {_FIX_CHECKPOINT}"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"The tokenizer files in {folder} are missing or corrupt ({e}). {_FIX_CHECKPOINT}") from e
    model.to(target).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, label_names=label_names, meta=meta, path=folder)
