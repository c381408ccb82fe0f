"""expert_matmul: each token times the weights of its own selected experts (the MoE at decode).

impl="reference" gathers the weights and contracts them in XLA; "pallas_gpu" (Triton) and "pallas_tpu"
(Mosaic) read each selected expert's weights in place (kernel.py). "auto" picks the default backend's kernel
and the reference on CPU. Gradients (rarely needed: training routes many tokens and uses the grouped matmul)
come from the reference's autodiff.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.expert_matmul import kernel, reference

Impl = Literal["auto", "reference", "pallas_gpu", "pallas_tpu"]
_AUTO = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def expert_matmul(
    x: Float[Array, "tokens k"],
    w: Float[Array, "experts k n"],
    experts: Int[Array, "tokens top_k"],
    *,
    impl: Impl = "auto",
    interpret: bool | None = None,
    out_dtype: jnp.dtype | None = None,
    blocks: tuple[int, int] | None = None,
) -> Float[Array, "tokens top_k n"]:
    """out[t, j] = x[t] @ w[experts[t, j]] with fp32 accumulation, in `out_dtype` (default: x's dtype).

    Expert ids must lie in [0, experts): the kernels do not bounds-check them. `interpret`: run a kernel in the
    Pallas interpreter (default: on CPU only). `blocks`: a kernel's (block_k, block_n) (default: kernel.py's).
    """
    if x.ndim != 2 or w.ndim != 3 or experts.ndim != 2 or x.shape[1] != w.shape[1] or experts.shape[0] != x.shape[0]:
        raise ValueError(f"expert_matmul: expected x [tokens, k], w [experts, k, n], experts [tokens, top_k]; got "
                         f"x {x.shape}, w {w.shape}, experts {experts.shape}")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"expert_matmul: expert ids must be integers, got {experts.dtype}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if impl == "auto":
        impl = _AUTO.get(jax.default_backend(), "reference")
        try:
            if impl != "reference":
                kernel.check(impl.removeprefix("pallas_"), *w.shape[1:])
        except ValueError:
            impl = "reference"
    if impl == "reference":
        return reference.expert_matmul(x, w, experts, out_dtype)
    if impl not in ("pallas_gpu", "pallas_tpu"):
        raise ValueError(f"expert_matmul: impl={impl!r} is not one of auto, reference, pallas_gpu, pallas_tpu")
    backend = impl.removeprefix("pallas_")
    kernel.check(backend, *w.shape[1:], blocks=blocks)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _kernel_matmul(backend, out_dtype, interpret, blocks, x, w, experts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel_matmul(backend, out_dtype, interpret, blocks, x, w, experts):
    return kernel.expert_matmul_pallas(x, w, experts, backend=backend, out_dtype=out_dtype, interpret=interpret,
                                       blocks=blocks)


def _kernel_matmul_fwd(backend, out_dtype, interpret, blocks, x, w, experts):
    return _kernel_matmul(backend, out_dtype, interpret, blocks, x, w, experts), (x, w, experts)


def _kernel_matmul_bwd(backend, out_dtype, interpret, blocks, residuals, dout):
    x, w, experts = residuals
    _, vjp = jax.vjp(lambda a, b: reference.expert_matmul(a, b, experts, out_dtype), x, w)
    return (*vjp(dout), None)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)
