"""The step-time model (training/steptime.py, training/timeplan.py) and ``plan.py --time``:
hand-computed cases, the analytic update FLOPs against XLA's cost analysis of the compiled
update step, and the command line's presets and its explicit-peaks form."""

import dataclasses
import importlib
import json
import math
import pathlib
import subprocess
import sys

import pytest

from advgame_jax.experiment.validate import settings_from_config
from advgame_jax.training import steptime as st
from advgame_jax.training.timeplan import (
    JudgeLoad,
    Layout,
    Lengths,
    StepInputs,
    build_workload,
    judge_requests,
    length_bucket,
    lengths_from_metrics,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
HW = st.Hardware(
    name="t",
    peak_flops=100e12,
    hbm_bw=1e12,
    disk_bw=1e9,
    net_bw=1e11,
    mfu=0.5,
    bw_eff=0.5,
    call_overhead_s=0.01,
    decode_step_floor_s=0.001,
)
SHAPE = st.Shape(
    params=1_000_000_000,
    matmul_params=900_000_000,
    layers=10,
    hidden=1024,
    ffn=4096,
    heads=8,
    kv_heads=2,
    head_dim=64,
    vocab=32_000,
)


def test_generation_is_the_bandwidth_roofline_plus_fixed_costs():
    s = st.Sampler(SHAPE, dtype_bytes=2, replicas=2, tp=1)
    call = st.GenCall(rows=8, prompt_len=100, steps=50, cache_len=200, filter_passes=1)
    got = st.generation_time(HW, s, [call, call])
    rows = 4  # 8 rows over 2 replicas
    kv_tok = 2 * 10 * 2 * 64 * 2  # K and V, layers, kv heads, head dim, bf16
    step_bytes = 2e9 + rows * 200 * kv_tok + rows * 32_000 * 4
    step_flops = 2 * 0.9e9 * rows + 4 * 10 * 8 * 64 * 200 * rows
    assert step_bytes / 0.5e12 > step_flops / 50e12  # decode is bandwidth-bound here
    pre = max(
        (2 * 0.9e9 * rows * 100 + 4 * 10 * 8 * 64 * 50 * rows * 100) / 50e12,
        (2e9 + rows * 100 * kv_tok) / 0.5e12,
    )
    one = 0.01 + pre + 50 * max(step_bytes / 0.5e12, 0.001)
    assert got["seconds"] == pytest.approx(2 * one, rel=1e-9)
    assert got["calls"] == 2


def test_update_is_compute_bound_at_scale_and_counts_fsdp_traffic():
    t = st.Trainer(SHAPE, devices=8, fsdp=8, compute_bytes=2, remat=True, reference_forward=True)
    got = st.update_time(HW, t, [st.UpdateCall(rows=64, length=2048)])
    fwd = 2 * 0.9e9 + 4 * 10 * 8 * 64 * 1024
    flops = 64 * 2048 * 5 * fwd / 8
    net = (4 * 1e9 * 2 + 4 * 1e9) * 7 / 8
    adamw = 7 * 4 * 1e9 / 8 / 0.5e12  # θ, g, m, v read; θ, m, v written (fp32 shard)
    want = 0.01 + max(flops / 50e12, net / 1e11) + adamw
    assert got["seconds"] == pytest.approx(want, rel=1e-9)
    assert got["flops_per_device"] == pytest.approx(flops)


def test_update_counts_only_the_microbatches_that_run():
    t = st.Trainer(SHAPE, devices=1, fsdp=1, compute_bytes=4, remat=False)
    full = st.update_time(HW, t, [st.UpdateCall(rows=8, length=256, microbatches=4)])
    half = st.update_time(HW, t, [st.UpdateCall(rows=8, length=256, microbatches=4, active=2)])
    none = st.update_time(HW, t, [st.UpdateCall(rows=8, length=256, microbatches=4, active=0)])
    assert half["flops_per_device"] == pytest.approx(full["flops_per_device"] / 2)
    assert none["flops_per_device"] == 0.0
    # Nothing but the call and the AdamW pass over fp32 θ, g, m, v (7 arrays' traffic).
    assert none["seconds"] == pytest.approx(0.01 + 7 * 4 * 1e9 / 0.5e12, rel=1e-9)


def test_measured_token_selection_adds_per_row_and_step():
    hw = dataclasses.replace(HW, select_s_per_row=1e-3)
    s = st.Sampler(SHAPE, dtype_bytes=2)
    call = st.GenCall(rows=4, prompt_len=16, steps=10, cache_len=32)
    extra = (
        st.generation_time(hw, s, [call])["seconds"] - st.generation_time(HW, s, [call])["seconds"]
    )
    assert extra == pytest.approx(10 * 4 * 1e-3, rel=1e-9)
    with pytest.raises(ValueError, match="select_s_per_row"):
        dataclasses.replace(HW, select_s_per_row=-1.0)


def test_step_sums_its_stages_and_amortises_sync_and_checkpoint():
    s = st.Sampler(SHAPE)
    call = st.GenCall(rows=4, prompt_len=16, steps=8, cache_len=32)
    t = st.Trainer(SHAPE, devices=4, fsdp=4)
    w = st.StepWorkload(
        attacker=s,
        defender=s,
        attacker_calls=[call],
        defender_calls=[call] * 2,
        trainers={"defender": t},
        updates={"defender": [st.UpdateCall(8, 64)]},
        ema_players=1,
        sync_every=2,
        sync_bytes=4e9,
        sync_via_disk=True,
        checkpoint_every=50,
        checkpoint_bytes=16e9,
    )
    p = st.predict_step(HW, w)
    assert p["step_s"] == pytest.approx(sum(p["stages"].values()))
    assert p["stages"]["sync"] == pytest.approx((2 * 4e9 / 1e9 + 0.01) / 2)
    assert p["stages"]["checkpoint"] == pytest.approx(16e9 / 1e9 / 50)
    assert p["stages"]["defender_generation"] == pytest.approx(
        2 * p["stages"]["attacker_generation"]
    )
    assert p["ema_s"] == pytest.approx(0.01 + 12e9 / 4 / 0.5e12)
    assert p["stages"]["faithfulness"] == 0 == p["stages"]["judging"]  # rule judge
    assert st.run_totals(10.0, 1000, 16) == dict(
        num_steps=1000,
        wall_h=pytest.approx(10000 / 3600),
        device_hours=pytest.approx(16 * 10000 / 3600),
    )
    with pytest.raises(ValueError, match="mfu"):
        dataclasses.replace(HW, mfu=float("nan"))


def test_paper_workload_counts_rows_requests_and_buckets():
    c = importlib.import_module("configs.llama_ipo_md").get_config()
    from advgame_jax.models import ModelConfig

    mc = ModelConfig.from_hf_file(ROOT / "configs" / "models" / "llama3.1_8b")
    s = settings_from_config(c, complete=False)
    lay = Layout(trainer=8, engines=2, judge_replicas=2, judge_tp=2)
    w = build_workload(
        s,
        StepInputs(
            shapes={"attacker": mc, "defender": mc},
            layout=lay,
            lengths=Lengths(
                attacker_prompt=500,
                attacker_new_mean=300,
                attacker_steps=900,
                defender_new_mean=400,
                defender_steps=1000,
            ),
            judge=JudgeLoad(shape=mc),
        ),
    )
    b = 4 * 8  # seeds_per_device × trainer devices = the paper's 32 per split
    assert [x.rows for x in w.attacker_calls] == [b * 2] * 2
    assert [x.rows for x in w.defender_calls] == [b * 4] * 2
    assert w.attacker_calls[0].steps == 900 and w.defender_calls[0].steps == 1000
    assert w.updates["attacker"][0] == st.UpdateCall(rows=2 * b, length=length_bucket(800))
    assert w.updates["defender"][0] == st.UpdateCall(rows=2 * b * 2, length=length_bucket(828))
    assert length_bucket(800) == 1024 and length_bucket(828) == 1024 and length_bucket(17) == 24
    # Pairwise, A = D = 2: one defender comparison per attack, one attacker one per seed.
    assert judge_requests(s, b) == (b * 2, b * 2 + b)
    assert w.attacker.replicas == 2 and w.ema_players == 2


def test_lengths_from_a_runs_metrics(tmp_path):
    c = importlib.import_module("configs.tiny").get_config()
    m = tmp_path / "metrics.jsonl"
    m.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "step": 1,
                    "harmful/x/attacker_tokens/mean": 10,
                    "benign/x/attacker_tokens/mean": 20,
                    "harmful/y/tokens/mean": 30,
                    "benign/y/tokens/mean": 10,
                },
                {
                    "step": 2,
                    "harmful/x/attacker_tokens/mean": 12,
                    "benign/x/attacker_tokens/mean": 18,
                    "harmful/y/tokens/mean": 20,
                    "benign/y/tokens/mean": 20,
                },
            ]
        )
        + "\n{torn"
    )
    s = settings_from_config(c, complete=False)
    ln = lengths_from_metrics(str(m), s, tail=1.5)
    assert ln.attacker_new_mean == 15 and ln.defender_new_mean == 20
    assert ln.attacker_steps == math.ceil(22.5) and ln.defender_steps == 30
    assert lengths_from_metrics(str(m), s, tail=10).defender_steps == 40  # max_new_tokens cap


