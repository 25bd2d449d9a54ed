"""The OpenAI wire format of the server: request models (pydantic) and response bodies.

Requests are validated straight from the raw body by pydantic (strict types; unknown fields
are ignored, as OpenAI-compatible servers do), then checked against the server's ``Limits``
and turned into ``(prompt token ids, SamplingParams)``. Responses, stream chunks and the model
list are the ``openai`` package's own pydantic models, so the official client parses them.

Fields: ``/v1/chat/completions``: ``messages`` (``role``, ``content`` a string or a list of
``{"type": "text", "text"}`` parts), ``max_tokens`` / ``max_completion_tokens``, ``logprobs``
(bool) with ``top_logprobs`` 0-20. ``/v1/completions``: ``prompt`` (a string, strings, token
ids or token-id lists), ``max_tokens``, ``logprobs`` 0-5 (alternatives per token). Both:
``model``, ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` (-1 / 0 = off), ``n``,
``seed``, ``stop`` (a string or up to 4; the text is cut before the first), ``stop_token_ids``,
``ignore_eos``, ``stream`` with ``stream_options.include_usage``. Generation also stops on the
tokenizer's stop ids unless ``ignore_eos``. Every violation raises ``RequestError`` (HTTP
status + OpenAI error fields), never an internal message.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from typing import Any, Literal, Optional, Sequence, Union

import pydantic
from openai.types import Completion as TextCompletion
from openai.types import CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as cc
from openai.types.chat import chat_completion_chunk as ck
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs as TextLogprobs
from pydantic import BaseModel, ConfigDict, Field

from advgame_jax.sampling.base import Completion, SamplingParams

MAX_CHAT_TOP_LOGPROBS, MAX_TEXT_LOGPROBS = 20, 5  # OpenAI's bounds


class RequestError(Exception):
    """A request the server rejects: HTTP ``status`` + OpenAI ``{"error": {...}}`` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers=None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


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
    top_logprobs: int = 0  # alternatives per token
    stream: bool = False
    include_usage: bool = False


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
_TYPES = {
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "an object",
    "int_from_float": "an integer",
    "literal_error": "'text'",
}


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
        where = f"messages[{loc[1]}]"
        if len(loc) == 2:
            return _bad(f"{where} must be an object with 'role' and 'content'", field)
        if loc[2] == "content":
            return _bad(
                f"{where}.content must be a string or a list of {{'type': 'text', "
                f"'text': str}} parts; only text is supported",
                field,
            )
        return _bad(f"{where}.{loc[2]} must be a string", field)
    if kind == "missing":
        return _bad(f"'{field}' is required", field)
    if field in _SHAPES:
        return _bad(_SHAPES[field], field)
    want = _TYPES.get(kind, "valid")
    return _bad(f"'{field}' must be {want}, got {type(e.get('input')).__name__}", field)


def _in(name, value, lo, hi, *, lo_open=False):
    if value is None:
        return None
    if ((value <= lo) if lo_open else (value < lo)) or value > hi:
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value


def _token_ids(ids, name, vocab) -> tuple[int, ...]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise _bad(f"'{name}' holds token id {bad[0]} outside [0, {vocab})", name)
    return tuple(ids)


def _validate(model, raw: bytes, served: str):
    try:
        req = model.model_validate_json(raw)
    except pydantic.ValidationError as err:
        raise _explain(err) from None
    if req.model not in (None, served):
        raise RequestError(
            404,
            f"model {req.model!r} does not exist; this server serves {served!r}",
            code="model_not_found",
            param="model",
        )
    return req


def _common(req: _Common, tokenizer, limits: Limits, max_tokens, prompts, **out):
    vocab = tokenizer.vocab_size
    _in("max_tokens", max_tokens, 1, limits.max_tokens)
    temperature = _in("temperature", req.temperature, 0.0, 2.0)
    top_p = _in("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    top_k = _in("top_k", req.top_k, -1, vocab) or 0
    n = _in("n", req.n, 1, limits.max_n) or 1
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > 4:
        raise _bad(_SHAPES["stop"], "stop")
    stop_ids = _token_ids(req.stop_token_ids or [], "stop_token_ids", vocab)
    if not req.ignore_eos:
        stop_ids = tuple(tokenizer.stop_token_ids) + stop_ids
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
        seed=secrets.randbits(63) if req.seed is None else req.seed,
    )  # no seed: calls differ
    options = req.stream_options
    return ParsedRequest(
        prompts=tuple(prompts),
        params=params,
        stop_strings=tuple(s for s in stop if s),
        stream=bool(req.stream),
        include_usage=bool(options and options.include_usage),
        **out,
    )


