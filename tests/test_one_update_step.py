"""The capacity planner compiles the program the trainer runs.

For the paper configs, each player's update step is built twice at a tiny shape (the family's
``config.json`` with its widths and depth shrunk): once as the planner builds it
(``training.planning.player_program``: abstract state and batch) and once as the trainer does
(``experiment.players``: the trainer's mesh, a real state from ``initial_state``, a real
collated batch, placed as a call places them). The two lowered programs must be the same text
(compared by sha256). A negative control changes ``loss.entropy_coef`` (the planner once
dropped it, so it never planned the entropy pass) and ``loss.beta``: the hash must move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.experiment import players
from advgame_jax.experiment.update_settings import player_training
from advgame_jax.experiment.validate import settings_from_config
from advgame_jax.models import init_params, param_shardings
from advgame_jax.training import collate_pairs, collate_samples, planning
from advgame_jax.types import TokenPair, TokenSample

SEQ = 32
PROMPT = 12
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
CONFIGS = ("llama_ipo_md", "qwen_ipo_md", "qwen_dpo_md", "qwen_grpo")


def _config(name: str, **overrides):
    """The typed settings of ``configs/<name>.py`` with ``overrides`` (what both builders read)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return settings_from_config(config, complete=False)


def _tiny(config, role):
    return dataclasses.replace(planning.model_config_for(config, role), **TINY)


def _digest(lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def planner_hash(config, role) -> str:
    mesh = _mesh(config)
    step, state, batch = planning.player_program(config, role, _tiny(config, role), mesh, SEQ)
    return _digest(step.lower(state, batch))


def _mesh(config):
    # launch/plan.py's mesh over every visible device (the tests' 8 virtual CPU devices).
    from advgame_jax.models import make_mesh

    data, fsdp, tensor = planning.resolve_mesh_shape(config.mesh, jax.device_count())
    return make_mesh(
        data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor]
    )


def _records(kind: str, rows: int, vocab: int):
    rng = np.random.default_rng(0)

    def ids(n):
        return tuple(int(x) for x in rng.integers(3, vocab, n))

    if kind == "pairs":
        return [TokenPair(ids(PROMPT), ids(SEQ - PROMPT), ids(SEQ - PROMPT)) for _ in range(rows)]
    return [
        TokenSample(
            ids(PROMPT),
            ids(SEQ - PROMPT),
            float(rng.normal()),
            tuple(float(x) for x in -rng.uniform(1, 5, SEQ - PROMPT)),
        )
        for _ in range(rows)
    ]


def trainer_hash(config, role) -> str:
    mesh = players.resolve_mesh(config)
    mc = _tiny(config, role)
    step = players._update_step(mc, player_training(config, role).update, mesh, None)
    dtype = player_training(config, role).state.param_dtype
    params = jax.device_put(init_params(mc, jax.random.key(0), dtype), param_shardings(mc, mesh))
    player = types.SimpleNamespace(role=role, optimizer=step.optimizer)
    state = players.initial_state(player, params, config)
    kind, rows = planning.player_rows(config, role, step.data_parallel_size)
    collate = collate_pairs if kind == "pairs" else collate_samples
    batch = collate(
        _records(kind, rows, mc.vocab_size),
        pad_id=0,
        length_buckets=(SEQ,),
        num_microbatches=int(config.train.num_microbatches),
        data_parallel_size=step.data_parallel_size,
    )
    assert batch.tokens.shape[0] == rows and batch.tokens.shape[-1] == SEQ
    return _digest(step.lower_call(state, batch))


@pytest.mark.parametrize("name", CONFIGS)
def test_planner_and_trainer_lower_the_same_update_program(name):
    config = _config(name)
    for role in ("attacker", "defender"):
        assert config.player(role).trainable
        assert planner_hash(config, role) == trainer_hash(config, role), (name, role)


def test_the_comparison_sees_loss_settings():
    base = _config("llama_ipo_md")
    h0 = trainer_hash(base, "defender")
    entropy = _config("llama_ipo_md", **{"loss.entropy_coef": 0.01})
    h_ent = trainer_hash(entropy, "defender")
    assert h_ent != h0  # the entropy pass is part of the program
    assert planner_hash(entropy, "defender") == h_ent
    beta = _config("llama_ipo_md", **{"loss.beta": float(base.loss.beta) * 2})
    assert planner_hash(beta, "defender") not in (h0, h_ent)
    schedule = _config("llama_ipo_md", **{"optim.lr_schedule": "run"})
    assert planner_hash(schedule, "defender") != h0  # the LR schedule runs inside the step


def test_update_step_settings_come_from_one_mapping():
    c = _config("qwen_grpo", **{"loss.entropy_coef": 0.02, "loss.tis_cap": 0.0})
    t = player_training(c, "defender")
    assert t.update.loss.entropy_coef == 0.02 and t.update.loss.tis_cap is None
    assert t.update.loss.tis_detach is False and t.update.train.step_on_empty is True
    assert t.update.optim.restart is (c.optim.lr_schedule == "cycle")
    assert t.state.keep_ema is (c.train.reference == "ema" or c.train.sample_from == "ema")
    assert t.update.train.compute_dtype == jnp.bfloat16
