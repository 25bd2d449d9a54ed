"""The user-error base shared by the whole project, and how entry points report it.

Every exception that means "the user's input is wrong" (a config field, an override, a seed
line, a prompt-set row, a checkpoint that does not match, an endpoint that does not answer as
expected, a directory in use by another run) derives from ``UserError``. Its message names the
file/field and what was expected, in one line. Entry points run their body through
``run_cli``, which turns a ``UserError`` into one ``error: <message>`` line on stderr and exit
status 2: no traceback, no help dump. Anything else is a bug and keeps its traceback.

Subclasses keep a second, standard base (``ValueError``, ``PermissionError``, …) so that code
catching the standard type keeps working.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad user input: the message is one line naming the file/field and what was expected."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (newlines folded), never empty."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USER_ERROR)


def run_cli(body: Callable[[], T]) -> T:
    """Run an entry point's ``body()``; a ``UserError`` becomes one ``error:`` line, exit 2."""
    try:
        return body()
    except UserError as err:
        fail(one_line(err))
