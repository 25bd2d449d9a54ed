"""Train the attacker and defender with the AdvGame recipe.

    python launch/train.py --config=configs/tiny.py                      # offline default
    python launch/train.py --config=configs/llama_ipo_md.py --config.workdir=... \
        --config.attacker.hf_path=... --config.defender.hf_path=... \
        --config.judge.endpoints=http://host:8000/v1

All logic lives in ``advgame_jax.experiment``; this file only parses flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def main(argv):
    del argv
    from advgame_jax import distributed

    config = _CONFIG.value
    # Join a multi-process world (Slurm, TPU pod, explicit flags) before JAX starts.
    d = config.get("distributed", {})
    distributed.initialize(distributed.detect_world(
        coordinator=d.get("coordinator", ""), num_processes=d.get("num_processes", 0),
        process_id=d.get("process_id", -1)), expect_processes=d.get("num_processes", 0))
    from advgame_jax.experiment.loop import run_from_config

    logging.set_verbosity(logging.INFO)
    run_from_config(config)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
