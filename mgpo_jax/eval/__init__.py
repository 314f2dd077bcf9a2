"""Evaluation: the greedy multi-turn evaluation loop shared by training and `python -m mgpo_jax.evaluate`."""
