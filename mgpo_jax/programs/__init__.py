"""What the programs run (`python -m mgpo_jax.main`, `.evaluate`, `.repro`): the training loop and the
objects a config builds. Programs only: no library module imports from here."""
