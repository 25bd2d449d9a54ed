"""The OpenAI wire format of the server: request models (pydantic) and response bodies.

Requests are validated straight from the raw body by pydantic (strict types; unknown fields
are ignored, as OpenAI-compatible servers do), then checked against the server's ``Limits``
and turned into ``(prompt token ids, SamplingParams)``. Responses and stream chunks follow the
shapes of the ``openai`` package's models, so the official client parses them.

Fields: ``/v1/chat/completions``: ``messages`` (``role``, ``content`` a string or a list of
``{"type": "text", "text"}`` parts), ``max_tokens`` / ``max_completion_tokens``, ``logprobs``
(bool) with ``top_logprobs`` 0-20. ``/v1/completions``: ``prompt`` (a string, strings, token
ids or token-id lists), ``max_tokens``, ``logprobs`` 0-5 (alternatives per token). Both:
``model``, ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` (-1 / 0 = off), ``n``,
``seed``, ``stop`` (a string or up to 4; the text is cut before the first), ``stop_token_ids``,
``ignore_eos``, ``stream`` with ``stream_options.include_usage``. Generation also stops on the
tokenizer's stop ids unless ``ignore_eos``. Every violation raises ``RequestError`` (HTTP
status + OpenAI error fields), never an internal message.

Streaming: the sampler returns a completion whole, so a streamed answer is one chunk per
choice (role, text, log-probs, finish reason), the usage chunk when asked for, and ``[DONE]``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from typing import Literal, Optional, Sequence, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from advgame_jax.sampling.base import Completion, SamplingParams


class RequestError(Exception):
    """A request the server rejects: HTTP ``status`` + OpenAI ``{"error": {...}}`` ``body``."""

    def __init__(self, status, message, *, type="invalid_request_error", code=None, **fields):
        super().__init__(message)
        self.status, self.headers, param = status, fields.get("headers", {}), fields.get("param")
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


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
    stop_strings: tuple[str, ...]
    logprobs: bool
    top_logprobs: int  # alternatives per token
    stream: bool
    include_usage: bool


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: str
    content: Union[str, list[_TextPart]]


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    n: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = Field(None, union_mode="left_to_right")
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    stream: Optional[bool] = False
    stream_options: Optional[_StreamOptions] = None


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None


_SHAPES = {
    "prompt": "'prompt' must be a string, a list of strings, a list of token ids or a list of "
    "token-id lists (non-empty)",
    "stop": "'stop' must be a string or a list of at most 4 strings",
    "messages": "'messages' must be a non-empty list",
}
_TYPES = {"float_type": "a number", "int_from_float": "an integer", "model_type": "an object"}
_TYPES.update(int_type="an integer", bool_type="a boolean")


def _bad(message, param=None, code=None):
    return RequestError(400, message, param=param, code=code)


def _explain(err: pydantic.ValidationError) -> RequestError:
    """One clean 400 from pydantic's first error (no internal text)."""
    e = err.errors(include_url=False)[0]
    loc, kind = e["loc"], e["type"]
    if kind == "json_invalid":
        why = str(e.get("ctx", {}).get("error", ""))
        if "recursion" in why:
            return _bad("the request body is nested too deeply")
        if "surrogate" in why or "hex escape" in why:
            return _bad(
                "the request body is not valid JSON text: it holds a lone UTF-16 "
                "surrogate escape (\\ud800-\\udfff without its pair)"
            )
        return _bad(f"the request body is not valid JSON: {why}")
    if kind == "json_type" or not loc:
        return _bad("the request body must be a JSON object")
    field = str(loc[0])
    if field == "messages" and len(loc) >= 2:
        return _bad(
            f"messages[{loc[1]}] must be an object with 'role' and 'content' (a string or a "
            "list of {'type': 'text', 'text': str} parts; only text is supported)",
            field,
        )
    if kind == "missing":
        return _bad(f"'{field}' is required", field)
    if field in _SHAPES:
        return _bad(_SHAPES[field], field)
    want = _TYPES.get(kind, "a " + kind.removesuffix("_type"))
    return _bad(f"'{field}' must be {want}, got {type(e.get('input')).__name__}", field)


def _in(name, value, lo, hi, *, lo_open=False):
    if value is not None and (((value <= lo) if lo_open else (value < lo)) or value > hi):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value


def _token_ids(ids, name, vocab) -> tuple[int, ...]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise _bad(f"'{name}' holds token id {bad[0]} outside [0, {vocab})", name)
    return tuple(ids)


def _chat_prompt(req: ChatRequest, tokenizer):
    messages = [
        {"role": m.role, "content": m.content}
        if isinstance(m.content, str)
        else {"role": m.role, "content": "".join(p.text for p in m.content)}
        for m in req.messages
    ]
    try:
        text = tokenizer.hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as err:  # the template's own raise_exception, or a malformed turn
        raise _bad(f"the chat template rejected these messages: {err}", "messages") from None
    return [tuple(tokenizer.encode(text, add_special_tokens=False))]


def _text_prompts(req: CompletionRequest, tokenizer, limits: Limits):
    prompt = req.prompt
    if not prompt:
        raise _bad(_SHAPES["prompt"], "prompt")
    many = isinstance(prompt, list) and not isinstance(prompt[0], int)
    if many and len(prompt) > limits.max_n:  # before encoding thousands of prompts
        raise _bad(
            f"the request asks for {len(prompt)} prompts; this server returns at most "
            f"{limits.max_n} completions per request",
            "prompt",
        )
    return [
        tuple(tokenizer.encode(p)) if isinstance(p, str) else _token_ids(p, "prompt", vocab)
        for vocab in [tokenizer.vocab_size]
        for p in (prompt if many else [prompt])
    ]


