"""One trial's GPU memory, estimated on the meta device, and the automatic number of trials per GPU built on it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DebertaV2Config,
    GPT2Config,
    PretrainedConfig,
)

from lorasent.config import OFFLINE_MODEL, TINY_MODEL, ModelArguments
from lorasent.errors import ConfigError
from lorasent.footprint import (
    GIB,
    RUNTIME_BYTES,
    FusedAttention,
    peak_forward_bytes,
    saved_bytes,
    training_footprint,
)
from lorasent.model import add_lora, build_model, meta_model
from tune.cluster import (
    GPU_MEMORY_USABLE,
    MAX_SHARED_TRIALS_PER_GPU,
    MAX_TRIALS_PER_GPU,
    automatic_gpu_sharing,
    plan_resources,
    preflight,
    shared_gpu_sharing,
    trials_per_gpu,
)
from tune.config import TuneArguments
from tune.engine import EngineLayout, EnginePlan

LABELS = ["negative", "positive"]


def _random_model(config: PretrainedConfig, tokenizer_dir: Path, folder: Path) -> str:
    """A random-init model folder of `config`'s architecture, with the tiny model's tokenizer."""
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Architectures whose forward pass looks at token values: GPT-2 and DeBERTa-v2/v3 (see `footprint._forward`)
RANDOM_MODELS = {
    "gpt2": lambda vocab: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, pad_token_id=0),
    "deberta-v2": lambda vocab: DebertaV2Config(vocab_size=vocab, pad_token_id=0, **SMALL),
}


# DistilBERT (q_lin), BERT (query/value), GPT-2 (c_attn, a Conv1D) and DeBERTa-v2 (query_proj/value_proj)
@pytest.mark.parametrize("model_name", [TINY_MODEL, OFFLINE_MODEL, *RANDOM_MODELS])
def test_meta_pass_counts_what_a_real_pass_keeps(model_name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    if model_name in RANDOM_MODELS:
        vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
        model_name = _random_model(RANDOM_MODELS[model_name](vocab), tiny_model_dir, tmp_path / model_name)
    model_args = ModelArguments(model_name_or_path=model_name, target_modules="auto")
    real = build_model(model_args, LABELS).train()
    meta = add_lora(meta_model(model_args, len(LABELS)), model_args).train()
    sdpa = real.config._attn_implementation == "sdpa"  # DeBERTa's disentangled attention is its own, eager
    for batch, length in [(4, 32), (2, 48)]:
        # Training with attention dropout: the CPU runs SDPA's math path, as the meta device does.
        real_saved = saved_bytes(real, batch, length)
        assert saved_bytes(meta, batch, length) == real_saved > 0
        with FusedAttention():  # what a GPU's fused kernel keeps instead: no attention probabilities
            fused = saved_bytes(meta, batch, length)
        assert 0 < fused < real_saved if sdpa else fused == real_saved
    real.eval()
    meta.eval()
    # Without gradients the CPU runs a fused (flash) SDPA kernel, which FusedAttention stands in for on meta.
    for batch, length in [(8, 32), (2, 256)]:
        with FusedAttention():
            fused = peak_forward_bytes(meta, batch, length)
        assert fused == peak_forward_bytes(real, batch, length) > 0
    if sdpa:  # long reviews: the math path's probabilities dominate
        assert peak_forward_bytes(meta, 2, 256) > fused


def test_footprint_follows_batch_length_and_weight_dtype() -> None:
    model_args = ModelArguments(model_name_or_path=OFFLINE_MODEL)
    small = training_footprint(model_args, batch_size=8, max_length=64, eval_batch_size=8)
    assert small.runtime == RUNTIME_BYTES and small.total == small.weights + small.optimizer + small.activations + GIB
    assert training_footprint(model_args, batch_size=16, max_length=64, eval_batch_size=8).activations > (
        1.9 * small.activations
    )
    assert training_footprint(model_args, batch_size=8, max_length=128, eval_batch_size=8).activations > (
        1.9 * small.activations
    )
    # A large evaluation batch can need more than training does: the estimate takes the larger of the two.
    assert training_footprint(model_args, batch_size=8, max_length=64, eval_batch_size=512).activations > (
        small.activations
    )
    half = training_footprint(model_args, batch_size=8, max_length=64, eval_batch_size=8, frozen_dtype=torch.bfloat16)
    assert small.weights / 2 < half.weights < 0.6 * small.weights  # frozen Linear/Embedding halved, the rest fp32
    assert half.optimizer == small.optimizer > 0
    assert small.describe().startswith("~") and "activations" in small.describe()


def test_trials_per_gpu_follow_memory() -> None:
    assert trials_per_gpu(80 * GIB, 2 * GIB) == MAX_TRIALS_PER_GPU  # 36 would fit; 8 is the most measured
    assert trials_per_gpu(16 * GIB, 2 * GIB) == 7  # 90% of 16 GiB
    assert trials_per_gpu(8 * GIB, 20 * GIB) == 1

    footprint = training_footprint(
        ModelArguments(model_name_or_path=OFFLINE_MODEL), batch_size=32, max_length=512, eval_batch_size=128
    )
    share, why = automatic_gpu_sharing(16 * GIB, footprint)
    expected = trials_per_gpu(16 * GIB, footprint.total)
    assert share == 1 / expected and f"{expected} trial(s) per GPU of 16 GiB" in why
    plan = plan_resources(TuneArguments(), [{"CPU": 16.0, "GPU": 1.0}], gpu_sharing=(share, why))
    assert (plan.trials_per_gpu, plan.max_concurrent_trials) == (expected, expected)
    assert why in plan.describe()
    with pytest.warns(UserWarning, match="One trial may not fit a GPU of 2 GiB"):
        assert automatic_gpu_sharing(2 * GIB, footprint)[0] == 1.0
    explicit = plan_resources(TuneArguments(gpus_per_trial=0.5), [{"CPU": 16.0, "GPU": 1.0}], gpu_sharing=(share, why))
    assert explicit.gpus_per_trial == 0.5 and why not in explicit.describe()


def test_trials_sharing_one_base_hold_it_once_and_pack_by_their_own_memory() -> None:
    """--fused_trials: the frozen base, the runtime and an evaluation pass once per GPU, each trial its adapter, head,
    optimizer state and batch; as many trials as fit, at most MAX_SHARED_TRIALS_PER_GPU and the search's trials."""
    footprint = training_footprint(
        ModelArguments(model_name_or_path=OFFLINE_MODEL), batch_size=32, max_length=512, eval_batch_size=128
    )
    assert footprint.shared_total(1) == footprint.total  # one trial alone needs what a trial process needs
    assert footprint.train_batch > footprint.eval_batch  # so every further trial adds exactly its own part
    assert footprint.shared_total(5) - footprint.shared_total(4) == footprint.per_shared_trial
    evaluation_heavy = training_footprint(
        ModelArguments(model_name_or_path=OFFLINE_MODEL), batch_size=2, max_length=64, eval_batch_size=512
    )
    assert evaluation_heavy.shared_total(2) == evaluation_heavy.total + evaluation_heavy.trained_weights + (
        evaluation_heavy.optimizer
    )  # two small batches still fit in what one evaluation pass needs

    memory = 16 * GIB
    share, why = shared_gpu_sharing(memory, footprint, trials=1000)
    n = round(1 / share)
    assert footprint.shared_total(n) <= GPU_MEMORY_USABLE * memory < footprint.shared_total(n + 1)
    assert n > trials_per_gpu(memory, footprint.total)  # the base is held once, not once a trial
    assert f"{n} trial(s) per GPU of 16 GiB sharing one base model (at most 32)" in why
    assert shared_gpu_sharing(1000 * GIB, footprint, trials=1000)[0] == 1 / MAX_SHARED_TRIALS_PER_GPU
    assert shared_gpu_sharing(1000 * GIB, footprint, trials=5)[0] == 1 / 5  # no room kept for trials never run
    with pytest.warns(UserWarning, match="One trial may not fit a GPU of 2 GiB"):
        assert shared_gpu_sharing(2 * GIB, footprint, trials=27)[0] == 1.0

    # The plan's share becomes the engine's trials at once, and the plan's reason the engines' description.
    plan = plan_resources(
        TuneArguments(), [{"CPU": 16.0, "GPU": 1.0}], gpu_sharing=shared_gpu_sharing(memory, footprint, 1000)
    )
    layout = EngineLayout.of(plan.gpus, plan.cpus, plan.trials_per_gpu, None)
    assert (plan.trials_per_gpu, layout.trials_at_once) == (n, n)
    assert why in EnginePlan([], layout.trials_at_once, 1.0, why=plan.gpu_sharing).describe()


def test_plan_without_visible_gpus_never_estimates_memory() -> None:
    def must_not_run():
        raise AssertionError("the footprint was computed for a machine without GPUs")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = preflight(TuneArguments(num_cpus=2, num_gpus=0), must_not_run)
    assert (plan.gpus_per_trial, plan.gpu_sharing) == (0.0, "")
    # GPUs declared (--num_gpus) that torch does not see: refused before Ray hands trials GPUs that are not there.
    visible = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"--num_gpus {visible + 1}, but torch sees {visible} GPU"):
        preflight(TuneArguments(num_cpus=2, num_gpus=visible + 1), must_not_run)


def test_out_of_memory_help_names_the_next_share() -> None:
    from tune.trainable import out_of_memory_help

    assert "--gpus_per_trial 0.25" in out_of_memory_help(0.125)
    assert "--gpus_per_trial" not in out_of_memory_help(1.0)  # a whole GPU already: only smaller work helps
    assert "per_device_train_batch_size" in out_of_memory_help(1.0)
