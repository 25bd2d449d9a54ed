"""Seed datasets: the ``Seed`` record and its JSONL reader, packaged toy seeds, the sharded
resumable ``SeedIterator``; the TFDS builder lives in ``data.tfds_seeds`` and the WildJailbreak
preparation in ``data.wildjailbreak`` (imported on demand: they pull in heavier libraries)."""

from advgame_jax.data.iterator import SeedIterator
from advgame_jax.data.seeds import (
    CATEGORIES,
    Seed,
    SeedFileError,
    packaged_seed_path,
    read_seeds_jsonl,
    split_by_category,
    write_seeds_jsonl,
)

__all__ = [
    "CATEGORIES",
    "Seed",
    "SeedFileError",
    "SeedIterator",
    "packaged_seed_path",
    "read_seeds_jsonl",
    "split_by_category",
    "write_seeds_jsonl",
]
