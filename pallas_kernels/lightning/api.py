"""Public lightning-attention entry points: shape checks and dispatch to one implementation.

``impl``: "reference" (token recurrence), "xla" (chunked scan), "pallas_gpu" (Pallas Triton kernels),
"pallas_tpu" (Mosaic TPU kernels), or "auto" (pallas_gpu on GPU, pallas_tpu on TPU, xla elsewhere).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.lightning.decode import lightning_decode_step_pallas, lightning_decode_step_xla
from pallas_kernels.lightning import pallas_gpu
from pallas_kernels.lightning.pallas_gpu import lightning_attention_pallas_gpu
from pallas_kernels.lightning.pallas_tpu import lightning_attention_pallas_tpu
from pallas_kernels.lightning.reference import lightning_attention_reference
from pallas_kernels.lightning.xla import lightning_attention_xla

IMPLS = ("reference", "xla", "pallas_gpu", "pallas_tpu", "auto")
XLA_CHUNK, GPU_CHUNK, TPU_CHUNK = 64, 64, 128  # default chunk sizes


def _resolve(impl: str, dk: int, dv: int, chunk_size: int | None) -> tuple[str, int | None]:
    """(impl, chunk_size) to run. "auto" is pallas_gpu on GPU, pallas_tpu on TPU and xla elsewhere; on GPU it falls
    back to xla for head dims the Triton kernels refuse, and ignores a chunk_size they cannot take (the chunk size
    is a tiling choice that does not change the result)."""
    if impl not in IMPLS:
        raise ValueError(f"lightning_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl, chunk_size
    backend = jax.default_backend()
    if backend == "gpu":
        if not pallas_gpu.supports(dk, dv, GPU_CHUNK):
            return "xla", chunk_size
        return "pallas_gpu", chunk_size if chunk_size and pallas_gpu.supports(dk, dv, chunk_size) else None
    if backend == "tpu":
        return "pallas_tpu", chunk_size if chunk_size and chunk_size % 32 == 0 else None
    return "xla", chunk_size


def _check_shapes(q, k, v, slopes, initial_state, segment_ids) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"lightning_attention: q and k must both be [batch, seq, heads, head_dim]; "
                         f"got q {q.shape}, k {k.shape}")
    batch, seq, heads, dk = q.shape
    if seq < 1:
        raise ValueError(f"lightning_attention: empty sequence (q {q.shape})")
    if v.ndim != 4 or v.shape[:3] != (batch, seq, heads):
        raise ValueError(f"lightning_attention: v must be [batch, seq, heads, dv] = [{batch}, {seq}, {heads}, dv]; "
                         f"got {v.shape}")
    if slopes.shape != (heads,):
        raise ValueError(f"lightning_attention: slopes must be [heads] = [{heads}]; got {slopes.shape}")
    for name, x in (("q", q), ("k", k), ("v", v), ("slopes", slopes)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"lightning_attention: {name} must be floating point; got {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"lightning_attention: q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    state_shape = (batch, heads, dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"lightning_attention: initial_state must be [batch, heads, dk, dv] = {state_shape}; "
                         f"got {initial_state.shape}")
    if segment_ids is not None and (segment_ids.shape != (batch, seq)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"lightning_attention: segment_ids must be integer [batch, seq] = [{batch}, {seq}]; "
                         f"got {segment_ids.dtype} {segment_ids.shape}")


def lightning_attention(
    q: Float[Array, "batch seq heads dk"],
    k: Float[Array, "batch seq heads dk"],
    v: Float[Array, "batch seq heads dv"],
    slopes: Float[Array, " heads"],
    *,
    initial_state: Float[Array, "batch heads dk dv"] | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "batch seq heads dv"], Float[Array, "batch heads dk dv"]]:
    """Causal linear attention with a fixed per-head decay ``exp(-slope)`` (MiniMax lightning attention).

    ``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. Returns ``(out, final_state)``: out in q.dtype,
    the state in fp32. ``segment_ids`` resets the state where a new packed segment starts; the final state is then
    that of the last segment. ``interpret`` (Pallas impls only) defaults to True on CPU. Slopes are constants
    (buffers in MiniMax): no gradient flows to them.
    """
    _check_shapes(q, k, v, slopes, initial_state, segment_ids)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"lightning_attention: chunk_size must be positive; got {chunk_size}")
    slopes = jax.lax.stop_gradient(slopes)
    impl, chunk_size = _resolve(impl, q.shape[-1], v.shape[-1], chunk_size)
    if impl == "reference":
        return lightning_attention_reference(q, k, v, slopes, initial_state, segment_ids)
    if impl == "xla":
        return lightning_attention_xla(q, k, v, slopes, initial_state, segment_ids,
                                       chunk_size=chunk_size or XLA_CHUNK)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if impl == "pallas_gpu":
        return lightning_attention_pallas_gpu(q, k, v, slopes, initial_state, segment_ids,
                                              chunk_size=chunk_size or GPU_CHUNK, interpret=interpret)
    return lightning_attention_pallas_tpu(q, k, v, slopes, initial_state, segment_ids,
                                          chunk_size=chunk_size or TPU_CHUNK, interpret=interpret)


def lightning_decode_step(
    q: Float[Array, "batch heads dk"],
    k: Float[Array, "batch heads dk"],
    v: Float[Array, "batch heads dv"],
    slopes: Float[Array, " heads"],
    state: Float[Array, "batch heads dk dv"],
    *,
    impl: str = "auto",
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch heads dv"], Float[Array, "batch heads dk dv"]]:
    """One decode token: ``state <- exp(-slope) state + k^T v``, ``out = q state``; out in q.dtype, state fp32.

    The Pallas impls update the state in place: donate ``state`` under ``jax.jit`` to avoid a copy.
    """
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"lightning_decode_step: q, k must be [batch, heads, dk] and v [batch, heads, dv]; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    batch, heads, dk = q.shape
    state_shape = (batch, heads, dk, v.shape[-1])
    if slopes.shape != (heads,) or state.shape != state_shape:
        raise ValueError(f"lightning_decode_step: expected slopes [{heads}] and state {state_shape}; got "
                         f"{slopes.shape} and {state.shape}")
    impl, _ = _resolve(impl, dk, v.shape[-1], None)
    if impl in ("reference", "xla"):
        return lightning_decode_step_xla(q, k, v, slopes, state)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return lightning_decode_step_pallas(q, k, v, slopes, state, backend=impl.removeprefix("pallas_"),
                                        interpret=interpret)
