"""One game step's workload from an experiment config: the ``steptime.StepWorkload`` that
``launch/plan.py --time`` predicts, built from the config, both players' shapes, a device
layout and token lengths (the config's budgets, or a run's ``metrics.jsonl``).

What a step does (GAME_SPEC §2, both seed splits): the attacker samples A attacks for each of
B seeds (B·A rows), the judge checks faithfulness, the defender samples D responses per attack
(B·A·D rows), the judge scores them, then each trainable player takes one optimizer update per
split (attacker: B pairs, defender: B·A pairs; GRPO: B·A and B·A·D samples), and the EMA runs
once. Lengths: ``decode_steps`` is the longest row of a call (the sampler runs until every row
has stopped); without metrics it is the config's ``max_new_tokens`` (the worst case).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from advgame_jax.plan_inputs import PlanInputError
from advgame_jax.sampling.placement import placement_of
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
    path: str, config, *, tail: float = 2.0, attacker_prompt: int = 512
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
    cap = int(config.sampling.max_new_tokens)
    a, d = (sum(v) / len(v) for v in (vals["a"], vals["d"]))
    return Lengths(
        attacker_prompt=attacker_prompt,
        attacker_new_mean=a,
        attacker_steps=min(cap, math.ceil(tail * a)),
        defender_new_mean=d,
        defender_steps=min(cap, math.ceil(tail * d)),
    )


def lengths_from_config(config, *, attacker_prompt: int = 512) -> Lengths:
    n = int(config.sampling.max_new_tokens)
    return Lengths(
        attacker_prompt=attacker_prompt,
        attacker_new_mean=n,
        attacker_steps=n,
        defender_new_mean=n,
        defender_steps=n,
    )


def _dtype_bytes(name: str) -> int:
    return 2 if name in ("bfloat16", "float16") else 4


def judge_requests(config, b: int) -> tuple[int, int]:
    """(faithfulness, scoring) judge requests of one split with ``b`` seeds."""
    a, d, j = int(config.game.num_attacks), int(config.game.num_responses), config.judge
    faith = b * a * int(j.num_faith_samples) if config.game.faithfulness else 0
    swap = 2 if j.swap_positions else 1
    if j.mode == "pairwise":
        score = (b * a * math.comb(d, 2) * swap if j.defender_judge else 0) + (
            b * math.comb(a, 2) * swap if j.attacker_judge else 0
        )
    else:
        score = (b * a * d if j.defender_judge else 0) + (b * a if j.attacker_judge else 0)
    return faith, score * int(j.num_samples)


def build_workload(
    config,
    shapes: dict,
    layout: Layout,
    lengths: Lengths,
    *,
    judge_shape=None,
    judge_prompt: int = 1024,
    judge_new: int = 512,
    flops_per_token: dict | None = None,
    fsdp: int | None = None,
    batch_devices: int | None = None,
) -> StepWorkload:
    """The step of ``config`` (see module doc) on ``layout``; ``shapes``: role → ModelConfig."""
    t, g = config.train, config.game
    # Seeds per split: seeds_per_device on each batch-parallel (data × fsdp) trainer device.
    b = int(t.seeds_per_device) * (batch_devices or layout.trainer)
    a, d = int(g.num_attacks), int(g.num_responses)
    ln = lengths
    top_filter = config.sampling.top_p < 1.0 or config.sampling.top_k > 0
    s = {r: Shape.of(shapes[r]) for r in ("attacker", "defender")}
    in_process = layout.engines == 0
    replicas = layout.trainer if in_process else max(layout.engines // layout.gen_tp, 1)

    def sampler(role):
        p = config[role]
        return Sampler(
            s[role],
            _dtype_bytes(p.sampler_dtype if in_process else "bfloat16"),
            replicas=replicas,
            tp=1 if in_process else layout.gen_tp,
        )

    def calls(rows, prompt, steps, mean):
        # JAX sampler: padded buckets, the whole cache read each step; engines: live context.
        if in_process:
            n_bucket = pow2(int(config.sampling.max_new_tokens), 16)
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
        return [c] * 2  # one call per split

    d_prompt = int(ln.attacker_new_mean + ln.defender_prompt_extra)
    budget = int(config.defender.get("engine", {}).get("max_prompt_tokens", 0) or 0)
    if budget:  # longer prompts are refused by the sampler (MAX_LENGTH), never generated
        d_prompt = min(d_prompt, budget)
    att_calls = calls(b * a, ln.attacker_prompt, ln.attacker_steps, ln.attacker_new_mean)
    def_calls = calls(b * a * d, d_prompt, ln.defender_steps, ln.defender_new_mean)
    grpo = config.loss.kind == "grpo"
    rows = {"attacker": b * a if grpo else 2 * b, "defender": b * a * d if grpo else 2 * b * a}
    seq = {
        "attacker": length_bucket(
            int(ln.attacker_prompt + ln.attacker_new_mean), tuple(t.length_buckets)
        ),
        "defender": length_bucket(int(d_prompt + ln.defender_new_mean), tuple(t.length_buckets)),
    }
    fsdp = fsdp or layout.trainer
    trainers, updates = {}, {}
    for r in ("attacker", "defender"):
        if not config[r].trainable:
            continue
        trainers[r] = Trainer(
            s[r],
            devices=layout.trainer,
            fsdp=fsdp,
            compute_bytes=_dtype_bytes(config[r].compute_dtype),
            remat=bool(t.get("remat", True)) and t.get("remat_policy", "full") != "none",
            reference_forward=(not grpo or float(config.loss.get("kl_coef", 0.0)) > 0),
            flops_per_token=(flops_per_token or {}).get(r, 0.0),
        )
        updates[r] = [UpdateCall(rows=rows[r], length=seq[r])] * 2
    keep_ema = StateSettings(reference=t.reference, sample_from=t.sample_from).keep_ema
    ema_players = len(trainers) if keep_ema else 0
    faith, score = judge_requests(config, b)
    judge = Judge(
        shape=Shape.of(judge_shape) if judge_shape is not None else None,
        faith=faith,
        pairs=score,
        prompt_tokens=judge_prompt,
        new_tokens=judge_new,
        replicas=max(layout.judge_replicas, 1),
        tp=layout.judge_tp,
        batch=layout.judge_batch,
    )
    sync_bytes = sum(
        s[r].params * (2 if not in_process else _dtype_bytes(config[r].sampler_dtype))
        for r in trainers
    )
    state_bytes = sum(s[r].params * (16 if ema_players else 12) for r in trainers)
    return StepWorkload(
        attacker=sampler("attacker"),
        defender=sampler("defender"),
        attacker_calls=att_calls,
        defender_calls=def_calls,
        trainers=trainers,
        updates=updates,
        judge=judge,
        ema_players=ema_players,
        sync_every=int(t.sync_every_n_steps),
        sync_bytes=sync_bytes,
        sync_via_disk=not in_process,
        checkpoint_every=int(t.checkpoint_every),
        checkpoint_bytes=float(state_bytes),
    )


def default_layout(
    config,
    devices: int,
    *,
    trainer: int = 0,
    engines: int = -1,
    judge_replicas: int = -1,
    judge_tp: int = 1,
    gen_tp: int = 1,
    judge_batch: int = 32,
    judge_external: bool = False,
) -> Layout:
    """A layout of ``devices`` for ``config``: players on offloaded engines (the paper's
    placement) get ``devices/8`` generation devices each and the judge ``devices/4``; the
    trainer takes the rest. In-process samplers (placement 'jax') share the trainer's."""
    offloaded = any(
        placement_of(config, r) in ("offloaded", "colocated") for r in ("attacker", "defender")
    )
    remote_judge = config.judge.backend == "endpoint"
    if engines < 0:
        engines = max(devices // 8, 1) if offloaded and devices >= 4 else 0
    if judge_replicas < 0:
        judge_replicas = max(devices // 4 // judge_tp, 1) if remote_judge and devices >= 4 else 0
    trainer = trainer or devices - 2 * engines - (
        0 if judge_external else judge_replicas * judge_tp
    )
    layout = Layout(
        trainer=trainer,
        engines=engines,
        gen_tp=gen_tp,
        judge_replicas=judge_replicas,
        judge_tp=judge_tp,
        judge_batch=judge_batch,
        judge_external=judge_external,
    )
    if trainer < 1 or layout.total > devices:
        raise PlanInputError(
            f"layout: trainer {trainer} + 2 × {engines} engine + {judge_replicas} × {judge_tp} "
            f"judge devices do not fit in {devices} devices; set --trainer_devices, "
            f"--engine_devices, --judge_replicas"
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
    config,
    hw,
    devices: int,
    layout: Layout,
    lengths: Lengths,
    shapes: dict,
    *,
    lengths_from: str,
    num_steps: int = 0,
    judge_shape=None,
    judge_prompt=1536,
    judge_new=512,
) -> dict:
    """Predict one step of ``config`` (``steptime.predict_step``) and the whole run."""
    from advgame_jax.training.steptime import predict_step, run_totals, slowest_stage

    w = build_workload(
        config,
        shapes,
        layout,
        lengths,
        judge_shape=judge_shape,
        judge_prompt=judge_prompt,
        judge_new=judge_new,
    )
    pred = predict_step(hw, w)
    steps = num_steps or int(config.train.num_steps)
    return dict(
        config=str(config.name),
        devices=devices,
        hardware=dataclasses.asdict(hw),
        layout=dataclasses.asdict(layout),
        lengths=dataclasses.asdict(lengths),
        lengths_from=lengths_from,
        stages=pred["stages"],
        step_s=pred["step_s"],
        ema_s=pred["ema_s"],
        slowest=slowest_stage(pred["stages"]),
        run=run_totals(pred["step_s"], steps, devices),
    )
