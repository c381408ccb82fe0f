"""Top-k mixture of SwiGLU experts (architecture.md §7).

Routing: fp32 softmax over all experts, then top-k, then the top-k weights renormalised (kept fp32, as the
transformers port). Two single-device dispatches compute the same function: `dense` runs every expert on every
token (the reference), `ragged` sorts token copies by expert and uses grouped matmuls.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from m1jax.config import ModelConfig
from m1jax.layers.common import ACTIVATIONS, dense_param


def route(x: Float[Array, "tokens d"], router: Float[Array, "d experts"], top_k: int):
    """Return (router logits fp32, all-expert probabilities, top-k renormalised weights, top-k expert ids)."""
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    return logits, probs, weights / jnp.sum(weights, -1, keepdims=True), experts


def router_stats(logits, probs, experts: Int[Array, "tokens k"], token_mask: Float[Array, " tokens"]) -> dict:
    """Masked per-layer sums the pooled auxiliary losses and monitoring need (architecture.md §7.3)."""
    m = token_mask.astype(jnp.float32)
    chosen = jax.nn.one_hot(experts, probs.shape[-1], dtype=jnp.float32)  # [T, k, E]
    return {
        "selected": jnp.einsum("t,tke->ke", m, chosen),  # tokens whose k-th choice is e
        "prob_sum": m @ probs,  # [E]
        "z_sum": m @ jnp.square(jax.nn.logsumexp(logits, axis=-1)),
        "tokens": jnp.sum(m),
    }


def experts_dense(x, w1, w3, w2, weights, experts, act):
    """Reference dispatch: every expert on every token, combined with the (mostly zero) routing weights."""
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, w1.shape[0], dtype=weights.dtype))
    h = act(jnp.einsum("td,edi->tei", x, w1)) * jnp.einsum("td,edi->tei", x, w3)
    y = jnp.einsum("tei,eid->ted", h, w2)
    return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine).astype(x.dtype)


def experts_ragged(x, w1, w3, w2, weights, experts, act, grouped_matmul=jax.lax.ragged_dot):
    """Sorted dispatch: token copies sorted by expert, three grouped matmuls, weighted scatter-add back."""
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    xs = x[token_of]
    sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    h = act(grouped_matmul(xs, w1, sizes)) * grouped_matmul(xs, w3, sizes)
    y = grouped_matmul(h, w2, sizes).astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jax.ops.segment_sum(y, token_of, num_segments=t).astype(x.dtype)


DISPATCH = {"dense": experts_dense, "ragged": experts_ragged}


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs):
        d, i, e = config.hidden_size, config.intermediate_size, config.num_experts
        dt = config.jnp_dtype
        self.router = dense_param(rngs, (d, e), d, jnp.float32, stack)
        self.w1 = dense_param(rngs, (e, d, i), d, dt, stack)
        self.w3 = dense_param(rngs, (e, d, i), d, dt, stack)
        self.w2 = dense_param(rngs, (e, i, d), i, dt, stack)
        self.config = config

    def __call__(self, h: Float[Array, "batch seq d"], token_mask: Float[Array, "batch seq"], dispatch: str = "ragged"):
        cfg = self.config
        b, n, d = h.shape
        x = h.reshape(b * n, d)
        logits, probs, weights, experts = route(x, self.router[...], cfg.num_experts_per_tok)
        y = DISPATCH[dispatch](x, self.w1[...], self.w3[...], self.w2[...], weights, experts,
                               ACTIVATIONS[cfg.hidden_act])
        return y.reshape(b, n, d), router_stats(logits, probs, experts, token_mask.reshape(-1))
