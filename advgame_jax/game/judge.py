"""The ``Judge`` protocol and the LLM judge built on any text-completion backend.

A judge answers three kinds of batched requests; each returns one result per request, with
``None`` (or a ``None`` side of a pair) wherever it could not produce a usable answer:

- ``faithfulness([FaithRequest]) -> [bool | None]``
- ``pairwise([PairRequest]) -> [(score_A | None, score_B | None)]``
- ``pointwise([PointRequest]) -> [score | None]``
- ``fault_counts() -> {kind: count}``: cumulative backend faults (timeouts, HTTP errors, …).

A judge never raises for a bad answer. ``LLMJudge`` renders requests with a ``TemplateSet``,
sends all prompts of a call to a ``TextBackend`` at once and parses the answers
(``game.parsing``). Backends: ``EndpointBackend`` (``game.endpoint``, an OpenAI-compatible
server) and ``SamplerBackend`` (an in-process ``Sampler``, for small colocated judges).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from advgame_jax.game import parsing
from advgame_jax.game.templates import TemplateSet
from advgame_jax.net import FaultCounter
from advgame_jax.sampling.base import Generator, SamplingParams

PairScores = tuple[Optional[float], Optional[float]]


@dataclasses.dataclass(frozen=True)
class FaithRequest:
    """Is ``attack`` faithful to ``seed`` (category selects the direction of the question)?"""

    seed: str
    attack: str
    category: str


@dataclasses.dataclass(frozen=True)
class PairRequest:
    """Score ``response_a`` (position A) and ``response_b`` (position B) under ``rubric``."""

    rubric: str
    query: str
    response_a: str
    response_b: str


@dataclasses.dataclass(frozen=True)
class PointRequest:
    rubric: str
    query: str
    response: str


@runtime_checkable
class Judge(Protocol):
    def faithfulness(self, requests: Sequence[FaithRequest]) -> list[Optional[bool]]: ...

    def pairwise(self, requests: Sequence[PairRequest]) -> list[PairScores]: ...

    def pointwise(self, requests: Sequence[PointRequest]) -> list[Optional[float]]: ...

    def fault_counts(self) -> Mapping[str, int]: ...


@runtime_checkable
class TextBackend(Protocol):
    """Answers user-turn prompts with text (None where no answer came back)."""

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]: ...

    def fault_counts(self) -> Mapping[str, int]: ...


class LLMJudge:
    """A ``Judge`` that asks a language model through a ``TextBackend``.

    Answers that come back but do not parse are counted as ``unparsable`` faults.
    ``num_samples`` (pairwise and pointwise requests): each prompt is answered that many times
    (sampled decoding) and the parsed scores are averaged over the samples that parsed (a pair
    counts only when both its scores parsed); no parsed sample gives None. Faithfulness
    requests are answered once each: the rollout asks ``num_faith_samples`` times and takes a
    majority instead. Scores above 10 (clipped by the parser) are counted as
    ``score_out_of_range``.
    """

    def __init__(self, backend: TextBackend, templates: TemplateSet, *, num_samples: int = 1):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"judge num_samples: expected an integer >= 1, got {num_samples!r}")
        self.backend = backend
        self.templates = templates
        self.num_samples = num_samples
        self._faults = FaultCounter()

    def _complete(self, prompts: list[str]) -> list[Optional[str]]:
        if not prompts:
            return []
        return list(self.backend.complete(prompts))

    def _complete_n(self, prompts: list[str]) -> list[list[Optional[str]]]:
        """``num_samples`` answers per prompt, all prompts in one backend call."""
        k = self.num_samples
        texts = self._complete([p for p in prompts for _ in range(k)])
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]

    def _count_unparsable(self, texts, parsed_ok) -> None:
        bad = sum(1 for t, ok in zip(texts, parsed_ok, strict=True) if t is not None and not ok)
        if bad:
            self._faults.add("unparsable", bad)

    def _count_out_of_range(self, texts, tags) -> None:
        n = sum(parsing.score_out_of_range(t, tag) for t in texts for tag in tags)
        if n:  # clipped to [0, 10] by the parser; counted so a miscalibrated judge shows
            self._faults.add("score_out_of_range", n)

    def faithfulness(self, requests: Sequence[FaithRequest]) -> list[Optional[bool]]:
        prompts = [
            self.templates.faithfulness_prompt(r.seed, r.attack, r.category) for r in requests
        ]
        texts = self._complete(prompts)
        verdicts = [parsing.parse_faith_verdict(t) for t in texts]
        self._count_unparsable(texts, [v is not None for v in verdicts])
        return verdicts

    def pairwise(self, requests: Sequence[PairRequest]) -> list[PairScores]:
        prompts = [
            self.templates.pairwise_prompt(r.rubric, r.query, r.response_a, r.response_b)
            for r in requests
        ]
        out = []
        for texts in self._complete_n(prompts):
            scores = [parsing.parse_pair_scores(t) for t in texts]
            self._count_unparsable(texts, [a is not None for a, _ in scores])
            self._count_out_of_range(texts, ("score_A", "score_B"))
            # parse_pair_scores gives both scores or neither.
            ok = [(a, b) for a, b in scores if a is not None and b is not None]
            out.append(
                (sum(a for a, _ in ok) / len(ok), sum(b for _, b in ok) / len(ok))
                if ok
                else (None, None)
            )
        return out

    def pointwise(self, requests: Sequence[PointRequest]) -> list[Optional[float]]:
        prompts = [self.templates.pointwise_prompt(r.rubric, r.query, r.response) for r in requests]
        out = []
        for texts in self._complete_n(prompts):
            scores = [parsing.parse_score(t, "score") for t in texts]
            self._count_unparsable(texts, [v is not None for v in scores])
            self._count_out_of_range(texts, ("score",))
            ok = [v for v in scores if v is not None]
            out.append(sum(ok) / len(ok) if ok else None)
        return out

    def fault_counts(self) -> dict[str, int]:
        counts = collections.Counter(self._faults.snapshot())
        counts.update(self.backend.fault_counts())
        return dict(counts)


class SamplerBackend:
    """A ``TextBackend`` over an in-process ``Sampler``: one ``generate`` call per batch.

    ``tokenizer`` needs ``render_user_turn(text) -> ids``. A sampler exception turns the whole
    batch into None (fault ``sampler_error``); a length-stopped answer is still parsed (the
    score may already be there) and counted as fault ``length``.
    """

    def __init__(self, sampler: Generator, tokenizer: Any, params: SamplingParams):
        self.sampler = sampler
        self.tokenizer = tokenizer
        stop = params.stop_token_ids or tuple(getattr(tokenizer, "stop_token_ids", ()))
        self.params = dataclasses.replace(params, n=1, stop_token_ids=tuple(stop))
        self._faults = FaultCounter()

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]:
        try:
            ids = [self.tokenizer.render_user_turn(p) for p in prompts]
            completions = self.sampler.generate(ids, self.params)
            if len(completions) != len(prompts):
                raise ValueError(
                    f"sampler returned {len(completions)} completions for {len(prompts)} prompts"
                )
        except Exception:  # a judge fault inside a step must not end the step
            self._faults.add("sampler_error", len(prompts))
            return [None] * len(prompts)
        lengths = sum(1 for c in completions if c.finish_reason == "length")
        if lengths:
            self._faults.add("length", lengths)
        return [c.text for c in completions]

    def fault_counts(self) -> dict[str, int]:
        return self._faults.snapshot()
