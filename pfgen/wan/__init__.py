"""Causal Wan on diffusers components: processors, checkpoints, the tiny embedded model, text encoding."""
