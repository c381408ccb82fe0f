"""grouped_matmul: the MoE expert matmul over rows sorted by expert, with a choice of implementation.

impl="reference" is jax.lax.ragged_dot; "pallas_gpu" (Triton) and "pallas_tpu" (Mosaic) are megablox-style
kernels whose backward runs on kernels too: dlhs = grouped_matmul(dout, rhs^T) and drhs = the transposed
grouped matmul (per group lhs_g^T @ dout_g). "auto" picks the kernel of the default backend, and the
reference on CPU.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul import pallas_gpu, pallas_tpu, reference
from pallas_kernels.grouped_matmul.tiling import Tiling

Impl = Literal["auto", "reference", "pallas_gpu", "pallas_tpu"]
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
_AUTO = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def grouped_matmul(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "groups k n"],
    group_sizes: Int[Array, " groups"],
    *,
    impl: Impl = "auto",
    interpret: bool | None = None,
    tiling: Tiling | tuple[int, ...] | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> Float[Array, "m n"]:
    """Per group g: lhs[rows of g] @ rhs[g], the same function as jax.lax.ragged_dot.

    lhs rows are sorted by group; group_sizes (int32) sums to at most m and rows past the sum give zeros
    (a larger sum is cut off at m by the kernels). tiling: a Tiling or (block_m, block_k, block_n[,
    num_warps, num_stages]), default per kernel; interpret: run a kernel in the Pallas interpreter
    (default: on CPU only). Kernels accumulate in fp32; their gradients come back in the operand dtypes.
    """
    _check_operands(lhs, rhs, group_sizes)
    if impl == "auto":
        impl = _auto_impl(lhs, rhs, tiling)
    if impl == "reference":
        return reference.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type)
    if impl not in _KERNELS:
        raise ValueError(f"grouped_matmul: impl={impl!r} is not one of auto, reference, {', '.join(_KERNELS)}")
    kernels = _KERNELS[impl]
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"grouped_matmul {impl}: lhs is {lhs.dtype} but rhs is {rhs.dtype}; cast one of them")
    tiling = kernels.DEFAULT_TILING if tiling is None else Tiling(*tiling)
    kernels.check(tiling, k=lhs.shape[1], n=rhs.shape[2])
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
    return _kernel_gmm(impl, tiling, out_dtype, interpret, lhs, rhs, group_sizes.astype(jnp.int32))


def _auto_impl(lhs, rhs, tiling) -> str:
    """The default backend's kernel when it can take these operands, else the reference."""
    impl = _AUTO.get(jax.default_backend(), "reference")
    if impl == "reference" or lhs.dtype != rhs.dtype:
        return "reference"
    kernels = _KERNELS[impl]
    try:
        kernels.check(kernels.DEFAULT_TILING if tiling is None else Tiling(*tiling), k=lhs.shape[1], n=rhs.shape[2])
    except ValueError:
        return "reference"
    return impl


def _check_operands(lhs, rhs, group_sizes) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"grouped_matmul: lhs must be [m, k] and rhs [groups, k, n], got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul: lhs {lhs.shape} and rhs {rhs.shape} disagree on k")
    if group_sizes.shape != rhs.shape[:1] or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"grouped_matmul: group_sizes must be integers of shape ({rhs.shape[0]},) to match rhs, got "
            f"{group_sizes.dtype}{list(group_sizes.shape)}"
        )
    if rhs.shape[0] == 0:
        raise ValueError("grouped_matmul: rhs has no groups")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel_gmm(impl, tiling, out_dtype, interpret, lhs, rhs, group_sizes):
    return _KERNELS[impl].gmm(lhs, rhs, group_sizes, tiling=tiling, out_dtype=out_dtype, interpret=interpret)


def _kernel_gmm_fwd(impl, tiling, out_dtype, interpret, lhs, rhs, group_sizes):
    out = _kernel_gmm(impl, tiling, out_dtype, interpret, lhs, rhs, group_sizes)
    return out, (lhs, rhs, group_sizes)


def _kernel_gmm_bwd(impl, tiling, out_dtype, interpret, residuals, dout):
    lhs, rhs, group_sizes = residuals
    kernels, dout = _KERNELS[impl], dout.astype(lhs.dtype)
    dlhs = kernels.gmm(
        dout, rhs, group_sizes, tiling=tiling, out_dtype=lhs.dtype, transpose_rhs=True, interpret=interpret
    )
    drhs = kernels.tgmm(lhs, dout, group_sizes, tiling=tiling, out_dtype=rhs.dtype, interpret=interpret)
    return dlhs, drhs, None


_kernel_gmm.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)
