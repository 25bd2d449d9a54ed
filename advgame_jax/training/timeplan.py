"""One game step's workload from an experiment's settings: the ``steptime.StepWorkload`` that
``launch/plan.py --time`` predicts, built from the typed ``Settings``, both players' shapes, a
device layout and token lengths (the settings' budgets, or a run's ``metrics.jsonl``).

What a step does (GAME_SPEC §2, both seed splits): the attacker samples A attacks for each of
B seeds (B·A rows), the judge checks faithfulness, the defender samples D responses per attack
(B·A·D rows), the judge scores them, then each trainable player takes one optimizer update per
split (attacker: B pairs, defender: B·A pairs; GRPO: B·A and B·A·D samples), and the EMA runs
once. Lengths: ``decode_steps`` is the longest row of a call (the sampler runs until every row
has stopped); without metrics it is ``sampling.max_new_tokens`` (the worst case).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

from advgame_jax.plan_inputs import PlanInputError
from advgame_jax.settings import ROLES, Settings
from advgame_jax.training.state import StateSettings
from advgame_jax.training.steptime import (
    GenCall,
    Judge,
    Sampler,
    Shape,
    StepWorkload,
    Trainer,
    UpdateCall,
)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Token counts of one step: prompts, mean generated lengths and the longest row."""

    attacker_prompt: int = 512
    attacker_new_mean: float = 2048
    attacker_steps: int = 2048
    defender_prompt_extra: int = 128  # the defender's template around the attack
    defender_new_mean: float = 2048
    defender_steps: int = 2048


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which devices do what. ``trainer``: devices of the update mesh; ``engines``: devices
    per player's generation (0: the trainer's, the in-process JAX sampler); ``gen_tp``:
    tensor-parallel size of one generation replica; the judge: ``judge_replicas`` × ``judge_tp``
    devices (0 replicas: not counted, e.g. a rule judge or a judge outside the job)."""

    trainer: int
    engines: int = 0
    gen_tp: int = 1
    judge_replicas: int = 0
    judge_tp: int = 1
    judge_batch: int = 32
    judge_external: bool = False  # the judge's devices are not the job's (not counted)

    @property
    def total(self) -> int:
        judge = 0 if self.judge_external else self.judge_replicas * self.judge_tp
        return self.trainer + 2 * self.engines + judge


@dataclasses.dataclass(frozen=True)
class LayoutRequest:
    """What the command line fixes of a :class:`Layout` (:func:`default_layout` derives the
    rest): ``trainer`` 0, ``engines`` -1 and ``judge_replicas`` -1 mean "derived"."""

    trainer: int = 0
    engines: int = -1
    judge_replicas: int = -1
    judge_tp: int = 1
    gen_tp: int = 1
    judge_batch: int = 32
    judge_external: bool = False


@dataclasses.dataclass(frozen=True)
class JudgeLoad:
    """The judge's model shape (a ``ModelConfig``; None: its compute is not counted) and the
    tokens of one request and of one answer."""

    shape: Any = None
    prompt_tokens: int = 1024
    new_tokens: int = 512


@dataclasses.dataclass(frozen=True)
class UpdateScale:
    """How the update is spread, when it differs from "every trainer device": ``fsdp``
    (devices the state is sharded over) and ``batch_devices`` (batch-parallel devices, which
    set the seeds per split); 0 = ``layout.trainer``. ``flops_per_token``: role -> measured
    update FLOPs per token (absent: the analytic count)."""

    fsdp: int = 0
    batch_devices: int = 0
    flops_per_token: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything one step's workload needs besides the settings: both players' shapes
    (role -> ``ModelConfig``), the device layout, the token lengths, the judge's load and
    the update's spread."""

    shapes: Mapping[str, Any]
    layout: Layout
    lengths: Lengths
    judge: JudgeLoad = JudgeLoad()
    scale: UpdateScale = dataclasses.field(default_factory=UpdateScale)


