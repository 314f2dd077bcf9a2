"""MGPO vs GRPO vs a random-crop control at laptop scale (`python -m mgpo_jax.repro`): the comparison
driver (`__main__.py`), the recipe of the tiny pretrained base it starts from (`pretrain.py`, the base
itself in `base/`), and what that base can do (`gates.py`). Programs: no library module imports from here."""
