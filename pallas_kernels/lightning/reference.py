"""Token-by-token lightning-attention recurrence: the oracle every other implementation is tested against.

Per batch row and head, with decay ``lam = exp(-slope)``::

    S_t = lam * S_{t-1} + k_t^T v_t        (S_{-1} = initial_state)
    o_t = q_t S_t                          (no 1/sqrt(d), no normaliser; the current token has weight 1)

With ``segment_ids`` the state is reset to zero before every token whose id differs from the previous token's
(packed documents); ``initial_state`` belongs to the first segment.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def compute_dtype(dtype) -> jnp.dtype:
    """fp32, or float64 for float64 inputs (the float64 recurrence is the test oracle)."""
    return jnp.promote_types(dtype, jnp.float32)


def segment_starts(segment_ids: Int[Array, "batch seq"]) -> Array:
    """True where a token starts a new segment (never at position 0: the initial state belongs to segment 0)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def lightning_attention_reference(
    q: Float[Array, "batch seq heads dk"],
    k: Float[Array, "batch seq heads dk"],
    v: Float[Array, "batch seq heads dv"],
    slopes: Float[Array, " heads"],
    initial_state: Float[Array, "batch heads dk dv"] | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, "batch seq heads dv"], Float[Array, "batch heads dk dv"]]:
    """Exact recurrence (``lax.scan`` over tokens) in fp32, or float64 for float64 inputs."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    decay = jnp.exp(-slopes.astype(dtype))[None, :, None, None]
    state = (jnp.zeros((batch, heads, dk, dv), dtype) if initial_state is None
             else initial_state.astype(dtype))
    if segment_ids is None:
        keep = jnp.ones((seq, batch), dtype)
    else:
        keep = 1.0 - segment_starts(segment_ids).T.astype(dtype)

    def step(s, xs):
        q_t, k_t, v_t, keep_t = xs
        s = keep_t[:, None, None, None] * decay * s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")

    to_time_major = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
    state, out = jax.lax.scan(step, state, (to_time_major(q), to_time_major(k), to_time_major(v), keep))
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state
