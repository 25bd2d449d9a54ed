"""Replicas of one service: the least-loaded healthy replica router, and the failure-rate
warning a caller raises over its batches of requests.

``ReplicaRouter``: each attempt goes to the healthy replica with the fewest requests in
flight (ties: the one given the fewest requests so far, then the first listed), at most
``max_in_flight_per_endpoint`` on any one replica (0: no per-replica bound; ``acquire`` waits
for a free slot). ``unhealthy_after`` consecutive failed attempts mark a replica unhealthy
for ``unhealthy_cooldown_s``; it is then used only when no replica is healthy.

``FailureRateMonitor``: ``note(requests, failed)`` once per batch. A warning is logged at the
end of the first batch at which the failure rate of the batches since the last warning
crosses ``threshold`` (so a judge that fails from the start is named after its first batch);
while the rate stays above it, at most one more warning every ``every`` batches. A window of
``every`` batches under the threshold starts a new window.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence


class Replica:
    """One replica: its base URL, requests in flight and health."""

    def __init__(self, base: str):
        self.base = base
        self.in_flight = self.peak_in_flight = self.assigned = 0
        self.consecutive_failures = 0
        self.unhealthy_until = 0.0
        self.attempts = self.failures = 0


class ReplicaRouter:
    def __init__(
        self,
        bases: Sequence[str],
        *,
        max_in_flight_per_endpoint: int = 0,
        unhealthy_after: int = 3,
        unhealthy_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not bases:
            raise ValueError("a replica router needs at least one base URL")
        if max_in_flight_per_endpoint < 0 or unhealthy_after < 1 or unhealthy_cooldown_s < 0:
            raise ValueError(
                "replica options: expected max_in_flight_per_endpoint >= 0, "
                f"unhealthy_after >= 1, unhealthy_cooldown_s >= 0; got "
                f"{max_in_flight_per_endpoint}, {unhealthy_after}, "
                f"{unhealthy_cooldown_s}"
            )
        self.replicas = [Replica(b) for b in bases]
        self.max_in_flight_per_endpoint = int(max_in_flight_per_endpoint)
        self.unhealthy_after = int(unhealthy_after)
        self.unhealthy_cooldown_s = float(unhealthy_cooldown_s)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())

    def acquire(
        self, pin: Optional[int] = None, timeout: Optional[float] = None
    ) -> Optional[Replica]:
        """The least-loaded healthy replica with a free slot (``pin``: that replica, whatever
        its health); waits for a slot, at most ``timeout`` seconds (then None)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                cap = self.max_in_flight_per_endpoint or None
                cands = self.replicas if pin is None else [self.replicas[pin]]
                free = [r for r in cands if cap is None or r.in_flight < cap]
                now = self._clock()
                pool = [r for r in free if r.unhealthy_until <= now] or free
                if pool:
                    best = min(
                        pool, key=lambda r: (r.in_flight, r.assigned, self.replicas.index(r))
                    )
                    best.assigned += 1
                    best.in_flight += 1
                    best.peak_in_flight = max(best.peak_in_flight, best.in_flight)
                    return best
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def release(self, replica: Replica, ok: bool, record: bool = True) -> None:
        """Free ``replica``'s slot; ``record``: count the attempt in its health."""
        with self._cond:
            replica.in_flight -= 1
            self._cond.notify()
            if not record:
                return
            replica.attempts += 1
            if ok:
                replica.consecutive_failures = 0
            else:
                replica.failures += 1
                replica.consecutive_failures += 1
                if replica.consecutive_failures >= self.unhealthy_after:
                    replica.unhealthy_until = self._clock() + self.unhealthy_cooldown_s

    def health(self) -> list[dict]:
        """Per replica: base URL, healthy now, in flight (now / at most), attempts, failed
        attempts."""
        now = self._clock()
        with self._cond:
            return [
                {
                    "endpoint": r.base,
                    "healthy": r.unhealthy_until <= now,
                    "in_flight": r.in_flight,
                    "peak_in_flight": r.peak_in_flight,
                    "attempts": r.attempts,
                    "failures": r.failures,
                }
                for r in self.replicas
            ]

    def describe(self) -> str:
        return ", ".join(
            f"{h['endpoint']} {'up' if h['healthy'] else 'UNHEALTHY'} "
            f"({h['failures']}/{h['attempts']} attempts failed)"
            for h in self.health()
        )


class FailureRateMonitor:
    """Warns when too many of a caller's requests fail (module docstring).

    what: who fails, e.g. "JUDGE"; consequence: what the failures become;
    details: extra text at the end of the warning (endpoint health, fault counts)."""

    def __init__(
        self,
        *,
        threshold: float = 0.1,
        every: int = 10,
        what: str = "JUDGE",
        consequence: str = "their slots become judge error values",
        details: Callable[[], str] = lambda: "",
        logger: str = "advgame_jax.judge",
    ):
        if every < 1 or not 0.0 <= threshold <= 1.0:
            raise ValueError(
                f"failure-rate warning: expected every >= 1 and 0 <= threshold <= 1; "
                f"got {every}, {threshold}"
            )
        self.threshold, self.every = float(threshold), int(every)
        self.what, self.consequence, self.details = what, consequence, details
        self._log = logging.getLogger(logger)
        self._lock = threading.Lock()
        self._window = [0, 0, 0]  # batches, requests, failed requests since the window began
        self._since_warning: Optional[int] = None  # batches since the last warning
        self.warnings_logged = 0

    def note(self, requests: int, failed: int) -> bool:
        """Record one batch; True when this batch logged a warning."""
        with self._lock:
            w = self._window
            w[0] += 1
            w[1] += requests
            w[2] += failed
            if self._since_warning is not None:
                self._since_warning += 1
            batches, total, bad = w
            crossed = total > 0 and bad / total > self.threshold
            may_warn = self._since_warning is None or self._since_warning >= self.every
            if not (crossed and may_warn):
                if batches >= self.every and not crossed:
                    self._window = [0, 0, 0]
                return False
            self._window = [0, 0, 0]
            self._since_warning = 0
            self.warnings_logged += 1
        extra = self.details()
        self._log.warning(
            "%s FAILURE RATE %.1f%% over the last %d batch%s (%d of %d requests failed after "
            "retries; threshold %.1f%%); %s.%s",
            self.what,
            100.0 * bad / total,
            batches,
            "" if batches == 1 else "es",
            bad,
            total,
            100.0 * self.threshold,
            self.consequence,
            f" {extra}" if extra else "",
        )
        return True
