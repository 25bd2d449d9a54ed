"""Package layout only; the metadata, dependencies and extras are in pyproject.toml.

The entry scripts stay where users run them (``python launch/train.py``) and are installed as
``advgame_jax.launch`` as well, which the console scripts (``advgame-train`` ...) import.
pyproject.toml cannot combine package discovery with a mapped directory, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["advgame_jax", "advgame_jax.*"]), "advgame_jax.launch"],
    package_dir={"advgame_jax.launch": "launch"},
)
