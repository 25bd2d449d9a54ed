"""The safety-evaluation run: every example of every set is answered by the target, judged by
the classifier, and recorded; then per-set metrics are written as JSON and a markdown table.

Layout of ``out_dir``:
- ``run.json``: what the results were produced with (target, classifier, seed, decoding).
  A rerun with different settings is refused, so one results file never mixes runs.
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

from advgame_jax.evaluation import metrics as metrics_lib
from advgame_jax.evaluation.classifiers import ClassifyRequest
from advgame_jax.evaluation.prompt_sets import PromptSet
from advgame_jax.evaluation.results import (  # noqa: F401 (RunMismatchError re-exported)
    ResultsFile, RunMismatchError, check_run_identity, write_json_atomic, write_text_atomic)
from advgame_jax.evaluation.targets import Decoding, example_seed


def judge_records(examples, gens, classifier) -> list[dict]:
    """Classify the generations that exist; a failed generation keeps None verdicts."""
    ok = [i for i, g in enumerate(gens) if g.finish_reason != "error"]
    verdicts = classifier.classify([ClassifyRequest(examples[i].prompt, gens[i].text)
                                    for i in ok]) if ok else []
    by_index = dict(zip(ok, verdicts))
    out = []
    for i, (ex, g) in enumerate(zip(examples, gens)):
        v = by_index.get(i)
        out.append({"uid": ex.uid, "category": ex.category, "subcategory": ex.subcategory,
                    "prompt": ex.prompt, "response": g.text, "finish_reason": g.finish_reason,
                    "num_tokens": g.num_tokens, "num_chars": len(g.text),
                    "request_harmful": v.request_harmful if v else None,
                    "refusal": v.response_refusal if v else None,
                    "harmful": v.response_harmful if v else None})
    return out


def run_eval(sets: Sequence[PromptSet], target, classifier, out_dir: str, *, seed: int = 0,
             decoding: Decoding = Decoding(), batch_size: int = 32, num_resamples: int = 1000,
             on_batch: Optional[Callable[[str, int], None]] = None) -> dict:
    """Evaluate; returns ``{set_name: metrics}`` (also written to ``out_dir``).

    ``on_batch(set_name, num_done)`` is called after each recorded batch (progress; tests).
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    check_run_identity(out_dir, {"target": target.label, "classifier": classifier.name,
                                  "seed": seed, "decoding": dataclasses.asdict(decoding)})
    with ResultsFile(os.path.join(out_dir, "results.jsonl")) as results:
        done = {(r["set"], r["uid"]) for r in results.records}
        for ps in sets:
            todo = [e for e in ps.examples if (ps.name, e.uid) not in done]
            logging.info("set %s: %d examples, %d to run", ps.name, len(ps.examples), len(todo))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                gens = target.generate([e.prompt for e in chunk],
                                       [example_seed(seed, ps.name, e.uid) for e in chunk],
                                       decoding)
                recs = judge_records(chunk, gens, classifier)
                results.append([{"set": ps.name, **r} for r in recs])
                if on_batch:
                    on_batch(ps.name, start + len(chunk))
        records = list(results.records)
    out = {}
    for ps in sets:
        uids = {e.uid for e in ps.examples}
        recs = [r for r in records if r["set"] == ps.name and r["uid"] in uids]
        out[ps.name] = metrics_lib.set_metrics(recs, seed=seed, num_resamples=num_resamples)
        out[ps.name]["kind"] = ps.kind
    write_json_atomic(os.path.join(out_dir, "eval.json"),
                      {"target": target.label, "classifier": classifier.name, "seed": seed,
                       "decoding": dataclasses.asdict(decoding), "sets": out})
    write_text_atomic(os.path.join(out_dir, "eval.md"),
                      f"# Safety evaluation\n\nTarget: `{target.label}`; classifier: "
                      f"`{classifier.name}`; seed {seed}; temperature {decoding.temperature}; "
                      f"max {decoding.max_new_tokens} new tokens. Rates in %, 95% Wilson "
                      f"CIs in brackets, the judged examples each is over as n.\n\n"
                      + metrics_lib.markdown_table(out))
    for line in metrics_lib.judge_failure_warnings(out):
        logging.warning("%s", line)
    return out
