"""Seed reader, packaged seeds, TFDS round trip, SeedIterator, WildJailbreak preparation."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from advgame_jax.data import (
    Seed,
    SeedFileError,
    SeedIterator,
    packaged_seed_path,
    read_seeds_jsonl,
)
from advgame_jax.data import wildjailbreak as wjb

REPO = pathlib.Path(__file__).resolve().parents[1]
GOOD = '{"prompt": "how do i bake bread", "category": "benign"}'


# ---- JSONL reader ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"prompt": "x", "category": "benign"', "invalid JSON"),
        ('["x", "benign"]', "got list"),
        ('{"category": "benign"}', "missing field 'prompt'"),
        ('{"prompt": "x"}', "missing field 'category'"),
        ('{"prompt": "x", "category": "benign", "id": 3}', "unexpected field"),
        ('{"prompt": 7, "category": "benign"}', "'prompt' is int"),
        ('{"prompt": "   ", "category": "benign"}', "'prompt' is empty"),
        ('{"prompt": "x", "category": "toxic"}', "'category' is 'toxic'"),
        ('{"prompt": "x", "category": null}', "'category' is None"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, bad, why):
    path = tmp_path / "seeds.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")  # the bad record is on line 3
    with pytest.raises(SeedFileError) as err:
        read_seeds_jsonl(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg and why in msg and '"category": "harmful" | "benign"' in msg


def test_reader_missing_file(tmp_path):
    with pytest.raises(SeedFileError, match=f"{tmp_path / 'nope.jsonl'} does not exist"):
        read_seeds_jsonl(tmp_path / "nope.jsonl")


def test_reader_skips_blank_lines_and_keeps_order(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('\n{"prompt": "a ü 桜", "category": "harmful"}\n  \n' + GOOD + "\n\n")
    assert read_seeds_jsonl(path) == [
        Seed("a ü 桜", "harmful"),
        Seed("how do i bake bread", "benign"),
    ]


def test_real_seed_files(wildjailbreak_dir):
    for category in ("harmful", "benign"):
        path = wildjailbreak_dir / f"valid_{category}_256.jsonl"
        seeds = read_seeds_jsonl(path)
        reference = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        assert len(seeds) == 256
        assert {s.category for s in seeds} == {category}
        assert [s.prompt for s in seeds] == [r["prompt"] for r in reference]


def test_packaged_seeds():
    train = read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl"))
    valid = read_seeds_jsonl(packaged_seed_path("toy_valid"))
    for seeds, n in ((train, 48), (valid, 16)):
        assert sum(s.category == "harmful" for s in seeds) == n
        assert sum(s.category == "benign" for s in seeds) == n
        assert all(len(s.prompt.split()) <= 12 for s in seeds)
    prompts = [s.prompt for s in train + valid]
    assert len(set(prompts)) == len(prompts)  # unique, and train/valid disjoint
    assert os.path.isfile(packaged_seed_path("tiny_corpus.txt"))
    with pytest.raises(SeedFileError, match="unknown packaged data file"):
        packaged_seed_path("missing.jsonl")


# ---- TFDS -----------------------------------------------------------------------------------
def test_tfds_round_trip_real_seeds(wildjailbreak_dir, tmp_path):
    from advgame_jax.data.tfds_seeds import build_seed_dataset, read_seed_split

    splits = {
        "harmful": wildjailbreak_dir / "valid_harmful_256.jsonl",
        "benign": wildjailbreak_dir / "valid_benign_256.jsonl",
        "toy": packaged_seed_path("toy_seeds"),
    }
    build_seed_dataset(splits, tmp_path / "tfds")
    for name, path in splits.items():
        assert read_seed_split(tmp_path / "tfds", name) == read_seeds_jsonl(path), name
    assert list((tmp_path / "tfds" / "seed_prompts" / "1.0.0").glob("*.array_record-*"))


def test_tfds_without_tensorflow(tmp_path):
    """Build and read in a fresh interpreter: TensorFlow is never imported (it is not installed
    in the project environment at all; the flag is printed for the log)."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        tf_installed = importlib.util.find_spec("tensorflow") is not None
        from advgame_jax.data import packaged_seed_path, read_seeds_jsonl
        from advgame_jax.data.tfds_seeds import build_seed_dataset, read_seed_split
        build_seed_dataset({{"valid": packaged_seed_path("toy_valid")}}, {str(tmp_path)!r})
        assert read_seed_split({str(tmp_path)!r}, "valid") == read_seeds_jsonl(packaged_seed_path("toy_valid"))
        assert "tensorflow" not in sys.modules  # TFDS never loaded TensorFlow
        print("tf_installed", tf_installed, "OK")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_tfds_bad_file_names_line(tmp_path):
    from advgame_jax.data.tfds_seeds import build_seed_dataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + '{"prompt": "x", "category": "neutral"}\n')
    with pytest.raises(SeedFileError, match=f"{bad}:2:"):
        build_seed_dataset({"train": bad}, tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "seed_prompts").exists()


