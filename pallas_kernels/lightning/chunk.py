"""In-kernel chunk math shared by the GPU (Triton) and TPU (Mosaic) lightning kernels.

For the chunk of ``C`` tokens starting at global token ``start``, with ``n`` valid rows (the rest is padding) and
decay ``lam = exp(-s)`` (kernels.md §1.2, with inclusive decay)::

    a_i = lam^(i+1)            q-decay, from the state entering the chunk to row i
    b_i = lam^(n-1-i), i < n   k-decay, from row i to the last valid row
    gamma = lam^n              chunk decay
    D_ij = lam^(i-j), i >= j   intra-chunk decay

With packed segments, ``a`` keeps only rows of the segment open at the chunk start, ``b`` only rows of the chunk's
last segment, ``D`` only same-segment pairs, and ``gamma`` is 0 if a segment starts inside the chunk.
Everything is 2-D (columns ``[C, 1]``) so that both backends lower it; exponents are masked, never results.
"""

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ChunkFactors:
    a: jax.Array       # [C, 1]
    b: jax.Array       # [C, 1]
    gamma: jax.Array   # [1, 1]
    intra: jax.Array   # [C, C]


def decay_pow(s, power):
    """``exp(-s * power)`` where ``power >= 0``, else 0."""
    return jnp.where(power >= 0, jnp.exp(-s * jnp.maximum(power, 0).astype(F32)), 0.0)


def rows(chunk: int):
    return jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)


def intra_decay(s, chunk: int):
    """``D`` without segment masks: the same for every chunk, so kernels build it once."""
    diff = rows(chunk) - jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return decay_pow(s, diff)


def chunk_factors(s, start, seq: int, intra, segments=None) -> ChunkFactors:
    """Factors of one chunk; ``segments = (seg_col [C,1], seg_row [1,C], seg_prev_col [C,1])`` when packed."""
    chunk = intra.shape[0]
    i = rows(chunk)
    n_valid = jnp.clip(seq - start, 0, chunk)
    a = decay_pow(s, i + 1)
    b = decay_pow(s, n_valid - 1 - i)
    gamma = decay_pow(s, jnp.full((1, 1), n_valid, jnp.int32))
    if segments is not None:
        seg_col, seg_row, seg_prev_col = segments
        seg_open = jnp.min(seg_prev_col, axis=0, keepdims=True)   # [1, 1]: no vector-to-scalar extraction
        seg_last = jnp.max(seg_col, axis=0, keepdims=True)
        a = jnp.where(seg_col == seg_open, a, 0.0)
        b = jnp.where(seg_col == seg_last, b, 0.0)
        gamma = jnp.where(seg_last == seg_open, gamma, 0.0)
        intra = jnp.where(seg_col == seg_row, intra, 0.0)
    return ChunkFactors(a, b, gamma, intra)


def scale_rows(x, w):
    """``x * w`` for a [C, 1] weight column, computed in fp32 and returned in x's dtype (a dot operand)."""
    return (x.astype(F32) * w).astype(x.dtype)


def _precision(x):
    return jax.lax.Precision.HIGHEST if x.dtype == F32 else None


def mm(x, y):
    """``x @ y`` with fp32 accumulation (full fp32 for fp32 operands: no TF32 / bf16 passes)."""
    return jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=_precision(x), preferred_element_type=F32)


def mm_t(x, y):
    """``x @ y.T``."""
    return jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=_precision(x), preferred_element_type=F32)


def t_mm(x, y):
    """``x.T @ y``."""
    return mm(x.T, y)
