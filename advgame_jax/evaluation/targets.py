"""Models to evaluate or attack: an HF directory, a game checkpoint (either player, trained
or EMA params), or an OpenAI-compatible endpoint, behind one ``generate`` call.

Everything that can fail for a user-input reason fails in the constructor helpers (missing
directory, wrong model family / shapes, unreachable endpoint, attacker without the flag),
before any generation. ``generate(prompts, seeds)`` sends each prompt as one chat user turn
and returns one :class:`Generation` per prompt; the sampling seed of each prompt is given by
the caller (derived from the run seed and the example id), so results do not depend on
batching, on resuming, or on running in-process versus over HTTP.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Optional, Sequence

from advgame_jax.controlled import (
    AttackerNotAllowed,  # noqa: F401 (the one gate's error)
    require_attacker_allowed,
)
from advgame_jax.errors import UserError
from advgame_jax.evaluation.http_client import EndpointSpec, OpenAIClient, Request
from advgame_jax.net import DEFAULT_TIMEOUT_S


class TargetError(UserError, ValueError):
    """A model to load is missing, of the wrong family, or not allowed (attacker)."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Greedy by default (temperature 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # 'stop' | 'length' | 'error' (endpoint gave no answer)
    num_tokens: Optional[int]


def example_seed(seed: int, *parts: str) -> int:
    """A 31-bit sampling seed from the run seed and an example's identity."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") >> 1


# ---------------------------------------------------------------------------- game checkpoints
def find_step_dir(path: str) -> str:
    """The newest ``<root>/<step>`` dir under a workdir, its ``checkpoints`` dir or a step dir."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise TargetError(f"--checkpoint {path!r}: not a directory")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = (
        os.path.join(path, "checkpoints")
        if os.path.isdir(os.path.join(path, "checkpoints"))
        else path
    )
    steps = sorted(
        (
            int(d)
            for d in os.listdir(root)
            if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))
        ),
        reverse=True,
    )
    if not steps:
        raise TargetError(
            f"--checkpoint {path!r}: no game checkpoint found (expected a "
            f"training workdir, its checkpoints/ dir or a checkpoints/<step> dir)"
        )
    return os.path.join(root, str(steps[0]))


def read_meta(step_dir: str) -> dict:
    for fn in sorted(glob.glob(os.path.join(step_dir, "meta", "*"))):
        if os.path.isfile(fn):
            try:
                with open(fn, encoding="utf-8") as f:
                    meta = json.load(f)
            except ValueError:
                continue
            if isinstance(meta, dict) and "config" in meta:
                return meta
    return {}


def resolve_base_hf_dir(step_dir: str, player: str, override: str = "") -> str:
    """The HF dir holding ``player``'s architecture and tokenizer for a game checkpoint."""
    if override:
        return override
    cfg = read_meta(step_dir).get("config") or {}
    hf = (cfg.get(player) or {}).get("hf_path") or ""
    if hf:
        return hf
    if cfg.get("toy_world"):
        workdir = os.path.dirname(os.path.dirname(step_dir))
        toy = cfg.get("toy_dir") or os.path.join(workdir, "toy")
        return os.path.join(toy, player)
    raise TargetError(
        f"--checkpoint {step_dir!r}: its metadata names no {player} checkpoint; "
        f"pass --base_hf_dir (the HF dir the {player} was initialised from)"
    )


def check_hf_dir(path: str, field: str) -> None:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise TargetError(
            f"{field} {path!r}: expected a Hugging Face checkpoint directory "
            f"(config.json + *.safetensors)"
        )


def checkpoint_model_config(step_dir: str, player: str):
    """The model config the checkpoint's own metadata records for ``player`` (None for a
    checkpoint written before it was recorded)."""
    from advgame_jax.models import ModelConfig

    saved = (read_meta(step_dir).get("models") or {}).get(player)
    if not isinstance(saved, dict):
        return None
    try:
        return ModelConfig.from_hf_dict(saved, source=f"{step_dir} metadata")
    except Exception as err:  # noqa: BLE001 - a damaged record: say which checkpoint
        raise TargetError(
            f"--checkpoint {step_dir!r}: unreadable {player} model config in its metadata ({err})"
        ) from None


