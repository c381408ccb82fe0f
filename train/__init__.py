"""Training for m1jax: the jitted sharded train step, data, orbax checkpoints, metrics, and recipes (`m1jax train`)."""
