"""Per-stage wall-clock accounting for the game loop, by wrapping samplers and judges.

The game code stays unaware of timing: the loop hands it ``TimedSampler`` / ``TimedJudge``
proxies, which add the time of each call to a ``StageTimer`` under a stage name
(``attacker_generation``, ``faithfulness``, ``defender_generation``, ``judging``).
"""

from __future__ import annotations

import collections
import contextlib
import time


class StageTimer:
    """Accumulates seconds per stage until ``pop()`` returns and clears them."""

    def __init__(self):
        self._t = collections.defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._t[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._t.items()}
        self._t.clear()
        return out


class TimedSampler:
    """A ``Generator`` proxy (what the game calls) that times ``generate`` under ``stage``;
    weights and counters stay with the player's sampler."""

    def __init__(self, sampler, timer: StageTimer, stage: str):
        self._sampler, self._timer, self._stage = sampler, timer, stage

    def generate(self, prompt_token_ids, params):
        with self._timer.stage(self._stage):
            return self._sampler.generate(prompt_token_ids, params)


class TimedJudge:
    """A ``Judge`` proxy: faithfulness calls under ``faithfulness``, scoring under ``judging``."""

    def __init__(self, judge, timer: StageTimer):
        self._judge, self._timer = judge, timer

    def faithfulness(self, requests):
        with self._timer.stage("faithfulness"):
            return self._judge.faithfulness(requests)

    def pairwise(self, requests):
        with self._timer.stage("judging"):
            return self._judge.pairwise(requests)

    def pointwise(self, requests):
        with self._timer.stage("judging"):
            return self._judge.pointwise(requests)

    def fault_counts(self):
        return self._judge.fault_counts()
