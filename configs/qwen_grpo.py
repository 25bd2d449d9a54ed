"""Paper run: qwen family, grpo (GAME_SPEC §3). Needs --config.{attacker,defender}.hf_path,
--config.judge.endpoints and --config.workdir overrides."""

from advgame_jax.experiment.configs.paper import paper_config


def get_config():
    return paper_config("qwen", "grpo")
