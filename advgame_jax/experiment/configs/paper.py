"""The paper's runs (GAME_SPEC §3) as one function of model family, loss and ablation.

Everything that differs from ``configs/base.py`` is stated once, in the tables below:
``REFERENCE`` (what every paper run shares, the reference implementation's behaviour),
``FAMILIES``, ``LOSSES`` and ``ABLATIONS`` (overrides on top, as dotted field -> value).
Each ``configs/<family>_<loss>.py`` and ``configs/ablations/<name>.py`` file is a one-line call
of ``paper_config``. Checkpoint paths and judge endpoints are deliberately empty: pass them as
overrides (``--config.attacker.hf_path=... --config.judge.endpoints=...``); the run stops
before training with a message naming each missing field.
"""

from advgame_jax.experiment.configs.base import base_config

# Shared by every paper run: the reference's settings where they differ from base.py
# (docs/game.md, "Deviations", lists each one and the option that restores ours).
REFERENCE = {
    "judge.backend": "endpoint",
    # FSDP over all trainer devices: both 8B players' state + a step fit 8×H200
    # (docs/capacity.md, launch/plan.py).
    "mesh.data": 1,
    "mesh.fsdp": -1,
    # The paper's layout: each player's vLLM engine in its own process on GPUs the trainer
    # does not use (set <role>.engine.devices, or engine.address for a user-started engine);
    # prompts up to 2,048 tokens + 2,048 new tokens (docs/sampling.md).
    "attacker.placement": "offloaded",
    "defender.placement": "offloaded",
    "attacker.engine.max_prompt_tokens": 2048,
    "defender.engine.max_prompt_tokens": 2048,
    "game.templates": "advgame_paper",
    "judge.temperature": 0.6,
    "judge.top_p": 0.9,
    "judge.num_samples": 1,
    "judge.max_new_tokens": 8192,
    "judge.faith_tie": "not_faithful",
    "game.selection": "reference",
    "optim.lr_schedule": "cycle",
    "train.loss_normalization": "reference",
    "train.norm_seeds_per_microbatch": 1,  # reference: batch_size 4 / num_microbatches_B 4
    "train.step_on_empty_batch": True,
    "train.seeds_per_step": 32,  # the reference's 32 harmful + 32 benign seeds per step
    "loss.tis_detach": False,
    # Whole-split validation of four splits, 64 seeds per rollout call (eval_batch_size).
    "validation.num_seeds": 0,
    "validation.batch_size": 64,
}

FAMILIES = {
    # Qwen2.5-7B-Instruct plays both roles; Qwen2.5-32B-Instruct judges.
    "qwen": {"judge.model": "Qwen2.5-32B-Instruct"},
    # Llama-3.1-8B-Instruct defends; an abliterated Llama-3.1-8B attacks; an abliterated
    # Llama-3.3-70B-Instruct judges.
    "llama": {"judge.model": "Llama-3.3-70B-Instruct-abliterated"},
}

_MD = {
    "judge.mode": "pairwise",
    "game.num_attacks": 2,
    "game.num_responses": 2,
    "train.sample_from": "ema",
    "train.reference": "ema",
}
_GRPO = {
    "loss.kind": "grpo",
    "judge.mode": "pointwise",
    "game.num_attacks": 4,
    "game.num_responses": 4,
    "train.sample_from": "trained",
    "train.reference": "initial",
    "loss.tis_cap": 2.0,
    "loss.grpo_baseline": "across_seeds",
}
LOSSES = {
    "dpo_md": {"loss.kind": "dpo", **_MD},
    "ipo_md": {"loss.kind": "ipo", **_MD},
    "grpo": _GRPO,
}

# Ablations of the main DPO-MD run (the three GRPO ones replace its loss).
_ON_POLICY = {"train.sample_from": "trained", "train.reference": "initial"}
ABLATIONS = {
    "none": {},
    "no_ema": _ON_POLICY,  # on-policy DPO against the frozen initial model
    "dpo_onpolicy": _ON_POLICY,  # the reference's name for the same run
    "pointwise_judge": {"judge.mode": "pointwise"},
    "fixed_attacker": {"attacker.trainable": False},
    "no_attacker_judge": {"judge.attacker_judge": False},
    "non_optimistic": {"game.optimistic_attacker": False},
    "no_think": {"game.attacker_format": "prompt_strict"},
    "small_judge": {"judge.model": "Qwen2.5-7B-Instruct"},
    "grpo_pairwise_onpolicy": {**_GRPO, "judge.mode": "pairwise"},
    # Samples from the EMA copies, so no importance correction; the reference model stays
    # the initial one.
    "grpo_pointwise_offpolicy": {**_GRPO, "train.sample_from": "ema", "loss.tis_cap": 0.0},
}


def _apply(c, overrides: dict) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"configs/paper.py: {dotted} is not a field of configs/base.py")
        node[leaf] = value


def paper_config(family: str, loss: str, ablation: str = "none"):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}")
    c = base_config()
    c.name = f"{family}_{loss}" + ("" if ablation == "none" else f"_{ablation}")
    for table in (REFERENCE, FAMILIES[family], LOSSES[loss], ABLATIONS[ablation]):
        _apply(c, table)
    return c