# ---- SeedIterator ---------------------------------------------------------------------------
def _seeds(n, category="harmful"):
    return [Seed(f"prompt {i}", category) for i in range(n)]


def _stream(it, n_batches):
    return [s for _ in range(n_batches) for s in it.next_batch()]


def test_iterator_epochs_are_seeded_permutations():
    seeds = _seeds(48)
    it = SeedIterator(seeds, 5, seed=3)
    stream = _stream(it, 30)  # 150 seeds: 3 full epochs and part of a 4th
    for e in range(3):
        perm = np.random.default_rng([3, e]).permutation(48)
        assert stream[48 * e : 48 * (e + 1)] == [seeds[i] for i in perm]
    assert it.state()["epoch"] == 3 and it.state()["position"] == 150 - 144
    assert all(len(b) == 5 for b in (it.next_batch(), it.next_batch()))


def test_iterator_deterministic_and_seed_dependent():
    seeds = _seeds(20)
    a = _stream(SeedIterator(seeds, 4, seed=1), 12)
    b = _stream(SeedIterator(seeds, 4, seed=1), 12)
    c = _stream(SeedIterator(seeds, 4, seed=2), 12)
    assert a == b and a != c
    assert a[:20] != a[20:40]  # epochs are reshuffled


@pytest.mark.parametrize("consumed", [0, 3, 4, 7, 10])
def test_iterator_resume_identical(consumed):
    seeds = _seeds(23)
    ref = SeedIterator(seeds, 3, seed=9, shard_index=1, shard_count=2)
    _stream(ref, consumed)
    state = json.loads(json.dumps(ref.state()))
    fresh = SeedIterator(seeds, 3, seed=9, shard_index=1, shard_count=2)
    fresh.restore(state)
    assert _stream(fresh, 15) == _stream(ref, 15)


