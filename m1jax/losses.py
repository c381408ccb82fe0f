"""Router losses and monitoring from forward()'s `Output.router` statistics (architecture.md §7.3).

The statistics are masked per-layer sums, so pooling over layers and tokens (padding excluded) is a sum
over the layer axis followed by one division: exactly the original/transformers `load_balancing_loss_func`
on the concatenated router logits of all layers.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float


def load_balancing_loss(router_stats: dict, num_experts: int) -> Float[Array, ""]:
    """Switch-style L_aux = E * sum_{k,e} f[k,e] * P[e], f and P pooled over all layers' real tokens.

    f[k,e]: fraction of tokens whose k-th choice is expert e; P[e]: mean router probability of e.
    Uniform routing gives top_k. Needs `selected` [L,k,E], `prob_sum` [L,E], `tokens` [L].
    """
    tokens = jnp.sum(router_stats["tokens"])
    f = jnp.sum(router_stats["selected"], axis=0) / tokens  # [k, E]
    p = jnp.sum(router_stats["prob_sum"], axis=0) / tokens  # [E]
    return num_experts * jnp.sum(f * p[None, :])


def router_z_loss(router_stats: dict) -> Float[Array, ""]:
    """Mean over all layers' real tokens of logsumexp(router logits)^2 (ST-MoE's z-loss)."""
    return jnp.sum(router_stats["z_sum"]) / jnp.sum(router_stats["tokens"])


def tokens_per_expert(router_stats: dict) -> Float[Array, "layers experts"]:
    """Real tokens routed to each expert in each layer (any of the top-k choices), for monitoring."""
    return jnp.sum(router_stats["selected"], axis=1)
