"""The command-line parser of `python -m lorasent.train` and `python tune/run.py`: transformers' `HfArgumentParser`
over the arguments dataclasses, failing the project's clean way.

Every parse error (an unknown flag included) is a `ConfigError` naming `--help`, so flags and YAML values fail
alike, and an optional number accepts `none`, so a limit set by a preset or a config file can be lifted from the
command line (`--max_train_samples none`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from transformers import HfArgumentParser

from lorasent.errors import ConfigError

NONE_WORDS = ("none", "null")


def _number_or_none(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return None if value.strip().lower() in NONE_WORDS else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `ConfigError`s and whose optional numbers take `none`."""

    def __init__(self, dataclass_types: Iterable[type], **kwargs: Any) -> None:
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if action.default is None and action.type in (int, float):
                action.type = _number_or_none(action.type)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}. See `{self.prog} --help`.")

    def parse_dataclasses(self, argv: Sequence[str]) -> tuple[Any, ...]:
        """The dataclasses filled from `argv`; an argument no dataclass takes is refused, not ignored."""
        *parsed, remaining = self.parse_args_into_dataclasses(
            args=list(argv), return_remaining_strings=True, look_for_args_file=False
        )
        if remaining:
            raise ConfigError(f"Unrecognised arguments {remaining}. See `{self.prog} --help`.")
        return tuple(parsed)
