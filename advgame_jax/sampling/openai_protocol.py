"""The OpenAI wire format for the HTTP server: request validation and response bodies.

Pure functions from parsed JSON to ``(prompt token ids, SamplingParams)`` and from
``Completion`` records back to JSON; ``server.py`` owns the sockets, the queue and the worker.

Supported request fields (others are ignored, as OpenAI-compatible servers do):
``/v1/chat/completions``: ``messages`` (required; ``role`` user / assistant / system as the
chat template allows, ``content`` a string or a list of ``{"type": "text", "text"}`` parts),
``/v1/completions``: ``prompt`` (required; a string, a list of strings, a list of token ids
or a list of token-id lists). Both: ``model``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` (-1 or 0 =
off), ``n``, ``seed``, ``stop`` (string or up to 4 strings; the text is cut before the
first one), ``stop_token_ids``, ``ignore_eos``, ``logprobs`` (chat: bool, with
``top_logprobs`` 0; completions: 0 = the sampled token only), ``stream`` (false only).
By default generation also stops on the tokenizer's stop ids (``ignore_eos`` turns that off).
Every violation raises ``RequestError`` with the HTTP status and OpenAI error fields.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any, Optional, Sequence

from advgame_jax.sampling.base import Completion, SamplingParams


class RequestError(Exception):
    """A request the server rejects: HTTP ``status`` + OpenAI ``{"error": {...}}`` fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Server-side bounds on what one request may ask for."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_n: int = 16  # completions per request: prompts × n (a prompt list counts in full)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A validated request: ``prompts`` (token ids), one SamplingParams and output options."""

    kind: str  # "chat" | "completions"
    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False


def _bad(message, param=None, code=None):
    return RequestError(400, message, param=param, code=code)


def _number(body, name, default, lo, hi, *, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not ((lo < value) if lo_open else (lo <= value)) or value > hi:
        left = "(" if lo_open else "["
        raise _bad(f"'{name}' must be in {left}{lo}, {hi}], got {value}", name)
    return float(value)


def _integer(body, name, default, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def _token_ids(value, name, vocab_size) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _bad(f"'{name}' must be a list of integer token ids", name)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise _bad(f"'{name}' holds token id {bad[0]} outside [0, {vocab_size})", name)
    return tuple(value)


def _common(body: dict, tokenizer, limits: Limits, max_tokens_names: Sequence[str]):
    if body.get("stream"):
        raise _bad("'stream' is not supported by this server; send stream=false", "stream")
    max_tokens = None
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _integer(body, name, None, 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1, tokenizer.vocab_size)
    n = _integer(body, "n", 1, 1, limits.max_n)
    seed = _integer(body, "seed", None)
    if seed is None:
        seed = secrets.randbits(63)  # like OpenAI: without a seed, calls differ
    stop = body.get("stop")
    if stop is None:
        stop_strings = ()
    elif isinstance(stop, str):
        stop_strings = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stop_strings = tuple(s for s in stop if s)
    else:
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop")
    extra_ids = body.get("stop_token_ids") or []
    stop_ids = _token_ids(extra_ids, "stop_token_ids", tokenizer.vocab_size)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    if not ignore_eos:
        stop_ids = tuple(tokenizer.stop_token_ids) + stop_ids
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=max(top_k, 0), max_new_tokens=max_tokens,
        stop_token_ids=tuple(dict.fromkeys(stop_ids)), n=n, seed=seed)
    return params, stop_strings


def _check_length(prompts, limits: Limits):
    for ids in prompts:
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise _bad(f"the prompt has {len(ids)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", code="context_length_exceeded")


def _message_text(i, message) -> dict:
    if not isinstance(message, dict):
        raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise _bad(f"messages[{i}].role must be a string", "messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content parts must be {{'type': 'text', 'text': "
                           f"str}}; only text is supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                   "messages")
    return {"role": role, "content": content}


def parse_chat(body: Any, tokenizer, limits: Limits) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body and render its messages with the chat template."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    messages = [_message_text(i, m) for i, m in enumerate(messages)]
    params, stop_strings = _common(body, tokenizer, limits,
                                   ("max_tokens", "max_completion_tokens"))
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs")
    if body.get("top_logprobs"):
        raise _bad("'top_logprobs' > 0 is not supported; only the sampled token's log-prob "
                   "is returned", "top_logprobs")
    try:
        text = tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    except Exception as err:  # the template's own raise_exception, or a malformed turn
        raise _bad(f"the chat template rejected these messages: {err}", "messages") from err
    prompt = tuple(tokenizer.encode(text, add_special_tokens=False))
    _check_length([prompt], limits)
    return ParsedRequest("chat", (prompt,), params, stop_strings, logprobs)


def parse_completions(body: Any, tokenizer, limits: Limits) -> ParsedRequest:
    """Validate a ``/v1/completions`` body; text prompts are encoded without special tokens."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is required", "prompt")
    vocab = tokenizer.vocab_size
    if isinstance(prompt, str):
        prompts = [tuple(tokenizer.encode(prompt))]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tuple(tokenizer.encode(p)) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_ids(p, "prompt", vocab) for p in prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = [_token_ids(prompt, "prompt", vocab)]
    else:
        raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a "
                   "list of token-id lists (non-empty)", "prompt")
    params, stop_strings = _common(body, tokenizer, limits, ("max_tokens",))
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or logprobs != 0):
        raise _bad("'logprobs' must be 0 (the sampled token's log-prob) or absent; top "
                   "alternatives are not supported", "logprobs")
    _check_length(prompts, limits)
    if len(prompts) * params.n > limits.max_n:
        raise _bad(f"the request asks for {len(prompts)} prompts × n={params.n} = "
                   f"{len(prompts) * params.n} completions; this server returns at most "
                   f"{limits.max_n} per request", "prompt")
    return ParsedRequest("completions", tuple(prompts), params, stop_strings,
                         logprobs is not None)


def _apply_stop_strings(c: Completion, stop_strings, tokenizer):
    """Cut the text before the first stop string; keep the tokens that produced the rest."""
    cut = min((i for i in (c.text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut < 0:
        return c.text, c.token_ids, c.logprobs, c.finish_reason
    keep = len(c.token_ids)
    for m in range(len(c.token_ids) + 1):
        if len(tokenizer.decode(c.token_ids[:m])) >= cut:
            keep = m
            break
    return c.text[:cut], c.token_ids[:keep], c.logprobs[:keep], "stop"


def build_response(req: ParsedRequest, completions: Sequence[Completion], tokenizer,
                   model_name: str) -> dict:
    """The OpenAI response body for ``req`` (chat.completion or text_completion)."""
    choices = []
    completion_tokens = 0
    for index, c in enumerate(completions):
        completion_tokens += len(c.token_ids)
        text, ids, lps, finish = _apply_stop_strings(c, req.stop_strings, tokenizer)
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ids] \
            if req.logprobs else []
        if req.kind == "chat":
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [
                    {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                     "top_logprobs": []} for s, lp in zip(pieces, lps)]}
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": finish})
        else:
            logprobs = None
            if req.logprobs:
                offsets, pos = [], 0
                for s in pieces:
                    offsets.append(pos)
                    pos += len(s)
                logprobs = {"tokens": pieces, "token_logprobs": list(lps),
                            "top_logprobs": None, "text_offset": offsets}
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": finish})
    prompt_tokens = sum(len(p) for p in req.prompts)
    chat = req.kind == "chat"
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
