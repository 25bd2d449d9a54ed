"""The safety-evaluation run: every example of every set is answered by the target, judged by
the classifier, and recorded; then per-set metrics are written as JSON and a markdown table.

Layout of ``out_dir``:
- ``run.json``: what the results were produced with (target, classifier, seed, decoding),
  written with the first recorded batch. A rerun with different settings is refused while
  ``results.jsonl`` holds results, so one results file never mixes runs; a directory whose
  earlier attempt recorded nothing (it failed before its first batch) is reused.
- ``results.jsonl`` (mode 0600): one record per finished example (prompt and response
  included: keep it private). A killed run, rerun with the same flags, skips every example
  already recorded.
- ``eval.json`` / ``eval.md``: metrics per set (``metrics.set_metrics``), rebuilt from
  ``results.jsonl`` at the end of each run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

from absl import logging

from advgame_jax.errors import UserError
from advgame_jax.evaluation import metrics as metrics_lib
from advgame_jax.evaluation.classifiers import ClassifyRequest
from advgame_jax.evaluation.prompt_sets import PromptSet
from advgame_jax.evaluation.results import (  # noqa: F401 (RunMismatchError re-exported)
    ResultsFile,
    RunMismatchError,
    check_run_identity,
    write_json_atomic,
    write_text_atomic,
)
from advgame_jax.evaluation.targets import Decoding, example_seed
from advgame_jax.locking import DirLock

MAX_RESAMPLES = 100_000  # bootstrap memory is num_resamples × examples indices


class EvalSettingsError(UserError, ValueError):
    """A numeric setting of an evaluation run is out of range."""


def check_settings(
    *,
    batch_size: int,
    num_resamples: int,
    decoding: Decoding,
    limit: int = 0,
    max_positions: Optional[int] = None,
) -> None:
    """Refuse out-of-range settings before any model loads (``--flag=value: expected …``).

    ``max_positions``: the in-process model's ``max_position_embeddings`` (None for an
    endpoint, whose server bounds its own lengths); ``max_new_tokens`` must leave room for a
    prompt in it."""
    import math

    def need(ok: bool, flag: str, value, expected: str) -> None:
        if not ok:
            raise EvalSettingsError(f"--{flag}={value!r}: expected {expected}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
    need(
        is_int(num_resamples) and 1 <= num_resamples <= MAX_RESAMPLES,
        "num_resamples",
        num_resamples,
        f"an integer in [1, {MAX_RESAMPLES}]",
    )
    need(is_int(limit) and limit >= 0, "limit", limit, "an integer >= 0 (0 = every example)")
    t, top_p, n = decoding.temperature, decoding.top_p, decoding.max_new_tokens
    need(
        isinstance(t, (int, float)) and math.isfinite(t) and t >= 0,
        "temperature",
        t,
        "a finite number >= 0 (0 = greedy)",
    )
    need(isinstance(top_p, (int, float)) and 0 < top_p <= 1, "top_p", top_p, "a number in (0, 1]")
    need(is_int(n) and n >= 1, "max_new_tokens", n, "an integer >= 1")
    if max_positions is not None:
        need(
            n < max_positions,
            "max_new_tokens",
            n,
            f"an integer below the model's max_position_embeddings ({max_positions}), leaving "
            "room for the prompt",
        )


def judge_records(examples, gens, classifier) -> list[dict]:
    """Classify the generations that exist; a failed generation keeps None verdicts."""
    ok = [i for i, g in enumerate(gens) if g.finish_reason != "error"]
    verdicts = (
        classifier.classify([ClassifyRequest(examples[i].prompt, gens[i].text) for i in ok])
        if ok
        else []
    )
    by_index = dict(zip(ok, verdicts, strict=True))
    out = []
    for i, (ex, g) in enumerate(zip(examples, gens, strict=True)):
        v = by_index.get(i)
        out.append(
            {
                "uid": ex.uid,
                "category": ex.category,
                "subcategory": ex.subcategory,
                "prompt": ex.prompt,
                "response": g.text,
                "finish_reason": g.finish_reason,
                "num_tokens": g.num_tokens,
                "num_chars": len(g.text),
                "request_harmful": v.request_harmful if v else None,
                "refusal": v.response_refusal if v else None,
                "harmful": v.response_harmful if v else None,
            }
        )
    return out


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What an evaluation run's results depend on (``seed``, ``decoding``) and how it runs:
    examples per ``generate`` call and bootstrap resamples of the metrics' CIs."""

    seed: int = 0
    decoding: Decoding = Decoding()
    batch_size: int = 32
    num_resamples: int = 1000


