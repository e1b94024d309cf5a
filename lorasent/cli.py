"""The command-line parser of `python -m lorasent.train` and `python tune/run.py`: transformers' `HfArgumentParser`
over the arguments dataclasses, failing the project's clean way.

Every parse error (an unknown flag included) is a `ConfigError` naming `--help`, so flags and YAML values fail
alike, and an optional number or switch accepts `none`, so a limit set by a preset or a config file can be lifted from
the command line (`--max_train_samples none`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from lorasent.config import COMMA_SEPARATED
from lorasent.errors import ConfigError

NONE_WORDS = ("none", "null")
_KINDS = {"int": "a whole number", "float": "a number", "str": "a string", "string_to_bool": "true or false"}


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return None if value.strip().lower() in NONE_WORDS else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _refuse(prog: str, message: str) -> None:
    raise ConfigError(f"{message.rstrip('.')}. See `{prog} --help`.")


class PreParser(argparse.ArgumentParser):
    """A plain parser of the options read before the full parse (which layers or files apply), failing as
    `ArgumentParser` does: argparse would print this parser's usage, which lists only those options, and exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _refuse(self.prog, message)


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `ConfigError`s and whose optional numbers and switches take `none`."""

    def __init__(self, dataclass_types: Iterable[type], **kwargs: Any) -> None:
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if action.default is None and action.type in (int, float):
                action.type = _or_none(action.type)
            if action.default is None and action.type is string_to_bool:  # a switch whose default tells it apart
                action.type, action.nargs, action.const = _or_none(string_to_bool), "?", True  # --x as --x true
            if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_x repeats --x's help
                action.help = f"Turn --{action.dest} off (it is on by default)."
                action.default = argparse.SUPPRESS  # not "(default: False)"; --x's default True is what applies

    def error(self, message: str) -> None:  # type: ignore[override]
        _refuse(self.prog, message)

    def config_defaults(
        self, values: Mapping[str, Any], source: str, searchable: Collection[str] | None = None
    ) -> dict[str, Any]:
        """A config file's `values` as defaults of this parser's options, read as the same flags would be.

        A scalar becomes the string a command line holds, so argparse converts it alike; a list is taken only by an
        option of several values or a comma-separated one (`COMMA_SEPARATED`); null only by an optional
        one. Anything else would reach the dataclasses as a wrong type (a traceback, or worse a string read
        character by character), so it is refused here with the key, the value and what the option takes.
        `searchable`: the options a search may search, for a mapping of values given to one (None: this command
        searches nothing).
        """
        actions: dict[str, argparse.Action] = {}
        for action in self._actions:
            actions.setdefault(action.dest, action)  # `--x` comes before HfArgumentParser's `--no_x`
        return {
            key: _config_value(actions[key], value, f"{source}: {key}", searchable) for key, value in values.items()
        }

    def parse_dataclasses(self, argv: Sequence[str]) -> tuple[Any, ...]:
        """The dataclasses filled from `argv`; an argument no dataclass takes is refused, not ignored."""
        *parsed, remaining = self.parse_args_into_dataclasses(
            args=list(argv), return_remaining_strings=True, look_for_args_file=False
        )
        if remaining:
            raise ConfigError(f"Unrecognised arguments {remaining}. See `{self.prog} --help`.")
        return tuple(parsed)


def _takes(action: argparse.Action) -> str:
    """What an option takes, in words."""
    if action.choices is not None:
        one = f"one of {list(action.choices)}"
    else:
        one = _KINDS.get(getattr(action.type, "__name__", ""), "one value")
    if action.nargs in ("+", "*"):
        return f"a list, each item {one}"
    return f"{one} or null" if action.default is None else one


def _config_value(action: argparse.Action, value: Any, where: str, searchable: Collection[str] | None) -> Any:
    """One config value as its option's default (see `ArgumentParser.config_defaults`)."""
    key, takes = action.dest, _takes(action)
    several, joined = action.nargs in ("+", "*"), key in COMMA_SEPARATED
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(
            f"{where} is null (an empty value), but --{key} takes {takes}. Give it a value, or delete the line to keep "
            f"the default {action.default!r}."
        )
    if isinstance(value, dict):
        space = json.dumps({key: value})
        if searchable is None:
            search = f"To search over values, give them to `python tune/run.py --search_space '{space}'`."
        elif key in searchable:
            search = f"To search over values, give them to the search space: --search_space '{space}'."
        else:
            search = f"{key} cannot be searched either: the search space takes {', '.join(searchable)}."
        raise ConfigError(
            f"{where} is the mapping {value!r}, but --{key} takes {takes}: a config file gives each option one value. "
            + search
        )
    if isinstance(value, list) and not (several or joined):
        raise ConfigError(f"{where} is the list {value!r}, but --{key} takes one value: {takes}.")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None or isinstance(item, (dict, list)):
            raise ConfigError(f"{where} holds {item!r}, but --{key} takes {takes}.")
        if isinstance(item, bool) and action.type is str:
            example = '["no", "yes"]' if several or joined else '"no"'
            raise ConfigError(
                f"{where} holds {value!r}: YAML reads an unquoted no / yes / off / on as a boolean, but --{key} takes "
                f"{takes}. Quote such values in the config file as written, e.g. {key}: {example}."
            )
        if action.choices is not None and action.type(str(item)) not in action.choices:
            raise ConfigError(f"{where} is {item!r}, but --{key} takes {takes}.")
    if joined:
        return ",".join(map(str, items))
    try:  # converted here too, so that a bad value names the file it came from (argparse would name only the flag)
        converted = [action.type(str(item)) if action.type else str(item) for item in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{where} is {value!r}, but --{key} takes {takes}.") from None
    return converted if several else str(value)  # argparse converts a string default only
