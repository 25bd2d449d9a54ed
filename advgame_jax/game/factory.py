"""``make_judge``: the judge named by an experiment's ``config.judge`` section
(``experiment/configs/base.py``): ``rule`` (offline lexicon judge), ``endpoint`` (OpenAI-compatible
servers) or ``sampler`` (an in-process ``Sampler`` the caller built from ``judge.hf_path``).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Optional

from advgame_jax.game.endpoint import EndpointBackend, JudgeEndpointError, probe_judge
from advgame_jax.game.judge import Judge, LLMJudge, SamplerBackend
from advgame_jax.game.rule_judge import RuleJudge
from advgame_jax.game.templates import get_template_set
from advgame_jax.sampling.base import Generator, SamplingParams

log = logging.getLogger(__name__)


BACKENDS = ("endpoint", "rule", "sampler")  # config.judge.backend

# Replica / health / warning options of EndpointBackend, passed through when the config has them.
_ENDPOINT_OPTIONS = (
    "max_in_flight_per_endpoint",
    "unhealthy_after",
    "unhealthy_cooldown_s",
    "warn_failure_rate",
    "warn_every",
    "explicit_sampling",
)


def make_judge(
    judge_config: Any,
    *,
    templates: str = "advgame_v1",
    sampler: Optional[Generator] = None,
    tokenizer: Any = None,
    seed: int = 0,
    check_endpoints: bool = True,
) -> Judge:
    """Build the judge of ``judge_config`` (fields: backend, endpoints, model, api_key_env,
    timeout_s, max_retries, concurrency, temperature, top_p, num_samples, max_new_tokens).
    The judge decodes with ``temperature`` / ``top_p`` (the reference: 0.6 / 0.9) and, with
    ``num_samples > 1``, averages the scores of that many answers per pairwise/pointwise
    request.

    The endpoint backend reads its API key from the environment variable named by
    ``api_key_env`` and, with ``check_endpoints``, fails fast naming any unreachable URL or a
    ``judge.model`` the endpoints do not serve, then sends one faithfulness and one pairwise
    probe and warns when an answer does not parse (``game.endpoint.probe_judge``).
    """
    backend = judge_config.backend
    if backend == "rule":
        return RuleJudge()
    template_set = get_template_set(templates)
    top_p = float(judge_config.get("top_p", 1.0))
    num_samples = int(judge_config.get("num_samples", 1))
    if backend == "endpoint":
        decoding = dict(temperature=judge_config.temperature)
        if "top_p" in inspect.signature(EndpointBackend).parameters:
            decoding["top_p"] = top_p
        elif top_p < 1.0:
            log.warning(
                "config.judge.top_p=%s: this endpoint client sends no top_p; the "
                "server's default applies",
                top_p,
            )
        env = judge_config.api_key_env
        if env and env not in os.environ:
            raise JudgeEndpointError(
                f"config.judge.api_key_env: environment variable {env!r} is not set"
            )
        client = EndpointBackend(
            judge_config.endpoints,
            judge_config.model,
            api_key=os.environ.get(env) if env else None,
            timeout_s=judge_config.timeout_s,
            max_retries=judge_config.max_retries,
            concurrency=judge_config.concurrency,
            max_tokens=judge_config.max_new_tokens,
            seed=seed,
            **decoding,
            **{k: judge_config[k] for k in _ENDPOINT_OPTIONS if k in judge_config},
        )
        judge = LLMJudge(client, template_set, num_samples=num_samples)
        if check_endpoints:
            client.check_endpoints()
            probe_judge(judge)
        return judge
    if backend == "sampler":
        if sampler is None or tokenizer is None:
            raise ValueError(
                "config.judge.backend='sampler': pass the judge sampler and its tokenizer"
            )
        params = SamplingParams(
            temperature=float(judge_config.temperature),
            top_p=top_p,
            max_new_tokens=int(judge_config.max_new_tokens),
            seed=seed,
        )
        return LLMJudge(
            SamplerBackend(sampler, tokenizer, params), template_set, num_samples=num_samples
        )
    raise ValueError(f"config.judge.backend: expected one of {BACKENDS}, got {backend!r}")
