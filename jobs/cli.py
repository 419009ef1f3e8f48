"""What every ``python -m jobs.X`` shares: a parser whose errors are one line and exit 2."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse with its defaults shown in ``--help`` and a bad argument reported as one line
    (``error: argument --n: ...``) instead of the usage block, exit status 2."""

    def __init__(self, prog: str, doc: str | None):
        super().__init__(prog=f"python -m {prog}", description=doc,
                         formatter_class=_Help)

    def error(self, message: str):
        print(f"error: {message} (python -m {self.prog.split()[-1]} --help)", file=sys.stderr)
        sys.exit(2)


class _Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default after its help, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is not None and d is not False and d != argparse.SUPPRESS and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
