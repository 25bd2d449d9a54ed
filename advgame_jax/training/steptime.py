"""Step-time model of one game step: pure functions of a hardware description and the
workload's numbers (no JAX, nothing measured here).

Each stage of a trainer step (the loop's ``time/<stage>`` metrics) is predicted from its work:

- ``attacker_generation`` / ``defender_generation``: per sampler call, prefill
  max(FLOPs / compute, weight bytes / bandwidth) + one decode step per generated position up
  to the longest row (the sampler's loop runs until every row has stopped), each
  max(bytes / bandwidth, FLOPs / compute, a per-step floor); bytes = the weights (one
  tensor-parallel shard) + the KV cache read + the top-p filter's passes over the vocabulary.
- ``faithfulness`` / ``judging``: the judge's requests decoded on its replicas in waves of
  ``judge_batch`` rows (a rule judge costs nothing).
- ``update``: both players' optimizer steps of both splits, FLOPs = (policy forward + backward
  + recomputation + reference forward) × 2·matmul-params per token (+ attention), compute- or
  bandwidth-bound, with the FSDP gathers on the interconnect; plus the EMA of θ̄ (memory bound).
- ``sync``: sampler weights refreshed (a device copy in-process, a sync checkpoint written and
  read for an engine in another process); ``checkpoint``: the full state written every
  ``checkpoint_every`` steps, amortised per step.

Every stage carries a fixed per-call cost (``call_overhead_s``) and a decode step takes at
least ``decode_step_floor_s`` (the launch/dispatch time of its ops): on a GPU/TPU cluster both
are small; on a CPU running a tiny model the floor dominates and is measured by
``training.calibration``. ``launch/plan.py --time`` assembles
the inputs; ``docs/capacity.md`` records the predictions and the CPU calibration.
"""

from __future__ import annotations

import dataclasses
import math