_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_config_differences(saved, base) -> list[str]:
    """Fields (every architecture field: norm eps, rope settings, max positions, ...) whose
    values differ between the checkpoint's model config and ``--base_hf_dir``'s."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(base)
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    return [
        f"{k}: {a[k]!r} in the checkpoint, {b[k]!r} in --base_hf_dir"
        for k in a
        if k not in _TOKEN_FIELDS and norm(a[k]) != norm(b.get(k))
    ]


def restore_player_params(step_dir: str, player: str, which: str, hf_dir: str):
    """``(model_config, params)`` of ``player``'s ``which`` ('ema'|'trained') params. The
    config is the checkpoint's own (its metadata), compared field by field with
    ``hf_dir``'s (which gives the tokenizer) before any array is read."""
    import jax

    from advgame_jax.models import ModelConfig, init_params
    from advgame_jax.sampling.checkpoints import restore_params

    if player not in ("attacker", "defender") or which not in ("ema", "trained"):
        raise TargetError(
            f"--player/--params: expected attacker|defender and ema|trained, got "
            f"{player!r}/{which!r}"
        )
    check_hf_dir(hf_dir, "--base_hf_dir")
    try:
        base = ModelConfig.from_hf_file(os.path.join(hf_dir, "config.json"))
    except Exception as err:
        raise TargetError(f"--base_hf_dir {hf_dir!r}: unsupported model config ({err})") from None
    config = checkpoint_model_config(step_dir, player) or base
    diffs = model_config_differences(config, base)
    if diffs:
        raise TargetError(
            f"--base_hf_dir {hf_dir!r} describes a different model than the "
            f"{player} of --checkpoint {step_dir!r}: "
            + "; ".join(diffs)
            + ". Pass the HF dir the player was trained from"
        )
    like = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    key = "ema_params" if which == "ema" else "params"
    try:
        params = restore_params(step_dir, key_path=(player, key), like=like)
    except ValueError as err:
        hint = (
            "this player has no EMA copy in this variant; use --params=trained"
            if which == "ema" and "not found" in str(err)
            else f"the checkpoint was trained from a different model (family or size) than {hf_dir}"
        )
        raise TargetError(
            f"--checkpoint {step_dir!r} ({player} {which} params) does not match "
            f"--base_hf_dir: {hint}. Details: {err}"
        ) from None
    return config, params


# ---------------------------------------------------------------------------- generators
class InProcessTarget:
    """The JAX sampler in this process (same buckets as ``launch/serve.py``)."""

    def __init__(
        self,
        config,
        params,
        hf_dir: str,
        *,
        compute_dtype=None,
        max_batch_size=64,
        max_prompt_tokens: int = 2048,
        label: str = "",
    ):
        from advgame_jax.sampling.jax_sampler import JaxSampler
        from advgame_jax.tokenization import ChatTokenizer

        self.tokenizer = ChatTokenizer.from_dir(hf_dir)
        self.sampler = JaxSampler(
            config,
            params,
            tokenizer=self.tokenizer,
            compute_dtype=compute_dtype,
            max_batch_size=max_batch_size,
            min_batch_bucket=min(8, max_batch_size),
            min_prompt_bucket=64,
            max_prompt_len=max(max_prompt_tokens, 16),
            copy_params=False,
        )
        self.max_prompt_tokens = max_prompt_tokens
        self.label = label or hf_dir

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], decoding: Decoding
    ) -> list[Generation]:
        from advgame_jax.sampling import SamplingParams

        requests, fits = [], []
        for p, s in zip(prompts, seeds, strict=True):
            ids = self.tokenizer.render_user_turn(p)
            # Like the server (HTTP 400): a prompt over the limit is a failed generation.
            fits.append(len(ids) <= self.max_prompt_tokens)
            if fits[-1]:
                requests.append(
                    (
                        [ids],
                        SamplingParams(
                            temperature=decoding.temperature,
                            top_p=decoding.top_p,
                            max_new_tokens=decoding.max_new_tokens,
                            stop_token_ids=tuple(self.tokenizer.stop_token_ids),
                            seed=int(s),
                        ),
                    )
                )
        done = iter(self.sampler.generate_many(requests) if requests else [])
        out = []
        for ok in fits:
            c = next(done)[0] if ok else None
            out.append(
                Generation(c.text, c.finish_reason, len(c.token_ids))
                if c
                else Generation("", "error", None)
            )
        return out


