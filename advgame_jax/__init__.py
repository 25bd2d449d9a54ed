"""advgame_jax: the AdvGame attacker–defender safety game (Paulus et al., 2025) in JAX.

Two language models, an Attacker and a Defender, are trained together as a non-zero-sum game
judged pairwise by an LLM judge, with online DPO / IPO (mirror-descent variants) or GRPO.
See README.md for the map of the code.
"""

__version__ = "0.1.0"
