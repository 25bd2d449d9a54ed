"""Capacity planner: does an experiment's update step fit on N devices of G GiB, and how long
does a game step take on a cluster?

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

Step time (``--time``; nothing compiled, see ``advgame_jax.training.steptime``):

    python launch/plan.py --config=configs/llama_ipo_md.py --time --cluster=16xH200
        [--from_metrics=RUN/metrics.jsonl] [--trainer_devices=8 --engine_devices=2
        --judge_replicas=2 --judge_tp=2] [--num_steps=1000]
    python launch/plan.py --config=... --time --peak_tflops=989 --hbm_gbps=4800 \
        --disk_gbps=2 --net_gbps=450 --devices=16
    python launch/plan.py --config=configs/tiny.py --time --cluster=cpu ...  # measured here

prints each stage of one step (generation, judge, update + EMA, weight sync, checkpoint), the
step, the ``num_steps`` wall time and device-hours.

Every flag, the config's mesh, the model files and the ``--json`` path are checked before JAX
starts (``advgame_jax.plan_inputs``); a bad one is one ``error:`` line, exit 2.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from advgame_jax.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=False
)
flags.DEFINE_integer("devices", 8, "number of devices of the trainer mesh")
flags.DEFINE_float("device_memory_gib", 131.0, "memory of one device in GiB (H200: 131)")
flags.DEFINE_integer("seq_len", 4096, "longest length bucket (prompt + completion tokens)")
flags.DEFINE_float("reserve_gib", 8.0, "memory kept free per device for sampler and runtime")
flags.DEFINE_string("attacker_model", "", "directory or config.json of the attacker's shape")
flags.DEFINE_string("defender_model", "", "directory or config.json of the defender's shape")
flags.DEFINE_string("json", "", "also write the plan as JSON to this path")
flags.DEFINE_bool("time", False, "predict the step time instead of the memory plan")
flags.DEFINE_string("cluster", "", "--time: 8xH200 | 16xH200 | tpu-v5p-32 | cpu (measured now)")
flags.DEFINE_float("peak_tflops", 0.0, "--time: dense TFLOP/s per device (instead of --cluster)")
flags.DEFINE_float("hbm_gbps", 0.0, "--time: device memory GB/s per device")
flags.DEFINE_float("disk_gbps", 2.0, "--time: checkpoint write GB/s of the job")
flags.DEFINE_float("net_gbps", 0.0, "--time: interconnect GB/s per device (0: hbm/10)")
flags.DEFINE_float("mfu", 0.0, "--time: achieved fraction of peak FLOP/s (0: the preset's)")
flags.DEFINE_float("bw_eff", 0.0, "--time: achieved fraction of memory bandwidth (0: preset)")
flags.DEFINE_string("from_metrics", "", "--time: lengths from a run's metrics.jsonl")
flags.DEFINE_float("attack_tokens", 0.0, "--time: mean attack length (longest = tail × mean)")
flags.DEFINE_float("response_tokens", 0.0, "--time: mean response length (longest = tail × mean)")
flags.DEFINE_float("length_tail", 2.0, "--time: longest row of a call / mean length (metrics)")
flags.DEFINE_integer("attacker_prompt_tokens", 512, "--time: attacker prompt tokens")
flags.DEFINE_integer("num_steps", 0, "--time: steps of the run (0: config.train.num_steps)")
flags.DEFINE_integer("trainer_devices", 0, "--time: devices of the update mesh (0: derived)")
flags.DEFINE_integer(
    "engine_devices",
    -1,
    "--time: generation devices per player (0: the "
    "trainer's, in-process; -1: derived from the config's placement)",
)
flags.DEFINE_integer("gen_tp", 1, "--time: tensor-parallel size of one generation replica")
flags.DEFINE_string("judge_model", "", "--time: directory or config.json of the judge's shape")
flags.DEFINE_integer("judge_replicas", -1, "--time: judge replicas (-1: derived)")
flags.DEFINE_bool("judge_external", False, "--time: the judge runs on devices outside --devices")
flags.DEFINE_integer("judge_tp", 0, "--time: devices per judge replica (0: from its size)")
flags.DEFINE_integer("judge_prompt_tokens", 1536, "--time: tokens of one judge request")
flags.DEFINE_integer("judge_new_tokens", 512, "--time: tokens of one judge answer")
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


def _model_paths(config, judge_path: str = "") -> dict:
    """Role -> the ``config.json`` of its shape (``--<role>_model``, ``<role>.hf_path``, or the
    family's file; see ``plan_inputs.model_path_for``), checked before JAX starts."""
    from advgame_jax.plan_inputs import model_path_for

    paths = {
        role: model_path_for(
            role,
            hf_path=str(config[role].hf_path),
            config_name=str(config.name),
            override=getattr(FLAGS, f"{role}_model"),
        )
        for role in ("attacker", "defender")
    }
    if judge_path:
        paths["judge"] = model_path_for("judge", override=judge_path)
    return paths


def _checked_inputs() -> dict:
    """Every input of the plan, checked without JAX (see plan_inputs)."""
    from advgame_jax.experiment.validate import convert_section
    from advgame_jax.plan_inputs import check_flags, resolve_mesh_shape
    from advgame_jax.settings import MeshSettings

    args = check_flags(
        devices=FLAGS.devices,
        device_memory_gib=FLAGS.device_memory_gib,
        seq_len=FLAGS.seq_len,
        reserve_gib=FLAGS.reserve_gib,
        json_path=FLAGS.json,
    )
    config = _config()
    resolve_mesh_shape(convert_section(MeshSettings, config.mesh, "mesh"), args["devices"])
    args["models"] = _model_paths(config)
    return args


def _settings(config):
    """The config's typed settings (the one conversion; a tool run needs no workdir)."""
    from advgame_jax.experiment.validate import settings_from_config

    return settings_from_config(config, complete=False)


def _start_jax(devices: int) -> None:
    """Ask for ``devices`` virtual CPU devices; must run before JAX initialises a backend."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _hardware(devices: int):
    """--cluster preset, --cluster=cpu (measured now), or the --peak_tflops/--hbm_gbps form."""
    from advgame_jax.plan_inputs import PlanInputError
    from advgame_jax.training import steptime

    given = FLAGS.peak_tflops or FLAGS.hbm_gbps
    if FLAGS.cluster and given:
        raise PlanInputError("--cluster and --peak_tflops/--hbm_gbps: give one of them")
    if FLAGS.cluster == "cpu":
        from advgame_jax.training.calibration import measure_cpu

        return measure_cpu(), devices
    if FLAGS.cluster:
        if FLAGS.cluster not in steptime.CLUSTERS:
            raise PlanInputError(
                f"--cluster={FLAGS.cluster}: expected one of "
                f"{', '.join(sorted(steptime.CLUSTERS))}, cpu"
            )
        hw, n = steptime.cluster(FLAGS.cluster)
    elif given:
        if not (FLAGS.peak_tflops > 0 and FLAGS.hbm_gbps > 0):
            raise PlanInputError("--peak_tflops and --hbm_gbps: give both, each > 0")
        hw = steptime.Hardware(
            name=f"{FLAGS.peak_tflops:g} TFLOP/s, {FLAGS.hbm_gbps:g} GB/s",
            peak_flops=FLAGS.peak_tflops * 1e12,
            hbm_bw=FLAGS.hbm_gbps * 1e9,
            disk_bw=FLAGS.disk_gbps * 1e9,
            net_bw=(FLAGS.net_gbps or FLAGS.hbm_gbps / 10) * 1e9,
        )
        n = devices
    else:
        raise PlanInputError("--time needs --cluster=NAME or --peak_tflops and --hbm_gbps")
    import dataclasses
    import math

    for name in ("mfu", "bw_eff", "disk_gbps", "net_gbps"):
        v = getattr(FLAGS, name)
        if not math.isfinite(v) or v < 0 or (name in ("mfu", "bw_eff") and v > 1):
            raise PlanInputError(
                f"--{name}={v}: expected a finite number ≥ 0"
                + (" and ≤ 1" if name in ("mfu", "bw_eff") else "")
            )
    over = {k: getattr(FLAGS, k) for k in ("mfu", "bw_eff") if getattr(FLAGS, k)}
    if FLAGS["disk_gbps"].present:
        over["disk_bw"] = FLAGS.disk_gbps * 1e9
    if FLAGS["net_gbps"].present:
        over["net_bw"] = FLAGS.net_gbps * 1e9
    return dataclasses.replace(hw, **over), n


def _time_body() -> int:
    import math

    from advgame_jax.plan_inputs import PlanInputError, check_devices, check_json_path

    json_path = check_json_path(FLAGS.json)
    config = _config()
    judge_path = FLAGS.judge_model
    if not judge_path and config.judge.backend == "endpoint":
        judge_path = {"llama": "llama3.3_70b", "qwen": "qwen2.5_32b"}.get(
            str(config.name).split("_")[0], ""
        )
        if not judge_path:
            raise PlanInputError("the judge is an endpoint: pass --judge_model=DIR (its shape)")
        judge_path = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "configs",
            "models",
            judge_path,
        )
    for name in ("length_tail",):
        if not FLAGS.length_tail >= 1:
            raise PlanInputError(f"--{name}={FLAGS.length_tail}: expected ≥ 1")
    for name in ("attacker_prompt_tokens", "judge_prompt_tokens", "judge_new_tokens"):
        if getattr(FLAGS, name) < 1:
            raise PlanInputError(f"--{name}={getattr(FLAGS, name)}: expected ≥ 1")
    if FLAGS.num_steps < 0:
        raise PlanInputError(f"--num_steps={FLAGS.num_steps}: expected ≥ 0")
    paths = _model_paths(config, judge_path)
    hw, devices = _hardware(check_devices(FLAGS.devices))
    settings = _settings(config)
    from advgame_jax.models import ModelConfig
    from advgame_jax.training import timeplan

    shapes = {r: ModelConfig.from_hf_file(paths[r]) for r in ("attacker", "defender")}
    judge_shape = ModelConfig.from_hf_file(paths["judge"]) if judge_path else None
    tp = FLAGS.judge_tp
    if not tp and judge_shape is not None:  # bf16 weights within 60% of one device's memory
        from advgame_jax.training.steptime import Shape

        tp = 1
        while 2 * Shape.of(judge_shape).params > 0.6 * 141e9 * tp:
            tp *= 2
    layout = timeplan.default_layout(
        settings,
        devices,
        timeplan.LayoutRequest(
            trainer=FLAGS.trainer_devices,
            engines=FLAGS.engine_devices,
            judge_replicas=FLAGS.judge_replicas if judge_shape is not None else 0,
            judge_tp=tp or 1,
            gen_tp=FLAGS.gen_tp,
            judge_external=FLAGS.judge_external,
        ),
    )
    if FLAGS.attack_tokens or FLAGS.response_tokens:
        if FLAGS.from_metrics or not (FLAGS.attack_tokens >= 1 and FLAGS.response_tokens >= 1):
            raise PlanInputError(
                "--attack_tokens and --response_tokens: give both (each ≥ 1), "
                "without --from_metrics"
            )
        cap = int(settings.sampling.max_new_tokens)
        lengths = timeplan.Lengths(
            attacker_prompt=FLAGS.attacker_prompt_tokens,
            attacker_new_mean=FLAGS.attack_tokens,
            attacker_steps=min(cap, math.ceil(FLAGS.length_tail * FLAGS.attack_tokens)),
            defender_new_mean=FLAGS.response_tokens,
            defender_steps=min(cap, math.ceil(FLAGS.length_tail * FLAGS.response_tokens)),
        )
        source = f"given means, longest = {FLAGS.length_tail:g} × mean"
    elif FLAGS.from_metrics:
        lengths = timeplan.lengths_from_metrics(
            FLAGS.from_metrics,
            settings,
            tail=FLAGS.length_tail,
            attacker_prompt=FLAGS.attacker_prompt_tokens,
        )
        source = f"means of {FLAGS.from_metrics}, longest = {FLAGS.length_tail:g} × mean"
    else:
        lengths = timeplan.lengths_from_config(
            settings, attacker_prompt=FLAGS.attacker_prompt_tokens
        )
        source = "every row at sampling.max_new_tokens: the worst case"
    inputs = timeplan.StepInputs(
        shapes=shapes,
        layout=layout,
        lengths=lengths,
        judge=timeplan.JudgeLoad(
            shape=judge_shape,
            prompt_tokens=FLAGS.judge_prompt_tokens,
            new_tokens=FLAGS.judge_new_tokens,
        ),
    )
    plan = timeplan.time_plan(
        settings, hw, devices, inputs, lengths_from=source, num_steps=FLAGS.num_steps
    )
    print(timeplan.format_time_plan(plan))
    if json_path:
        _write_json(json_path, plan)
    return 0


def _body() -> int:
    if FLAGS.time:
        return _time_body()
    args = _checked_inputs()
    _start_jax(args["devices"])
    from advgame_jax.training.planning import format_plan, plan_experiment

    plan = plan_experiment(
        _settings(_config()),
        devices=args["devices"],
        device_memory_gib=args["device_memory_gib"],
        seq_len=args["seq_len"],
        reserve_gib=args["reserve_gib"],
        models=args["models"],
    )
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
            fail(
                f"{', '.join(overrides)}: names a field the config does not have ({one_line(err)})"
            )
        fail(one_line(err))


def main(argv):
    if len(argv) > 1:
        from advgame_jax.errors import fail

        fail(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
    return run_cli(_body)


def run():
    """``advgame-plan`` (pyproject.toml): the same as ``python launch/plan.py``."""
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
