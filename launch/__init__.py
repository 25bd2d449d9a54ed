"""The entry scripts: run as ``python launch/<name>.py`` or as the installed console scripts
(``advgame-<name>``, pyproject.toml), which import this directory as ``advgame_jax.launch``."""
