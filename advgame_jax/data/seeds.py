"""Seed records ``s`` and their JSONL files: the ``Seed`` dataclass, a strict reader, and the
location of the seed files the package ships (``data/assets``).

One JSONL record a line: ``{"prompt": str, "category": "harmful" | "benign"}``; blank lines
are skipped. Any other line (invalid or too deeply nested JSON, a non-UTF-8 byte, a wrong
field) is a user-input error reported with its file and line number (``data.readers``).
``seeds_over_budget`` counts seeds that can never fit a prompt budget, for a report at load
time.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from typing import Literal, Sequence

from advgame_jax.data.readers import jsonl_records
from advgame_jax.errors import UserError

Category = Literal["harmful", "benign"]
CATEGORIES: tuple[Category, ...] = ("harmful", "benign")
_EXPECTED = (
    'expected a JSON object {"prompt": <non-empty string>, "category": "harmful" | "benign"}'
)


class SeedFileError(UserError, ValueError):
    """A seed file (or one of its lines) is not what the reader expects."""


@dataclasses.dataclass(frozen=True)
class Seed:
    """One seed prompt ``s`` and its category."""

    prompt: str
    category: Category


def parse_seed_record(record: object, where: str) -> Seed:
    """Validate one decoded record; ``where`` ("file:line") prefixes any error."""
    if not isinstance(record, dict):
        raise SeedFileError(f"{where}: got {type(record).__name__}; {_EXPECTED}")
    extra = sorted(set(record) - {"prompt", "category"})
    if extra:
        raise SeedFileError(f"{where}: unexpected field(s) {extra}; {_EXPECTED}")
    for field in ("prompt", "category"):
        if field not in record:
            raise SeedFileError(f"{where}: missing field {field!r}; {_EXPECTED}")
    prompt, category = record["prompt"], record["category"]
    if not isinstance(prompt, str):
        raise SeedFileError(f"{where}: field 'prompt' is {type(prompt).__name__}; {_EXPECTED}")
    if not prompt.strip():
        raise SeedFileError(f"{where}: field 'prompt' is empty; {_EXPECTED}")
    if category not in CATEGORIES:
        raise SeedFileError(f"{where}: field 'category' is {category!r}; {_EXPECTED}")
    return Seed(prompt=prompt, category=category)


def read_seeds_jsonl(path: str | os.PathLike) -> list[Seed]:
    """All seeds of a JSONL file, in file order. Raises ``SeedFileError`` naming file and line
    (``data.readers``: non-UTF-8 bytes, invalid or too deeply nested JSON, bad records)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SeedFileError(f"seed file {path} does not exist; expected a JSONL file")
    return [
        parse_seed_record(record, f"{path}:{lineno}")
        for lineno, record in jsonl_records(path, _EXPECTED, SeedFileError, objects_only=False)
    ]


def write_seeds_jsonl(path: str | os.PathLike, seeds: Sequence[Seed], mode: int = 0o600) -> str:
    """Write seeds as JSONL, created with file mode ``mode`` (private by default)."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its old mode under O_CREAT; force ours
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for s in seeds:
            f.write(
                json.dumps({"prompt": s.prompt, "category": s.category}, ensure_ascii=False) + "\n"
            )
    return path


def seeds_over_budget(seeds: Sequence[Seed], count_tokens, budget: int) -> list[int]:
    """Indices of seeds whose own text is longer than ``budget`` tokens (``count_tokens(str)``):
    whatever template wraps them, their prompts can never fit."""
    # A tokenizer makes at most one token per byte (plus a few specials), so only seeds with
    # more bytes than the budget need counting.
    return [
        i
        for i, s in enumerate(seeds)
        if len(s.prompt.encode("utf-8")) + 8 > budget and count_tokens(s.prompt) > budget
    ]


def split_by_category(seeds: Sequence[Seed]) -> dict[str, list[Seed]]:
    """``{"harmful": [...], "benign": [...]}``, each in input order."""
    out: dict[str, list[Seed]] = {c: [] for c in CATEGORIES}
    for s in seeds:
        out[s.category].append(s)
    return out


PACKAGED_FILES = ("toy_seeds.jsonl", "toy_valid.jsonl", "tiny_corpus.txt")


def packaged_seed_path(name: str) -> str:
    """Filesystem path of a file shipped in ``advgame_jax/data/assets`` (e.g. "toy_seeds.jsonl").

    A bare stem ("toy_seeds") is accepted for the JSONL files.
    """
    if name not in PACKAGED_FILES and f"{name}.jsonl" in PACKAGED_FILES:
        name = f"{name}.jsonl"
    if name not in PACKAGED_FILES:
        raise SeedFileError(
            f"unknown packaged data file {name!r}; expected one of {list(PACKAGED_FILES)}"
        )
    resource = importlib.resources.files("advgame_jax.data").joinpath("assets", name)
    # The package is installed as plain files (editable or wheel), so the path is real.
    path = str(resource)
    if not os.path.isfile(path):
        raise SeedFileError(f"packaged data file {path} is missing; reinstall advgame_jax")
    return path
