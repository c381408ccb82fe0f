"""One-token lightning-attention decode step: ``S <- lam*S + k^T v``, ``o = q S`` with an fp32 state.

A pure bandwidth problem (0.5 FLOP per byte of fp32 state), so the Pallas kernel is elementwise (no dot: M would be
1) over a grid (batch, heads, dv tiles) and updates the state in place through ``input_output_aliases``; donate the
state under ``jax.jit`` to avoid a copy. q and k travel as [dk, 1] columns so neither backend transposes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float

F32 = jnp.float32


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


def _decode_kernel(decay_ref, q_ref, k_ref, v_ref, state_ref, out_ref, new_state_ref):
    state = decay_ref[...] * state_ref[...] + k_ref[...].astype(F32) * v_ref[...].astype(F32)
    new_state_ref[...] = state
    out_ref[...] = jnp.sum(q_ref[...].astype(F32) * state, axis=0, keepdims=True).astype(out_ref.dtype)


def check_shapes(dk: int, dv: int) -> None:
    for name, n in (("head_dim of q/k", dk), ("head_dim of v", dv)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"lightning_decode_step(impl='pallas_gpu'): {name} = {n}; the Triton kernel needs a "
                             f"power of two >= 16 (use impl='xla' for other shapes)")


@functools.partial(jax.jit, static_argnames=("backend", "interpret"))
def lightning_decode_step_pallas(q, k, v, slopes, state, *, backend: str, interpret: bool):
    """Pallas decode step; ``backend`` "gpu" (Triton) or "tpu" (Mosaic, whole rows of dv per program)."""
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    if backend == "gpu":
        check_shapes(dk, dv)
        block_v, params = min(dv, 64), plt.CompilerParams(num_warps=8, num_stages=1)
    else:
        block_v, params = dv, pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
        interpret = pltpu.InterpretParams() if interpret else False
    column = pl.BlockSpec((None, None, dk, 1), lambda b, h, j: (b, h, 0, 0))
    row = pl.BlockSpec((None, None, 1, block_v), lambda b, h, j: (b, h, 0, j))
    tile = pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j))
    decay = jnp.exp(-slopes.astype(F32))[:, None, None]
    out, state = pl.pallas_call(
        _decode_kernel,
        grid=(batch, heads, dv // block_v),
        in_specs=[pl.BlockSpec((None, 1, 1), lambda b, h, j: (h, 0, 0)), column, column, row, tile],
        out_specs=[row, tile],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, 1, dv), q.dtype), jax.ShapeDtypeStruct(state.shape, F32)],
        input_output_aliases={4: 1},
        compiler_params=params,
        interpret=interpret,
        name="lightning_decode",
    )(decay, q[..., None], k[..., None], v[:, :, None, :], state.astype(F32))
    return out[:, :, 0], state
