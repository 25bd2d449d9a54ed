"""Train the attacker and defender with the AdvGame recipe.

    python launch/train.py --config=configs/tiny.py                      # offline default
    python launch/train.py --config=configs/llama_ipo_md.py --config.workdir=... \
        --config.attacker.hf_path=... --config.defender.hf_path=... \
        --config.judge.endpoints=http://host:8000/v1

All logic lives in ``advgame_jax.experiment``; this file only parses flags and reports a bad
input (config field, override, seed file, workdir, checkpoint) as one ``error:`` line with
exit status 2. The console shows the progress line and warnings; libraries' INFO lines go
to ``<workdir>/train.log``.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    from advgame_jax.experiment.logsetup import divert_stderr

    divert_stderr()  # late library noise at exit goes to train.log, not under the error line
    sys.exit(2)


def _override_message(argv, err: Exception) -> str:
    """One line naming the ``--config.<path>`` override that named an unknown field."""
    text = str(err.args[0]) if err.args else str(err)
    quoted = re.findall(r"'([^'\s]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--") :].split("=", 1)[0]
        parts = path.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if part in quoted:
                where = ".".join(parts[:i])
                return f"{arg.split('=', 1)[0]}: {where} has no field {part!r}" + (
                    f" (did you mean {hint.group(1)!r}?)" if hint else ""
                )
    return f"bad --config override: {type(err).__name__}: {text}"


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:  # a value that does not parse (`--config.train.num_steps=abc`)
        _fail(" ".join(str(err).split()) + " (--helpshort lists the flags)")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        _fail(_override_message(argv, err))


def main(argv):
    del argv
    from advgame_jax import distributed
    from advgame_jax.errors import UserError, one_line
    from advgame_jax.experiment.logsetup import configure_logging
    from advgame_jax.experiment.loop import run_from_config
    from advgame_jax.experiment.validate import settings_from_config
    from advgame_jax.fsutil import check_writable_dir

    config = _CONFIG.value
    try:
        # Join a multi-process world (Slurm, TPU pod, explicit flags) before JAX starts.
        d = config.get("distributed", {})
        distributed.initialize(
            distributed.detect_world(
                coordinator=d.get("coordinator", ""),
                num_processes=d.get("num_processes", 0),
                process_id=d.get("process_id", -1),
            ),
            expect_processes=d.get("num_processes", 0),
        )
        settings = settings_from_config(config)  # the one conversion; the runner reuses it
        check_writable_dir(os.path.abspath(settings.workdir), "config.workdir")
        log_path = configure_logging(settings.workdir)
        logging.info("library logs: %s", log_path)
        run_from_config(config, settings=settings)
    except UserError as err:
        _fail(one_line(err))
    except Exception as err:
        from advgame_jax.experiment.logsetup import FILE_ONLY
        from advgame_jax.training.checkpoint import disk_full

        if disk_full(err):  # one line on the console; the traceback goes to train.log
            logging.error("stopped: no space left on device", exc_info=err, extra=FILE_ONLY)
            _fail(
                f"no space left on device ({one_line(err)[:300]}); free some space and "
                f"rerun the same command to resume from the last complete checkpoint"
            )
        if isinstance(err, OSError) and "config." in str(err):  # e.g. check_writable_dir
            _fail(str(err))
        raise


def run():
    """``advgame-train`` (pyproject.toml): the same as ``python launch/train.py``."""
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
