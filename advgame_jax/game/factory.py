"""``make_judge``: the judge named by an experiment's typed ``judge`` section
(``advgame_jax.settings.JudgeSettings``): ``rule`` (offline lexicon judge), ``endpoint`` (OpenAI-compatible
servers) or ``sampler`` (an in-process ``Sampler`` the caller built from ``judge.hf_path``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from advgame_jax.game.endpoint import EndpointBackend, JudgeEndpointError, probe_judge
from advgame_jax.game.judge import Judge, LLMJudge, SamplerBackend
from advgame_jax.game.rule_judge import RuleJudge
from advgame_jax.game.templates import get_template_set
from advgame_jax.sampling.base import Generator, SamplingParams
from advgame_jax.settings import JudgeSettings

BACKENDS = ("endpoint", "rule", "sampler")  # judge.backend


def make_judge(
    judge: JudgeSettings,
    *,
    templates: str = "advgame_v1",
    sampler: Optional[Generator] = None,
    tokenizer: Any = None,
    seed: int = 0,
    check_endpoints: bool = True,
) -> Judge:
    """Build the judge of the ``judge`` section. The judge decodes with ``temperature`` /
    ``top_p`` (the reference: 0.6 / 0.9) and, with ``num_samples > 1``, averages the scores of
    that many answers per pairwise/pointwise request.

    The endpoint backend reads its API key from the environment variable named by
    ``api_key_env`` and, with ``check_endpoints``, fails fast naming any unreachable URL or a
    ``judge.model`` the endpoints do not serve, then sends one faithfulness and one pairwise
    probe and warns when an answer does not parse (``game.endpoint.probe_judge``). The sampler
    backend needs the in-process ``sampler`` the caller built from ``judge.hf_path`` and its
    ``tokenizer``.
    """
    if judge.backend == "rule":
        return RuleJudge()
    if judge.backend == "endpoint":
        return _endpoint_judge(judge, templates, seed=seed, check_endpoints=check_endpoints)
    if judge.backend == "sampler":
        return _sampler_judge(judge, templates, sampler, tokenizer, seed=seed)
    raise ValueError(f"config.judge.backend: expected one of {BACKENDS}, got {judge.backend!r}")


def _endpoint_judge(judge: JudgeSettings, templates: str, *, seed: int, check_endpoints: bool):
    """An ``LLMJudge`` over the OpenAI-compatible servers of ``judge.endpoints``."""
    env = judge.api_key_env
    if env and env not in os.environ:
        raise JudgeEndpointError(
            f"config.judge.api_key_env: environment variable {env!r} is not set"
        )
    client = EndpointBackend(
        judge.endpoints,
        judge.model,
        api_key=os.environ.get(env) if env else None,
        timeout_s=judge.timeout_s,
        max_retries=judge.max_retries,
        concurrency=judge.concurrency,
        max_tokens=judge.max_new_tokens,
        seed=seed,
        temperature=judge.temperature,
        top_p=float(judge.top_p),
        max_in_flight_per_endpoint=judge.max_in_flight_per_endpoint,
        unhealthy_after=judge.unhealthy_after,
        unhealthy_cooldown_s=judge.unhealthy_cooldown_s,
        warn_failure_rate=judge.warn_failure_rate,
        warn_every=judge.warn_every,
        explicit_sampling=judge.explicit_sampling,
    )
    llm = LLMJudge(client, get_template_set(templates), num_samples=int(judge.num_samples))
    if check_endpoints:
        client.check_endpoints()
        probe_judge(llm)
    return llm


def _sampler_judge(judge: JudgeSettings, templates: str, sampler, tokenizer, *, seed: int):
    """An ``LLMJudge`` decoding with an in-process sampler."""
    if sampler is None or tokenizer is None:
        raise ValueError("config.judge.backend='sampler': pass the judge sampler and its tokenizer")
    params = SamplingParams(
        temperature=float(judge.temperature),
        top_p=float(judge.top_p),
        max_new_tokens=int(judge.max_new_tokens),
        seed=seed,
    )
    return LLMJudge(
        SamplerBackend(sampler, tokenizer, params),
        get_template_set(templates),
        num_samples=int(judge.num_samples),
    )
