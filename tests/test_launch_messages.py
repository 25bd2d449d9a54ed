"""Messages a user reads: one-line config errors from launch/train.py (unknown override field
with its path, invalid field, unwritable workdir), the exact line of a non-UTF-8 byte in seed
and WildJailbreak files, seeds that can never fit a prompt budget, and the console filter
that keeps library INFO lines in the log file."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from advgame_jax.data import Seed, SeedFileError, read_seeds_jsonl
from advgame_jax.data.seeds import seeds_over_budget
from advgame_jax.data.wildjailbreak import WildJailbreakFormatError, read_wildjailbreak_tsv
from advgame_jax.experiment import logsetup

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--config=" + str(ROOT / "configs" / "tiny.py"),
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,want",
    [
        (["--config.train.foo=1"], "error: --config.train.foo: config.train has no field 'foo'\n"),
        (
            ["--config.trian.num_steps=1"],
            "error: --config.trian.num_steps: config has no field 'trian' (did you mean 'train'?)\n",
        ),
        (
            ["--config.game.num_attacks=0"],
            "error: config.game.num_attacks: expected an integer >= 1, got 0\n",
        ),
        # A value that does not parse: was absl's two-line FATAL message with exit status 1.
        (
            ["--config.train.num_steps=abc"],
            "error: flag --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc' "
            "(--helpshort lists the flags)\n",
        ),
    ],
)
def test_config_errors_are_one_line(tmp_path, args, want):
    out = _train(*args, "--config.workdir=" + str(tmp_path / "w"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.endswith(want), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_unwritable_workdir_is_one_line_before_anything_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _train("--config.workdir=" + str(blocker / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.workdir=") and "not a writable directory" in last


def test_non_utf8_byte_is_reported_on_its_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    good = b'{"prompt": "open the vault", "category": "harmful"}\n'
    seeds.write_bytes(good * 3000 + b'{"prompt": "bad \xff byte", "category": "benign"}\n' + good)
    with pytest.raises(SeedFileError, match=r"seeds\.jsonl:3001: byte 0xff at column 17"):
        read_seeds_jsonl(seeds)

    # The TSV reader decodes in 8 KB blocks; the byte sits far past the first block.
    tsv = tmp_path / "train.tsv"
    row = b"open the vault\tadv text\tsure\tvanilla_harmful\n"
    tsv.write_bytes(
        b"vanilla\tadversarial\tcompletion\tdata_type\n"
        + row * 2000
        + b"bad \xfe row\tadv\tsure\tvanilla_benign\n"
        + row
    )
    with pytest.raises(WildJailbreakFormatError, match=r"train\.tsv:2002: byte 0xfe at column 5"):
        read_wildjailbreak_tsv(tsv)


def test_seeds_that_can_never_fit_are_found():
    seeds = [Seed("a b c", "harmful"), Seed("word " * 50, "benign"), Seed("é" * 30, "harmful")]
    count = lambda text: len(text.split())  # noqa: E731 - an independent, obvious tokenizer
    assert seeds_over_budget(seeds, count, budget=20) == [1]
    assert seeds_over_budget(seeds, lambda t: len(t.encode("utf-8")), budget=20) == [1, 2]


def _record(pathname, level):
    return logging.LogRecord("absl", level, pathname, 1, "message", (), None)


def test_console_shows_own_progress_and_warnings_library_info_goes_to_the_file(tmp_path):
    f = logsetup.ConsoleFilter()
    ours = str(ROOT / "advgame_jax" / "experiment" / "metrics.py")
    library = os.path.join(os.path.dirname(logging.__file__), "orbax_like.py")
    assert f.filter(_record(ours, logging.INFO))
    assert not f.filter(_record(library, logging.INFO))
    assert f.filter(_record(library, logging.WARNING))
    path = logsetup.configure_logging(str(tmp_path))
    try:
        logging.getLogger("some.library").warning("library warning line")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert "library warning line" in pathlib.Path(path).read_text()
    finally:
        console = logsetup.logging.get_absl_handler()
        for flt in [x for x in console.filters if isinstance(x, logsetup.ConsoleFilter)]:
            console.removeFilter(flt)
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "baseFilename", None) == path]:
            root.removeHandler(h)
            h.close()
