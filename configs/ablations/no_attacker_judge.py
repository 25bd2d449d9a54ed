"""Paper ablation 'no_attacker_judge' of DPO-MD (GAME_SPEC §3). Family: qwen by default; pick Llama with
`--config=configs/ablations/no_attacker_judge.py:llama`."""

from advgame_jax.experiment.configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "no_attacker_judge")