def length_bucket(n: int, buckets=()) -> int:
    """The update's padded length: the smallest configured bucket ≥ n, else the default
    ladder 16, 24, 32, 48, 64, 96, … (2^k and 3·2^(k-1)), as ``training.batching``."""
    if buckets:
        fit = [b for b in sorted(buckets) if b >= n]
        return fit[0] if fit else int(n)
    b = 16
    while True:
        for c in (b, 3 * b // 2):
            if c >= n:
                return c
        b *= 2


def pow2(n: int, minimum: int = 1) -> int:
    return max(1 << max(int(n) - 1, 0).bit_length(), minimum)


def lengths_from_metrics(
    path: str, settings: Settings, *, tail: float = 2.0, attacker_prompt: int = 512
) -> Lengths:
    """Mean generated lengths over a run's ``metrics.jsonl`` (both splits); the longest row
    of a call is taken as ``tail`` × the mean, capped by ``sampling.max_new_tokens``."""
    if not os.path.isfile(path):
        raise PlanInputError(f"--from_metrics={path}: no such file")
    keys = {
        "a": ("harmful/x/attacker_tokens/mean", "benign/x/attacker_tokens/mean"),
        "d": ("harmful/y/tokens/mean", "benign/y/tokens/mean"),
    }
    vals = {"a": [], "d": []}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a torn last line of a running job
            if not isinstance(rec, dict):
                raise PlanInputError(f"{path}:{i}: expected a JSON object per line")
            for k, names in keys.items():
                vals[k].extend(float(rec[n]) for n in names if isinstance(rec.get(n), (int, float)))
    if not vals["a"] or not vals["d"]:
        raise PlanInputError(
            f"{path}: no x/attacker_tokens/mean or y/tokens/mean records; "
            f"expected a training run's metrics.jsonl"
        )
    cap = int(settings.sampling.max_new_tokens)
    a, d = (sum(v) / len(v) for v in (vals["a"], vals["d"]))
    return Lengths(
        attacker_prompt=attacker_prompt,
        attacker_new_mean=a,
        attacker_steps=min(cap, math.ceil(tail * a)),
        defender_new_mean=d,
        defender_steps=min(cap, math.ceil(tail * d)),
    )


def lengths_from_config(settings: Settings, *, attacker_prompt: int = 512) -> Lengths:
    """Every row at ``sampling.max_new_tokens``: the worst case."""
    n = int(settings.sampling.max_new_tokens)
    return Lengths(
        attacker_prompt=attacker_prompt,
        attacker_new_mean=n,
        attacker_steps=n,
        defender_new_mean=n,
        defender_steps=n,
    )


def _dtype_bytes(name: str) -> int:
    return 2 if name in ("bfloat16", "float16") else 4


def judge_requests(settings: Settings, b: int) -> tuple[int, int]:
    """(faithfulness, scoring) judge requests of one split with ``b`` seeds."""
    g, j = settings.game, settings.judge
    a, d = int(g.num_attacks), int(g.num_responses)
    faith = b * a * int(j.num_faith_samples) if g.faithfulness else 0
    swap = 2 if j.swap_positions else 1
    if j.mode == "pairwise":
        score = (b * a * math.comb(d, 2) * swap if j.defender_judge else 0) + (
            b * math.comb(a, 2) * swap if j.attacker_judge else 0
        )
    else:
        score = (b * a * d if j.defender_judge else 0) + (b * a if j.attacker_judge else 0)
    return faith, score * int(j.num_samples)


def _samplers(settings: Settings, shapes: dict, layout: Layout) -> dict:
    """Role -> its generation: the in-process JAX sampler on every trainer device, or
    ``engines // gen_tp`` engine replicas (bf16)."""
    in_process = layout.engines == 0
    replicas = layout.trainer if in_process else max(layout.engines // layout.gen_tp, 1)
    return {
        r: Sampler(
            shapes[r],
            _dtype_bytes(settings.player(r).sampler_dtype if in_process else "bfloat16"),
            replicas=replicas,
            tp=1 if in_process else layout.gen_tp,
        )
        for r in ROLES
    }


def _gen_calls(
    settings: Settings, in_process: bool, rows: int, prompt: int, steps: int, mean: float
) -> list:
    """One generation call per split. JAX sampler: padded buckets, the whole cache read each
    step; engines: the live context."""
    if in_process:
        sp = settings.sampling
        top_filter = sp.top_p < 1.0 or sp.top_k > 0
        n_bucket = pow2(int(sp.max_new_tokens), 16)
        p_bucket = pow2(prompt, 16)
        c = GenCall(
            rows=rows,
            prompt_len=p_bucket,
            steps=steps,
            cache_len=p_bucket + n_bucket,
            filter_passes=2 + 2 * 48 if top_filter else 1,
        )
    else:
        c = GenCall(
            rows=rows,
            prompt_len=prompt,
            steps=steps,
            cache_len=int(prompt + mean / 2),
            filter_passes=1,
        )
    return [c] * 2


def _defender_prompt(settings: Settings, ln: Lengths) -> int:
    """The defender's prompt: the attack in its template, cut at the engine's prompt budget
    (longer prompts are refused by the sampler (MAX_LENGTH), never generated)."""
    d_prompt = int(ln.attacker_new_mean + ln.defender_prompt_extra)
    budget = int(settings.defender.engine.max_prompt_tokens or 0)
    return min(d_prompt, budget) if budget else d_prompt


def _updates(settings: Settings, inputs: StepInputs, shapes: dict, b: int, d_prompt: int):
    """``(trainers, updates)``: role -> ``Trainer`` and role -> one ``UpdateCall`` per split,
    for the trainable players."""
    t, g, ln, layout = settings.train, settings.game, inputs.lengths, inputs.layout
    a, d = int(g.num_attacks), int(g.num_responses)
    grpo = settings.loss.kind == "grpo"
    rows = {"attacker": b * a if grpo else 2 * b, "defender": b * a * d if grpo else 2 * b * a}
    buckets = tuple(t.length_buckets)
    seq = {
        "attacker": length_bucket(int(ln.attacker_prompt + ln.attacker_new_mean), buckets),
        "defender": length_bucket(int(d_prompt + ln.defender_new_mean), buckets),
    }
    trainers, updates = {}, {}
    for r in ROLES:
        if not settings.player(r).trainable:
            continue
        trainers[r] = Trainer(
            shapes[r],
            devices=layout.trainer,
            fsdp=inputs.scale.fsdp or layout.trainer,
            compute_bytes=_dtype_bytes(settings.player(r).compute_dtype),
            remat=t.remat_policy != "none",
            reference_forward=(not grpo or float(settings.loss.kl_coef) > 0),
            flops_per_token=inputs.scale.flops_per_token.get(r, 0.0),
        )
        updates[r] = [UpdateCall(rows=rows[r], length=seq[r])] * 2
    return trainers, updates


def _judge(settings: Settings, inputs: StepInputs, b: int) -> Judge:
    load, layout = inputs.judge, inputs.layout
    faith, score = judge_requests(settings, b)
    return Judge(
        shape=Shape.of(load.shape) if load.shape is not None else None,
        faith=faith,
        pairs=score,
        prompt_tokens=load.prompt_tokens,
        new_tokens=load.new_tokens,
        replicas=max(layout.judge_replicas, 1),
        tp=layout.judge_tp,
        batch=layout.judge_batch,
    )


def build_workload(settings: Settings, inputs: StepInputs) -> StepWorkload:
    """The step of ``settings`` (see module doc) on ``inputs.layout``."""
    t, g, ln, layout = settings.train, settings.game, inputs.lengths, inputs.layout
    # Seeds per split: seeds_per_device on each batch-parallel (data × fsdp) trainer device.
    b = int(t.seeds_per_device) * (inputs.scale.batch_devices or layout.trainer)
    a, d = int(g.num_attacks), int(g.num_responses)
    shapes = {r: Shape.of(inputs.shapes[r]) for r in ROLES}
    in_process = layout.engines == 0
    d_prompt = _defender_prompt(settings, ln)
    trainers, updates = _updates(settings, inputs, shapes, b, d_prompt)
    keep_ema = StateSettings(reference=t.reference, sample_from=t.sample_from).keep_ema
    ema_players = len(trainers) if keep_ema else 0
    sync_bytes = sum(
        shapes[r].params * (2 if not in_process else _dtype_bytes(settings.player(r).sampler_dtype))
        for r in trainers
    )
    state_bytes = sum(shapes[r].params * (16 if ema_players else 12) for r in trainers)
    samplers = _samplers(settings, shapes, layout)
    return StepWorkload(
        attacker=samplers["attacker"],
        defender=samplers["defender"],
        attacker_calls=_gen_calls(
            settings,
            in_process,
            b * a,
            ln.attacker_prompt,
            ln.attacker_steps,
            ln.attacker_new_mean,
        ),
        defender_calls=_gen_calls(
            settings, in_process, b * a * d, d_prompt, ln.defender_steps, ln.defender_new_mean
        ),
        trainers=trainers,
        updates=updates,
        judge=_judge(settings, inputs, b),
        ema_players=ema_players,
        sync_every=int(t.sync_every_n_steps),
        sync_bytes=sync_bytes,
        sync_via_disk=not in_process,
        checkpoint_every=int(t.checkpoint_every),
        checkpoint_bytes=float(state_bytes),
    )


def default_layout(
    settings: Settings, devices: int, request: Optional[LayoutRequest] = None
) -> Layout:
    """A layout of ``devices`` for ``settings``, with what ``request`` fixes: players on
    offloaded engines (the paper's placement) get ``devices/8`` generation devices each and the
    judge ``devices/4``; the trainer takes the rest. In-process samplers (placement 'jax')
    share the trainer's."""
    q = request or LayoutRequest()
    offloaded = any(settings.player(r).placement in ("offloaded", "colocated") for r in ROLES)
    remote_judge = settings.judge.backend == "endpoint"
    engines, judge_replicas = q.engines, q.judge_replicas
    if engines < 0:
        engines = max(devices // 8, 1) if offloaded and devices >= 4 else 0
    if judge_replicas < 0:
        judge_replicas = max(devices // 4 // q.judge_tp, 1) if remote_judge and devices >= 4 else 0
    trainer = q.trainer or devices - 2 * engines - (
        0 if q.judge_external else judge_replicas * q.judge_tp
    )
    layout = Layout(
        trainer=trainer,
        engines=engines,
        gen_tp=q.gen_tp,
        judge_replicas=judge_replicas,
        judge_tp=q.judge_tp,
        judge_batch=q.judge_batch,
        judge_external=q.judge_external,
    )
    if trainer < 1 or layout.total > devices:
        raise PlanInputError(
            f"layout: trainer {trainer} + 2 × {engines} engine + {judge_replicas} × "
            f"{q.judge_tp} judge devices do not fit in {devices} devices; set "
            f"--trainer_devices, --engine_devices, --judge_replicas"
        )
    return layout


def format_time_plan(p: dict) -> str:
    """The step-time plan as text: one line per stage, the step, the run."""
    lay, hw, run = p["layout"], p["hardware"], p["run"]
    lines = [
        f"step time {p['config']} on {hw['name']}: {p['devices']} devices (trainer "
        f"{lay['trainer']}, generation {lay['engines'] or 'in-process'} per player, judge "
        f"{lay['judge_replicas']} × {lay['judge_tp']}"
        f"{' outside the job' if lay['judge_external'] else ''}); peaks {hw['peak_flops'] / 1e12:.3g} "
        f"TFLOP/s × {hw['mfu']:.2f}, {hw['hbm_bw'] / 1e9:.4g} GB/s × {hw['bw_eff']:.2f} per "
        f"device",
        f"  lengths: attacker prompt {p['lengths']['attacker_prompt']}, attack mean "
        f"{p['lengths']['attacker_new_mean']:.0f} (longest {p['lengths']['attacker_steps']}), "
        f"response mean {p['lengths']['defender_new_mean']:.0f} (longest "
        f"{p['lengths']['defender_steps']}) tokens ({p['lengths_from']})",
    ]
    for k, v in p["stages"].items():
        lines.append(f"  {k:<20} {v:9.2f} s")
    lines.append(f"  {'step':<20} {p['step_s']:9.2f} s  (slowest: {p['slowest']})")
    lines.append(
        f"{run['num_steps']} steps: {run['wall_h']:.1f} h wall, "
        f"{run['device_hours']:.0f} device-hours on {p['devices']} devices"
    )
    return "\n".join(lines)


def time_plan(
    settings: Settings,
    hw,
    devices: int,
    inputs: StepInputs,
    *,
    lengths_from: str,
    num_steps: int = 0,
) -> dict:
    """Predict one step of ``settings`` (``steptime.predict_step``) and the whole run
    (``num_steps``, 0: ``train.num_steps``)."""
    from advgame_jax.training.steptime import predict_step, run_totals, slowest_stage

    pred = predict_step(hw, build_workload(settings, inputs))
    steps = num_steps or int(settings.train.num_steps)
    return dict(
        config=str(settings.name),
        devices=devices,
        hardware=dataclasses.asdict(hw),
        layout=dataclasses.asdict(inputs.layout),
        lengths=dataclasses.asdict(inputs.lengths),
        lengths_from=lengths_from,
        stages=pred["stages"],
        step_s=pred["step_s"],
        ema_s=pred["ema_s"],
        slowest=slowest_stage(pred["stages"]),
        run=run_totals(pred["step_s"], steps, devices),
    )
