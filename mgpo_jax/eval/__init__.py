"""Evaluation.

  loop      the greedy multi-turn evaluation loop shared by training and `python -m mgpo_jax.evaluate`
  grading   the MGPO reward's grading (last \\boxed{}) and lmms-eval's letter extraction
  suite     the released benchmarks by name, run with a protocol (mgpo, direct, mgpo with K turns)
  table     each benchmark's own score and the table in the paper's column order
"""
