"""Counts XLA backend compilations process-wide, so runs and tests can prove "no recompiles".

JAX reports every backend compilation through ``jax.monitoring``; one listener, registered
once, increments a counter that the game loop logs as ``sys/compilations``.
"""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_registered = False


def _listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def install() -> None:
    """Register the listener (idempotent)."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


def count() -> int:
    """Backend compilations seen since ``install()``."""
    install()
    return _count
