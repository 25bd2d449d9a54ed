"""WildJailbreak train TSV -> the seed JSONL splits the game trains and validates on.

Input: the user-downloaded ``train.tsv`` of WildJailbreak (Jiang et al., 2024), tab-separated
with a header holding at least ``vanilla``, ``adversarial``, ``completion``, ``data_type``;
``data_type`` is one of ``vanilla_harmful``, ``vanilla_benign``, ``adversarial_harmful``,
``adversarial_benign``.

Output (files created with mode 0600 in ``out_dir``):
- ``train_{harmful,benign}.jsonl`` / ``valid_{harmful,benign}.jsonl``: the ``vanilla`` prompts
  of the vanilla rows, per category, permuted with ``numpy.random.default_rng(seed)`` (42 by
  default); the first ``valid_size`` of the permutation are validation, the rest train.
- ``adversarial_{harmful,benign}.jsonl``: the ``adversarial`` prompts of the adversarial rows,
  in file order (evaluation splits).
- ``valid_adversarial_{harmful,benign}.jsonl``: the first 256 (harmful) / 128 (benign) of the
  adversarial prompts permuted with the same seeded generator (all of them when there are
  fewer), the paper's adversarial validation splits (``config.data.valid_adversarial_*``).

Prompts are never logged or put in error messages: a bad header or row is reported by file,
line number and what was expected.
"""

from __future__ import annotations

import os
from typing import Optional, cast

import numpy as np

from advgame_jax.data.readers import table_rows
from advgame_jax.data.seeds import CATEGORIES, Category, Seed, write_seeds_jsonl
from advgame_jax.errors import UserError

REQUIRED_COLUMNS = ("vanilla", "adversarial", "completion", "data_type")
DATA_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful", "adversarial_benign")
DEFAULT_SEED = 42
DEFAULT_VALID_SIZE = 256
# Adversarial validation seeds per category (the reference's valid_adversarial_*_{256,128}).
DEFAULT_ADVERSARIAL_VALID_SIZES = {"harmful": 256, "benign": 128}


class WildJailbreakFormatError(UserError, ValueError):
    """The TSV is not a WildJailbreak train file as expected."""


class OutputDirError(UserError, OSError):
    """The output directory of the seed splits cannot be created or written."""


def read_wildjailbreak_tsv(path: str | os.PathLike) -> dict[str, list[Seed]]:
    """Group the TSV's prompts by data_type: ``{data_type: [Seed, ...]}`` in file order.

    Vanilla rows contribute their ``vanilla`` column, adversarial rows their ``adversarial``.
    The file is read by ``data.readers.table_rows`` (strict quoting, UTF-8 line by line), so
    every fault is reported by line.
    """
    path = os.fspath(path)
    out: dict[str, list[Seed]] = {t: [] for t in DATA_TYPES}
    for line, row in table_rows(
        path,
        REQUIRED_COLUMNS,
        delimiter="\t",
        exact_width=True,
        kind="the WildJailbreak train TSV",
        error=WildJailbreakFormatError,
    ):
        data_type = row["data_type"].strip()
        if data_type not in DATA_TYPES:
            raise WildJailbreakFormatError(
                f"{path}:{line}: column 'data_type' is not one of {list(DATA_TYPES)}"
            )
        kind, category = data_type.split("_", 1)
        text_col = "vanilla" if kind == "vanilla" else "adversarial"
        prompt = row[text_col]
        if not prompt.strip():
            raise WildJailbreakFormatError(
                f"{path}:{line}: column {text_col!r} is empty; expected the prompt of a {data_type} row"
            )
        # data_type is one of DATA_TYPES, so its suffix is a Category.
        out[data_type].append(Seed(prompt=prompt, category=cast(Category, category)))
    return out


def split_train_valid(
    seeds: list[Seed], *, valid_size: int, seed: int = DEFAULT_SEED
) -> tuple[list[Seed], list[Seed]]:
    """Seeded permutation; the first ``valid_size`` are validation, the rest train."""
    if isinstance(valid_size, bool) or not isinstance(valid_size, int) or valid_size < 0:
        raise WildJailbreakFormatError(f"valid_size={valid_size!r}; expected an integer >= 0")
    perm = np.random.default_rng(seed).permutation(len(seeds))
    shuffled = [seeds[int(i)] for i in perm]
    return shuffled[valid_size:], shuffled[:valid_size]


def prepare_wildjailbreak(
    tsv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    valid_size: int = DEFAULT_VALID_SIZE,
    seed: int = DEFAULT_SEED,
    adversarial_valid_sizes: Optional[dict] = None,
) -> dict[str, int]:
    """Write the train/valid/adversarial JSONL splits; returns ``{file name: record count}``.

    ``adversarial_valid_sizes``: ``{category: n}`` for the adversarial validation splits
    (default ``DEFAULT_ADVERSARIAL_VALID_SIZES``)."""
    sizes = dict(
        DEFAULT_ADVERSARIAL_VALID_SIZES
        if adversarial_valid_sizes is None
        else adversarial_valid_sizes
    )
    for category, n in sizes.items():
        if category not in CATEGORIES or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise WildJailbreakFormatError(
                f"adversarial_valid_sizes: expected {{'harmful'|'benign': int >= 0}}, got "
                f"{category!r}: {n!r}"
            )
    grouped = read_wildjailbreak_tsv(tsv_path)
    files: dict[str, list[Seed]] = {}
    for category in CATEGORIES:
        vanilla = grouped[f"vanilla_{category}"]
        if len(vanilla) <= valid_size:
            raise WildJailbreakFormatError(
                f"{os.fspath(tsv_path)}: {len(vanilla)} vanilla_{category} rows; expected more than "
                f"valid_size={valid_size} so that train is not empty"
            )
        train, valid = split_train_valid(vanilla, valid_size=valid_size, seed=seed)
        files[f"train_{category}.jsonl"] = train
        files[f"valid_{category}.jsonl"] = valid
        files[f"adversarial_{category}.jsonl"] = grouped[f"adversarial_{category}"]
        _, adv_valid = split_train_valid(
            grouped[f"adversarial_{category}"], valid_size=sizes.get(category, 0), seed=seed
        )
        files[f"valid_adversarial_{category}.jsonl"] = adv_valid
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        for name, seeds in files.items():
            write_seeds_jsonl(os.path.join(out_dir, name), seeds, mode=0o600)
    except OSError as err:
        raise OutputDirError(
            f"out_dir {out_dir!r}: cannot write the seed files "
            f"({err.strerror or type(err).__name__}); expected a writable "
            "directory"
        ) from None
    return {name: len(seeds) for name, seeds in files.items()}


def summary(counts: dict[str, int], out_dir: Optional[str] = None) -> str:
    """Counts only (never prompts), one file a line."""
    head = [f"wrote to {out_dir}:"] if out_dir else []
    return "\n".join(head + [f"  {name}: {n}" for name, n in sorted(counts.items())])