def _encode(tokenizer, text: str, **kw) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, **kw))


def parse_chat(raw: bytes, tokenizer, limits: Limits, served: str = "advgame") -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body and render its messages with the chat template."""
    req = _validate(ChatRequest, raw, served)
    messages = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(p.text for p in m.content),
        }
        for m in req.messages
    ]
    top = _in("top_logprobs", req.top_logprobs, 0, MAX_CHAT_TOP_LOGPROBS) or 0
    if top and not req.logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:
        text = tokenizer.hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as err:  # the template's own raise_exception, or a malformed turn
        raise _bad(f"the chat template rejected these messages: {err}", "messages") from None
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    if req.max_completion_tokens is not None:
        _in("max_completion_tokens", max_tokens, 1, limits.max_tokens)
    prompt = _encode(tokenizer, text, add_special_tokens=False)
    return _common(
        req,
        tokenizer,
        limits,
        max_tokens,
        [prompt],
        kind="chat",
        logprobs=bool(req.logprobs),
        top_logprobs=top,
    )


def parse_completions(
    raw: bytes, tokenizer, limits: Limits, served: str = "advgame"
) -> ParsedRequest:
    """Validate a ``/v1/completions`` body; text prompts are encoded without special tokens."""
    req = _validate(CompletionRequest, raw, served)
    prompt, vocab = req.prompt, tokenizer.vocab_size
    if not prompt:
        raise _bad(_SHAPES["prompt"], "prompt")
    many = isinstance(prompt, list) and not isinstance(prompt[0], int)
    if many and len(prompt) > limits.max_n:  # before encoding thousands of prompts
        raise _bad(
            f"the request asks for {len(prompt)} prompts; this server returns at most "
            f"{limits.max_n} completions per request",
            "prompt",
        )
    prompts = [
        _encode(tokenizer, p) if isinstance(p, str) else _token_ids(p, "prompt", vocab)
        for p in (prompt if many else [prompt])
    ]
    top = _in("logprobs", req.logprobs, 0, MAX_TEXT_LOGPROBS)
    return _common(
        req,
        tokenizer,
        limits,
        req.max_tokens,
        prompts,
        kind="completions",
        logprobs=top is not None,
        top_logprobs=top or 0,
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


def text_deltas(c: Completion, tokenizer) -> list[str]:
    """One text piece per token, concatenating exactly to ``c.text`` (incremental decode)."""
    pieces, done = [], 0
    for m in range(1, len(c.token_ids) + 1):
        prefix = tokenizer.decode(c.token_ids[:m]) if m < len(c.token_ids) else c.text
        agree = next(
            (i for i, (a, b) in enumerate(zip(prefix, c.text, strict=False)) if a != b),
            min(len(prefix), len(c.text)),
        )
        end = max(done, agree if m < len(c.token_ids) else len(c.text))
        pieces.append(c.text[done:end])
        done = end
    return pieces


@dataclasses.dataclass(frozen=True)
class _Span:
    """What choice ``i`` holds: ``text`` and the log-probs of tokens ``lo:hi`` of its
    completion (all of them, or one token in a stream chunk); ``first``: the stream's role
    chunk; ``offset``: characters of the choice's text before this one."""

    i: int
    text: str
    lo: int
    hi: int
    finish: Any = None  # a FinishReason; None in the token chunks of a stream
    first: bool = False
    offset: int = 0


