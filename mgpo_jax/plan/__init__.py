"""Planning a run before it starts: the memory plan of a config on a TPU slice (`memory.py`, whose command
line is `tools/plan.py`)."""
