"""Capacity planner: does an experiment's update step fit on N devices of G GiB?

    python launch/plan.py --config=configs/llama_ipo_md.py --devices=8 --device_memory_gib=131
        [--seq_len=4096] [--json=PATH] [--attacker_model=DIR] [--defender_model=DIR]
        [--config.mesh.fsdp=8 ...]

Offline and allocation-free: each player's shape comes from a ``config.json`` alone (its
``<role>.hf_path``, else ``--<role>_model``, else the family's file under ``configs/models/``).
The mesh is built on N virtual CPU devices, and the REAL update step is lowered and compiled
for the longest length bucket (``--seq_len``) with the config's batch (``seeds_per_device``
per device per split; the attacker gets one pair per seed, the defender one per (seed,
attack); GRPO: A, A·D samples). Reported per device and per player: argument, output and
temporary bytes from ``compiled.memory_analysis()``, and the largest collectives.

Fit rule: both players' states live at once, their steps run one after the other, so a device
needs Σ_players state + max_players temporaries (+ ``--reserve_gib`` for the sampler and the
runtime) ≤ device memory. XLA:CPU upcasts bf16 matmul operands to f32, so CPU temporaries are
an upper bound of the GPU/TPU figure.
"""

import os
import sys

_DEVICES = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
# Virtual devices must be requested before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={int(_DEVICES)}")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advgame_jax.training.planning import plan_experiment, format_plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=False)
flags.DEFINE_integer("devices", 8, "number of devices of the trainer mesh")
flags.DEFINE_float("device_memory_gib", 131.0, "memory of one device in GiB (H200: 131)")
flags.DEFINE_integer("seq_len", 4096, "longest length bucket (prompt + completion tokens)")
flags.DEFINE_float("reserve_gib", 8.0, "memory kept free per device for sampler and runtime")
flags.DEFINE_string("attacker_model", "", "directory or config.json of the attacker's shape")
flags.DEFINE_string("defender_model", "", "directory or config.json of the defender's shape")
flags.DEFINE_string("json", "", "also write the plan as JSON to this path")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    plan = plan_experiment(_CONFIG.value, devices=FLAGS.devices,
                           device_memory_gib=FLAGS.device_memory_gib, seq_len=FLAGS.seq_len,
                           reserve_gib=FLAGS.reserve_gib,
                           models={"attacker": FLAGS.attacker_model,
                                   "defender": FLAGS.defender_model})
    print(format_plan(plan))
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=2)
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
