"""Files: remote-aware paths, parameter checkpoints, metrics and TensorBoard event files."""
