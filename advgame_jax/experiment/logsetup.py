"""Where log lines go: the console shows the project's own progress lines and warnings;
libraries' INFO chatter (Orbax at every save, absl, JAX), every Orbax record (its warnings
about metadata it does not need, its tracebacks when a write fails) and every traceback of a
library go only to ``<workdir>/train.log`` (mode 0600) during a training run, which also
receives everything the console shows. A record logged with ``extra=FILE_ONLY`` (e.g. the
traceback behind a one-line ``error:``) goes to the file only. Evaluation tools, which have
no log file, call :func:`quiet_console` for the same console.
"""

from __future__ import annotations

import logging as pylogging
import os

from absl import logging

import advgame_jax

LOG_FILE = "train.log"
# Source trees whose INFO lines are the project's own (the progress line, resume notes).
_OWN_ROOTS = (
    os.path.dirname(os.path.abspath(advgame_jax.__file__)) + os.sep,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(advgame_jax.__file__))), "launch")
    + os.sep,
)


FILE_ONLY = {"advgame_file_only": True}
_ORBAX = os.sep + "orbax" + os.sep


class ConsoleFilter(pylogging.Filter):
    """Passes the project's own records (INFO and up) and libraries' warnings and errors,
    except Orbax's records, libraries' tracebacks and ``FILE_ONLY`` records."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if getattr(record, "advgame_file_only", False):
            return False
        path = os.path.abspath(record.pathname)
        if path.startswith(_OWN_ROOTS):
            return True
        if _ORBAX in path or record.name.startswith("orbax") or record.exc_info:
            return False
        return record.levelno >= pylogging.WARNING


def quiet_console() -> None:
    """INFO verbosity with :class:`ConsoleFilter` on the console (tools without a log file)."""
    logging.set_verbosity(logging.INFO)
    console = logging.get_absl_handler()
    if not any(isinstance(f, ConsoleFilter) for f in console.filters):
        console.addFilter(ConsoleFilter())


_LOG_PATH: list[str] = []


def divert_stderr() -> None:
    """Send whatever is still written to stderr (fd 2) to the run's log file: called right
    after the one ``error:`` line, so that a library's late noise at exit (Orbax/asyncio
    callbacks failing after a failed save) lands in ``train.log``, not on the console. No-op
    before :func:`configure_logging`."""
    if not _LOG_PATH:
        return
    import sys

    sys.stderr.flush()
    fd = os.open(_LOG_PATH[-1], os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)


def configure_logging(workdir: str) -> str:
    """Route INFO-level logging as described above; returns the log file's path. Call once,
    after absl has parsed flags (``app.run``) and ``workdir`` exists."""
    logging.set_verbosity(logging.INFO)
    path = os.path.join(os.path.abspath(workdir), LOG_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = pylogging.FileHandler(path, encoding="utf-8")
    handler.setLevel(pylogging.INFO)
    handler.setFormatter(logging.PythonFormatter())
    pylogging.getLogger().addHandler(handler)
    console = logging.get_absl_handler()
    if not any(isinstance(f, ConsoleFilter) for f in console.filters):
        console.addFilter(ConsoleFilter())
    _LOG_PATH.append(path)
    return path
