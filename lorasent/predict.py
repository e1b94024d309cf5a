"""Predictions from a trained model folder: a `Predictor` for code and a command line for people.

Inference sorts texts by length and pads each batch only to its longest member, so a batch of short reviews
costs little; results come back in input order. Bad input (empty text, bytes that are not UTF-8) yields a
`Prediction` carrying an error instead of failing the whole batch; over-long texts are truncated and flagged.

    python -m lorasent.predict runs/train --text "Works great." --text "Broke after a day."
    python -m lorasent.predict runs/train --input reviews.csv --text_column review --output predictions.csv
    python -m lorasent.predict runs/train --interactive
"""

from __future__ import annotations

import argparse
import codecs
import csv
import ctypes
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from tqdm.auto import tqdm
from transformers import BatchEncoding
from transformers.utils import logging as hf_logging

from lorasent.config import Precision
from lorasent.cpus import cap_torch_threads
from lorasent.errors import ConfigError, DataError, LorasentError
from lorasent.model import (
    AUTOCAST_DTYPES,
    LoadedModel,
    device_precision,
    load_model_dir,
    resolve_device,
    sdpa_attention_mask,
)
from lorasent.paths import atomic_write_text, check_writable
from lorasent.process import exit_process
from lorasent.tokenize import check_room_for_text, make_collator

Text = str | bytes
PRECISION_HELP = "'auto': bf16 on GPUs that support it (as training), fp16 on other GPUs, fp32 on the CPU."
TRUST_REMOTE_CODE_HELP = (
    "Run code that comes with the base model, when the model folder needs it. Off: only turn on for code you trust."
)
EXIT_STATUS = (
    "Exit status: 0 when at least one text was scored (the rows that failed are reported beside the others), 1 when "
    "no text could be scored, 2 when the command is refused (bad arguments, input, output or model folder), 130 when "
    "interrupted (Ctrl-C, which also ends --interactive; an --output file is then not written)."
)
# The largest field csv can read (a C long): its default, 131,072 characters, refuses long reviews, which are truncated.
CSV_FIELD_LIMIT = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1
# Characters read per token of max_length at first: English averages ~5; a text that needs more is read further.
CHARS_PER_TOKEN = 16


@dataclass
class Prediction:
    """The model's answer for one text; `error` is set (and the rest empty) when the text could not be scored."""

    label: str | None = None
    label_id: int | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    error: str | None = None


def _as_text(item: Any) -> tuple[str | None, str | None]:
    """(text, None) for usable input, else (None, why not)."""
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, (
                f"not valid UTF-8 (byte 0x{item[e.start]:02x} at offset {e.start}); re-encode the input as UTF-8"
            )
    if not isinstance(item, str):
        return None, f"expected text, got {type(item).__name__}"
    if _has_surrogates(item):  # e.g. JSON's "\ud800": the tokenizer would fail the whole batch on it
        return None, "not valid Unicode (a lone surrogate); send the text as UTF-8"
    if not item.strip():
        return None, "empty or whitespace-only text; nothing to classify"
    return item, None


