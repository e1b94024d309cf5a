"""LoRA model: target modules by architecture, head training, save / load round trip, corrupt folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    ModernBertConfig,
    PretrainedConfig,
)

from lorasent.config import OFFLINE_MODEL, TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.errors import CheckpointError, ConfigError
from lorasent.export import merge_and_export
from lorasent.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META_FILE,
    build_model,
    check_lora_rank,
    device_precision,
    load_model_dir,
    meta_model,
    resolve_target_modules,
    save_model_dir,
    sdpa_attention_mask,
    trainable_parameters,
)
from lorasent.tokenize import load_tokenizer
from lorasent.train import main as train_main

LABELS = ["negative", "positive"]
TEXTS = ["Great value, works perfectly.", "Broke after two days, total waste of money and time.", "ok"]


def _lora_modules(model) -> set[str]:
    return set(model.peft_config["default"].target_modules)


def _logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def tiny_args(tiny_model_dir: Path) -> ModelArguments:
    return ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4)


@pytest.fixture(scope="module")
def saved_tiny(tiny_args: ModelArguments, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model whose adapter and head hold non-trivial weights, saved as a model folder."""
    torch.manual_seed(0)
    model = build_model(tiny_args, LABELS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA B starts at zero; a round trip of zeros would prove nothing
                param.normal_(0, 0.5)
    model.eval()
    tokenizer = load_tokenizer(tiny_args)
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_model_dir(
        model,
        tokenizer,
        folder,
        data_args=DataArguments(),
        model_args=tiny_args,
        train_args=TrainArguments(),
        metrics={"accuracy": 0.5},
    )
    return folder, _logits(model, tokenizer)


def test_tiny_distilbert_auto_targets_q_lin_v_lin_and_trains_the_head(tiny_args: ModelArguments) -> None:
    model = build_model(tiny_args, LABELS)
    assert _lora_modules(model) == {"q_lin", "v_lin"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("q_lin.lora_A" in name for name in trainable)
    assert not any("k_lin" in name for name in trainable)
    # DistilBERT's head is pre_classifier + classifier, both trained in full.
    assert any("pre_classifier.modules_to_save" in name for name in trainable)
    assert any("classifier.modules_to_save" in name for name in trainable)
    n_trainable, total = trainable_parameters(model)
    assert 0 < n_trainable < total
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # Set when built: were the first forward pass to set it, torch.compile would compile the model a second time.
    assert model.config.problem_type == "single_label_classification"


def test_half_precision_base_keeps_what_is_trained_in_fp32(tiny_args: ModelArguments) -> None:
    torch.manual_seed(0)
    full = build_model(tiny_args, LABELS)
    torch.manual_seed(0)
    half = build_model(tiny_args, LABELS, frozen_dtype=torch.bfloat16)
    dtypes = {name: (p.dtype, p.requires_grad) for name, p in half.named_parameters()}
    assert {dtype for dtype, trained in dtypes.values() if trained} == {torch.float32}  # adapter and head
    assert dtypes["base_model.model.distilbert.transformer.layer.0.attention.k_lin.weight"][0] == torch.bfloat16
    assert dtypes["base_model.model.distilbert.transformer.layer.0.attention.q_lin.base_layer.weight"][0] == (
        torch.bfloat16
    )
    assert dtypes["base_model.model.distilbert.embeddings.word_embeddings.weight"][0] == torch.bfloat16
    assert dtypes["base_model.model.distilbert.embeddings.LayerNorm.weight"][0] == torch.float32
    # Under autocast the matmuls see bf16 weights either way: the outputs agree to bf16 rounding.
    tokenizer = load_tokenizer(tiny_args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _logits(full.eval(), tokenizer), _logits(half.eval(), tokenizer)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("native", [True, False], ids=["Ampere or later", "older GPU"])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """'auto' on CUDA: bf16 where the GPU computes it, else fp16. torch's own default answer also counts the bf16 it
    emulates on older GPUs (slowly, and found out by allocating on the GPU). Only the GPU's answer is faked."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda")
    assert device_precision("auto", cuda) == ("bf16" if native else "fp16")
    assert device_precision("bf16", cuda) == "bf16"  # forced: the user's choice, emulated or not
    assert device_precision("auto", torch.device("cpu")) == "fp32"


def test_minilm_auto_targets_query_value_with_sdpa(offline_model_dir: Path) -> None:
    model = build_model(ModelArguments(model_name_or_path=OFFLINE_MODEL), LABELS)
    assert _lora_modules(model) == {"query", "value"}
    assert model.config._attn_implementation == "sdpa"
    n_trainable, total = trainable_parameters(model)
    assert n_trainable / total < 0.02  # LoRA r=8 on q/v plus the head: about 0.3% of 22.7M


def test_presets_resolve_to_explicit_module_names(tiny_model_dir: Path, offline_model_dir: Path) -> None:
    tiny = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    assert sorted(resolve_target_modules(tiny, "attention")) == ["k_lin", "out_lin", "q_lin", "v_lin"]
    # all-linear covers the feed-forward layers but never the head, which trains in full instead.
    assert sorted(resolve_target_modules(tiny, "all-linear")) == ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"]
    assert resolve_target_modules(tiny, " q_lin , lin1 ") == ["q_lin", "lin1"]
    minilm = AutoModelForSequenceClassification.from_pretrained(offline_model_dir)
    # BERT's attention output is `attention.output.dense`; a bare `dense` would also hit the feed-forward layers.
    assert sorted(resolve_target_modules(minilm, "attention")) == ["attention.output.dense", "key", "query", "value"]


def test_unknown_target_module_lists_the_valid_names(tiny_model_dir: Path) -> None:
    tiny = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"\['query'\].*q_lin.*v_lin.*presets"):
        resolve_target_modules(tiny, "q_lin,query")
    with pytest.raises(ConfigError, match="Unknown LoRA target"):
        build_model(ModelArguments(model_name_or_path=TINY_MODEL, target_modules="classifier"), LABELS)


def test_a_rank_above_every_adapted_layers_width_is_refused_naming_them(tiny_model_dir: Path) -> None:
    """A rank-r update of an m x n weight has rank at most min(m, n): peft built r=100,000 on the tiny model's 32-wide
    layers (25.6M LoRA parameters), and r=10**20 crashed inside torch."""
    tiny = meta_model(ModelArguments(model_name_or_path=TINY_MODEL))
    for rank in (33, 10**20):
        with pytest.raises(ConfigError, match=rf"LoRA rank {rank} .* \(q_lin, v_lin: 32 x 32 weights\).* at most 32\."):
            build_model(ModelArguments(model_name_or_path=TINY_MODEL, lora_r=rank), LABELS)
    # the widest adapted layer sets the limit; each layer is named with its shape
    targets = resolve_target_modules(tiny, "all-linear")
    check_lora_rank(tiny, targets, 32)
    lines = "k_lin, out_lin, q_lin, v_lin: 32 x 32; lin1: 128 x 32; lin2: 32 x 128 weights"
    with pytest.raises(ConfigError, match=rf"\({lines}\).* Set lora_r to at most 32\."):
        check_lora_rank(tiny, targets, 64)
    assert build_model(ModelArguments(model_name_or_path=TINY_MODEL, lora_r=32), LABELS).peft_config["default"].r == 32


@pytest.mark.parametrize(
    ("cls", "changes", "message"),
    [
        (TrainArguments, {"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        (TrainArguments, {"learning_rate": -1e-3}, "learning_rate"),
        (TrainArguments, {"num_train_epochs": 0}, "num_train_epochs"),
        (ModelArguments, {"lora_r": 0}, "lora_r"),
        (ModelArguments, {"lora_dropout": 1.0}, "lora_dropout"),
        # alpha / r overflowed a float inside peft (a traceback), or scaled a zero update to NaN (every step)
        (ModelArguments, {"lora_alpha": 10**400}, "scales the LoRA update by more than a 32-bit float holds"),
        (ModelArguments, {"lora_alpha": 10**40}, "with lora_r 8 scales the LoRA update by more than a 32-bit"),
        (ModelArguments, {"target_modules": " , "}, "target_modules"),
    ],
)
def test_impossible_values_are_refused_at_construction(cls, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**changes)


@pytest.mark.parametrize(
    ("name", "message"), [("offline:no-such-model", "Unknown built-in model"), ("./no/such/folder", "does not exist")]
)
def test_unknown_model_names_are_refused_before_loading(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(ModelArguments(model_name_or_path=name), LABELS)


def test_save_load_round_trip_gives_identical_outputs(saved_tiny) -> None:
    folder, expected = saved_tiny
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, META_FILE, "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temp folder left behind
    loaded = load_model_dir(folder, device="cpu")
    assert loaded.label_names == LABELS
    assert loaded.meta["metrics"] == {"accuracy": 0.5}
    assert loaded.meta["model"]["model_name_or_path"] == TINY_MODEL
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), expected, rtol=0, atol=0)


def test_merged_export_loads_without_peft(saved_tiny, tmp_path: Path) -> None:
    folder, expected = saved_tiny
    merged_dir = merge_and_export(folder, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    loaded = load_model_dir(folder, device="cpu")
    torch.testing.assert_close(_logits(merged, loaded.tokenizer), expected, rtol=1e-4, atol=1e-5)


def _corrupt(folder: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / how
    shutil.copytree(folder, broken)
    if how == "no-meta":
        (broken / META_FILE).unlink()
    elif how == "bad-json":
        (broken / META_FILE).write_text('{"label_names": ["neg', encoding="utf-8")
    elif how == "no-weights":
        (broken / ADAPTER_WEIGHTS).unlink()
    elif how == "truncated-weights":
        data = (broken / ADAPTER_WEIGHTS).read_bytes()
        (broken / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "garbage-weights":
        (broken / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage" * 100)
    elif how == "no-lora-weights":  # the head is there, a LoRA layer's weights are not: peft only warned
        weights = load_file(broken / ADAPTER_WEIGHTS)
        save_file(
            {k: v for k, v in weights.items() if "layer.1.attention.q_lin.lora_" not in k}, broken / ADAPTER_WEIGHTS
        )
    elif how == "wrong-shapes":  # the adapter config claims another rank than the stored weights have
        config = json.loads((broken / ADAPTER_CONFIG).read_text())
        config["r"] = 2
        (broken / ADAPTER_CONFIG).write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no-meta", "lorasent.json is missing"),
        ("bad-json", "corrupt or truncated"),
        ("no-weights", "has no adapter_model.safetensors"),
        ("truncated-weights", "adapter_model.safetensors is corrupt or truncated"),
        ("garbage-weights", "adapter_model.safetensors is corrupt or truncated"),
        ("wrong-shapes", "does not fit the base model"),
        ("no-lora-weights", "adapter_model.safetensors lacks adapter weights: .*layer.1.attention.q_lin.lora_A"),
    ],
)
def test_corrupt_model_folder_is_a_clear_checkpoint_error(saved_tiny, tmp_path: Path, how: str, message: str) -> None:
    broken = _corrupt(saved_tiny[0], tmp_path, how)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model_dir(broken, device="cpu")
    assert str(broken) in str(info.value)
    assert "Re-run the training" in str(info.value)


def test_a_base_model_folder_that_moved_is_named_with_where_to_point_at_it(
    saved_tiny, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """lorasent.json records a local base model by its absolute path, which another machine may not have."""
    folder, expected = saved_tiny
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["model"]["model_name_or_path"] = str(tmp_path / "gone")
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'gone'}, is not there .*model.model_name_or_path in {copy}"):
        load_model_dir(copy, device="cpu")
    meta["model"]["model_name_or_path"] = str(shutil.copytree(tiny_model_dir, tmp_path / "here"))
    (copy / META_FILE).write_text(json.dumps(meta))
    loaded = load_model_dir(copy, device="cpu")
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), expected, rtol=0, atol=0)


def test_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_dir(tmp_path / "nothing-here")


def test_only_encoder_weights_missing_from_the_checkpoint_are_reported(
    tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """transformers' load report calls the new head MISSING on every load; lorasent names only what matters."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    head = [key for key in weights if key.startswith(("pre_classifier.", "classifier."))]
    assert head, "the tiny model should ship a head for this test to drop"
    dropped = "distilbert.transformer.layer.1.ffn.lin1.weight"
    save_file({k: v for k, v in weights.items() if k not in [*head, dropped]}, folder / "model.safetensors")

    build_model(ModelArguments(model_name_or_path=str(tiny_model_dir), lora_r=4), LABELS)  # complete: silent
    assert "LOAD REPORT" not in capfd.readouterr().err and not caplog.records  # nor "layers were not sharded"
    build_model(ModelArguments(model_name_or_path=str(folder), lora_r=4), LABELS)
    assert "LOAD REPORT" not in capfd.readouterr().err
    (record,) = caplog.records
    assert record.levelname == "WARNING" and dropped in record.getMessage() and "classifier" not in record.getMessage()


@pytest.mark.parametrize("model_name", [TINY_MODEL, OFFLINE_MODEL])
def test_the_4d_attention_mask_gives_the_same_logits(model_name: str, tiny_model_dir, offline_model_dir) -> None:
    """The 4D mask that spares every step a host-GPU sync means what the padded 2D mask means (DistilBERT, BERT)."""
    model = build_model(ModelArguments(model_name_or_path=model_name), ["negative", "positive"]).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 12))  # past the special tokens
    padding = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
    four_d = sdpa_attention_mask(model.config, padding)
    assert four_d.shape == (3, 1, 12, 12) and four_d.dtype == torch.bool
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=padding).logits
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=four_d).logits, expected)
    model.config._attn_implementation = "eager"  # eager attention adds a float mask of its own making: left as is
    assert sdpa_attention_mask(model.config, padding) is padding


