"""SmolLM2-135M-Instruct as attacker and defender, the offline rule judge (what each setting is
and why: ``advgame_jax/experiment/configs/smol.py``, ``smol_config``).

    python -m advgame_jax.models.smollm2 --install
    python launch/train.py --config=configs/smol.py
"""

from advgame_jax.experiment.configs.smol import smol_config


def get_config():
    return smol_config()
