"""MGPO vs GRPO at laptop scale (`python -m mgpo_jax.repro`): the comparison driver (`__main__.py`), the
warm-up rows it trains before RL (`warmup.py`), and a localisation diagnostic (`python -m
mgpo_jax.repro.probe`). A program: no library module imports from here."""
