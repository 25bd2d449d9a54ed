"""Experiment assembly: config validation, building players/samplers/judges from a config,
the offline toy world, metrics writers and the game loop that ``launch/train.py`` runs."""
