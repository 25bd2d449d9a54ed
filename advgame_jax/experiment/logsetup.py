"""Where log lines go during a training run: the console shows the project's own progress
lines and every warning; libraries' INFO chatter (Orbax at every save, absl, JAX) goes only
to ``<workdir>/train.log`` (mode 0600), which also receives everything the console shows.
"""

from __future__ import annotations

import logging as pylogging
import os

from absl import logging

import advgame_jax

LOG_FILE = "train.log"
# Source trees whose INFO lines are the project's own (the progress line, resume notes).
_OWN_ROOTS = (os.path.dirname(os.path.abspath(advgame_jax.__file__)) + os.sep,
              os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
                  advgame_jax.__file__))), "launch") + os.sep)


class ConsoleFilter(pylogging.Filter):
    """Passes warnings and errors from anywhere, INFO only from this project's sources."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return os.path.abspath(record.pathname).startswith(_OWN_ROOTS)


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
    return path
