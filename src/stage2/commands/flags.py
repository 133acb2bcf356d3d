"""What a flag's value may be, declared where the flag is defined and checked in one place before anything runs.

A numeric flag's `type` is an :class:`Int` or :class:`Float` carrying its allowed range (``type=Int(min=1)``):
argparse calls it to read the command line, `config_value` reads a --config value (already typed by YAML or
JSON) with the flag's own type and choices, and `check_args` checks every parsed value, wherever it came from
(command line, --config, --demo), against the range its flag declares. Torch-free, like the parsers.

A flag given twice never drops a value silently: the commands' :class:`FlagParser` refuses a second value of a
one-value flag (`--lr 1e-3 --lr 1e-4`, `--manifest a.csv --manifest b.csv`), and a list flag (``action=Extend``:
`--val-manifest`, `--perturb`) adds each occurrence's values to the list.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from stage2.errors import ConfigError

# Pairs (a, b): flag a must not exceed flag b, where a parser has both.
NOT_ABOVE = (("min_lr", "lr"),)


@dataclass(frozen=True)
class Number:
    """A number in a range: `min`/`max` inclusive, `above`/`below` exclusive, optionally a multiple of an int;
    `words` are names the flag also takes in place of a number (`--self-blend paired`).

    Called by argparse with the command-line text; the range is checked by `check_args` (so that a value out of
    range is one line naming the flag, whatever its source).
    """

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    multiple_of: int | None = None
    words: tuple[str, ...] = ()

    kind: ClassVar[type] = float
    noun: ClassVar[str] = "a number"

    @property
    def __name__(self) -> str:  # argparse's "invalid <name> value: 'x'"
        return " or ".join([self.kind.__name__, *self.words])

    def __call__(self, text: str) -> int | float | str:
        return text if text in self.words else self.kind(text)

    def from_config(self, value: Any) -> int | float | str:
        """A YAML/JSON value as this type; ValueError when it is not one (1.5 for an integer, a list, a bool)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        if self.kind is int and not isinstance(value, int):
            raise ValueError
        return self.kind(value)

    def allows(self, value: int | float | str) -> bool:
        if isinstance(value, str):
            return value in self.words
        return (math.isfinite(value)
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below)
                and (self.multiple_of is None or value % self.multiple_of == 0))

    def describe(self) -> str:
        """`an integer >= 1`, `a number >= 0 and < 1`, `a multiple of 32 >= 32`."""
        show = str if self.kind is int else "{:g}".format
        bounds = [f"{op} {show(v)}" for op, v in ((">=", self.min), (">", self.above), ("<=", self.max),
                                                  ("<", self.below)) if v is not None]
        noun = f"a multiple of {self.multiple_of}" if self.multiple_of else self.noun
        number = " ".join([noun, " and ".join(bounds)]).strip()
        return ", or ".join([number, *self.words])


@dataclass(frozen=True)
class Int(Number):
    kind = int
    noun = "an integer"


Float = Number


class FlagParser(argparse.ArgumentParser):
    """The commands' parser: every plain flag takes one value (:class:`Once`); `given` holds the flags met so far
    in the parse under way (the dests of :class:`Once`, :class:`Extend` and the switches), which tells a flag given
    on the command line from a default (--demo's, --config's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, Once)  # add_argument without action=
        self.register("action", "store", Once)
        self.register("action", "store_true", NotedTrue)
        self.register("action", "store_false", NotedFalse)
        self.given: set[str] = set()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self.given = set()
        return super().parse_known_args(args, namespace)


class Once(argparse.Action):
    """argparse's `store`, but a second occurrence is a ConfigError naming both values: argparse kept the last one
    and dropped the first without a word."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.dest in parser.given:
            raise ConfigError(f"{option_string} given twice ({_shown(getattr(namespace, self.dest))}, then "
                              f"{_shown(values)}): it takes one value")
        parser.given.add(self.dest)
        setattr(namespace, self.dest, values)


class Noted(argparse.Action):
    """A switch that notes itself in the parser's `given`; mixed into argparse's store_true and store_false."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class NotedTrue(Noted, argparse._StoreTrueAction):  # argparse keeps its action classes private
    pass


class NotedFalse(Noted, argparse._StoreFalseAction):
    pass


class Extend(argparse.Action):
    """A list flag: each occurrence adds its values, `--val-manifest a.csv --val-manifest b.csv` is both. The first
    occurrence replaces the default (the parser's, or what --config or --demo set) instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(values) if isinstance(values, list) else [values]
        if self.dest in parser.given:
            items = [*getattr(namespace, self.dest), *items]
        parser.given.add(self.dest)
        setattr(namespace, self.dest, items)


def given_flags(parser: FlagParser, dests: tuple[str, ...]) -> dict[str, str]:
    """Of `dests`, those given on the command line of the parser's last parse, as {dest: the flag given}."""
    return {action.dest: action.option_strings[0] for action in parser._actions  # argparse keeps no public list
            if action.dest in dests and action.dest in parser.given}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric value of `args` in its flag's range, and NOT_ABOVE; ConfigError naming the first one that
    is not (flag, value, allowed range)."""
    for action in parser._actions:  # argparse keeps no public list of its options
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Number) and value is not None and not action.type.allows(value):
            raise ConfigError(f"{_flag(action)} {value}: expected {action.type.describe()}")
    for low, high in NOT_ABOVE:
        a, b = getattr(args, low, None), getattr(args, high, None)
        if a is not None and b is not None and a > b:
            raise ConfigError(f"--{low.replace('_', '-')} {a}: expected at most --{high.replace('_', '-')} ({b})")


def config_value(action: argparse.Action, value: Any) -> Any:
    """A --config value (YAML or JSON: already a bool, number, string, list or null) as the flag's own type and
    choices would read it; ValueError with one line naming the value and what the flag takes."""
    try:
        converted = _convert(action, value)
        ok = all(v is None or _allowed(action, v) for v in (converted if isinstance(converted, list) else [converted]))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        ok = False
    if not ok:
        hint = " (YAML reads yes/no/on/off as true/false: quote it)" if isinstance(value, bool) else ""
        raise ValueError(f"{json.dumps(value)}: expected {_expected(action)}{hint}")
    return converted


def _allowed(action: argparse.Action, value: Any) -> bool:
    return ((action.choices is None or value in action.choices)
            and (not isinstance(action.type, Number) or action.type.allows(value)))


def _convert(action: argparse.Action, value: Any) -> Any:
    if value is None:
        if action.default is None:  # an optional flag left unset, as args.json records it
            return None
        raise ValueError
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ValueError
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError
        return [_scalar(action, item) for item in items]
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    if isinstance(action.type, Number):
        return action.type.from_config(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError
    return (action.type or str)(str(value))  # a number where a string is expected is read as its text


def _expected(action: argparse.Action) -> str:
    if _is_switch(action):
        return "true or false"
    if action.choices is not None:
        what = f"one of {', '.join(map(str, action.choices))}"
    elif isinstance(action.type, Number):
        what = action.type.describe()
    else:
        what = "a string"
    if action.nargs in ("+", "*"):
        what = f"{what} or a list of them"
    return f"{what} or null" if action.default is None else what


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0  # store_true/store_false and --x/--no-x


def _flag(action: argparse.Action) -> str:
    return action.option_strings[0]
