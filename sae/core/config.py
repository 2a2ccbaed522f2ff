"""Configuration helpers shared by every config dataclass and command line.

`option(default, help)` declares a config field with its --help text. `OptionError` is how a
config says a value is wrong: it names the field, and the command line shows the flag the user
typed instead (`--n-sequences`, not `n_sequences`).
"""
from __future__ import annotations

from dataclasses import field


def option(default, help: str):
    """A config field with its --help text (command lines are built from these)."""
    return field(default=default, metadata={"help": help})


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