@pytest.mark.slow
def test_analytic_update_flops_match_the_compiled_programs_cost_analysis():
    """XLA counts a scanned layer body once, so the check uses one layer (trip count 1)."""
    import jax.numpy as jnp

    from advgame_jax.models import ModelConfig, make_mesh
    from advgame_jax.training import capacity as cap
    from advgame_jax.training.optimizer import OptimizerSettings
    from advgame_jax.training.update import (
        LossSettings,
        StepSettings,
        UpdateSettings,
        update_step_from,
    )

    mc = ModelConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    import jax

    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    rows, length = 8, 128
    for remat in ("none", "full"):
        step = update_step_from(
            mc,
            UpdateSettings(
                LossSettings(kind="dpo"),
                OptimizerSettings(1e-4, num_steps=10),
                StepSettings(
                    compute_dtype=jnp.float32, remat=remat, attention_impl="xla", chunk_size=512
                ),
            ),
            mesh=mesh,
        )
        state = cap.abstract_state(mc, step.optimizer, mesh)
        batch = cap.abstract_batch("pairs", rows, length, mesh)
        ca = step.lower(state, batch).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        t = st.Trainer(st.Shape.of(mc), devices=1, fsdp=1, remat=remat == "full")
        analytic = 2 * rows * length * t.update_flops_per_token(length)
        assert analytic == pytest.approx(ca["flops"], rel=0.25), (remat, analytic, ca["flops"])


