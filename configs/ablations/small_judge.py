"""Paper ablation 'small_judge' (GAME_SPEC §3, the ABLATIONS table of experiment/configs/paper.py). Family: qwen by default;
pick Llama with `--config=configs/ablations/small_judge.py:llama`."""

from advgame_jax.experiment.configs.paper import paper_config


def get_config(family="qwen"):
    return paper_config(family or "qwen", "dpo_md", "small_judge")
