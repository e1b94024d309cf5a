"""Predictor and prediction CLI: batching keeps order and values, bad input is reported per text, files in
every supported format, interactive use, and clean errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import interrupt_when_ready
from test_security import _model_with_custom_code

from lorasent import predict as predict_module
from lorasent.config import TINY_MODEL, DataArguments, ModelArguments, TrainArguments
from lorasent.errors import CheckpointError, ConfigError, DataError
from lorasent.model import build_model, load_model_dir, save_model_dir
from lorasent.predict import Predictor
from lorasent.tokenize import load_tokenizer

LABELS = ["negative", "positive"]
TEXTS = [
    "Great.",
    "The battery died after a week and support never answered my emails.",
    "ok",
    "I would buy this again, the sound is clear and loud enough for the whole room.",
    "meh",
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder with a non-zero adapter, trained with max_length 32."""
    model_args = ModelArguments(model_name_or_path=TINY_MODEL, lora_r=4)
    torch.manual_seed(0)
    model = build_model(model_args, LABELS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("predict") / "model"
    return save_model_dir(
        model,
        load_tokenizer(model_args),
        folder,
        data_args=DataArguments(max_length=32),
        model_args=model_args,
        train_args=TrainArguments(),
    )


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.from_dir(model_dir, device="cpu", batch_size=2)


def test_length_sorted_batches_return_results_in_input_order(predictor: Predictor) -> None:
    batched = predictor.predict(TEXTS)
    one_by_one = [predictor.predict([text])[0] for text in TEXTS]
    # Every text scores differently, so any mix-up of the order would show.
    assert len({round(p.probabilities["positive"], 6) for p in batched}) == len(TEXTS)
    for got, alone in zip(batched, one_by_one, strict=True):
        assert got.label == alone.label and got.label_id == alone.label_id
        for name in LABELS:
            assert got.probabilities[name] == pytest.approx(alone.probabilities[name], abs=1e-5)
        assert sum(got.probabilities.values()) == pytest.approx(1.0)


def test_bad_inputs_get_an_error_and_never_break_the_batch(predictor: Predictor) -> None:
    texts = ["Lovely.", "", "   \t", b"caf\xe9 au lait", b"fine bytes", None, "Awful.", "caf\udce9"]  # a lone surrogate
    results = predictor.predict(texts)
    errors = [r.error for r in results]
    assert errors[0] is None and errors[4] is None and errors[6] is None
    assert "empty" in errors[1] and "empty" in errors[2]
    assert "not valid UTF-8" in errors[3] and "0xe9" in errors[3]
    assert "expected text" in errors[5]
    assert "not valid Unicode" in errors[7]
    assert results[1].label is None and results[1].probabilities == {}
    assert results[6].label in LABELS


def test_any_iterable_of_texts_is_scored_and_a_single_text_is_refused(predictor: Predictor) -> None:
    expected = [p.probabilities for p in predictor.predict(TEXTS)]
    for texts in (tuple(TEXTS), pd.Series(TEXTS, index=range(10, 15)), (text for text in TEXTS)):
        assert [p.probabilities for p in predictor.predict(texts)] == expected
    for single in ("Great.", b"Great."):  # not one prediction per character
        with pytest.raises(DataError, match=r"predict\(\[text\]\)"):
            predictor.predict(single)


def test_very_long_texts_are_truncated_and_flagged(predictor: Predictor) -> None:
    long, short = predictor.predict(["good value " * 5000, "good value"])
    assert predictor.max_length == 32  # the trained max length from lorasent.json
    assert long.truncated and not short.truncated
    assert long.label in LABELS and long.error is None


def test_a_huge_text_is_tokenised_only_as_far_as_truncation_keeps(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A megabyte is not tokenised whole (seconds, and the overflow's memory) for the max_length tokens kept, and the
    tokens kept are the same as the whole text's: cut at a word, read further when the start is mostly spaces."""
    words = " ".join(TEXTS[i % len(TEXTS)] for i in range(2**20 // 40))
    spaced = "Great. " + " " * 2**14 + words  # more spaces than the first cut reads
    tokenizer, tokenised = predictor.tokenizer, []

    def recording(texts: list[str], **options: Any) -> Any:
        tokenised.extend(map(len, texts))
        return tokenizer(texts, **options)

    monkeypatch.setattr(predictor, "tokenizer", recording)
    huge, spaces = predictor.predict([words, spaced])
    assert max(tokenised) < len(words) // 10, tokenised
    alike = predictor.predict([words[:2000], "Great. " + words[:2000]])
    for got, want in zip([huge, spaces], alike, strict=True):
        assert got.truncated and want.truncated and got.label == want.label
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-6)


def test_predictor_on_a_corrupt_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        Predictor.from_dir(tmp_path)


def test_cli_text_flags(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict_module.main([str(model_dir), "--text", "Great.", "--text", "  ", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] in LABELS
    assert lines[1].startswith("error") and "empty" in lines[1]


def test_cli_txt_file_with_a_non_utf8_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "reviews.txt"
    source.write_bytes(b"Works great.\r\nBad \xff\xfe bytes here\n\nStopped working.\n")
    output = tmp_path / "out.csv"
    assert predict_module.main([str(model_dir), "--input", str(source), "--output", str(output)]) == 0
    assert "predict:" not in capsys.readouterr().err  # a progress bar only on a terminal, not in a log file
    frame = pd.read_csv(output, keep_default_na=False)
    assert len(frame) == 4
    assert list(frame.columns) == ["text", "label", "label_id", "prob_negative", "prob_positive", "truncated", "error"]
    assert frame.loc[0, "text"] == "Works great." and frame.loc[0, "label"] in LABELS and frame.loc[0, "error"] == ""
    assert "not valid UTF-8" in frame.loc[1, "error"] and "empty" in frame.loc[2, "error"]
    assert frame.loc[3, "label"] in LABELS


def test_cli_jsonl_and_csv_inputs(model_dir: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b'{"review": "Nice."}\n{"review": "broken\n{"other": 1}\n{"review": "Terrible."}\n')
    out = tmp_path / "out.jsonl"
    args = [str(model_dir), "--input", str(jsonl), "--text_column", "review", "--output", str(out)]
    assert predict_module.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] is None for r in rows] == [True, False, False, True]
    assert "not valid JSON" in rows[1]["error"] and "no 'review' field" in rows[2]["error"]

    csv_file = tmp_path / "in.csv"
    csv_file.write_bytes(b'id,review\n1,"Good, really good."\n2,caf\xe9\n3,"multi\nline"\n')
    out_csv = tmp_path / "out.csv"
    args = [str(model_dir), "--input", str(csv_file), "--text_column", "review", "--output", str(out_csv)]
    assert predict_module.main(args) == 0
    frame = pd.read_csv(out_csv, keep_default_na=False)
    assert frame["text"].tolist()[0] == "Good, really good." and frame.loc[2, "text"] == "multi\nline"
    assert frame.loc[1, "error"].startswith("not valid UTF-8") and frame.loc[2, "error"] == ""


@pytest.mark.parametrize("name", ["in.json", "in.parquet"])
def test_cli_json_and_parquet_inputs(model_dir: Path, tmp_path: Path, name: str) -> None:
    """The formats a model can be trained on can be scored too; a value that is no text is that row's error."""
    source = tmp_path / name
    frame = pd.DataFrame({"id": [1, 2, 3], "review": ["Nice.", None, "Terrible."]})
    frame.to_json(source, orient="records") if name.endswith(".json") else frame.to_parquet(source)
    out = tmp_path / "out.csv"
    assert (
        predict_module.main([str(model_dir), "--input", str(source), "--text_column", "review", "--output", str(out)])
        == 0
    )
    result = pd.read_csv(out, keep_default_na=False)
    assert result["text"].tolist() == ["Nice.", "", "Terrible."] and set(result.loc[[0, 2], "label"]) <= set(LABELS)
    assert result.loc[1, "error"].startswith("expected text") and result.loc[[0, 2], "error"].tolist() == ["", ""]


def test_cli_interactive_reads_until_eof(model_dir: Path, monkeypatch, capsys) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"Great phone.\n\nNever again.\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert predict_module.main([str(model_dir), "--interactive"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("error")


def test_cli_help_gives_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        predict_module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Text column/field of a .csv, .jsonl, .json or .parquet input (default: text)." in help_text
    assert "Texts per forward pass (default: 64)." in help_text


def test_ctrl_c_ends_an_interactive_session_without_a_traceback(model_dir: Path) -> None:
    def answered(process: subprocess.Popen) -> None:
        process.stdin.write("Great phone.\n")
        process.stdin.flush()
        answer = process.stdout.readline()  # the model is loaded and waiting for the next line
        assert answer.startswith(("negative", "positive")), answer + process.stderr.read()

    argv = ["-m", "lorasent.predict", str(model_dir), "--interactive"]
    returncode, _, err = interrupt_when_ready(argv, answered, timeout=120, stdin=True)
    assert returncode == 130 and err == "interrupted\n", err


def test_cli_interactive_refuses_an_output_file(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"Great phone.\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    output = tmp_path / "out.csv"
    assert predict_module.main([str(model_dir), "--interactive", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "--output does not apply to --interactive" in captured.err
    assert captured.out == "" and not output.exists()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, t: [str(t / "missing-model"), "--text", "x"], "does not exist"),
        (lambda d, t: [str(d), "--input", str(t / "missing.txt")], "does not exist"),
        (lambda d, t: [str(d), "--input", str(_write(t / "in.csv", b"a,b\n1,2\n"))], "no column 'text'"),
        (lambda d, t: [str(d), "--input", str(_write(t / "in.xml", b"<x/>"))], "use a .txt"),
        (lambda d, t: [str(d), "--input", str(t)], "is a folder"),
        (lambda d, t: [str(d), "--input", str(_write(t / "empty.csv", b""))], "empty.csv is empty"),
        # [CLS] [SEP] fill 2 tokens: every text looked alike (2), or truncation stopped and the model crashed (1)
        (lambda d, t: [str(d), "--text", "great", "--max_length", "2"], "max_length 2 leaves no room for text"),
        (lambda d, t: [str(d), "--text", "great " * 600, "--max_length", "1"], "max_length 1 leaves no room"),
    ],
)
def test_cli_errors_are_one_clean_line(model_dir: Path, tmp_path: Path, capsys, make_args, message) -> None:
    assert predict_module.main(make_args(model_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data"),
    [("empty.txt", b""), ("header-only.csv", b"id,text\n"), ("blank.jsonl", b"\n\n")],
)
def test_cli_input_without_texts_is_refused(model_dir: Path, tmp_path: Path, capsys, name, data) -> None:
    output = tmp_path / "out.csv"
    args = [str(model_dir), "--input", str(_write(tmp_path / name, data)), "--output", str(output)]
    assert predict_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no texts" in err and "Traceback" not in err
    assert not output.exists()


@pytest.mark.parametrize(
    "device",
    [
        "gpu",
        "cuda:99",
        pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_cli_device_that_is_not_here_names_the_ones_that_are(model_dir: Path, capsys, device: str) -> None:
    assert predict_module.main([str(model_dir), "--text", "Great.", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"'{device}'" in err and "Traceback" not in err
    assert "devices: cpu" in err  # the fix: the devices this machine has
    with pytest.raises(ConfigError, match="devices: cpu"):
        Predictor.from_dir(model_dir, device=device)


def test_a_model_for_the_cpu_loads_no_weights_onto_a_gpu_it_can_see(model_dir: Path, monkeypatch) -> None:
    """peft loads an adapter onto "cuda" wherever a GPU is visible: a CUDA context on GPU 0 for a model loaded for the
    CPU (or for cuda:1). Only the machine is faked (a GPU is visible); this CPU build fails any load onto it."""
    reference = Predictor.from_dir(model_dir, device="cpu").predict(TEXTS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaded = load_model_dir(model_dir, device="cpu")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert Predictor(loaded).predict(TEXTS) == reference


def test_a_precision_the_device_cannot_run_is_refused_before_the_model_loads(tmp_path: Path, capsys) -> None:
    # The folder does not exist: the precision must be what is reported, without loading.
    missing = tmp_path / "no-model"
    assert predict_module.main([str(missing), "--text", "Great.", "--device", "cpu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'fp16' needs a CUDA GPU" in err and "auto" in err
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        Predictor.from_dir(missing, device="cpu", precision="fp16")


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_every_precision_the_cpu_runs_gives_the_same_labels(model_dir: Path, precision: str) -> None:
    """On the CPU 'auto' is fp32; a forced bf16 runs under autocast, with probabilities within bf16's rounding."""
    reference = Predictor.from_dir(model_dir, device="cpu", precision="fp32").predict(TEXTS)
    predictions = Predictor.from_dir(model_dir, device="cpu", precision=precision).predict(TEXTS)
    tolerance = 0.03 if precision == "bf16" else 0.0
    for got, want in zip(predictions, reference, strict=True):
        assert got.probabilities == pytest.approx(want.probabilities, abs=tolerance)
        if abs(want.probabilities["positive"] - 0.5) > tolerance:
            assert got.label == want.label
    ran_in_bf16 = any(got.probabilities != want.probabilities for got, want in zip(predictions, reference, strict=True))
    assert ran_in_bf16 == (precision == "bf16")


@pytest.mark.parametrize("max_length", [0, -5])
def test_cli_max_length_must_be_positive(model_dir: Path, capsys, max_length: int) -> None:
    assert predict_module.main([str(model_dir), "--text", "Great.", "--max_length", str(max_length)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"max_length must be positive, got {max_length}" in err


def test_cli_output_format_is_refused_before_the_model_loads(tmp_path: Path, capsys) -> None:
    # The model folder does not exist either: the output format must be what is reported, without loading.
    output = tmp_path / "predictions.xlsx"
    assert predict_module.main([str(tmp_path / "missing-model"), "--text", "x", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "use a .csv or .jsonl file for --output" in err
    assert "does not exist" not in err and not output.exists()


def test_cli_utf8_bom_is_not_part_of_the_first_column_or_text(model_dir: Path, tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    csv_file = _write(tmp_path / "excel.csv", bom + b"text,id\r\nGood value.,1\r\ncaf\xe9,2\r\n")
    out = tmp_path / "out.jsonl"
    assert predict_module.main([str(model_dir), "--input", str(csv_file), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["text"] == "Good value." and rows[0]["label"] in LABELS
    assert rows[1]["error"].startswith("not valid UTF-8")  # a bad row is still reported, not the whole file

    txt_file = _write(tmp_path / "notepad.txt", bom + b"Nice.\n")
    assert predict_module.main([str(model_dir), "--input", str(txt_file), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["text"] == "Nice."


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("blocker/out.csv", "blocker is a file, not a folder"),
        ("blocker/sub/out.jsonl", "blocker is a file, not a folder"),
        ("folder.csv", "it is a folder"),
    ],
)
def test_cli_output_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path: Path, capsys, output: str, message: str
) -> None:
    # The model folder does not exist: the output location must be what is reported, without loading or scoring.
    _write(tmp_path / "blocker", b"a file where a folder would go")
    (tmp_path / "folder.csv").mkdir()
    args = [str(tmp_path / "missing-model"), "--text", "x", "--output", str(tmp_path / output)]
    assert predict_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "--output" in err and "Traceback" not in err


def test_cli_csv_field_longer_than_the_csv_modules_default_limit(model_dir: Path, tmp_path: Path) -> None:
    long = "good value " * 20_000  # 220,000 characters; csv refuses fields over 131,072 unless told otherwise
    csv_file = _write(tmp_path / "long.csv", f'id,text\n1,"{long}"\n2,Fine.\n'.encode())
    out = tmp_path / "out.jsonl"
    assert predict_module.main([str(model_dir), "--input", str(csv_file), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["text"] == long and rows[0]["truncated"] and rows[0]["label"] in LABELS
    assert rows[1]["text"] == "Fine." and not rows[1]["truncated"]


def test_cli_csv_the_csv_module_cannot_read_names_the_file_and_line(
    model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """csv's limit is a C long, 2**31 - 1 characters where that is 32 bits; a limit of 64 makes its real error."""
    csv_file = _write(tmp_path / "in.csv", b'text\nshort\n"' + b"x" * 100 + b'"\nafter\n')
    monkeypatch.setattr(predict_module, "CSV_FIELD_LIMIT", 64)
    previous = csv.field_size_limit()
    try:
        code = predict_module.main([str(model_dir), "--input", str(csv_file)])
    finally:
        csv.field_size_limit(previous)  # the limit is the process's, not this test's
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{csv_file} is not valid CSV at line 3" in err and "Traceback" not in err


def test_cli_exits_1_when_no_text_could_be_scored(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert predict_module.main([str(model_dir), "--text", ""]) == 1
    assert capsys.readouterr().out.startswith("error  empty")  # each row's error is still reported
    assert predict_module.main([str(model_dir), "--text", "", "--text", "Great."]) == 0

    source = _write(tmp_path / "bad.txt", b"\n\xff\xfe\n")
    out = tmp_path / "out.csv"
    assert predict_module.main([str(model_dir), "--input", str(source), "--output", str(out)]) == 1
    frame = pd.read_csv(out, keep_default_na=False)
    assert "empty" in frame.loc[0, "error"] and "not valid UTF-8" in frame.loc[1, "error"]


def test_a_model_folder_cannot_turn_on_remote_code(
    model_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A model folder is data: its lorasent.json asking for trust_remote_code, with a base whose config.json names
    code in a .py file, runs that code only when the user passes --trust_remote_code."""
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "custom-code-ran"
    base = _model_with_custom_code(tiny_model_dir, tmp_path / "custom-base", marker)
    folder = shutil.copytree(model_dir, tmp_path / "model")
    meta = json.loads((folder / "lorasent.json").read_text())
    meta["model"].update(model_name_or_path=str(base), trust_remote_code=True)
    (folder / "lorasent.json").write_text(json.dumps(meta))

    assert predict_module.main([str(folder), "--text", "Great."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Pass --trust_remote_code" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="cannot turn on running model code"):
        load_model_dir(folder)
    assert not marker.exists()
    # Passed by the user, the switch does run the base's code: the refusal above is not vacuous.
    assert predict_module.main([str(folder), "--text", "Great.", "--trust_remote_code"]) == 0
    assert marker.exists()
