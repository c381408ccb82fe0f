"""CISPO, the RL objective MiniMax-M1 was trained with (M1 report Eq. 4-5; architecture.md §12).

    J(θ) = 1/Σ_i|o_i| · Σ_i Σ_t  sg(r̂_{i,t}) · Â_i · log π_θ(o_{i,t} | q, o_{i,<t})
    r_{i,t} = π_θ(o_{i,t}|·) / π_old(o_{i,t}|·),   r̂ = clip(r, 1 - ε_low, 1 + ε_high),   Â_i = (R_i - mean R)/std R

The importance weight is clipped and its gradient stopped, so every token keeps a gradient through log π_θ (PPO
and GRPO drop the clipped tokens' gradients instead); the loss is normalised by the tokens of the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def group_advantages(rewards: Float[np.ndarray, "prompts group"]) -> Float[np.ndarray, "prompts group"]:
    """GRPO's group-relative advantages (R - mean) / std within each prompt's group; 0 for a group whose rewards
    are all equal (it carries no signal)."""
    rewards = np.asarray(rewards, np.float64)
    std = rewards.std(axis=1, keepdims=True)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return np.where(std > 0, centred / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)


def cispo_loss(
    logp: Float[Array, "batch seq"],
    old_logp: Float[Array, "batch seq"],
    advantages: Float[Array, " batch"],
    mask: Float[Array, "batch seq"],
    *,
    eps_high: float,
    eps_low: float | None = None,
) -> Float[Array, ""]:
    """-J(θ) over the tokens where `mask` is 1 (the sampled completions, normalised by their number).

    `old_logp`: the behaviour policy's log-probabilities of the same tokens (the sampler's); `eps_low=None`: no
    lower bound (the M1 setting).
    """
    mask = mask.astype(jnp.float32)
    weight = jnp.minimum(jnp.exp(logp - old_logp), 1.0 + eps_high)
    if eps_low is not None:
        weight = jnp.maximum(weight, 1.0 - eps_low)
    weight = jax.lax.stop_gradient(weight)
    return -jnp.sum(weight * advantages[:, None] * logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def importance_stats(logp: Float[Array, "batch seq"], old_logp: Float[Array, "batch seq"],
                     mask: Float[Array, "batch seq"], *, eps_high: float, eps_low: float | None = None) -> dict:
    """Over the tokens where `mask` is 1: the mean ratio π_θ/π_old, the shares clipped above (and below), and the
    mean |log π_θ - log π_old| (at the first update on a batch: the train-inference mismatch)."""
    mask = mask.astype(jnp.float32)
    mean = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    ratio = jnp.exp(logp - old_logp)
    stats = {"ratio_mean": mean(ratio), "clipped_high": mean((ratio > 1.0 + eps_high).astype(jnp.float32)),
             "logp_mismatch": mean(jnp.abs(logp - old_logp))}
    if eps_low is not None:
        stats["clipped_low"] = mean((ratio < 1.0 - eps_low).astype(jnp.float32))
    return stats
