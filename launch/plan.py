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

Every flag, the config's mesh, the model files and the ``--json`` path are checked before JAX
starts (``advgame_jax.plan_inputs``); a bad one is one ``error:`` line, exit 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advgame_jax.errors import run_cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=False)
flags.DEFINE_integer("devices", 8, "number of devices of the trainer mesh")
flags.DEFINE_float("device_memory_gib", 131.0, "memory of one device in GiB (H200: 131)")
flags.DEFINE_integer("seq_len", 4096, "longest length bucket (prompt + completion tokens)")
flags.DEFINE_float("reserve_gib", 8.0, "memory kept free per device for sampler and runtime")
flags.DEFINE_string("attacker_model", "", "directory or config.json of the attacker's shape")
flags.DEFINE_string("defender_model", "", "directory or config.json of the defender's shape")
flags.DEFINE_string("json", "", "also write the plan as JSON to this path")
FLAGS = flags.FLAGS


def _config():
    """The loaded ``--config`` (a file that does not load is a user error, one line)."""
    from advgame_jax.plan_inputs import PlanInputError

    config = _CONFIG.value
    try:
        config.get("name")  # a file that failed to load raises here, not at .value
        return config
    except OSError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise PlanInputError(f"--config: {lines[-1] if lines else err}") from None


def _checked_inputs() -> dict:
    """Every input of the plan, checked without JAX (see plan_inputs)."""
    from advgame_jax.plan_inputs import check_flags, model_path_for, resolve_mesh_shape

    args = check_flags(devices=FLAGS.devices, device_memory_gib=FLAGS.device_memory_gib,
                       seq_len=FLAGS.seq_len, reserve_gib=FLAGS.reserve_gib,
                       json_path=FLAGS.json)
    config = _config()
    resolve_mesh_shape(config.mesh, args["devices"])
    args["models"] = {role: model_path_for(config, role, getattr(FLAGS, f"{role}_model"))
                      for role in ("attacker", "defender")}
    return args


def _start_jax(devices: int) -> None:
    """Ask for ``devices`` virtual CPU devices; must run before JAX initialises a backend."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _body() -> int:
    args = _checked_inputs()
    _start_jax(args["devices"])
    from advgame_jax.training.planning import format_plan, plan_experiment

    plan = plan_experiment(_config(), devices=args["devices"],
                           device_memory_gib=args["device_memory_gib"], seq_len=args["seq_len"],
                           reserve_gib=args["reserve_gib"], models=args["models"])
    print(format_plan(plan))
    if args["json_path"]:
        _write_json(args["json_path"], plan)
    return 0


def _parse_flags(argv):
    """absl's parse; a bad flag or ``--config`` override is one ``error:`` line, exit 2."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        from advgame_jax.errors import fail, one_line

        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        if isinstance(err, (AttributeError, KeyError)) and overrides:
            fail(f"{', '.join(overrides)}: names a field the config does not have "
                 f"({one_line(err)})")
        fail(one_line(err))


def main(argv):
    if len(argv) > 1:
        from advgame_jax.errors import fail

        fail(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
    return run_cli(_body)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
