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
    names the flag (command-line users type flags)."""

    def __init__(self, name: str, problem: str, flag_name: str | None = None):
        self.name, self.problem, self.flag = name, problem, flag_name or flag(name)
        super().__init__(f"{name} {problem}")

    def cli_message(self) -> str:
        return f"{self.flag} {self.problem}"
