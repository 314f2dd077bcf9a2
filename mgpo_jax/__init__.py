"""mgpo_jax: MGPO (multi-turn grounding policy optimisation) for Qwen2.5-VL in pure JAX."""
