"""Parameter initialisation and activations shared by the layers."""

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def dense_param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype, stack: tuple[int, ...] = ()) -> nnx.Param:
    """A weight drawn from N(0, 1/fan_in) (LeCun normal), with optional leading stacked (scanned) axes."""
    w = jax.random.normal(rngs.params(), stack + shape, jnp.float32) / jnp.sqrt(fan_in)
    return nnx.Param(w.astype(dtype))