def test_iterator_restore_rejects_foreign_state():
    it = SeedIterator(_seeds(10), 2, seed=0)
    other = SeedIterator(_seeds(10), 2, seed=1).state()
    with pytest.raises(ValueError, match=r"state\['seed'\]=1"):
        it.restore(other)
    with pytest.raises(ValueError, match="position"):
        it.restore({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="epoch"):
        it.restore({"epoch": -1, "position": 0})


@pytest.mark.parametrize("n, shards", [(48, 4), (50, 3), (7, 7)])
def test_iterator_shards_disjoint_and_cover(n, shards):
    seeds = _seeds(n)
    its = [SeedIterator(seeds, 2, seed=5, shard_index=k, shard_count=shards) for k in range(shards)]
    for epoch in range(3):
        parts = [it.epoch_indices(epoch) for it in its]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(n))  # disjoint and covering
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # The batches a shard emits are exactly its slices of consecutive epochs.
    for it in its:
        expected = [seeds[i] for e in range(3) for i in it.epoch_indices(e)]
        got = _stream(it, (len(expected) + 1) // 2)
        assert got[: len(expected)] == expected


def test_iterator_bad_arguments():
    with pytest.raises(ValueError, match="mix categories"):
        SeedIterator(_seeds(3) + _seeds(3, "benign"), 2, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        SeedIterator(_seeds(3), 2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        SeedIterator(_seeds(3), 2, seed=0, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="batch_size"):
        SeedIterator(_seeds(3), 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        SeedIterator([], 1, seed=0)


# ---- WildJailbreak preparation -------------------------------------------------------------
def _tsv_rows():
    rows = []
    for i in range(7):
        rows.append((f"plain harmful placeholder {i}", "", "placeholder reply", "vanilla_harmful"))
    for i in range(6):
        rows.append((f"plain benign placeholder {i}", "", "placeholder reply", "vanilla_benign"))
    rows.append(
        ("source h", '"quoted\ttab and\nnewline" harmful placeholder', "r", "adversarial_harmful")
    )
    rows.append(("source h2", "second adversarial harmful placeholder", "r", "adversarial_harmful"))
    rows.append(("source b", "adversarial benign placeholder", "r", "adversarial_benign"))
    return rows


def _write_tsv(path, rows, header=("vanilla", "adversarial", "completion", "data_type")):
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def test_prepare_wildjailbreak(tmp_path):
    tsv = tmp_path / "train.tsv"
    rows = _tsv_rows()
    _write_tsv(tsv, rows)
    out = tmp_path / "out"
    counts = wjb.prepare_wildjailbreak(tsv, out, valid_size=3)
    assert counts == {
        "train_harmful.jsonl": 4,
        "valid_harmful.jsonl": 3,
        "adversarial_harmful.jsonl": 2,
        "train_benign.jsonl": 3,
        "valid_benign.jsonl": 3,
        "adversarial_benign.jsonl": 1,
        # Adversarial validation: up to 256 / 128, here all of the 2 / 1 adversarial rows.
        "valid_adversarial_harmful.jsonl": 2,
        "valid_adversarial_benign.jsonl": 1,
    }
    for name in counts:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
    for category in ("harmful", "benign"):
        vanilla = [r[0] for r in rows if r[3] == f"vanilla_{category}"]
        train = [s.prompt for s in read_seeds_jsonl(out / f"train_{category}.jsonl")]
        valid = [s.prompt for s in read_seeds_jsonl(out / f"valid_{category}.jsonl")]
        perm = np.random.default_rng(42).permutation(len(vanilla))
        assert valid + train == [vanilla[i] for i in perm]
        adv = read_seeds_jsonl(out / f"adversarial_{category}.jsonl")
        assert [s.prompt for s in adv] == [r[1] for r in rows if r[3] == f"adversarial_{category}"]
        assert {s.category for s in adv} == {category}
    # Adversarial validation = the first n of the seeded permutation of the adversarial rows.
    small = wjb.prepare_wildjailbreak(
        tsv, tmp_path / "small", valid_size=3, adversarial_valid_sizes={"harmful": 1, "benign": 0}
    )
    assert (small["valid_adversarial_harmful.jsonl"], small["valid_adversarial_benign.jsonl"]) == (
        1,
        0,
    )
    adv_h = [r[1] for r in rows if r[3] == "adversarial_harmful"]
    first = int(np.random.default_rng(42).permutation(len(adv_h))[0])
    got = read_seeds_jsonl(tmp_path / "small" / "valid_adversarial_harmful.jsonl")
    assert [(s.prompt, s.category) for s in got] == [(adv_h[first], "harmful")]
    with pytest.raises(ValueError, match="adversarial_valid_sizes"):
        wjb.prepare_wildjailbreak(
            tsv, tmp_path / "bad", valid_size=3, adversarial_valid_sizes={"harmful": -1}
        )
    again = wjb.prepare_wildjailbreak(tsv, tmp_path / "again", valid_size=3)
    assert again == counts
    for name in counts:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda rows: rows.__setitem__(4, rows[4][:3] + ("vanilla_toxic",)),
            ":6: column 'data_type'",
        ),
        (lambda rows: rows.__setitem__(2, rows[2][:3]), ":4: row has 3 fields"),
        (lambda rows: rows.__setitem__(1, ("",) + rows[1][1:]), ":3: column 'vanilla' is empty"),
    ],
)
def test_prepare_bad_rows(tmp_path, mutate, expect):
    rows = _tsv_rows()
    mutate(rows)
    tsv = tmp_path / "bad.tsv"
    _write_tsv(tsv, rows)
    with pytest.raises(wjb.WildJailbreakFormatError) as err:
        wjb.prepare_wildjailbreak(tsv, tmp_path / "out", valid_size=3)
    assert f"{tsv}{expect}" in str(err.value)
    assert "placeholder" not in str(err.value)  # prompts never reach error messages


def test_prepare_bad_header_and_sizes(tmp_path):
    tsv = tmp_path / "h.tsv"
    _write_tsv(tsv, _tsv_rows(), header=("vanilla", "adversarial", "reply", "data_type"))
    with pytest.raises(
        wjb.WildJailbreakFormatError, match=f"{tsv}:1: header lacks column.*completion"
    ):
        wjb.prepare_wildjailbreak(tsv, tmp_path / "out")
    _write_tsv(tsv, _tsv_rows())
    with pytest.raises(wjb.WildJailbreakFormatError, match="6 vanilla_benign rows"):
        wjb.prepare_wildjailbreak(tsv, tmp_path / "out", valid_size=6)


def test_prepare_data_launcher(tmp_path):
    tsv = tmp_path / "train.tsv"
    _write_tsv(tsv, _tsv_rows())
    out = subprocess.run(
        [
            sys.executable,
            "launch/prepare_data.py",
            f"--tsv={tsv}",
            f"--out_dir={tmp_path / 'o'}",
            "--valid_size=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train_harmful.jsonl: 5" in out.stdout and "placeholder" not in out.stdout + out.stderr
    assert len(read_seeds_jsonl(tmp_path / "o" / "valid_benign.jsonl")) == 2
