"""MGPO rollout: box parsing, cropping, prompts and rewards (host side)."""
