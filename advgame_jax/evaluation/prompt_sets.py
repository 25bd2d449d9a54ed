"""Evaluation prompt sets: readers for our seed files and the public formats users download.

Every reader returns a list of :class:`EvalExample` (a stable ``uid``, the ``prompt`` sent to
the model, ``category`` 'harmful' — the model should not comply — or 'benign' — it should,
and an optional ``subcategory`` used for per-category rates). Formats:

==============  ==========================================================================
kind            file and columns (a header line is required for CSV/TSV)
==============  ==========================================================================
``seeds``       our seed JSONL: ``{"prompt", "category"}`` a line (``data.read_seeds_jsonl``)
``tfds``        our TFDS seed dataset: ``DATA_DIR#SPLIT`` (``data.tfds_seeds``)
``harmbench``   HarmBench behaviours CSV: ``Behavior``, ``FunctionalCategory``,
                ``SemanticCategory``, ``ContextString`` (optional), ``BehaviorID``; all
                harmful; a contextual behaviour is sent as context, a blank line, behaviour
``xstest``      XSTest prompts CSV: ``id``, ``prompt``, ``type``, ``label`` (safe|unsafe)
``wildjailbreak`` WildJailbreak TSV (eval or train file): ``adversarial`` (or ``vanilla``
                for vanilla rows) and ``data_type`` ({vanilla,adversarial}_{harmful,benign})
``wildguardtest`` WildGuardTest exported to JSONL: ``prompt``, ``prompt_harm_label``
                (harmful|unharmful), optional ``subcategory``, ``adversarial``
``orbench``     OR-Bench CSV (``prompt``, ``category``); benign (the 80k / hard-1k files);
                ``orbench-toxic`` reads the toxic file as harmful
``dan``         ``TEMPLATES,BEHAVIOURS``: jailbreak templates (CSV with a ``prompt`` column,
                or JSONL ``{"template"}``) × harmful behaviours (HarmBench CSV or seed
                JSONL); ``{behavior}`` in a template is replaced, else the behaviour is
                appended after a blank line
==============  ==========================================================================

A set is named on the command line as ``KIND:PATH`` or ``NAME=KIND:PATH``. Files are read by
``data.readers``: UTF-8 (a byte-order mark before a CSV header is ignored), strict CSV quoting
(an unclosed quote is refused on the line where its field started, never merged with the
rows after it), JSONL objects whose fields are strings. A malformed file raises
:class:`PromptSetError` naming the file, the line and the field; prompt text is never put in
an error message (seed prompts are sensitive).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Optional

from advgame_jax.data.readers import jsonl_records, table_rows
from advgame_jax.data.seeds import CATEGORIES, SeedFileError, read_seeds_jsonl
from advgame_jax.errors import UserError


class PromptSetError(UserError, ValueError):
    """A prompt-set spec or file is not what its reader expects."""


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One evaluation prompt: ``uid`` is unique within its set and stable across runs."""

    uid: str
    prompt: str
    category: str  # 'harmful' | 'benign'
    subcategory: str = ""


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    kind: str
    path: str
    examples: tuple[EvalExample, ...]


