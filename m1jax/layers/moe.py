"""Top-k mixture of SwiGLU experts (architecture.md §7).

Routing: fp32 softmax over all experts, then top-k, then the top-k weights renormalised (kept fp32, as the
transformers port). Three single-device dispatches compute the same function: `dense` runs every expert on every
token (the reference), `ragged` sorts token copies by expert and uses grouped matmuls, `gather` multiplies each
token copy by its own expert's weights (no sort or tile schedule: the fewest launches, for a few tokens at decode);
`ep` (layers/moe_ep.py) runs them expert-parallel on the current mesh. `auto` picks `ep` under a multi-device
mesh, else on a GPU `gather` when the token copies are at most half the experts (decode), else `ragged`.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from m1jax.config import ModelConfig
from m1jax.layers.common import ACTIVATIONS, dense_param, fp32_matmul
from m1jax.layers.moe_ep import grouped_swiglu, resolve_dispatch
from m1jax.sharding import length_pieces
from pallas_kernels import grouped_matmul
from pallas_kernels.expert_matmul import expert_matmul


def route(x: Float[Array, "tokens d"], router: Float[Array, "d experts"], top_k: int,
          threshold: Float[Array, " tokens"] | None = None):
    """Return (router logits fp32, all-expert probabilities, top-k renormalised weights, top-k expert ids).

    With `threshold` (inference only), a selected expert whose renormalised weight is below it gets weight 0
    (skipped; the other weights are not renormalised again); the top choice is always kept.
    """
    logits = fp32_matmul(x, router)  # a true fp32 product, so near-ties route as the reference does
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, -1, keepdims=True)
    if threshold is not None:
        weights = jnp.where((weights >= threshold[:, None]) | (jnp.arange(top_k) == 0), weights, 0.0)
    return logits, probs, weights, experts


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


def row_routing(experts: Int[Array, "tokens k"], weights: Float[Array, "tokens k"],
                token_mask: Float[Array, "batch seq"], num_experts: int) -> dict:
    """Per batch row: real tokens that selected each expert, and how many of those selections were skipped."""
    b = token_mask.shape[0]
    chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * token_mask.reshape(-1, 1, 1)  # [T, k, E]
    skipped = chosen * (weights == 0)[..., None]
    return {"row_selected": chosen.reshape(b, -1, num_experts).sum(1),
            "row_skipped": skipped.reshape(b, -1, num_experts).sum(1)}


def experts_dense(x, w1, w3, w2, weights, experts, act):
    """Reference dispatch: every expert on every token, combined with the (mostly zero) routing weights."""
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, w1.shape[0], dtype=weights.dtype))
    h = act(jnp.einsum("td,edi->tei", x, w1)) * jnp.einsum("td,edi->tei", x, w3)
    y = jnp.einsum("tei,eid->ted", h, w2)
    return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine).astype(x.dtype)


def experts_ragged(x, w1, w3, w2, weights, experts, act, grouped_matmul=grouped_matmul):
    """Sorted dispatch: token copies sorted by expert, three grouped matmuls, weighted scatter-add back."""
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    xs = x[token_of]
    sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    y = grouped_swiglu(xs, w1, w3, w2, sizes, act, grouped_matmul).astype(jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    return jax.ops.segment_sum(y, token_of, num_segments=t).astype(x.dtype)


def experts_gather(x, w1, w3, w2, weights, experts, act):
    """Per-copy dispatch: each token times its own top-k experts' weights, weighted sum of the k outputs."""
    t, k = experts.shape
    h = act(expert_matmul(x, w1, experts)) * expert_matmul(x, w3, experts)  # [t, k, i]
    y = expert_matmul(h.reshape(t * k, -1), w2, experts.reshape(t * k, 1), out_dtype=jnp.float32)
    return jnp.einsum("tkd,tk->td", y.reshape(t, k, -1), weights).astype(x.dtype)


DISPATCH = {"dense": experts_dense, "ragged": experts_ragged, "gather": experts_gather}


def choose_dispatch(dispatch, copies: int, num_experts: int):
    """resolve_dispatch, with `auto` on one GPU taking `gather` for at most num_experts / 2 token copies: then
    each selected expert is read about once either way, and gather launches a third as many kernels (on CPU the
    gather's reference copies the weights, and ragged stays faster)."""
    resolved = resolve_dispatch(dispatch)
    if dispatch == "auto" and resolved == "ragged" and 2 * copies <= num_experts and jax.default_backend() == "gpu":
        return "gather"
    return resolved


def piece_major(a: Float[Array, "batch seq *rest"], pieces: int) -> Float[Array, "tokens *rest"]:
    """[batch, seq, ...] -> [tokens, ...] in the order (piece, row, position in the piece): with the sequence split
    over the context axis in `pieces`, each device's tokens stay a contiguous block ("tokens" in m1jax.sharding),
    so flattening moves nothing (row-major order would gather the sequences)."""
    b, n = a.shape[:2]
    return a.reshape(b, pieces, n // pieces, *a.shape[2:]).swapaxes(0, 1).reshape(b * n, *a.shape[2:])


def batch_major(a: Float[Array, "tokens *rest"], batch: int, pieces: int) -> Float[Array, "batch seq *rest"]:
    """The inverse of piece_major."""
    t = a.shape[0]
    return a.reshape(pieces, batch, t // (batch * pieces), *a.shape[1:]).swapaxes(0, 1).reshape(
        batch, t // batch, *a.shape[1:])


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs):
        d, i, e = config.hidden_size, config.intermediate_size, config.num_experts
        dt = config.jnp_dtype
        self.router = dense_param(rngs, (d, e), d, jnp.float32, stack)
        self.w1 = dense_param(rngs, (e, d, i), d, dt, stack)
        self.w3 = dense_param(rngs, (e, d, i), d, dt, stack)
        self.w2 = dense_param(rngs, (e, i, d), i, dt, stack)
        self.config = config

    def __call__(self, h: Float[Array, "batch seq d"], token_mask: Float[Array, "batch seq"], dispatch: str = "ragged",
                 expert_threshold: Array | float | None = None):
        """`expert_threshold` (scalar or [batch]; see `route`) also adds per-row counts to the stats."""
        cfg = self.config
        b, n, d = h.shape
        pieces = length_pieces(n)
        x, mask = piece_major(h, pieces), piece_major(token_mask, pieces)
        threshold = None if expert_threshold is None else piece_major(jnp.broadcast_to(
            jnp.reshape(jnp.asarray(expert_threshold, jnp.float32), (-1, 1)), (b, n)), pieces)
        logits, probs, weights, experts = route(x, self.router[...], cfg.num_experts_per_tok, threshold)
        args = (x, self.w1[...], self.w3[...], self.w2[...], weights, experts, ACTIVATIONS[cfg.hidden_act])
        dispatch = choose_dispatch(dispatch, b * n * cfg.num_experts_per_tok, cfg.num_experts)
        if isinstance(dispatch, str):
            y, dropped = DISPATCH[dispatch](*args), jnp.zeros((), jnp.float32)
        else:  # expert parallel on the current mesh (m1jax.layers.moe_ep)
            y, dropped = dispatch(*args, token_mask=mask)
        stats = router_stats(logits, probs, experts, mask) | {"dropped": dropped}
        if threshold is not None:
            by_row = lambda a: batch_major(a, b, pieces).reshape(b * n, -1)
            stats.update(row_routing(by_row(experts), by_row(weights), token_mask, cfg.num_experts))
        return batch_major(y, b, pieces), stats
