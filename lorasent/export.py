"""A lorasent model folder as a plain transformers model: the adapter folded into the base weights.

For serving stacks and users that load `AutoModelForSequenceClassification.from_pretrained` and nothing else (no
peft, no lorasent). `python -m lorasent.export MODEL_DIR OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers.utils import logging as hf_logging

from lorasent.errors import LorasentError
from lorasent.model import check_output_dir, load_model_dir
from lorasent.paths import atomic_dir, atomic_write_text
from lorasent.predict import TRUST_REMOTE_CODE_HELP
from lorasent.process import exit_process

# Written into every export: where it came from (and how it scored there), and the mark that lets a later export of
# the same name replace it
EXPORT_FILE = "lorasent_export.json"


def merge_and_export(model_dir: str | Path, out_dir: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Fold the adapter into the base weights and save a plain transformers model (safetensors) with tokenizer.

    The result loads with `AutoModelForSequenceClassification.from_pretrained(out_dir)`, without peft. Its tokenizer
    truncates (`truncation=True`) at the max length the model was trained with, as `Predictor` does, so a long text
    gets the same prediction there as from lorasent. `trust_remote_code` lets a base model that needs its own code
    load (see `load_model_dir`); the export then needs it too.
    """
    check_output_dir(out_dir, marker=EXPORT_FILE)
    loaded = load_model_dir(model_dir, device="cpu", trust_remote_code=trust_remote_code)
    trained_length = loaded.meta["data"].get("max_length") or loaded.tokenizer.model_max_length
    loaded.tokenizer.model_max_length = min(trained_length, loaded.tokenizer.model_max_length)
    merged = loaded.model.merge_and_unload()
    provenance = {
        "exported_from": str(Path(model_dir).resolve()),
        "base_model": loaded.meta["model"]["model_name_or_path"],
        "max_length": loaded.tokenizer.model_max_length,
        "metrics": loaded.meta.get("metrics"),
    }
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / EXPORT_FILE, json.dumps(provenance, indent=2) + "\n")
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 done, 2 refused, 130 interrupted (Ctrl-C)."""
    hf_logging.disable_progress_bar()  # a bar for loading a few MB of weights is noise on a command line
    parser = argparse.ArgumentParser(
        prog="python -m lorasent.export",
        description="Save a lorasent model folder as a plain transformers model, the LoRA adapter merged into the "
        "base weights: it loads with AutoModelForSequenceClassification.from_pretrained, without peft or lorasent.",
    )
    parser.add_argument("model_dir", help="A model folder written by lorasent training.")
    parser.add_argument("out_dir", help="A new or empty folder, or an earlier export to replace.")
    parser.add_argument("--trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    args = parser.parse_args(argv)
    try:
        out = merge_and_export(args.model_dir, args.out_dir, trust_remote_code=args.trust_remote_code)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the folder is written whole or not at all
        print(f"interrupted: nothing written to {args.out_dir}", file=sys.stderr)
        return 130
    print(f"wrote {out}: load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    exit_process(main())
