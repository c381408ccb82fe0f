"""Reference grouped matmuls: XLA's ragged dots, the oracle for the Pallas kernels.

With rows of `lhs` sorted by group, g(r) the group of row r and S = sum(group_sizes) <= m:
    grouped_matmul(lhs, rhs)[r]        = lhs[r] @ rhs[g(r)]   for r < S, and 0 for r >= S
    transposed_grouped_matmul(lhs, d)[g] = sum over rows r of g of outer(lhs[r], d[r])  (0 if g is empty)
The second is the rhs-gradient of the first.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def grouped_matmul(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "groups k n"],
    group_sizes: Int[Array, " groups"],
    preferred_element_type: jnp.dtype | None = None,
) -> Float[Array, "m n"]:
    """Per group g: lhs[rows of g] @ rhs[g]; zeros past sum(group_sizes)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)


def transposed_grouped_matmul(
    lhs: Float[Array, "m k"],
    dout: Float[Array, "m n"],
    group_sizes: Int[Array, " groups"],
    preferred_element_type: jnp.dtype | None = None,
) -> Float[Array, "groups k n"]:
    """Per group g: lhs[rows of g]^T @ dout[rows of g]."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
    )
    return jax.lax.ragged_dot_general(
        lhs, dout, group_sizes, dims, preferred_element_type=preferred_element_type
    )
