"""Utility benchmarks through EleutherAI's lm-evaluation-harness (the ``lmeval`` extra), not
re-implemented: the command that runs its tasks against a defender behind an
OpenAI-compatible server, and the folding of its results file into our report.

Two ways to serve the defender (export it first with ``launch/convert.py``):
- ``launch/serve.py --model_dir=EXPORT`` with lm-eval's ``local-chat-completions`` model:
  generative tasks (IFEval, GSM8K, ``mmlu_generative``…), chat template applied server-side;
- vLLM (``python -m vllm.entrypoints.openai.api_server --model EXPORT``) with
  ``local-completions``: also log-likelihood tasks (MMLU), which need prompt log-probs
  (``echo``) that ``launch/serve.py`` does not provide.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from advgame_jax.errors import UserError


class LmEvalResultsError(UserError, ValueError):
    """Not an lm-evaluation-harness results file."""


@dataclasses.dataclass(frozen=True)
class LmEvalServer:
    """The server lm-eval talks to. ``base_url``: e.g. ``http://127.0.0.1:8000/v1``.
    ``api``: 'chat' → ``local-chat-completions`` (generative tasks only) or 'completions' →
    ``local-completions`` (``tokenizer``: the exported HF dir, for log-likelihood tasks).
    ``extra_model_args``: appended to lm-eval's ``--model_args`` as given."""

    base_url: str
    model: str
    api: str = "chat"
    tokenizer: str = ""
    num_concurrent: int = 4
    extra_model_args: str = ""


def _model_args(server: LmEvalServer) -> str:
    """lm-eval's ``--model_args`` for ``server``."""
    base_url = server.base_url.rstrip("/")
    chat = server.api == "chat"
    args = [
        f"model={server.model}",
        f"base_url={base_url}/chat/completions" if chat else f"base_url={base_url}/completions",
        f"num_concurrent={server.num_concurrent}",
        "max_retries=3",
    ]
    if chat:
        args.append("tokenized_requests=False")
    elif server.tokenizer:
        args += [f"tokenizer={server.tokenizer}", "tokenizer_backend=huggingface"]
    if server.extra_model_args:
        args.append(server.extra_model_args)
    return ",".join(args)


def lmeval_command(
    server: LmEvalServer, tasks: Sequence[str], output_path: str, *, limit: int = 0
) -> list[str]:
    """argv of ``lm_eval`` running ``tasks`` against ``server`` (``limit``: examples per
    task, 0 = all)."""
    if server.api not in ("chat", "completions"):
        raise ValueError(f"api must be 'chat' or 'completions', got {server.api!r}")
    cmd = [
        "lm_eval",
        "--model",
        "local-chat-completions" if server.api == "chat" else "local-completions",
        "--model_args",
        _model_args(server),
        "--tasks",
        ",".join(tasks),
        "--output_path",
        output_path,
    ]
    if server.api == "chat":
        cmd.append("--apply_chat_template")
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def _results_file(path: str) -> str:
    if os.path.isdir(path):  # lm-eval writes <output_path>/<model>/results_<time>.json
        found = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(path)
            for f in fs
            if f.startswith("results") and f.endswith(".json")
        )
        if not found:
            raise LmEvalResultsError(f"--lmeval {path!r}: no results*.json inside")
        return found[-1]
    return path


def fold_lmeval(path: str) -> list[tuple[str, str, float]]:
    """``(task, metric, value)`` rows of an lm-eval results JSON (stderr rows left out)."""
    path = _results_file(path)
    from advgame_jax.data.readers import loads_json, read_text

    d = loads_json(
        read_text(path, "an lm-evaluation-harness results JSON", LmEvalResultsError),
        path,
        "expected an lm-evaluation-harness results file",
        LmEvalResultsError,
    )
    results = d.get("results") if isinstance(d, dict) else None
    if not isinstance(results, dict) or not results:
        raise LmEvalResultsError(
            f"--lmeval {path!r}: no 'results' mapping (expected an "
            f"lm-evaluation-harness results file)"
        )
    rows = []
    for task in sorted(results):
        for key, value in results[task].items():
            metric, _, _filter = key.partition(",")
            if "stderr" in metric or key == "alias" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = metric if _filter in ("", "none") else f"{metric} ({_filter})"
                rows.append((task, name, float(value)))
    return rows
