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

import math
import os
from typing import Sequence

from advgame_jax.errors import UserError


class LmEvalResultsError(UserError, ValueError):
    """Not an lm-evaluation-harness results file."""


def lmeval_command(
    base_url: str,
    model: str,
    tasks: Sequence[str],
    output_path: str,
    *,
    api: str = "chat",
    tokenizer: str = "",
    num_concurrent: int = 4,
    limit: int = 0,
    extra_model_args: str = "",
) -> list[str]:
    """argv of ``lm_eval`` against ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    ``api``: 'chat' → ``local-chat-completions`` (generative tasks only) or 'completions' →
    ``local-completions`` (``tokenizer``: the exported HF dir, for log-likelihood tasks).
    """
    if api not in ("chat", "completions"):
        raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
    base_url = base_url.rstrip("/")
    endpoint = f"{base_url}/chat/completions" if api == "chat" else f"{base_url}/completions"
    args = [
        f"model={model}",
        f"base_url={endpoint}",
        f"num_concurrent={num_concurrent}",
        "max_retries=3",
    ]
    if api == "chat":
        args.append("tokenized_requests=False")
    elif tokenizer:
        args += [f"tokenizer={tokenizer}", "tokenizer_backend=huggingface"]
    if extra_model_args:
        args.append(extra_model_args)
    cmd = [
        "lm_eval",
        "--model",
        "local-chat-completions" if api == "chat" else "local-completions",
        "--model_args",
        ",".join(args),
        "--tasks",
        ",".join(tasks),
        "--output_path",
        output_path,
    ]
    if api == "chat":
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