class EndpointTarget:
    """An OpenAI-compatible chat endpoint (probed at construction). ``timeout_s``: wall-clock
    deadline per request, retries included; a request past it is a failed generation
    (``finish_reason='error'``)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: Optional[str] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        concurrency: int = 8,
        field: str = "--endpoint",
    ):
        spec = EndpointSpec(url, model, api_key=api_key, timeout_s=timeout_s, field=field)
        self.client = OpenAIClient(spec, concurrency=concurrency)
        self.client.check()
        self.label = f"{url} ({model})"

    def generate(self, prompts, seeds, decoding: Decoding) -> list[Generation]:
        answers = self.client.complete(
            [
                Request(
                    p,
                    seed=int(s),
                    max_tokens=decoding.max_new_tokens,
                    temperature=decoding.temperature,
                    top_p=decoding.top_p,
                )
                for p, s in zip(prompts, seeds, strict=True)
            ]
        )
        return [
            Generation(a.text, a.finish_reason, a.num_tokens)
            if a
            else Generation("", "error", None)
            for a in answers
        ]


def is_attacker_dir(path: str) -> bool:
    from advgame_jax.controlled import is_attacker_artifact

    return is_attacker_artifact(path)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Where a target comes from: exactly one of ``hf_dir`` / ``checkpoint`` / ``endpoint``,
    with the options of that kind. ``field`` prefixes the flag names in messages
    (``--{field}hf_dir``); ``timeout_s`` is the endpoint's deadline per request."""

    hf_dir: str = ""
    checkpoint: str = ""
    endpoint: str = ""
    endpoint_model: str = "advgame"
    player: str = "defender"
    params: str = "ema"
    base_hf_dir: str = ""
    allow_attacker: bool = False
    api_key: Optional[str] = None
    compute_dtype: Any = None
    max_prompt_tokens: int = 2048
    field: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S


def _endpoint_target(spec: TargetSpec) -> EndpointTarget:
    return EndpointTarget(
        spec.endpoint,
        spec.endpoint_model,
        api_key=spec.api_key,
        timeout_s=spec.timeout_s,
        field=f"--{spec.field}endpoint",
    )


def _hf_target(spec: TargetSpec) -> InProcessTarget:
    field = f"--{spec.field}hf_dir"
    check_hf_dir(spec.hf_dir, field)
    require_attacker_allowed(spec.hf_dir, spec.allow_attacker, field)
    from advgame_jax.models import load_hf

    config, p = load_hf(spec.hf_dir)
    return InProcessTarget(
        config,
        p,
        spec.hf_dir,
        compute_dtype=spec.compute_dtype,
        max_prompt_tokens=spec.max_prompt_tokens,
        label=spec.hf_dir,
    )


def _checkpoint_target(spec: TargetSpec) -> InProcessTarget:
    step_dir = find_step_dir(spec.checkpoint)
    require_attacker_allowed(
        step_dir,
        spec.allow_attacker,
        f"--{spec.field}checkpoint",
        attacker=spec.player == "attacker",
    )
    hf = resolve_base_hf_dir(step_dir, spec.player, spec.base_hf_dir)
    config, p = restore_player_params(step_dir, spec.player, spec.params, hf)
    return InProcessTarget(
        config,
        p,
        hf,
        compute_dtype=spec.compute_dtype,
        max_prompt_tokens=spec.max_prompt_tokens,
        label=f"{step_dir} ({spec.player} {spec.params})",
    )


def load_target(spec: TargetSpec):
    """Build the target ``spec`` names (exactly one of its three sources)."""
    given = [
        n
        for n, v in (
            ("hf_dir", spec.hf_dir),
            ("checkpoint", spec.checkpoint),
            ("endpoint", spec.endpoint),
        )
        if v
    ]
    if len(given) != 1:
        raise TargetError(
            f"give exactly one of --{spec.field}hf_dir, --{spec.field}checkpoint, "
            f"--{spec.field}endpoint (got {given or 'none'})"
        )
    if spec.endpoint:
        return _endpoint_target(spec)
    if spec.hf_dir:
        return _hf_target(spec)
    return _checkpoint_target(spec)
