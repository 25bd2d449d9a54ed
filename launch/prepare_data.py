"""Turn a downloaded WildJailbreak train TSV into the game's seed JSONL splits.

    python launch/prepare_data.py --tsv=/path/to/wildjailbreak/train.tsv --out_dir=/path/to/seeds

Writes train/valid_{harmful,benign}.jsonl (vanilla prompts, seeded split),
adversarial_{harmful,benign}.jsonl and the adversarial validation splits
valid_adversarial_{harmful,benign}.jsonl (256 / 128 seeds by default; mode 0600) and prints
only the record counts. All logic
lives in ``advgame_jax.data.wildjailbreak``; this file only parses flags.
"""

from absl import app, flags

_TSV = flags.DEFINE_string(
    "tsv", None, "WildJailbreak train TSV (vanilla, adversarial, completion, data_type)."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Directory for the JSONL splits (created with mode 0700)."
)
_VALID_SIZE = flags.DEFINE_integer("valid_size", 256, "Validation seeds per category.")
_SEED = flags.DEFINE_integer("seed", 42, "Shuffle seed of the train/valid split.")
_ADV_HARMFUL = flags.DEFINE_integer(
    "valid_adversarial_harmful", 256, "Adversarial harmful validation seeds."
)
_ADV_BENIGN = flags.DEFINE_integer(
    "valid_adversarial_benign", 128, "Adversarial benign validation seeds."
)


def main(argv):
    del argv
    from advgame_jax.data.wildjailbreak import prepare_wildjailbreak, summary
    from advgame_jax.errors import run_cli

    # A bad TSV, size or output directory is one ``error:`` line with exit status 2.
    counts = run_cli(
        lambda: prepare_wildjailbreak(
            _TSV.value,
            _OUT_DIR.value,
            valid_size=_VALID_SIZE.value,
            seed=_SEED.value,
            adversarial_valid_sizes={"harmful": _ADV_HARMFUL.value, "benign": _ADV_BENIGN.value},
        )
    )
    print(summary(counts, _OUT_DIR.value))


def run():
    """``advgame-prepare-data`` (pyproject.toml): the same as ``python launch/prepare_data.py``."""
    flags.mark_flags_as_required(["tsv", "out_dir"])
    from advgame_jax.evaluation import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
