"""Pallas kernels for the selected-expert matmul: one program per (token copy, output tile).

At decode a step routes a handful of tokens, so the cost is reading each selected expert's weights once; a
grouped matmul would first sort the copies and build a tile schedule (a dozen small launches) and then compute
128-row tiles holding one real row. Here program (r, j) reads row r of x as a column and the [k, block_n] panel
of its expert's weights, block_k rows at a time, and multiplies elementwise (no dot: M would be 1, below the
tensor cores' minimum), accumulating in fp32. The GPU kernel (Triton) reads the expert id from a ref and indexes
the weights with it; the TPU kernel (Mosaic) prefetches the ids as scalars and lets the weight BlockSpec follow
them, with the contraction on an "arbitrary" grid axis accumulating into a VMEM scratch.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

F32 = jnp.float32
GPU_BLOCK_K, GPU_PROGRAMS = 256, 256  # narrow panels until there are ~2 programs per SM (latency hiding)
TPU_BLOCKS = (512, 512)


def default_blocks(backend: str, copies: int, k: int, n: int) -> tuple[int, int]:
    """(block_k, block_n): on GPU the widest panel <= 64 that still gives GPU_PROGRAMS programs (>= 16)."""
    if backend == "tpu":
        return fit(k, TPU_BLOCKS[0], "k", 128), fit(n, TPU_BLOCKS[1], "n", 128)
    block_n = fit(n, 64, "n", 16)
    while block_n > 16 and copies * (n // block_n) < GPU_PROGRAMS:
        block_n //= 2
    return fit(k, GPU_BLOCK_K, "k", 16), block_n


def fit(dim: int, block: int, name: str, minimum: int) -> int:
    """The largest power of two <= block dividing dim; ValueError below `minimum` (the kernel's smallest tile)."""
    while block > 1 and dim % block:
        block //= 2
    if block < minimum:
        raise ValueError(f"expert_matmul: {name}={dim} has no power-of-two divisor >= {minimum}; pad it or use "
                         f"impl='reference'")
    return block


def check(backend: str, k: int, n: int, blocks: tuple[int, int] | None = None) -> None:
    """Refuse sizes and blocks the compiled kernel cannot tile (interpret mode would not notice)."""
    minimum = 16 if backend == "gpu" else 128
    if blocks is not None:
        for name, dim, block in (("block_k", k, blocks[0]), ("block_n", n, blocks[1])):
            if block < minimum or block & (block - 1) or dim % block:
                raise ValueError(f"expert_matmul: {name}={block} must be a power of two >= {minimum} dividing {dim}")
    default_blocks(backend, 1, k, n)


def _gpu_kernel(ids_ref, x_ref, w_ref, out_ref, *, top_k: int, block_k: int, block_n: int):
    copy, tile = pl.program_id(0), pl.program_id(1)
    expert = ids_ref[copy]
    cols = pl.ds(pl.multiple_of(tile * block_n, block_n), block_n)

    def step(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        return acc + x_ref[jax.lax.div(copy, top_k), ks, :].astype(F32) * w_ref[expert, ks, cols].astype(F32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step, jnp.zeros((block_k, block_n), F32))
    out_ref[copy, :, cols] = jnp.sum(acc, axis=0, keepdims=True).astype(out_ref.dtype)


def _tpu_kernel(ids_ref, x_ref, w_ref, out_ref, acc_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.sum(x_ref[...].astype(F32) * w_ref[...].astype(F32), axis=0, keepdims=True)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("backend", "out_dtype", "interpret", "blocks"))
def expert_matmul_pallas(
    x: Float[Array, "tokens k"], w: Float[Array, "experts k n"], experts: Int[Array, "tokens top_k"], *,
    backend: str, out_dtype: jnp.dtype, interpret: bool, blocks: tuple[int, int] | None = None,
) -> Float[Array, "tokens top_k n"]:
    """out[t, j] = x[t] @ w[experts[t, j]] on the "gpu" (Triton) or "tpu" (Mosaic) backend; `blocks`:
    (block_k, block_n), default `default_blocks`."""
    tokens, top_k = experts.shape
    k, n = w.shape[1:]
    copies = tokens * top_k
    block_k, block_n = blocks or default_blocks(backend, copies, k, n)
    ids = experts.reshape(copies).astype(jnp.int32)
    x_col = x[..., None]  # [tokens, k, 1]: rows travel as columns, so neither backend transposes
    out_shape = jax.ShapeDtypeStruct((copies, 1, n), out_dtype)
    if backend == "gpu":
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, top_k=top_k, block_k=block_k, block_n=block_n),
            grid=(copies, n // block_n),
            out_shape=out_shape,
            compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
            interpret=interpret,
            name="expert_matmul",
        )(ids, x_col, w)
    else:
        out = pl.pallas_call(
            _tpu_kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=(copies, n // block_n, k // block_k),
                in_specs=[pl.BlockSpec((None, block_k, 1), lambda c, j, i, ids: (jax.lax.div(c, top_k), i, 0)),
                          pl.BlockSpec((None, block_k, block_n), lambda c, j, i, ids: (ids[c], i, j))],
                out_specs=pl.BlockSpec((None, 1, block_n), lambda c, j, i, ids: (c, 0, j)),
                scratch_shapes=[pltpu.VMEM((1, block_n), F32)],
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="expert_matmul",
        )(ids, x_col, w)
    return out.reshape(tokens, top_k, n)