def _choice(req: ParsedRequest, tokenizer, c: Completion, tops, span: _Span, stream: bool):
    """The choice ``span`` describes, of completion ``c`` (``tops``: its alternatives)."""
    want = req.logprobs and (span.hi > span.lo or not stream)
    lo, hi = (span.lo, span.hi) if want else (0, 0)  # no log-probs asked for: none decoded
    piece = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    pieces = [piece(t) for t in c.token_ids[lo:hi]]
    alts = [[(piece(t), v) for t, v in tops[j]] if tops else [] for j in range(lo, hi)]
    i, text, finish = span.i, span.text, span.finish
    if req.kind == "completions":
        lp = TextLogprobs(
            tokens=pieces,
            token_logprobs=list(c.logprobs[lo:hi]),
            top_logprobs=[dict(a) for a in alts] if req.top_logprobs and tops else None,
            text_offset=[span.offset + sum(map(len, pieces[:j])) for j in range(len(pieces))],
        )
        return CompletionChoice.model_construct(
            index=i, text=text, finish_reason=finish, logprobs=lp if want else None
        )
    b = lambda s: list(s.encode("utf-8", "replace"))  # noqa: E731
    content = [
        ChatCompletionTokenLogprob(
            token=s,
            logprob=v,
            bytes=b(s),
            top_logprobs=[TopLogprob(token=a, logprob=w, bytes=b(a)) for a, w in alt],
        )
        for s, v, alt in zip(pieces, c.logprobs[lo:hi], alts, strict=True)
    ]
    if not stream:
        return cc.Choice(
            index=i,
            finish_reason=finish,
            logprobs=cc.ChoiceLogprobs(content=content) if want else None,
            message=ChatCompletionMessage(role="assistant", content=text),
        )
    delta = (
        ck.ChoiceDelta(role="assistant", content=text)
        if span.first
        else ck.ChoiceDelta(content=text)
    )
    return ck.Choice(
        index=i,
        delta=delta,
        finish_reason=finish,
        logprobs=ck.ChoiceLogprobs(content=content) if want else None,
    )


def _body(req: ParsedRequest, head: dict, choices, stream: bool, **usage):
    chat = req.kind == "chat"
    cls = (ChatCompletionChunk if stream else ChatCompletion) if chat else TextCompletion
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return cls.model_construct(object=kind, **head, choices=choices, **usage).model_dump(
        mode="json", exclude_unset=True
    )


def _stream_spans(req: ParsedRequest, c: Completion, i: int, tokenizer) -> list[_Span]:
    """Choice ``i``'s stream chunks: the role first (chat), one per token, the finish."""
    spans = [_Span(i, "", 0, 0, first=True)] if req.kind == "chat" else []
    offset = 0
    for j, piece in enumerate(text_deltas(c, tokenizer)):
        spans.append(_Span(i, piece, j, j + 1, offset=offset))
        offset += len(piece)
    return spans + [_Span(i, "", 0, 0, c.finish_reason, offset=offset)]


def _events(req: ParsedRequest, completions, tokenizer, tops, head: dict, usage):
    """The server-sent events of a streamed answer (``responses``)."""
    for i, (c, t) in enumerate(zip(completions, tops, strict=True)):
        for span in _stream_spans(req, c, i, tokenizer):
            choice = _choice(req, tokenizer, c, t, span, True)
            yield f"data: {json.dumps(_body(req, head, [choice], True))}\n\n"
    if req.include_usage:
        yield f"data: {json.dumps(_body(req, head, [], True, usage=usage))}\n\n"
    yield "data: [DONE]\n\n"


def responses(
    req: ParsedRequest, completions: Sequence[Completion], tokenizer, model_name: str, tops=None
):
    """The response body (chat.completion or text_completion), or for ``req.stream`` the
    server-sent events: one chunk per token per choice, a finish chunk per choice, the usage
    chunk when asked for, and ``[DONE]``. ``completions`` are cut at the stop strings
    (``apply_stop``); ``tops[i][j]``: the (token id, log-prob) alternatives of token j of
    completion i."""
    tops = tops or [None] * len(completions)
    head = dict(
        id=("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        created=int(time.time()),
        model=model_name,
    )
    p = sum(len(x) for x in req.prompts)
    n = sum(len(x.token_ids) for x in completions)
    usage = CompletionUsage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)
    if req.stream:
        return _events(req, completions, tokenizer, tops, head, usage)
    choices = [
        _choice(req, tokenizer, c, t, _Span(i, c.text, 0, len(c.token_ids), c.finish_reason), False)
        for i, (c, t) in enumerate(zip(completions, tops, strict=True))
    ]
    return _body(req, head, choices, False, usage=usage)
