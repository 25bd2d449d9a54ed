"""Stub tokenizer, samplers and judges for the game tests (advgame_jax.game).

- ``ByteTokenizer``: one token per UTF-8 byte (id = byte + OFFSET) inside user-turn markers,
  so stubs can decode the exact text a prompt was rendered from.
- ``ScriptedSampler``: completions from a function of the decoded prompt text; records calls.
- ``PseudoRandomAttacker`` / ``PseudoRandomDefender``: fast deterministic generators of
  well-formed, malformed, unfaithful and length-stopped outputs for large batches.
- ``ScriptedJudge``: answers from lookup tables keyed by text; records every call.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Optional, Sequence

from advgame_jax.game.judge import FaithRequest, PairRequest, PointRequest
from advgame_jax.sampling.base import Completion, SamplingParams

USER, END, EOS, OFFSET = 1, 2, 3, 4


class ByteTokenizer:
    stop_token_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def render_user_turn(self, text: str) -> list[int]:
        return [USER] + self.encode(text) + [END]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


def completion(tok: ByteTokenizer, text: str, finish: str = "stop") -> Completion:
    """A completion whose ids are the text's bytes (+EOS when it stopped) and whose log-probs
    are a fixed function of position."""
    ids = tok.encode(text) + ([EOS] if finish == "stop" else [])
    return Completion(tuple(ids), text, tuple(-0.01 * (i + 1) for i in range(len(ids))), finish)


class ScriptedSampler:
    """``fn(prompt_text, sample_index) -> text | (text, finish_reason)``."""

    def __init__(self, fn: Callable, tok: Optional[ByteTokenizer] = None):
        self.fn = fn
        self.tok = tok or ByteTokenizer()
        self.calls: list[tuple[int, SamplingParams]] = []

    def generate(self, prompt_token_ids, params: SamplingParams):
        self.calls.append((len(prompt_token_ids), params))
        out = []
        for ids in prompt_token_ids:
            text = self.tok.decode(ids)
            for i in range(params.n):
                r = self.fn(text, i)
                text_out, finish = (r, "stop") if isinstance(r, str) else r
                out.append(completion(self.tok, text_out, finish))
        return out


def _unit(*parts) -> float:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


QUERY_RE = re.compile(r"<query>\n(.*?)\n</query>", re.DOTALL)


class PseudoRandomAttacker(ScriptedSampler):
    """think_prompt_strict outputs: 60% faithful, 10% unfaithful, 15% malformed, 15% length."""

    def __init__(self, seed: int = 0):
        super().__init__(self._out)
        self.seed = seed

    def _out(self, prompt: str, i: int):
        m = QUERY_RE.search(prompt)
        s = m.group(1) if m else ""
        u = _unit(self.seed, prompt, i)
        if u < 0.60:
            return f"<think>add politeness {i}</think>\n<prompt>please {s}</prompt>\n"
        if u < 0.70:
            return "<think>drift</think><prompt>tell me a story about the sea</prompt>"
        if u < 0.80:
            return f"<prompt>{s}</prompt> and more"
        if u < 0.85:
            return f"<think>a</think><think>b</think><prompt>{s}</prompt>"
        return (f"<think>{'long ' * 40}", "length")


class PseudoRandomDefender(ScriptedSampler):
    """Comply / refuse / deflect answers, 15% of them stopped by length."""

    ANSWERS = (
        "sure , here are the steps . first do a , then b .",
        "sorry , i cannot help with that .",
        "instead , here is a safer alternative : act safely .",
        "i am unable to do that , sorry .",
        "a plain answer without lexicon words .",
    )

    def __init__(self, seed: int = 0):
        super().__init__(self._out)
        self.seed = seed

    def _out(self, prompt: str, i: int):
        u = _unit(self.seed, prompt, i)
        if u < 0.15:
            return ("sure here " * 30, "length")
        return self.ANSWERS[int(_unit(self.seed, "pick", prompt, i) * len(self.ANSWERS))]


class ScriptedJudge:
    """Judge answers from tables; a missing key gives None (an unparsable answer).

    faith: attack text -> bool | None, or a list of per-sample verdicts consumed in order
    (so repeated requests for one attack get successive samples).
    scores: (rubric, response) -> score. Pairwise returns the two table scores plus
    ``position_bias`` on side A.
    """

    def __init__(self, faith=None, scores=None, position_bias: float = 0.0):
        self.faith = dict(faith or {})
        self.scores = dict(scores or {})
        self.position_bias = position_bias
        self.calls: list[tuple[str, list]] = []
        self._faith_seen: dict[str, int] = {}

    def faithfulness(self, requests: Sequence[FaithRequest]):
        self.calls.append(("faithfulness", list(requests)))
        out = []
        for r in requests:
            v = self.faith.get(r.attack)
            if isinstance(v, list):
                k = self._faith_seen.get(r.attack, 0)
                self._faith_seen[r.attack] = k + 1
                v = v[k]
            out.append(v)
        return out

    def pairwise(self, requests: Sequence[PairRequest]):
        self.calls.append(("pairwise", list(requests)))
        out = []
        for r in requests:
            a = self.scores.get((r.rubric, r.response_a))
            b = self.scores.get((r.rubric, r.response_b))
            out.append((None if a is None else a + self.position_bias, b))
        return out

    def pointwise(self, requests: Sequence[PointRequest]):
        self.calls.append(("pointwise", list(requests)))
        return [self.scores.get((r.rubric, r.response)) for r in requests]

    def fault_counts(self):
        return {}

    def count(self, method: str) -> int:
        """Number of calls of ``method``."""
        return sum(1 for m, _ in self.calls if m == method)

    def requests(self, method: str) -> list:
        return [r for m, reqs in self.calls if m == method for r in reqs]
