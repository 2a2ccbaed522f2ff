"""Configuration: every option is a dataclass field, and every command line is built from them.

`option(default, help)` declares a config field with its --help text; `add_options` turns a
config dataclass into argparse options and `from_args` builds the config back from the parsed
arguments; `config_parser` and `parse_config` do both for a command whose options are one config
(the one builder every CLI uses). `OptionError` is how a config says a value is wrong: it
names the field, and the command line shows the flag the user typed instead (`--n-sequences`,
not `n_sequences`).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field


def option(default, help: str):
    """A config field with its --help text (command lines are built from these)."""
    return field(default=default, metadata={"help": help})


def argument(help: str):
    """A config field without a default: a positional argument of its command (see config_parser)."""
    return field(metadata={"help": help})


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


class OptionError(ValueError):
    """An invalid option value. str() names the field (library users pass fields); `cli_message`
    names the flag (command-line users type flags). `problem` may name other options as {key},
    with `others` mapping each key to its field name; `flag_name` overrides the flag shown."""

    def __init__(self, name: str, problem: str, flag_name: str | None = None, **others: str):
        self.name, self.problem, self.others = name, problem, others
        self.flag = flag_name or flag(name)
        super().__init__(f"{name} {self._render(lambda field_name: field_name)}")

    def _render(self, show) -> str:
        if not self.others:
            return self.problem
        return self.problem.format(**{key: show(field_name) for key, field_name in self.others.items()})

    def cli_message(self) -> str:
        return f"{self.flag} {self._render(flag)}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the default is None (an option whose default depends on others)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_options(parser, cls, defaults: dict | None = None, skip=()) -> None:
    """One --flag per field of the dataclass `cls`: typed from its annotation, help from its
    metadata, default from `defaults` or the field. Booleans take --flag / --no-flag (a value such
    as "False" would otherwise parse as True); list fields take several values."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip and f.init:
            add_option(parser, f.name, hints[f.name], (defaults or {}).get(f.name, _field_default(f)),
                       f.metadata.get("help", ""))


def add_option(parser, name: str, kind, default, help_text: str, several: bool = False) -> None:
    """One --flag for a field `name` of type `kind` (see add_options); `several`: the flag takes
    one or more values (a sweep), parsed as a list."""
    if kind is bool:
        parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
    elif typing.get_origin(kind) is list:
        parser.add_argument(flag(name), nargs="+", type=typing.get_args(kind)[0], default=default, help=help_text)
    else:
        parser.add_argument(flag(name), type=kind, default=default, help=help_text, nargs="+" if several else None)


def config_parser(cls, prog: str, description: str, positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser of a command whose options are the fields of `cls`: the fields named in
    `positional` become positional arguments (a list field takes one or more), the rest --flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    hints, by_name = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    for name in positional:
        kind = hints[name]
        several = typing.get_origin(kind) is list
        parser.add_argument(name, type=typing.get_args(kind)[0] if several else kind, nargs="+" if several else None,
                            help=by_name[name].metadata.get("help", ""))
    add_options(parser, cls, skip=positional)
    return parser


def parse_config(cls, argv, prog: str, description: str, positional: tuple[str, ...] = ()):
    """The config `cls` from a command line (see config_parser)."""
    return from_args(cls, config_parser(cls, prog, description, positional).parse_args(argv))


def from_args(cls, args: argparse.Namespace, **overrides):
    """The config `cls` from parsed arguments (fields add_options made), with `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