def _plan(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "plan.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_presets_and_explicit_peaks_agree(tmp_path):
    a = _plan(
        "--config=configs/qwen_dpo_md.py",
        "--time",
        "--cluster=16xH200",
        f"--json={tmp_path / 'a.json'}",
    )
    assert a.returncode == 0, a.stderr[-2000:]
    for stage in st.STAGES:
        assert stage in a.stdout
    assert "1000 steps:" in a.stdout and "device-hours on 16 devices" in a.stdout
    b = _plan(
        "--config=configs/qwen_dpo_md.py",
        "--time",
        "--devices=16",
        "--peak_tflops=989",
        "--hbm_gbps=4800",
        "--net_gbps=450",
        "--disk_gbps=2",
        "--mfu=0.4",
        "--bw_eff=0.6",
        f"--json={tmp_path / 'b.json'}",
    )
    assert b.returncode == 0, b.stderr[-2000:]
    pa, pb = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    # The preset carries fixed per-call costs; the explicit form has none: within 5%.
    assert pb["step_s"] == pytest.approx(pa["step_s"], rel=0.05)
    assert pa["run"]["device_hours"] == pytest.approx(pa["step_s"] * 1000 / 3600 * 16)
    bad = _plan("--config=configs/qwen_dpo_md.py", "--time", "--cluster=nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --cluster=nope")
    bad = _plan("--config=configs/qwen_dpo_md.py", "--time", "--peak_tflops=100")
    assert bad.returncode == 2 and "give both" in bad.stderr