def run_eval(
    sets: Sequence[PromptSet],
    target,
    classifier,
    out_dir: str,
    settings: EvalSettings = EvalSettings(),
    *,
    on_batch: Optional[Callable[[str, int], None]] = None,
) -> dict:
    """Evaluate; returns ``{set_name: metrics}`` (also written to ``out_dir``).

    ``on_batch(set_name, num_done)`` is called after each recorded batch (progress; tests).
    One run per ``out_dir``: a second one is refused while the first holds its lock.
    """
    check_settings(
        batch_size=settings.batch_size,
        num_resamples=settings.num_resamples,
        decoding=settings.decoding,
    )
    out_dir = os.path.abspath(out_dir)
    with DirLock(out_dir, "--out_dir"):
        return _run_eval(sets, target, classifier, out_dir, settings, on_batch)


def _record_results(sets, target, classifier, out_dir, settings: EvalSettings, on_batch):
    """Answer and judge every example not yet in ``results.jsonl``; returns all records."""
    identity = {
        "target": target.label,
        "classifier": classifier.name,
        "seed": settings.seed,
        "decoding": dataclasses.asdict(settings.decoding),
    }
    with ResultsFile(os.path.join(out_dir, "results.jsonl")) as results:
        # run.json is checked against results that exist, and written with the first batch:
        # an attempt that recorded nothing never blocks the corrected rerun.
        identity_recorded = bool(results.records)
        if identity_recorded:
            check_run_identity(out_dir, identity)
        done = {(r["set"], r["uid"]) for r in results.records}
        for ps in sets:
            todo = [e for e in ps.examples if (ps.name, e.uid) not in done]
            logging.info("set %s: %d examples, %d to run", ps.name, len(ps.examples), len(todo))
            for start in range(0, len(todo), settings.batch_size):
                chunk = todo[start : start + settings.batch_size]
                gens = target.generate(
                    [e.prompt for e in chunk],
                    [example_seed(settings.seed, ps.name, e.uid) for e in chunk],
                    settings.decoding,
                )
                recs = judge_records(chunk, gens, classifier)
                if not identity_recorded:
                    write_json_atomic(os.path.join(out_dir, "run.json"), identity)
                    identity_recorded = True
                results.append([{"set": ps.name, **r} for r in recs])
                if on_batch:
                    on_batch(ps.name, start + len(chunk))
        return list(results.records)


def _write_summary(sets, records, target, classifier, out_dir, settings: EvalSettings) -> dict:
    """Per-set metrics from ``records``, written as ``eval.json`` and ``eval.md``."""
    seed, decoding = settings.seed, settings.decoding
    out = {}
    for ps in sets:
        uids = {e.uid for e in ps.examples}
        recs = [r for r in records if r["set"] == ps.name and r["uid"] in uids]
        out[ps.name] = metrics_lib.set_metrics(
            recs, seed=seed, num_resamples=settings.num_resamples
        )
        out[ps.name]["kind"] = ps.kind
    write_json_atomic(
        os.path.join(out_dir, "eval.json"),
        {
            "target": target.label,
            "classifier": classifier.name,
            "seed": seed,
            "decoding": dataclasses.asdict(decoding),
            "sets": out,
        },
    )
    write_text_atomic(
        os.path.join(out_dir, "eval.md"),
        f"# Safety evaluation\n\nTarget: `{target.label}`; classifier: "
        f"`{classifier.name}`; seed {seed}; temperature {decoding.temperature}; "
        f"max {decoding.max_new_tokens} new tokens. Rates in %, 95% Wilson "
        f"CIs in brackets, the judged examples each is over as n.\n\n"
        + metrics_lib.markdown_table(out),
    )
    return out


def _run_eval(sets, target, classifier, out_dir, settings: EvalSettings, on_batch) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    records = _record_results(sets, target, classifier, out_dir, settings, on_batch)
    out = _write_summary(sets, records, target, classifier, out_dir, settings)
    for line in metrics_lib.judge_failure_warnings(out):
        logging.warning("%s", line)
    return out
