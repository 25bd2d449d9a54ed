"""Paper ablation 'grpo_pointwise_offpolicy' (GAME_SPEC §3, configs/paper.py ABLATIONS). Family: qwen by default;
pick Llama with `--config=configs/ablations/grpo_pointwise_offpolicy.py:llama`."""

from configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "grpo_pointwise_offpolicy")