STAGES = (
    "attacker_generation",
    "faithfulness",
    "defender_generation",
    "judging",
    "update",
    "sync",
    "checkpoint",
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device's peaks and the fraction of them that real programs reach.

    peak_flops: dense matmul FLOP/s at the compute dtype; hbm_bw: device memory bytes/s;
    net_bw: interconnect bytes/s per device (collectives); disk_bw: checkpoint write bytes/s
    (the whole job's); mfu / bw_eff: achieved fraction of peak_flops / hbm_bw."""

    name: str
    peak_flops: float
    hbm_bw: float
    disk_bw: float
    net_bw: float
    mfu: float = 0.4
    bw_eff: float = 0.6
    call_overhead_s: float = 0.0
    decode_step_floor_s: float = 0.0
    # Token selection per decode step and row, where it is measured rather than counted as
    # ``GenCall.filter_passes`` of bytes (a CPU: log-softmax, filter and Gumbel draw over the
    # vocabulary are compute, not traffic).
    select_s_per_row: float = 0.0

    def __post_init__(self):
        for f in ("peak_flops", "hbm_bw", "disk_bw", "net_bw", "mfu", "bw_eff"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"hardware {self.name}: {f} must be a finite number > 0, got {v}")
        for f in ("call_overhead_s", "decode_step_floor_s", "select_s_per_row"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"hardware {self.name}: {f} must be a finite number ≥ 0, got {v}")
        if self.mfu > 1 or self.bw_eff > 1:
            raise ValueError(f"hardware {self.name}: mfu and bw_eff are fractions ≤ 1")

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu

    @property
    def bw(self) -> float:
        return self.hbm_bw * self.bw_eff


TB, GB = 1e12, 1e9
H200 = dict(
    peak_flops=989 * TB,
    hbm_bw=4.8 * TB,
    net_bw=450 * GB,
    disk_bw=2 * GB,
    mfu=0.4,
    bw_eff=0.6,
    call_overhead_s=2e-3,
    decode_step_floor_s=0.3e-3,
)
V5P = dict(
    peak_flops=459 * TB,
    hbm_bw=2.76 * TB,
    net_bw=300 * GB,
    disk_bw=2 * GB,
    mfu=0.45,
    bw_eff=0.6,
    call_overhead_s=2e-3,
    decode_step_floor_s=0.3e-3,
)
# name -> (device kind, total devices). Peaks: bf16 dense (H200 SXM: 989 TFLOP/s, 4.8 TB/s
# HBM3e, NVLink 900 GB/s both directions; v5p: 459 TFLOP/s, 2.76 TB/s, ICI ~300 GB/s per
# chip usable). mfu / bw_eff are typical achieved fractions, not measurements.
CLUSTERS = {"8xH200": (H200, 8), "16xH200": (H200, 16), "tpu-v5p-32": (V5P, 16)}


def cluster(name: str) -> tuple[Hardware, int]:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; one of {sorted(CLUSTERS)}")
    spec, n = CLUSTERS[name]
    return Hardware(name=name, **spec), n


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the model's cost depends on (from a ``ModelConfig``)."""

    params: int  # every parameter
    matmul_params: int  # parameters used as matmul weights per token (incl. the LM head)
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, mc) -> "Shape":
        d, f, L = mc.hidden_size, mc.intermediate_size, mc.num_layers
        q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
        emb = mc.vocab_size * d
        head = 0 if mc.tie_word_embeddings else emb
        params = L * (per_layer + 2 * d) + emb + head + d
        return cls(
            params=params,
            matmul_params=L * per_layer + emb,
            layers=L,
            hidden=d,
            ffn=f,
            heads=mc.num_heads,
            kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            vocab=mc.vocab_size,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def activation_bytes_per_token(self, context: float, dtype_bytes: int) -> float:
        """Bytes one forward pass of one token reads and writes between ops: per layer the
        norms and residuals (≈12·d), q/k/v and rope (3·(q+2kv)), the gated MLP (5·f) and the
        attention probabilities (3 · heads · context); then the logits (4 · vocab)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 12 * self.hidden + 3 * (q + 2 * kv) + 5 * self.ffn + 3 * self.heads * context
        return dtype_bytes * (self.layers * per_layer + 4 * self.vocab)

    def attn_flops_per_token(self, context: float) -> float:
        """Scores and values of one token attending to ``context`` positions (forward)."""
        return 4.0 * self.layers * self.heads * self.head_dim * context


@dataclasses.dataclass(frozen=True)
class GenCall:
    """One sampler call: ``rows`` padded rows, prompts padded to ``prompt_len``, the loop runs
    ``steps`` decode positions; the cache holds ``cache_len`` positions (each step reads the
    whole of it: the JAX sampler) or ``cache_len`` = the mean live context (paged engines)."""

    rows: int
    prompt_len: int
    steps: int
    cache_len: int
    filter_passes: int = 0  # full passes over [rows, vocab] per step by top-p / top-k


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Where a player's generation runs: ``replicas`` copies, each over ``tp`` devices."""

    shape: Shape
    dtype_bytes: int = 2
    replicas: int = 1
    tp: int = 1


def _roof(hw: Hardware, flops: float, nbytes: float) -> float:
    return max(flops / hw.flops, nbytes / hw.bw)


def generation_time(hw: Hardware, s: Sampler, calls: list[GenCall]) -> dict:
    """Seconds of ``calls`` run one after the other, rows split over the replicas."""
    total = flops_sum = bytes_sum = 0.0
    for c in calls:
        rows = math.ceil(c.rows / s.replicas)
        w = s.shape.params * s.dtype_bytes / s.tp
        pre_flops = (
            2.0 * s.shape.matmul_params * rows * c.prompt_len
            + s.shape.attn_flops_per_token(c.prompt_len / 2) * rows * c.prompt_len
        ) / s.tp
        pre_bytes = w + rows * c.prompt_len * s.shape.kv_bytes_per_token(s.dtype_bytes) / s.tp
        step_flops = (
            2.0 * s.shape.matmul_params * rows + s.shape.attn_flops_per_token(c.cache_len) * rows
        ) / s.tp
        step_bytes = (
            w
            + rows * c.cache_len * s.shape.kv_bytes_per_token(s.dtype_bytes) / s.tp
            + rows * s.shape.vocab * 4 * c.filter_passes
        )
        total += (
            hw.call_overhead_s
            + _roof(hw, pre_flops, pre_bytes)
            + c.steps
            * (
                max(_roof(hw, step_flops, step_bytes), hw.decode_step_floor_s)
                + rows * hw.select_s_per_row
            )
        )
        flops_sum += pre_flops + c.steps * step_flops
        bytes_sum += pre_bytes + c.steps * step_bytes
    return dict(seconds=total, flops=flops_sum, bytes=bytes_sum, calls=len(calls))


@dataclasses.dataclass(frozen=True)
class UpdateCall:
    """One optimizer update of a player: ``rows`` sequences (a pair is 2) of ``length``, in
    ``microbatches`` equal parts of which ``active`` hold a valid row (an empty microbatch
    skips its forward and backward: ``training.update``'s skip; ``active`` None: all)."""

    rows: int
    length: int
    microbatches: int = 1
    active: int | None = None

    @property
    def computed_rows(self) -> float:
        m = max(self.microbatches, 1)
        active = m if self.active is None else min(max(self.active, 0), m)
        return self.rows * active / m


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The trainer's mesh and the update's settings that change its cost."""

    shape: Shape
    devices: int
    fsdp: int
    compute_bytes: int = 2
    remat: bool = True
    reference_forward: bool = True
    # Measured FLOPs of one update (e.g. a compiled program's cost analysis) per sequence
    # token; 0: the analytic count below.
    flops_per_token: float = 0.0

    def update_flops_per_token(self, length: int) -> float:
        if self.flops_per_token:
            return self.flops_per_token
        fwd = 2.0 * self.shape.matmul_params + self.shape.attn_flops_per_token(length / 2)
        passes = 3 + (1 if self.remat else 0) + (1 if self.reference_forward else 0)
        return passes * fwd


def update_time(hw: Hardware, t: Trainer, calls: list[UpdateCall]) -> dict:
    """Seconds of the optimizer updates ``calls`` on the trainer's mesh: the microbatches'
    passes (compute, memory and the FSDP gathers/reductions on the interconnect overlap: the
    largest counts), then the AdamW pass over the state shard (after the last gradient)."""
    n = t.shape.params
    passes = 2 + (1 if t.remat else 0) + (1 if t.reference_forward else 0)  # weight reads
    total = flops_sum = net_sum = 0.0
    for c in calls:
        tokens = c.computed_rows * c.length / t.devices
        flops = tokens * t.update_flops_per_token(c.length)
        # Weights read per pass (gathered, compute dtype) + AdamW/state traffic of the shard
        # + the activations every pass reads and writes (backward: twice a forward's).
        act_passes = 3 + (1 if t.remat else 0) + (1 if t.reference_forward else 0)
        act = (
            tokens * act_passes * t.shape.activation_bytes_per_token(c.length / 2, t.compute_bytes)
        )
        nbytes = (passes * n * t.compute_bytes if tokens else 0.0) + act
        gathered = (t.fsdp - 1) / t.fsdp
        net = (passes * n * t.compute_bytes + 4 * n) * gathered if t.fsdp > 1 else 0.0
        optimizer = 7 * 4 * n / t.fsdp / hw.bw  # read θ, g, m, v; write θ, m, v (fp32)
        passes_s = max(flops / hw.flops, nbytes / hw.bw, net / hw.net_bw)
        total += hw.call_overhead_s + passes_s + optimizer
        flops_sum += flops
        net_sum += net
    return dict(
        seconds=total, flops_per_device=flops_sum, net_bytes_per_device=net_sum, calls=len(calls)
    )


def ema_time(hw: Hardware, params: int, shards: int, players: int) -> float:
    """θ̄ ← d·θ̄ + (1−d)·θ in fp32: read θ and θ̄, write θ̄, per trainable player."""
    if players == 0:
        return 0.0
    return players * (hw.call_overhead_s + 3 * 4 * params / shards / hw.bw)


@dataclasses.dataclass(frozen=True)
class Judge:
    """The judge's requests of one split: ``faith`` and ``pairs`` (pairwise/pointwise scoring)
    requests of ``prompt_tokens`` in, ``new_tokens`` out, on ``replicas`` × ``tp`` devices
    running ``batch`` requests at once. ``shape`` None: a rule judge (free)."""

    shape: Shape | None = None
    faith: int = 0
    pairs: int = 0
    prompt_tokens: int = 1024
    new_tokens: int = 512
    replicas: int = 1
    tp: int = 1
    batch: int = 32
    dtype_bytes: int = 2


def judge_time(hw: Hardware, j: Judge, requests: int) -> float:
    if j.shape is None or requests == 0:
        return 0.0
    per_wave = j.replicas * j.batch
    waves = math.ceil(requests / per_wave)
    rows = min(j.batch, math.ceil(requests / j.replicas))
    call = GenCall(
        rows=rows,
        prompt_len=j.prompt_tokens,
        steps=j.new_tokens,
        cache_len=j.prompt_tokens + j.new_tokens // 2,
    )
    return waves * generation_time(hw, Sampler(j.shape, j.dtype_bytes, 1, j.tp), [call])["seconds"]


@dataclasses.dataclass(frozen=True)
class StepWorkload:
    """Everything one trainer step does (both splits)."""

    attacker: Sampler
    defender: Sampler
    attacker_calls: list
    defender_calls: list
    trainers: dict  # role -> Trainer (trainable players only)
    updates: dict  # role -> [UpdateCall]
    judge: Judge = Judge()
    splits: int = 2
    ema_players: int = 0
    sync_every: int = 1
    sync_bytes: float = 0.0  # sampler weights refreshed per sync (both players)
    sync_via_disk: bool = False  # engines in another process read a sync checkpoint
    checkpoint_every: int = 0
    checkpoint_bytes: float = 0.0


def predict_step(hw: Hardware, w: StepWorkload) -> dict:
    """Seconds per stage of one trainer step (``STAGES``), their sum, and the details."""
    gen_a = generation_time(hw, w.attacker, w.attacker_calls)
    gen_d = generation_time(hw, w.defender, w.defender_calls)
    upd = {r: update_time(hw, w.trainers[r], w.updates.get(r, [])) for r in w.trainers}
    ema = 0.0
    if w.ema_players and w.trainers:
        t = next(iter(w.trainers.values()))
        ema = ema_time(hw, t.shape.params, t.fsdp, w.ema_players)
    stages = {
        "attacker_generation": gen_a["seconds"],
        "faithfulness": w.splits * judge_time(hw, w.judge, w.judge.faith),
        "defender_generation": gen_d["seconds"],
        "judging": w.splits * judge_time(hw, w.judge, w.judge.pairs),
        "update": sum(u["seconds"] for u in upd.values()) + ema,
        "sync": 0.0,
        "checkpoint": 0.0,
    }
    if w.sync_bytes:
        per = (2 * w.sync_bytes / hw.disk_bw) if w.sync_via_disk else w.sync_bytes / hw.bw
        stages["sync"] = (per + hw.call_overhead_s) / max(w.sync_every, 1)
    if w.checkpoint_every and w.checkpoint_bytes:
        stages["checkpoint"] = w.checkpoint_bytes / hw.disk_bw / w.checkpoint_every
    step = sum(stages.values())
    return dict(
        hardware=hw.name,
        stages=stages,
        step_s=step,
        ema_s=ema,
        details=dict(attacker_generation=gen_a, defender_generation=gen_d, update=upd),
    )


def run_totals(step_s: float, num_steps: int, devices: int) -> dict:
    """Wall time and device-hours of ``num_steps`` steps on ``devices`` devices."""
    hours = step_s * num_steps / 3600.0
    return dict(num_steps=num_steps, wall_h=hours, device_hours=hours * devices)


def slowest_stage(stages: dict) -> str:
    return max(stages, key=lambda k: stages[k])