def _uid(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def _dedupe(examples: list[EvalExample]) -> list[EvalExample]:
    """Make uids unique (a repeated prompt gets ``#2``, ``#3``...) in file order."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        n = seen.get(ex.uid, 0) + 1
        seen[ex.uid] = n
        out.append(ex if n == 1 else dataclasses.replace(ex, uid=f"{ex.uid}#{n}"))
    return out


def _read_table(path: str, required: tuple[str, ...], delimiter: str = ","):
    """Rows of a CSV/TSV as (line_number, dict), read by ``data.readers.table_rows``: the
    header must hold ``required``; quoting is strict and decoding UTF-8, faults by line."""
    return table_rows(path, required, delimiter=delimiter, error=PromptSetError)


def _need(path: str, line: int, row: dict, field: str, allowed=None) -> str:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        raise PromptSetError(
            f"{path}:{line}: field {field!r} is a JSON {type(value).__name__}; expected a string"
        )
    if value is None or not value.strip():
        raise PromptSetError(f"{path}:{line}: field {field!r} is missing or empty")
    if allowed is not None and value.strip().lower() not in allowed:
        raise PromptSetError(
            f"{path}:{line}: field {field!r} is {value.strip()!r}; expected one "
            f"of {sorted(allowed)}"
        )
    return value


def read_seed_set(path: str) -> list[EvalExample]:
    if not os.path.isfile(path):
        raise PromptSetError(f"{path}: file not found")
    try:
        seeds = read_seeds_jsonl(path)
    except SeedFileError as err:
        raise PromptSetError(str(err)) from None
    return _dedupe([EvalExample(_uid("s", s.prompt), s.prompt, s.category) for s in seeds])


def read_tfds_set(spec: str) -> list[EvalExample]:
    data_dir, _, split = spec.partition("#")
    if not split:
        raise PromptSetError(f"tfds set {spec!r}: expected DATA_DIR#SPLIT")
    from advgame_jax.data.tfds_seeds import read_seed_split

    try:
        seeds = read_seed_split(data_dir, split)
    except Exception as err:  # tfds raises many types for a missing dataset or split
        raise PromptSetError(
            f"{data_dir}: cannot read split {split!r} of the seed dataset ({type(err).__name__})"
        ) from None
    return _dedupe([EvalExample(_uid("s", s.prompt), s.prompt, s.category) for s in seeds])


def read_harmbench_csv(path: str) -> list[EvalExample]:
    out = []
    for line, row in _read_table(path, ("Behavior", "SemanticCategory")):
        behavior = _need(path, line, row, "Behavior")
        context = (row.get("ContextString") or "").strip()
        prompt = f"{context}\n\n{behavior}" if context else behavior
        uid = (row.get("BehaviorID") or "").strip() or _uid("hb", prompt)
        sub = (row.get("SemanticCategory") or "").strip()
        out.append(EvalExample(uid, prompt, "harmful", sub))
    return _dedupe(out)


def read_xstest_csv(path: str) -> list[EvalExample]:
    out = []
    for line, row in _read_table(path, ("prompt", "type", "label")):
        prompt = _need(path, line, row, "prompt")
        label = _need(path, line, row, "label", {"safe", "unsafe"}).strip().lower()
        uid = (row.get("id") or "").strip() or _uid("xs", prompt)
        out.append(
            EvalExample(
                f"xs-{uid}",
                prompt,
                "benign" if label == "safe" else "harmful",
                (row.get("type") or "").strip(),
            )
        )
    return _dedupe(out)


_WJB_TYPES = {"vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign"}


def read_wildjailbreak_tsv(path: str) -> list[EvalExample]:
    out = []
    for line, row in _read_table(path, ("data_type",), delimiter="\t"):
        kind = _need(path, line, row, "data_type", _WJB_TYPES).strip().lower()
        column = "adversarial" if kind.startswith("adversarial") else "vanilla"
        prompt = _need(path, line, row, column)
        out.append(EvalExample(_uid("wjb", prompt), prompt, kind.split("_")[1], kind))
    return _dedupe(out)


def _read_jsonl(path: str, expected: str):
    return jsonl_records(path, expected, PromptSetError)


def read_wildguardtest_jsonl(path: str) -> list[EvalExample]:
    out = []
    expected = (
        'expected a JSON object {"prompt": <string>, "prompt_harm_label": "harmful" | '
        '"unharmful", "subcategory"?: <string>, "adversarial"?: <bool>}'
    )
    for line, rec in _read_jsonl(path, expected):
        prompt = _need(path, line, rec, "prompt")
        label = _need(path, line, rec, "prompt_harm_label", {"harmful", "unharmful"})
        category = "harmful" if label.strip().lower() == "harmful" else "benign"
        sub = rec.get("subcategory") or ""
        if not isinstance(sub, str):
            raise PromptSetError(
                f"{path}:{line}: field 'subcategory' is a JSON {type(sub).__name__}; {expected}"
            )
        if rec.get("adversarial") is not None:
            sub = f"{sub}|{'adversarial' if rec['adversarial'] else 'vanilla'}".strip("|")
        out.append(EvalExample(_uid("wgt", prompt), prompt, category, sub))
    return _dedupe(out)


def read_orbench_csv(path: str, *, category: str = "benign") -> list[EvalExample]:
    out = []
    for line, row in _read_table(path, ("prompt", "category")):
        prompt = _need(path, line, row, "prompt")
        out.append(
            EvalExample(_uid("or", prompt), prompt, category, (row.get("category") or "").strip())
        )
    return _dedupe(out)


def _read_templates(path: str) -> list[str]:
    if path.endswith(".jsonl"):
        return [
            _need(path, line, rec, "template")
            for line, rec in _read_jsonl(path, 'expected a JSON object {"template": <string>}')
        ]
    out = []
    for line, row in _read_table(path, ("prompt",)):
        if str(row.get("jailbreak", "true")).strip().lower() in ("false", "0"):
            continue  # the jailbreak_llms CSV marks non-jailbreak prompts
        out.append(_need(path, line, row, "prompt"))
    return out


def read_dan_set(spec: str) -> list[EvalExample]:
    templates_path, sep, behaviours_path = spec.partition(",")
    if not sep or not templates_path or not behaviours_path:
        raise PromptSetError(f"dan set {spec!r}: expected TEMPLATES_PATH,BEHAVIOURS_PATH")
    templates = _read_templates(templates_path)
    if not templates:
        raise PromptSetError(f"{templates_path}: no jailbreak templates")
    if behaviours_path.endswith(".jsonl"):
        behaviours = [e for e in read_seed_set(behaviours_path) if e.category == "harmful"]
    else:
        behaviours = read_harmbench_csv(behaviours_path)
    if not behaviours:
        raise PromptSetError(f"{behaviours_path}: no harmful behaviours")
    out = []
    for t, template in enumerate(templates):
        for b in behaviours:
            prompt = (
                template.replace("{behavior}", b.prompt)
                if "{behavior}" in template
                else f"{template}\n\n{b.prompt}"
            )
            out.append(EvalExample(f"dan{t}-{b.uid}", prompt, "harmful", b.subcategory))
    return _dedupe(out)


READERS: dict[str, Callable[[str], list[EvalExample]]] = {
    "seeds": read_seed_set,
    "tfds": read_tfds_set,
    "harmbench": read_harmbench_csv,
    "xstest": read_xstest_csv,
    "wildjailbreak": read_wildjailbreak_tsv,
    "wildguardtest": read_wildguardtest_jsonl,
    "orbench": read_orbench_csv,
    "orbench-toxic": lambda p: read_orbench_csv(p, category="harmful"),
    "dan": read_dan_set,
}


def parse_set_spec(spec: str) -> tuple[str, str, str]:
    """``[NAME=]KIND:PATH`` -> (name, kind, path); the name defaults to the kind."""
    name, eq, rest = spec.partition("=")
    if not eq:
        name, rest = "", spec
    kind, colon, path = rest.partition(":")
    if not colon or kind not in READERS or not path:
        raise PromptSetError(
            f"prompt set {spec!r}: expected [NAME=]KIND:PATH with KIND one of {sorted(READERS)}"
        )
    return name or kind, kind, path


def load_prompt_set(spec: str, *, limit: Optional[int] = None) -> PromptSet:
    """Read one set; ``limit`` keeps the first N examples (file order)."""
    name, kind, path = parse_set_spec(spec)
    examples = READERS[kind](path)
    if not examples:
        raise PromptSetError(f"{path}: the {kind} file holds no prompts")
    bad = [e.category for e in examples if e.category not in CATEGORIES]
    assert not bad, bad
    if limit is not None and limit > 0:
        examples = examples[:limit]
    return PromptSet(name, kind, path, tuple(examples))


def load_prompt_sets(specs, *, limit: Optional[int] = None) -> list[PromptSet]:
    """Every set of ``specs``; all files are read (and checked) before anything runs."""
    sets = [load_prompt_set(s, limit=limit) for s in specs]
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PromptSetError(f"prompt sets: name(s) {dup} used twice; name them NAME=KIND:PATH")
    return sets
