"""Timing and error helpers shared by the benchmark scripts (run as `python3 benchmarks/NAME.py`)."""

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, target_s: float = 0.2) -> float:
    """Median over 3 trials of back-to-back calls (enough calls per trial to fill about target_s); a call
    slower than a second is timed once (CPU)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    probe = time.perf_counter() - start
    if probe > 1.0:
        return probe
    reps = int(min(50, max(1, target_s / max(probe, 1e-6))))
    trials = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        trials.append((time.perf_counter() - start) / reps)
    return statistics.median(trials)


def rel_err(got, want) -> float:
    """Largest max|got - want| / max|want| over the leaves (the output, or the output and gradients)."""
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = g.astype(jnp.float32), w.astype(jnp.float32)  # on the device: no big host copies
        errs.append(float(jnp.abs(g - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30)))
    return max(errs)
