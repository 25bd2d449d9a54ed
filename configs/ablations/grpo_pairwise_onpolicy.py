"""Paper ablation 'grpo_pairwise_onpolicy' (GAME_SPEC §3, the ABLATIONS table of experiment/configs/paper.py). Family: qwen by default;
pick Llama with `--config=configs/ablations/grpo_pairwise_onpolicy.py:llama`."""

from advgame_jax.experiment.configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "grpo_pairwise_onpolicy")