class Predictor:
    """Batched, length-sorted inference with a loaded model folder, on the CPU or a GPU.

    On a GPU it runs under autocast (bf16 where supported, as training and its evaluations did; `precision` forces
    one) and waits for the GPU once per call, not per batch: inputs go up from pinned memory without blocking, the
    probabilities stay on the device, and one copy brings them all back at the end (tests/test_device_reads.py).
    """

    def __init__(
        self, loaded: LoadedModel, batch_size: int = 64, max_length: int | None = None, precision: str = "auto"
    ) -> None:
        _check_sizes(batch_size, max_length)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.label_names = loaded.label_names
        self.batch_size = batch_size
        trained_length = loaded.meta.get("data", {}).get("max_length") or self.tokenizer.model_max_length
        self.max_length = min(max_length or trained_length, self.tokenizer.model_max_length)
        check_room_for_text(self.max_length, self.tokenizer)
        self.device = next(self.model.parameters()).device
        self.precision = device_precision(precision, self.device)
        self.collate = make_collator(self.tokenizer, pad_to_multiple_of=8 if self.device.type == "cuda" else None)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        precision: str = "auto",
        trust_remote_code: bool = False,
    ) -> Predictor:
        """Load a model folder (see `lorasent.model.load_model_dir`); max_length defaults to the trained one."""
        _check_sizes(batch_size, max_length)  # before the seconds that loading takes
        device_precision(precision, resolve_device(device))
        loaded = load_model_dir(path, device=device, trust_remote_code=trust_remote_code)
        return cls(loaded, batch_size=batch_size, max_length=max_length, precision=precision)

    def predict(self, texts: Iterable[Text], *, progress: bool = False) -> list[Prediction]:
        """One `Prediction` per input, in input order; str or UTF-8 bytes accepted, from any iterable (a list, a
        pandas Series, a generator)."""
        if isinstance(texts, (str, bytes)):  # iterating it would score each character (each byte) as a text
            raise DataError(
                f"predict takes a list of texts, got a single {type(texts).__name__}. Pass it in a list: "
                "predict([text])."
            )
        texts = list(texts)  # walked twice below: a generator would be empty the second time
        predictions = [Prediction() for _ in texts]
        valid: list[tuple[int, str]] = []
        for i, item in enumerate(texts):
            text, error = _as_text(item)
            if error is not None:
                predictions[i].error = error
            else:
                valid.append((i, text))
        if not valid:
            return predictions
        encoded = self._tokenize([self._enough_of(text) for _, text in valid])
        # Longest first, so a memory problem shows on the first batch rather than after most of the work.
        order = sorted(range(len(valid)), key=lambda k: len(encoded["input_ids"][k]), reverse=True)
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        probabilities = self._probabilities(encoded, batches, progress).tolist()  # in `order`: the one read back
        for k, row in zip(order, probabilities, strict=True):
            prediction = predictions[valid[k][0]]
            label_id = max(range(len(row)), key=row.__getitem__)  # the first of equals, as argmax
            prediction.label_id = label_id
            prediction.label = self.label_names[label_id]
            prediction.probabilities = dict(zip(self.label_names, row, strict=True))
            prediction.truncated = bool(encoded.encodings[k].overflowing)
        return predictions

    def _tokenize(self, texts: list[str]) -> BatchEncoding:
        """Exactly as in training (lorasent.tokenize): truncated, no token type ids."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, return_token_type_ids=False)

    def _enough_of(self, text: str) -> str:
        """`text`, or its start up to a whitespace that already holds more tokens than max_length keeps.

        Truncation keeps the same tokens (those of whole words are the same in the start as in the text), but a
        megabyte costs a second or two and the overflow's memory to tokenise whole (5 MB: 9 s, 0.8 GB)."""
        size = self.max_length * CHARS_PER_TOKEN
        while len(text) > size:
            start = text[:size]
            space = max(start.rfind(c) for c in " \t\n\r")  # a cut inside a word could change its tokens
            start = start[:space] if space > size // 2 else start  # else a word over half of it: cut inside
            if self._tokenize([start]).encodings[0].overflowing:
                return start
            size *= 4  # mostly spaces, or words the tokenizer takes whole: read further
        return text

    @torch.inference_mode()
    def _probabilities(self, encoded: BatchEncoding, batches: list[list[int]], progress: bool) -> torch.Tensor:
        """[texts, labels] softmax probabilities of `batches` in turn, on the host (one wait for the device)."""
        cuda = self.device.type == "cuda"
        dtype = AUTOCAST_DTYPES.get(self.precision)
        outputs = []
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress):
                features = [{key: encoded[key][k] for key in encoded} for k in batch]
                inputs = {
                    key: (value.pin_memory() if cuda else value).to(self.device, non_blocking=True)
                    for key, value in self.collate(features).items()
                }
                inputs["attention_mask"] = sdpa_attention_mask(self.model.config, inputs["attention_mask"])
                outputs.append(self.model(**inputs).logits.float().softmax(dim=-1))
        return torch.cat(outputs).cpu()


