"""Reference selected-expert matmul: gather each token's expert weights, then one batched contraction."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def expert_matmul(
    x: Float[Array, "tokens k"], w: Float[Array, "experts k n"], experts: Int[Array, "tokens top_k"],
    out_dtype: jnp.dtype,
) -> Float[Array, "tokens top_k n"]:
    """out[t, j] = x[t] @ w[experts[t, j]], accumulated in fp32."""
    return jnp.einsum("tk,tjkn->tjn", x, w[experts], preferred_element_type=jnp.float32).astype(out_dtype)