def _tiny_configs(vocab_size: int) -> dict[str, PretrainedConfig]:
    """Random-init decoders and a sliding-window encoder, small enough to build in milliseconds."""
    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    special = {"bos_token_id": 2, "eos_token_id": 3}
    llama = {"num_key_value_heads": 1, "max_position_embeddings": 128}
    sliding = {"local_attention": 16, "max_position_embeddings": 128, "cls_token_id": 2, "sep_token_id": 3}
    return {
        "gpt2": GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, **special),
        "llama": LlamaConfig(vocab_size=vocab_size, **llama, **size, **special),
        # local attention of 16 tokens in two of its three layers
        "modernbert": ModernBertConfig(vocab_size=vocab_size, pad_token_id=0, **sliding, **size, **special),
    }


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "modernbert"])
def test_the_mask_given_to_attention_keeps_causal_and_sliding_window_masks(architecture: str) -> None:
    """transformers takes a 4D mask as the whole mask: a decoder given one would attend to later tokens, and a
    sliding-window layer to all of them. Those get the 2D mask, and so the logits they were trained to give."""
    torch.manual_seed(0)
    config = _tiny_configs(500)[architecture]
    config.pad_token_id = 0
    model = AutoModelForSequenceClassification.from_config(config).eval()
    assert model.config._attn_implementation == "sdpa"
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, 30:] = 0
    input_ids = torch.randint(5, 500, (2, 40)) * padding
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=padding).logits
        got = model(input_ids=input_ids, attention_mask=sdpa_attention_mask(model.config, padding)).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_a_decoder_whose_config_has_no_pad_token_trains_saves_and_predicts(
    architecture: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """GPT-2's and Llama's config.json name no pad token, which their classifiers need to find each text's last
    token: `Trainer` copies the tokenizer's in before training, and a loaded model folder must predict with it too."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(_tiny_configs(len(tokenizer))[architecture])
    assert base.config.pad_token_id is None
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = ModelArguments(model_name_or_path=str(tmp_path / "base"), lora_r=4)
    model = build_model(args, LABELS)
    assert model.config.pad_token_id == meta_model(args).config.pad_token_id == tokenizer.pad_token_id
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model(**inputs, labels=torch.tensor([1, 0, 1])).loss.backward()  # a padded batch trains
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_model_dir(
        model, tokenizer, tmp_path / "model", data_args=DataArguments(), model_args=args, train_args=TrainArguments()
    )
    loaded = load_model_dir(tmp_path / "model", device="cpu")
    torch.testing.assert_close(
        _logits(loaded.model, loaded.tokenizer), _logits(model.eval(), tokenizer), rtol=0, atol=0
    )


def test_a_checkpoint_with_other_labels_gets_a_head_for_ours_without_a_warning(
    tiny_args: ModelArguments, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny model's config names two labels; three classes get a three-way head, silently, built or estimated."""
    names = ["negative", "neutral", "positive"]
    model = build_model(tiny_args, names)
    assert model.config.id2label == dict(enumerate(names)) and model.config.num_labels == 3
    assert meta_model(tiny_args, num_labels=3).config.num_labels == 3
    assert "incompatible" not in capfd.readouterr().err + caplog.text


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling calls Path.touch(marker)
        return (Path.touch, (self.marker,))


def test_a_folder_with_pickled_weights_only_is_refused_before_the_data_is_read(
    tiny_model_dir: Path, tmp_path: Path, write_data, capsys: pytest.CaptureFixture[str]
) -> None:
    """pytorch_model.bin is a pickle, which can run code when loaded: it is never loaded, and a folder holding no
    safetensors weights is refused by the checks that run before the data is tokenised, not by every trial after."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"weights": _RunsCodeWhenUnpickled(marker)}, folder / "pytorch_model.bin")
    args = ModelArguments(model_name_or_path=str(folder))
    refused = r"holds no model\.safetensors \(only pytorch_model\.bin\).*Convert a checkpoint you trust"
    for check in (meta_model, lambda args: build_model(args, LABELS)):
        with pytest.raises(ConfigError, match=refused):
            check(args)
    data = write_data([{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(40)])
    cache = tmp_path / "cache"
    argv = ["--model_name_or_path", str(folder), "--dataset", str(data), "--cache_dir", str(cache)]
    assert train_main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
    assert not cache.exists() and not marker.exists()
