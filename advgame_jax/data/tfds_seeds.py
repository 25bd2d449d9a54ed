"""Seed JSONL files as a TFDS dataset (array_record files, no TensorFlow needed) and back.

``build_seed_dataset({"train": "train.jsonl", ...}, data_dir)`` prepares the dataset
``seed_prompts`` under ``data_dir``; ``read_seed_split(data_dir, "train")`` reads one split back
through ``tfds.data_source`` (random access, as grain and plain iterators use it) to ``Seed``s
in the JSONL order. Every line is validated by the JSONL reader, so a bad file fails with its
file and line number before anything is written.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional

import tensorflow_datasets as tfds
from etils import epath

from advgame_jax.data.seeds import CATEGORIES, Seed, SeedFileError, read_seeds_jsonl

DATASET_NAME = "seed_prompts"


class SeedPrompts(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over seed JSONL files; splits are given as ``{name: path}``.

    Reading an already prepared dataset needs no ``split_paths``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Seed prompts with their harmful/benign category."}

    # TFDS 4.9.10 resolves a packaged builder's source file through `importlib_resources`, a
    # backport it does not install on Python >= 3.9; point it at this file directly.
    # (TFDS's lazy module hides `utils` from the type checker, and its stub types code_path
    # as a plain attribute, which a class property overrides.)
    @tfds.core.utils.classproperty  # pyright: ignore[reportAttributeAccessIssue]
    @classmethod
    def code_path(cls) -> epath.Path:  # pyright: ignore[reportIncompatibleVariableOverride]
        return epath.Path(pathlib.Path(__file__).resolve())

    def __init__(self, *, split_paths: Optional[Mapping[str, str]] = None, **kwargs):
        self._split_paths = dict(split_paths or {})
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Seed prompts s for the attacker-defender game.",
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "category": tfds.features.ClassLabel(names=list(CATEGORIES)),
                }
            ),
            supervised_keys=None,
            # Keep file order: the JSONL order is the order users and tests expect back.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        if not self._split_paths:
            raise SeedFileError(
                f"{DATASET_NAME}: no split_paths given; expected {{split name: JSONL path}} to build"
            )
        return {name: self._generate_examples(path) for name, path in self._split_paths.items()}

    def _generate_examples(self, path):
        for i, seed in enumerate(read_seeds_jsonl(path)):
            yield i, {"prompt": seed.prompt, "category": seed.category}


def build_seed_dataset(split_paths: Mapping[str, str], data_dir: str | os.PathLike) -> SeedPrompts:
    """Prepare ``seed_prompts`` (array_record) in ``data_dir`` from ``{split: jsonl path}``."""
    split_paths = {str(k): os.fspath(v) for k, v in split_paths.items()}
    for name, path in split_paths.items():
        if not name.isidentifier():
            raise SeedFileError(f"split name {name!r} for {path}: expected letters, digits and _")
        read_seeds_jsonl(path)  # validate everything before TFDS writes anything
    builder = SeedPrompts(split_paths=split_paths, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def read_seed_split(data_dir: str | os.PathLike, split: str) -> list[Seed]:
    """One prepared split back as ``Seed``s, in file order, via ``tfds.data_source``."""
    # Any: typed as split -> source; given one split it returns that split's random-access
    # source of example dicts.
    source: Any = tfds.data_source(
        DATASET_NAME, split=split, data_dir=os.fspath(data_dir), download=False
    )
    out = []
    for i in range(len(source)):
        ex = source[i]
        prompt = ex["prompt"]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        out.append(Seed(prompt=str(prompt), category=CATEGORIES[int(ex["category"])]))
    return out
