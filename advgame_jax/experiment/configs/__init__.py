"""The builders that the experiment configs under ``configs/`` are made of.

``configs/*.py`` are the files users pass as ``--config=`` (ml_collections loads them by
path); each defines ``get_config()`` by calling one builder of this package:
``base.base_config`` (every field and its default), ``paper.paper_config`` (the paper's runs
and ablations as tables over the base) and ``smol.smol_config`` (the SmolLM2 recipe). They live
in the package so that a config file imports them from any directory, installed or not
(``pip install -e .``), without editing ``sys.path``.
"""
