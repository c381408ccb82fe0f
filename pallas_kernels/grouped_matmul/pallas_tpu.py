"""Grouped matmul kernels for TPU on Mosaic TPU (megablox's gmm and tgmm).

The tile schedule (tiling.py) is scalar-prefetched into SMEM, so each grid step's index maps pick the
row tile and the group's weights from it. The grid is sequential per core, so a row tile straddling a
group boundary is revisited on consecutive steps and each visit writes only its group's rows into the
resident output block. Rows past sum(group_sizes) form one extra group that writes zeros.

Block rules: the last two dims of every block must be multiples of (8, 128) or span the array, so
feature tiles are multiples of 128 (or the whole dim) and tgmm's row chunks are multiples of 128.
fp32 operands are multiplied at HIGHEST precision (Mosaic would round them to bf16 otherwise).
interpret=True runs pltpu.InterpretParams(), the interpreter that follows TPU semantics on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul.tiling import Tiling, make_schedule, pad_rows

DEFAULT_TILING = Tiling(block_m=128, block_k=128, block_n=128)
_LANES, _SUBLANES = 128, 8


def check(tiling: Tiling, *, k: int, n: int) -> None:
    """Raise ValueError unless `tiling` fits Mosaic's (8, 128) block rule (any k and n can be tiled)."""
    del k, n
    if tiling.block_m % _SUBLANES:
        raise ValueError(f"pallas_tpu grouped_matmul: tiling.block_m={tiling.block_m} must be a multiple of 8")
    for name in ("block_k", "block_n"):
        if getattr(tiling, name) % _LANES:
            raise ValueError(
                f"pallas_tpu grouped_matmul: tiling.{name}={getattr(tiling, name)} must be a multiple of 128"
            )


def _fit_lanes(dim: int, block: int) -> int:
    """The largest multiple of 128 <= `block` dividing `dim`, or `dim` itself when 128 does not divide it."""
    if dim % _LANES:
        return dim
    block = min(block, dim)
    while dim % block:
        block -= _LANES
    return block


def _interpret_params(interpret: bool) -> pltpu.InterpretParams | bool:
    """The TPU interpreter (it models TPU block pipelining and revisits) or none."""
    return pltpu.InterpretParams() if interpret else False


def _precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _gmm_kernel(
    offsets_ref, group_ids_ref, row_tiles_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
    *, num_groups: int, transpose_rhs: bool,
):
    work, k_step = pl.program_id(1), pl.program_id(2)
    group = group_ids_ref[work]

    @pl.when(k_step == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group < num_groups)
    def _accumulate():
        dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
        acc_ref[...] += lax.dot_general(
            lhs_ref[...], rhs_ref[...], dims,
            precision=_precision(lhs_ref.dtype), preferred_element_type=jnp.float32,
        )

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _store():
        block_m, block_n = out_ref.shape
        rows = row_tiles_ref[work] * block_m + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
        in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        out_ref[...] = jnp.where(in_group, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "groups k n"],
    group_sizes: Int[Array, " groups"],
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """Per group g: lhs[rows of g] @ rhs[g] (rhs[g]^T if `transpose_rhs`); zeros past sum(group_sizes)."""
    m, k = lhs.shape
    num_groups, n = rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    block_m = tiling.block_m
    block_k, block_n = _fit_lanes(k, tiling.block_k), _fit_lanes(n, tiling.block_n)
    lhs_p = pad_rows(lhs, block_m)
    m_p = lhs_p.shape[0]
    tail = m_p - jnp.minimum(group_sizes.sum(), m_p)
    sched = make_schedule(jnp.concatenate([group_sizes, tail[None]]), m_p, block_m, visit_empty_groups=False)

    def lhs_map(j, t, kk, offsets, group_ids, row_tiles):
        return row_tiles[t], kk

    def rhs_map(j, t, kk, offsets, group_ids, row_tiles):
        group = jnp.minimum(group_ids[t], num_groups - 1)
        return (group, j, kk) if transpose_rhs else (group, kk, j)

    def out_map(j, t, kk, offsets, group_ids, row_tiles):
        return row_tiles[t], j

    rhs_block = (None, block_n, block_k) if transpose_rhs else (None, block_k, block_n)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, num_groups=num_groups, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((m_p, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n // block_n, sched.num_work, k // block_k),
            in_specs=[pl.BlockSpec((block_m, block_k), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((block_m, block_n), out_map),
            scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_params(interpret),
        name="grouped_matmul",
    )(sched.group_offsets, sched.group_ids, sched.row_tiles, lhs_p, rhs)
    return out[:m]


def _tgmm_kernel(offsets_ref, group_ids_ref, row_tiles_ref, lhs_t_ref, dout_ref, out_ref, acc_ref):
    work, last = pl.program_id(2), pl.num_programs(2) - 1
    group = group_ids_ref[work]
    starts_group = (work == 0) | (group_ids_ref[jnp.maximum(work - 1, 0)] != group)
    ends_group = (work == last) | (group_ids_ref[jnp.minimum(work + 1, last)] != group)
    start, end = offsets_ref[group], offsets_ref[group + 1]

    @pl.when(starts_group)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end > start)
    def _accumulate():
        block_m, block_k = lhs_t_ref.shape
        row0 = row_tiles_ref[work] * block_k

        def in_group(shape, dim):
            rows = row0 + lax.broadcasted_iota(jnp.int32, shape, dim)
            return (rows >= start) & (rows < end)

        def masked(ref, dim):
            x = ref[...].astype(jnp.float32)  # select in fp32: older TPUs have no bf16 VPU
            return jnp.where(in_group(x.shape, dim), x, 0).astype(ref.dtype)

        acc_ref[...] += jnp.dot(
            masked(lhs_t_ref, 1), masked(dout_ref, 0),
            precision=_precision(dout_ref.dtype), preferred_element_type=jnp.float32,
        )

    @pl.when(ends_group)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(
    lhs: Float[Array, "m k"],
    dout: Float[Array, "m n"],
    group_sizes: Int[Array, " groups"],
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool = False,
) -> Float[Array, "groups k n"]:
    """Per group g: lhs[rows of g]^T @ dout[rows of g] (zeros for an empty group)."""
    k, n = lhs.shape[1], dout.shape[1]
    num_groups = group_sizes.shape[0]
    block_m, block_n = _fit_lanes(k, tiling.block_m), _fit_lanes(n, tiling.block_n)
    block_k = tiling.block_k  # a row chunk: the lane dim of lhs^T blocks
    lhs_t, dout_p = pad_rows(lhs, block_k).T, pad_rows(dout, block_k)
    sched = make_schedule(group_sizes, dout_p.shape[0], block_k, visit_empty_groups=True)

    def lhs_map(i, j, t, offsets, group_ids, row_tiles):
        return i, row_tiles[t]

    def dout_map(i, j, t, offsets, group_ids, row_tiles):
        return row_tiles[t], j

    def out_map(i, j, t, offsets, group_ids, row_tiles):
        return group_ids[t], i, j

    return pl.pallas_call(
        _tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(k // block_m, n // block_n, sched.num_work),
            in_specs=[pl.BlockSpec((block_m, block_k), lhs_map), pl.BlockSpec((block_k, block_n), dout_map)],
            out_specs=pl.BlockSpec((None, block_m, block_n), out_map),
            scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_params(interpret),
        name="transposed_grouped_matmul",
    )(sched.group_offsets, sched.group_ids, sched.row_tiles, lhs_t, dout_p)
