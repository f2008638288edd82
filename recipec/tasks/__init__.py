"""Downstream tasks: what to train on (built-in, local files, hub) and how to score it."""
