"""Paper ablation 'small_judge' (GAME_SPEC §3, configs/paper.py ABLATIONS). Family: qwen by default;
pick Llama with `--config=configs/ablations/small_judge.py:llama`."""

from configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "small_judge")
