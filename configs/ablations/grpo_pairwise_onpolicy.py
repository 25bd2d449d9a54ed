"""Paper ablation 'grpo_pairwise_onpolicy' (GAME_SPEC §3, configs/paper.py ABLATIONS). Family: qwen by default;
pick Llama with `--config=configs/ablations/grpo_pairwise_onpolicy.py:llama`."""

from configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "grpo_pairwise_onpolicy")