def _check_sizes(batch_size: int, max_length: int | None) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}. Pass --batch_size 1 or more.")
    if max_length is not None and max_length <= 0:
        raise ConfigError(
            f"max_length must be positive, got {max_length}. Pass --max_length 1 or more, or leave it out for the "
            "trained max length."
        )


# -------------------------------------------------------------------------------------------------- CLI


_INPUTS = ".txt (one text per line), .jsonl, .csv, .json or .parquet"


def _read_input(path: Path, text_column: str) -> Iterator[Text | DataError]:
    """Texts from a .txt (one per line), .jsonl, .csv, .json or .parquet file (the formats training reads); a row
    that cannot be read yields a DataError."""
    if path.is_dir():
        raise DataError(f"Input {path} is a folder. Pass --input a {_INPUTS} file.")
    if not path.is_file():
        raise DataError(f"Input file {path} does not exist. Check the path passed to --input.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".parquet"):  # whole tables, read as training reads them
        from lorasent.data import read_table

        frame = read_table(path)
        if text_column not in frame.columns:
            raise _no_text_column(path, text_column, list(map(str, frame.columns)))
        yield from frame[text_column].tolist()
        return
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # Excel and Notepad start UTF-8 files with a BOM
    if suffix == ".txt":
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        yield from (line.removesuffix(b"\r") for line in lines)
    elif suffix == ".jsonl":
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield DataError(f"line {number} is not valid JSON in UTF-8 ({e})")
                continue
            if not isinstance(row, dict) or text_column not in row:
                yield DataError(f"line {number} has no '{text_column}' field; set --text_column")
                continue
            yield row[text_column]
    elif suffix == ".csv":
        yield from _read_csv(path, raw, text_column)
    else:
        raise DataError(f"Cannot read {path}: use a {_INPUTS} file for --input.")


def _read_csv(path: Path, raw: bytes, text_column: str) -> Iterator[Text]:
    """The texts of a CSV file's `text_column`, however long (they are truncated later, and flagged)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # surrogateescape keeps undecodable bytes, so one bad row is reported instead of failing the whole file.
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8", errors="surrogateescape"), newline=""))
    try:
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty. Give --input a CSV file with a header row and a text per row.")
        if text_column not in reader.fieldnames:
            raise _no_text_column(path, text_column, reader.fieldnames)
        for row in reader:
            text = row[text_column] or ""
            yield text.encode("utf-8", errors="surrogateescape") if _has_surrogates(text) else text
    except csv.Error as e:
        raise DataError(
            f"{path} is not valid CSV at line {reader.reader.line_num} ({e}). Check the quotes around that row: a "
            "quote left open runs on through the rows after it."
        ) from None


def _no_text_column(path: Path, text_column: str, columns: Sequence[str]) -> DataError:
    return DataError(
        f"{path} has no column '{text_column}' (columns: {list(columns)}). Set --text_column to the column that "
        "holds the texts."
    )


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _display(item: Text | DataError) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return item if isinstance(item, str) else ""


def _record(item: Text | DataError, prediction: Prediction, label_names: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"text": _display(item), "label": prediction.label, "label_id": prediction.label_id}
    record.update({f"prob_{name}": prediction.probabilities.get(name) for name in label_names})
    record.update(truncated=prediction.truncated, error=prediction.error)
    return record


def predict_items(predictor: Predictor, items: Sequence[Text | DataError], progress: bool) -> list[Prediction]:
    """Predictions for texts mixed with rows that already failed to read (their error carried over)."""
    texts = [item for item in items if not isinstance(item, DataError)]
    scored = iter(predictor.predict(texts, progress=progress))
    return [Prediction(error=str(item)) if isinstance(item, DataError) else next(scored) for item in items]


def _check_output(path: Path) -> None:
    """Refuse an output that cannot be written before the model loads and the texts are scored, not after."""
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"Cannot write {path}: use a .csv or .jsonl file for --output.")
    if path.is_dir():
        raise DataError(f"Cannot write {path}: it is a folder. Name a .csv or .jsonl file for --output.")
    check_writable(path, "Pick another path for --output.")


def _write_output(path: Path, records: list[dict[str, Any]]) -> None:
    if path.suffix.lower() == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        import pandas as pd

        frame = pd.DataFrame.from_records(records).astype({"label_id": "Int64"})  # ids stay ints beside empty rows
        atomic_write_text(path, frame.to_csv(index=False))


def _print_prediction(item: Text | DataError, prediction: Prediction) -> None:
    if prediction.error is not None:
        print(f"error  {prediction.error}: {_display(item)[:80]!r}")
        return
    flag = "  (truncated)" if prediction.truncated else ""
    confidence = prediction.probabilities[prediction.label]
    print(f"{prediction.label}  {confidence:.3f}  {_display(item)[:80]!r}{flag}")


def _interactive(predictor: Predictor) -> None:
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            print("> ", end="", flush=True)
        line = sys.stdin.buffer.readline()
        if not line:
            break
        text = line.rstrip(b"\r\n")
        _print_prediction(text, predictor.predict([text])[0])


def add_predictor_options(parser: argparse.ArgumentParser) -> None:
    """The model folder and how it runs: what every command that loads a `Predictor` takes."""
    parser.add_argument("model_dir", help="A model folder written by lorasent training (holds lorasent.json).")
    parser.add_argument("--batch_size", type=int, default=64, help="Texts per forward pass (default: %(default)s).")
    parser.add_argument("--max_length", type=int, help="Tokens kept per text (default: the trained max length).")
    parser.add_argument("--device", help="'cpu', 'cuda', 'cuda:1', ... (default: a GPU if there is one).")
    parser.add_argument("--precision", default="auto", choices=get_args(Precision), help=PRECISION_HELP)
    parser.add_argument("--trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """The `Predictor` that `add_predictor_options`' parsed options describe."""
    return Predictor.from_dir(
        args.model_dir,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        precision=args.precision,
        trust_remote_code=args.trust_remote_code,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lorasent.predict",
        description="Classify texts with a trained lorasent model folder.",
        epilog=EXIT_STATUS,
    )
    add_predictor_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="A text to classify; repeat for more.")
    source.add_argument("--input", type=Path, help=f"A {_INPUTS} file.")
    source.add_argument("--interactive", action="store_true", help="Classify lines typed on stdin until EOF.")
    parser.add_argument(
        "--text_column",
        default="text",
        help="Text column/field of a .csv, .jsonl, .json or .parquet input (default: %(default)s).",
    )
    parser.add_argument("--output", type=Path, help="Write predictions to this .csv or .jsonl file.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns its exit status (`EXIT_STATUS`)."""
    hf_logging.disable_progress_bar()  # a bar for loading a few MB of weights is noise on a command line
    args = parse_args(argv)
    cap_torch_threads()
    try:
        # Everything that can be refused without the model is checked before it loads.
        if args.interactive and args.output is not None:
            raise ConfigError(
                "--output does not apply to --interactive, which prints each prediction as a line is typed. Drop "
                "--output, or put the texts in a file and pass it with --input."
            )
        if args.output is not None:
            _check_output(args.output)
        items: list[Text | DataError] = []
        if args.text:
            items = list(args.text)
        elif args.input is not None:
            items = list(_read_input(args.input, args.text_column))
            if not items:
                raise DataError(f"{args.input} holds no texts. Give --input a file with at least one text in it.")
        predictor = predictor_from_args(args)
        if args.interactive:
            _interactive(predictor)
            return 0
        # a bar while a file is written, on a terminal: in a log file its redraws would be one endless line
        predictions = predict_items(predictor, items, progress=args.output is not None and sys.stderr.isatty())
        if args.output is not None:
            records = [_record(i, p, predictor.label_names) for i, p in zip(items, predictions, strict=True)]
            _write_output(args.output, records)
            failed = sum(p.error is not None for p in predictions)
            print(f"wrote {len(records)} predictions to {args.output} ({failed} rows with errors)")
        else:
            for item, prediction in zip(items, predictions, strict=True):
                _print_prediction(item, prediction)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + (f": {args.output} not written" if args.output is not None else ""), file=sys.stderr)
        return 130
    return 0 if any(p.error is None for p in predictions) else 1


if __name__ == "__main__":
    exit_process(main())
