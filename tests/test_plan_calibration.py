"""The step-time model calibrated on this machine: two real game steps of ``configs/tiny.py``
(toy world, JAX samplers, rule judge) against the model's prediction, per stage, with this
machine's figures measured in the same process around the measured step (training/
calibration.py), so the shared machine's load weighs on both.

What is predicted from what: the samplers' work is recorded call by call (padded rows, prompt
and cache buckets, decode steps = the longest row), the updates' batch shapes likewise; the
prediction is ``steptime`` applied to that work with the measured bandwidth, matmul rate at
the model's shapes, per-call cost and per-decode-step cost. At this size the decode step is a
fixed cost (XLA:CPU task overhead), measured by its own loop, not derived from peaks.
"""

import time

import numpy as np
import pytest

from advgame_jax.training import steptime as st

TOLERANCE = 0.30
COMPARED = ("attacker_generation", "defender_generation", "update")


def record_step_work(monkeypatch):
    """Record each sampler call's shapes and decode steps and each update batch's shape."""
    import jax

    import advgame_jax.experiment.loop as loop
    import advgame_jax.sampling.jax_sampler as js

    gen, upd = [], []
    generate = js._generate_jit

    def recording_generate(params, tokens, *args, **kw):
        out = generate(params, tokens, *args, **kw)
        num = np.asarray(jax.device_get(out[2]))
        gen.append(dict(vocab=kw["config"].vocab_size, rows=tokens.shape[0],
                        prompt=tokens.shape[1], new=kw["max_new_bucket"],
                        filter=kw["use_filter"], steps=int(num.max())))
        return out

    collate = loop.collate_global

    def recording_collate(records, **kw):
        batch = collate(records, **kw)
        upd.append(tuple(batch.tokens.shape))
        return batch

    monkeypatch.setattr(js, "_generate_jit", recording_generate)
    monkeypatch.setattr(loop, "collate_global", recording_collate)
    return gen, upd


def predict_recorded(hw, shapes, gen, upd, *, ema_players, remat):
    """steptime's prediction of the recorded work (fp32 in-process samplers, one device)."""
    calls = {"attacker": [], "defender": []}
    for i, g in enumerate(gen):  # per split: the attacker's call, then the defender's
        calls["attacker" if i % 2 == 0 else "defender"].append(st.GenCall(
            rows=g["rows"], prompt_len=g["prompt"], steps=g["steps"],
            cache_len=g["prompt"] + g["new"], filter_passes=2 + 2 * 48 if g["filter"] else 1))
    out = {}
    for role in ("attacker", "defender"):
        s = st.Sampler(st.Shape.of(shapes[role]), dtype_bytes=4)
        out[f"{role}_generation"] = st.generation_time(hw, s, calls[role])["seconds"]
    t = st.Trainer(st.Shape.of(shapes["defender"]), devices=1, fsdp=1, compute_bytes=4,
                   remat=remat, reference_forward=True)
    ups = [st.UpdateCall(rows=r * p, length=n) for r, p, n in upd]
    out["update"] = (st.update_time(hw, t, ups)["seconds"]
                     + st.ema_time(hw, t.shape.params, 1, ema_players))
    return out, calls


def calibrate(config, monkeypatch):
    """Run step 1 (compiles), measure, run step 2, measure; return (predicted, measured)."""
    from advgame_jax.experiment.loop import GameRunner
    from advgame_jax.training.calibration import mean_hardware, measure_cpu

    runner = GameRunner(config)
    try:
        gen, upd = record_step_work(monkeypatch)
        runner.train_step()
        shapes = {r: runner.players[r].model_config for r in ("attacker", "defender")}
        rows = max(g["rows"] for g in gen)
        cache = max(g["prompt"] + g["new"] for g in gen)
        tokens = max(r * p * n for r, p, n in upd) // max(config.train.num_microbatches, 1)
        params = runner.players["defender"].sampler.params

        def measure():
            return measure_cpu(model=shapes["defender"], params=params, tokens=tokens,
                               decode_rows=rows, cache_len=cache, repeats=3)

        measure()  # compiles the calibration programs
        before = measure()
        gen.clear()
        upd.clear()
        t0 = time.perf_counter()
        record = runner.train_step()
        step_s = time.perf_counter() - t0
        hw = mean_hardware(before, measure())
    finally:
        runner.close()
    trainable = sum(bool(config[r].trainable) for r in ("attacker", "defender"))
    predicted, _ = predict_recorded(hw, shapes, gen, upd, ema_players=trainable,
                                    remat=bool(config.train.remat))
    measured = {k: record[f"time/{k}"] for k in COMPARED}
    return predicted, measured, hw, step_s


@pytest.mark.slow
def test_tiny_game_steps_match_the_prediction_per_stage(tmp_path, toy_dir, monkeypatch):
    import importlib

    c = importlib.import_module("configs.tiny").get_config()
    c.workdir = str(tmp_path / "run")
    c.toy_dir = toy_dir
    c.logging.progress_bar = False
    c.train.validate_every = 0
    c.train.checkpoint_every = 0
    predicted, measured, hw, _ = calibrate(c, monkeypatch)
    lines = [f"{k}: predicted {predicted[k]:.3f} s, measured {measured[k]:.3f} s, ratio "
             f"{predicted[k] / measured[k]:.2f}" for k in COMPARED]
    summary = (f"bw {hw.hbm_bw / 1e9:.1f} GB/s, matmul {hw.peak_flops / 1e9:.1f} GFLOP/s × mfu "
               f"{hw.mfu:.2f}, call {hw.call_overhead_s * 1e3:.2f} ms, decode step "
               f"{hw.decode_step_overhead_s * 1e3:.2f} ms\n" + "\n".join(lines))
    print(summary)
    for k in COMPARED:
        assert predicted[k] == pytest.approx(measured[k], rel=TOLERANCE), summary
