"""Counts XLA backend compilations process-wide, so runs and tests can prove "no recompiles".

JAX reports every backend compilation through ``jax.monitoring``; one listener, registered
once, increments a counter that the game loop logs as ``sys/compilations``. With a persistent
compilation cache (``JAX_COMPILATION_CACHE_DIR``) a program may be loaded from the cache
instead of compiled; a load counts too, so a recompile is still seen when the cache hides it.
"""

from __future__ import annotations

import threading

import jax

_EVENTS = frozenset(
    {
        "/jax/core/compile/backend_compile_duration",  # compiled
        "/jax/compilation_cache/cache_retrieval_time_sec",  # loaded from the persistent cache
    }
)
_lock = threading.Lock()
_count = 0
_registered = False


def _listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
    global _count
    if event in _EVENTS:
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
    """Programs compiled (or loaded from the persistent cache) since ``install()``."""
    install()
    return _count
