"""The paper's runs (GAME_SPEC §3) as one function of model family, loss and ablation.

Each ``configs/<family>_<loss>.py`` file and each ``configs/ablations/<name>.py`` file is a
one-line call of ``paper_config``. Checkpoint paths and judge endpoints are deliberately empty:
pass them as overrides (``--config.attacker.hf_path=... --config.judge.endpoints=...``); the
run stops before training with a message naming each missing field.
"""

from configs.base import base_config

FAMILIES = {
    # Qwen2.5-7B-Instruct plays both roles; Qwen2.5-32B-Instruct judges.
    "qwen": dict(judge_model="Qwen2.5-32B-Instruct"),
    # Llama-3.1-8B-Instruct defends; an abliterated Llama-3.1-8B attacks; Llama-3.3-70B judges.
    "llama": dict(judge_model="Llama-3.3-70B-Instruct"),
}

ABLATIONS = ("none", "no_ema", "pointwise_judge", "fixed_attacker", "no_attacker_judge",
             "non_optimistic", "no_think")


def paper_config(family: str, loss: str, ablation: str = "none"):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    c = base_config()
    c.name = f"{family}_{loss}" + ("" if ablation == "none" else f"_{ablation}")
    c.judge.model = FAMILIES[family]["judge_model"]
    c.judge.backend = "endpoint"
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over all trainer devices (docs/capacity.md)
    c.attacker.sampler = "vllm"
    c.defender.sampler = "vllm"

    if loss in ("dpo_md", "ipo_md"):
        c.loss.kind = loss[:3]
        c.judge.mode = "pairwise"
        c.game.num_attacks, c.game.num_responses = 2, 2
        c.train.sample_from, c.train.reference = "ema", "ema"
    elif loss == "grpo":
        c.loss.kind = "grpo"
        c.judge.mode = "pointwise"
        c.game.num_attacks, c.game.num_responses = 4, 4
        c.train.sample_from, c.train.reference = "trained", "initial"
        c.loss.tis_cap = 2.0
    else:
        raise ValueError(f"loss must be 'dpo_md', 'ipo_md' or 'grpo', got {loss!r}")

    if ablation == "no_ema":  # on-policy DPO against the frozen initial model
        c.train.sample_from, c.train.reference = "trained", "initial"
    elif ablation == "pointwise_judge":
        c.judge.mode = "pointwise"
    elif ablation == "fixed_attacker":
        c.attacker.trainable = False
    elif ablation == "no_attacker_judge":
        c.judge.attacker_judge = False
    elif ablation == "non_optimistic":
        c.game.optimistic_attacker = False
    elif ablation == "no_think":
        c.game.attacker_format = "prompt_strict"
    return c
