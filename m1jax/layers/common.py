"""Parameter initialisation, activations and the full-precision fp32 matmul shared by the layers."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# Up to this many rows the three bf16 parts of fp32_matmul go through one matmul (one pass over the weights:
# decode, last-token prefill); above it, three accumulated products keep memory at one output's size.
STACKED_ROWS = 256


def fp32_matmul(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
    """fp32(x) @ fp32(w) at full fp32 precision (accelerators' default fp32 matmul is TF32 on recent GPUs and bf16
    passes on TPU), fast when w is bf16.

    A bf16 w is exact in bf16, so x is split exactly into three bf16 parts (8 significant bits each, 24 in all)
    and the products run on the bf16 units with fp32 accumulation: exact products, fp32 sums, and w read as bf16
    (no fp32 copy). Other weight dtypes take a Precision.HIGHEST matmul.
    """
    x = x.astype(jnp.float32)
    if w.dtype != jnp.bfloat16:
        return jnp.matmul(x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    parts, rest = [], x
    for _ in range(3):
        parts.append(rest.astype(jnp.bfloat16))
        rest = rest - parts[-1].astype(jnp.float32)
    product = lambda a: jnp.matmul(a, w, preferred_element_type=jnp.float32)
    if math.prod(x.shape[:-1]) <= STACKED_ROWS:
        out = product(jnp.stack(parts))
        return (out[2] + out[1]) + out[0]
    return (product(parts[2]) + product(parts[1])) + product(parts[0])


def dense_param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype, stack: tuple[int, ...] = ()) -> nnx.Param:
    """A weight drawn from N(0, 1/fan_in) (LeCun normal), with optional leading stacked (scanned) axes."""
    w = jax.random.normal(rngs.params(), stack + shape, jnp.float32) / jnp.sqrt(fan_in)
    return nnx.Param(w.astype(dtype))