def parse(kind: str, raw: bytes, tokenizer, limits: Limits, served: str) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` (``kind="chat"``: messages rendered with the chat
    template) or ``/v1/completions`` body (text prompts encoded without special tokens)."""
    try:
        req = (ChatRequest if kind == "chat" else CompletionRequest).model_validate_json(raw)
    except pydantic.ValidationError as err:
        raise _explain(err) from None
    if req.model not in (None, served):
        raise RequestError(
            404,
            f"model {req.model!r} does not exist; this server serves {served!r}",
            code="model_not_found",
            param="model",
        )
    vocab, max_tokens = tokenizer.vocab_size, req.max_tokens
    if isinstance(req, ChatRequest):
        if req.max_completion_tokens is not None:
            max_tokens = _in(
                "max_completion_tokens", req.max_completion_tokens, 1, limits.max_tokens
            )
        top = _in("top_logprobs", req.top_logprobs, 0, 20) or 0
        if top and not req.logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        prompts, logprobs = _chat_prompt(req, tokenizer), bool(req.logprobs)
    else:
        prompts, top = _text_prompts(req, tokenizer, limits), _in("logprobs", req.logprobs, 0, 5)
        logprobs, top = top is not None, top or 0
    _in("max_tokens", max_tokens, 1, limits.max_tokens)
    temperature = _in("temperature", req.temperature, 0, 2)
    top_p = _in("top_p", req.top_p, 0, 1, lo_open=True)
    top_k, n = _in("top_k", req.top_k, -1, vocab) or 0, _in("n", req.n, 1, limits.max_n) or 1
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > 4:
        raise _bad(_SHAPES["stop"], "stop")
    stop_ids = () if req.ignore_eos else tuple(tokenizer.stop_token_ids)
    stop_ids += _token_ids(req.stop_token_ids or [], "stop_token_ids", vocab)
    for ids in prompts:
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise _bad(
                f"the prompt has {len(ids)} tokens; this server accepts at most "
                f"{limits.max_prompt_tokens}",
                code="context_length_exceeded",
            )
    if len(prompts) * n > limits.max_n:
        raise _bad(
            f"the request asks for {len(prompts)} prompts × n={n} = {len(prompts) * n}"
            f" completions; this server returns at most {limits.max_n} per request",
            "prompt",
        )
    params = SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=max(top_k, 0),
        max_new_tokens=max_tokens or limits.default_max_tokens,
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        n=n,
        seed=secrets.randbits(63) if req.seed is None else req.seed,  # no seed: calls differ
    )
    usage = bool(req.stream_options and req.stream_options.include_usage)
    stops = tuple(s for s in stop if s)
    return ParsedRequest(
        kind, tuple(prompts), params, stops, logprobs, top, bool(req.stream), usage
    )


# ---------------------------------------------------------------------------- responses
def apply_stop(c: Completion, stop_strings, tokenizer) -> Completion:
    """Cut the text before the first stop string; keep the tokens that produced the rest."""
    cut = min((i for i in (c.text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut < 0:
        return c
    keep = next(
        (m for m in range(len(c.token_ids) + 1) if len(tokenizer.decode(c.token_ids[:m])) >= cut),
        len(c.token_ids),
    )
    return dataclasses.replace(
        c,
        text=c.text[:cut],
        token_ids=c.token_ids[:keep],
        logprobs=c.logprobs[:keep],
        finish_reason="stop",
    )


def _logprobs(req: ParsedRequest, tokenizer, c: Completion, tops):
    """The choice's ``logprobs`` field (chat: ``content`` entries; text: parallel lists)."""
    piece = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    pieces = [piece(t) for t in c.token_ids]
    alts = [[(piece(t), v) for t, v in tops[j]] if tops else [] for j in range(len(pieces))]
    if req.kind == "completions":
        return {
            "tokens": pieces,
            "token_logprobs": list(c.logprobs),
            "top_logprobs": [dict(a) for a in alts] if tops else None,
            "text_offset": [sum(map(len, pieces[:j])) for j in range(len(pieces))],
        }
    b = lambda s: list(s.encode("utf-8", "replace"))  # noqa: E731
    top = lambda alt: [{"token": a, "logprob": w, "bytes": b(a)} for a, w in alt]  # noqa: E731
    return {
        "content": [
            {"token": s, "logprob": v, "bytes": b(s), "top_logprobs": top(alt)}
            for s, v, alt in zip(pieces, c.logprobs, alts, strict=True)
        ]
    }


def responses(
    req: ParsedRequest, completions: Sequence[Completion], tokenizer, model_name: str, tops=None
):
    """The response body (chat.completion or text_completion), or for ``req.stream`` its
    server-sent events (module docstring). ``completions`` are cut at the stop strings
    (``apply_stop``); ``tops[i][j]``: the (token id, log-prob) alternatives of token j of
    completion i."""
    chat, tops = req.kind == "chat", tops or [None] * len(completions)
    choices = []
    for i, (c, t) in enumerate(zip(completions, tops, strict=True)):
        lp = _logprobs(req, tokenizer, c, t) if req.logprobs else None
        choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": lp}
        text = {"role": "assistant", "content": c.text} if chat else c.text
        choices.append(
            {**choice, ("text" if not chat else "delta" if req.stream else "message"): text}
        )
    kind = "chat.completion" + (".chunk" if req.stream else "") if chat else "text_completion"
    head: dict = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind}
    head.update(created=int(time.time()), model=model_name)
    p, n = sum(map(len, req.prompts)), sum(len(c.token_ids) for c in completions)
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    if not req.stream:
        return {**head, "choices": choices, "usage": usage}
    chunks = [{**head, "choices": [c]} for c in choices]
    chunks += [{**head, "choices": [], "usage": usage}] if req.include_usage else []
    return iter([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"])
