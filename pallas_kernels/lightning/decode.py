"""One-token lightning-attention decode step: ``S <- lam*S + k^T v``, ``o = q S`` with an fp32 state."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def lightning_decode_step_xla(
    q: Float[Array, "batch heads dk"],
    k: Float[Array, "batch heads dk"],
    v: Float[Array, "batch heads dv"],
    slopes: Float[Array, " heads"],
    state: Float[Array, "batch heads dk dv"],
) -> tuple[Float[Array, "batch heads dv"], Float[Array, "batch heads dk dv"]]:
    """Pure-JAX decode step; the reference for the Pallas kernel."""
    dtype = state.dtype
    decay = jnp.exp(-slopes.astype(dtype))[None, :, None, None]
    state = decay * state + k.astype(dtype)[..., :, None] * v.astype(dtype)[..., None, :]
    out = jnp.einsum("bhk,bhkv->bhv", q.astype(dtype), state, precision="highest")
    return out.astype(q.dtype), state
