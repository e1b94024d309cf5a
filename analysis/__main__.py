"""Command line of the analysis step.

    python -m analysis report [EXPERIMENT] [--retrain] [--output DIR] [--no-execute]
    python -m analysis retrain [EXPERIMENT] [--use-checkpoint] [--output DIR] [--dataset PATH]
    python -m analysis evaluate MODEL_DIR [--split test] [--output DIR]
    python -m analysis table [EXPERIMENT] [--csv FILE]

EXPERIMENT is the folder `python tune/run.py` printed (<storage_path>/<name>, default runs/tune/latest) or a
storage URI (s3://..., gs://...).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from analysis.results import DEFAULT_EXPERIMENT
from lorasent.cpus import cap_torch_threads
from lorasent.errors import LorasentError
from lorasent.process import exit_process

EXAMPLE_TEXT = "Works great, would buy again."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Trial tables, the executed notebook report, the retrained final model and its test evaluation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiment_help = f"Experiment folder (<storage_path>/<name>) or storage URI (default: {DEFAULT_EXPERIMENT})."

    report = commands.add_parser("report", help="Write the executed notebook report (report.ipynb + report.html).")
    report.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=experiment_help)
    report.add_argument("--retrain", action="store_true", help="Retrain the best config first (final test section).")
    report.add_argument(
        "--use-checkpoint", action="store_true", help="With --retrain: evaluate the best checkpoint, don't retrain."
    )
    report.add_argument(
        "--output", help="Report folder (default: <experiment>/report; for a storage URI, in its local copy)."
    )
    report.add_argument("--final-model", help="Final model folder to report on (default: <experiment>/final_model).")
    report.add_argument("--no-execute", action="store_true", help="Only write the notebook, do not run it.")
    report.add_argument(
        "--timeout", type=_positive_int, default=600, help="Seconds one notebook cell may run (default: %(default)s)."
    )
    report.add_argument("--trust_remote_code", action="store_true", help=f"With --retrain: {TRUST_REMOTE_CODE}")
    report.add_argument("--dataset", help=f"With --retrain: {MOVED_DATA}")

    retrain = commands.add_parser(
        "retrain", help="Retrain the best config on train + validation, test it once, save the final model."
    )
    retrain.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=experiment_help)
    retrain.add_argument(
        "--use-checkpoint", action="store_true", help="Test the best trial's own best checkpoint instead."
    )
    retrain.add_argument("--output", help="Final model folder (default: <experiment>/final_model).")
    retrain.add_argument("--trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE)
    retrain.add_argument("--dataset", help=MOVED_DATA)

    evaluate = commands.add_parser("evaluate", help="Evaluate a model folder on a split of its own data.")
    evaluate.add_argument("model_dir", help="A lorasent model folder (final model or trial checkpoint).")
    evaluate.add_argument(
        "--split", default="test", choices=("train", "validation", "test"), help="Split to score (default: test)."
    )
    evaluate.add_argument("--dataset", help=MOVED_DATA)
    evaluate.add_argument("--output", help="Write <split>_metrics.json and <split>_predictions.csv here.")
    evaluate.add_argument("--trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE)

    table = commands.add_parser("table", help="Print the trial table.")
    table.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=experiment_help)
    table.add_argument("--csv", help="Also write the full per-trial table to this CSV file.")
    return parser


TRUST_REMOTE_CODE = (
    "Run the base model's own code, for a search run with --trust_remote_code. Off: only turn on for code you trust."
)
MOVED_DATA = "Where the data file is now, if it moved since the search (another machine): the same content."


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


_python_format_warning = warnings.formatwarning


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """lorasent's own warnings as one line: they say what to do, and Python's format would add a line of our code."""
    if category.__module__.split(".")[0] in ("analysis", "lorasent"):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def _predict_hint(model_dir: object) -> None:
    print(f'Predict: python -m lorasent.predict {model_dir} --text "{EXAMPLE_TEXT}"')


def _retrain(args: argparse.Namespace, out_dir: str | None) -> Path:
    """The final model, retrained as `report --retrain` and `retrain` both ask, saved to `out_dir`."""
    from analysis.retrain import retrain_best

    return retrain_best(
        args.experiment,
        out_dir,
        use_checkpoint=args.use_checkpoint,
        trust_remote_code=args.trust_remote_code,
        dataset=args.dataset,
    )


def _quiet_weight_loading() -> None:
    """transformers' 'Loading weights' bar for a few MB of adapter is noise between retraining's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    if args.command in ("report", "retrain"):
        _quiet_weight_loading()
        cap_torch_threads()  # the test evaluation after retraining, as a training run and `lorasent.evaluate` are
    if args.command == "report":
        from analysis.report import write_report

        final_model = _retrain(args, args.final_model) if args.retrain else args.final_model
        paths = write_report(
            args.experiment, args.output, final_model=final_model, execute=not args.no_execute, timeout=args.timeout
        )
        print(f"Notebook: {paths.notebook}")
        if paths.html is not None:
            print(f"HTML:     {paths.html}")
        if paths.unfinished:
            print(f"Partial report: {paths.unfinished}. Rerun it when the search has finished.")
        if paths.final_model_mismatch:
            print(f"Warning: {paths.final_model_mismatch}")
        if paths.final_model.exists():
            _predict_hint(paths.final_model)
        else:
            print(f"No final model yet: python -m analysis retrain {args.experiment}  (or report --retrain)")
    elif args.command == "retrain":
        _predict_hint(_retrain(args, args.output))
    elif args.command == "evaluate":
        from analysis.retrain import warn_if_trained_on_legacy
        from lorasent.evaluate import main as evaluate_main

        warn_if_trained_on_legacy(args.model_dir, args.split)
        forwarded = [args.model_dir, "--split", args.split, *(["--output_dir", args.output] if args.output else [])]
        forwarded += ["--dataset", args.dataset] if args.dataset else []
        forwarded += ["--trust_remote_code"] if args.trust_remote_code else []
        return evaluate_main(forwarded)
    elif args.command == "table":
        import pandas as pd

        from analysis.results import load_experiment, trial_table

        exp = load_experiment(args.experiment)
        with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60):
            print(trial_table(exp).to_string())
        if args.csv:
            from lorasent.paths import atomic_write_text

            atomic_write_text(args.csv, exp.trials.to_csv(index=False))
            print(f"Wrote {args.csv}")
        if not exp.scored_trials.empty:
            print(f"Best: trial {exp.best_trial['trial_id']} {exp.best_config}, {exp.metric} "
                  f"{exp.best_trial[exp.best_column]:.4f} at epoch {exp.best_epoch}")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "report" and args.use_checkpoint and not args.retrain:
        parser.error("--use-checkpoint only applies with --retrain")
    warnings.formatwarning = _format_warning
    try:
        return run(args)
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a ReportInterrupted says what it kept
        print(f"error: {e or 'Interrupted.'}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = _python_format_warning  # a caller's process (a notebook, a test) keeps its own


if __name__ == "__main__":
    exit_process(main())
