"""Training for m1jax: config (config.py), packed token data (data.py), the jitted step (step.py), the loop with
checkpoints, metrics and fault handling (loop.py, checkpointing.py, metrics.py, distributed.py), and recipes."""
