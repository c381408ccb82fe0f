"""Chunked lightning attention in plain XLA: ``lax.scan`` over chunks, fp32 state (Lightning Attention-2 form).

For chunk c with ``len`` valid rows (only the last chunk may be short), rows i, j < C and decay ``lam``::

    q_decay_i = lam^(i+1)           k_decay_i = lam^(len-1-i) (0 for padding rows)
    intra_ij  = lam^(i-j) [i >= j]  chunk_decay = lam^len
    O_c = ((Q K^T) * intra) V + q_decay * (Q S_{c-1})
    S_c = chunk_decay * S_{c-1} + (k_decay * K)^T V

Segments (packed documents) mask ``intra`` to same-segment pairs, drop the ``Q S_{c-1}`` term for rows outside the
segment that was open when the chunk started, and keep only the chunk's last segment in ``S_c``.
Differentiable by plain autodiff (it saves one state per chunk, so it is meant as fallback and oracle, not for 128K).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.lightning.reference import compute_dtype, segment_starts


def chunk_lengths(seq: int, chunk: int) -> np.ndarray:
    """Valid rows of every chunk when ``seq`` tokens are padded up to a multiple of ``chunk``."""
    n = -(-seq // chunk)
    return np.minimum(chunk, seq - np.arange(n) * chunk)


def segment_index(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Canonical segment numbers 0, 1, 2, ... counting segment starts (so a repeated id is still a new segment)."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)


def lightning_attention_xla(
    q: Float[Array, "batch seq heads dk"],
    k: Float[Array, "batch seq heads dk"],
    v: Float[Array, "batch seq heads dv"],
    slopes: Float[Array, " heads"],
    initial_state: Float[Array, "batch heads dk dv"] | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    chunk_size: int = 64,
) -> tuple[Float[Array, "batch seq heads dv"], Float[Array, "batch heads dk dv"]]:
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    precision = "highest" if jnp.dtype(q.dtype).itemsize >= 4 else None
    dot = lambda spec, a, b: jnp.einsum(spec, a, b, precision=precision, preferred_element_type=dtype)
    chunk = chunk_size
    lengths = chunk_lengths(seq, chunk)
    n = len(lengths)
    pad = n * chunk - seq

    def to_chunks(x):  # [B, T, H, d] -> [n, B, H, C, d]
        x = jnp.pad(x.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(batch, n, chunk, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    s = slopes.astype(dtype)
    idx = jnp.arange(chunk, dtype=dtype)
    q_decay = jnp.exp(-s[:, None] * (idx + 1))[..., None]  # [H, C, 1]
    diff = idx[:, None] - idx[None, :]
    intra = jnp.where(diff >= 0, jnp.exp(-s[:, None, None] * jnp.maximum(diff, 0)), 0.0)  # [H, C, C]

    if segment_ids is None:
        seg_xs = None
    else:
        seg = jnp.pad(segment_index(segment_ids), ((0, 0), (0, pad)), mode="edge")
        seg_c = seg.reshape(batch, n, chunk).transpose(1, 0, 2)  # [n, B, C]
        starts = np.arange(n) * chunk
        seg_open = jnp.where(starts[:, None] == 0, 0, seg[:, np.maximum(starts - 1, 0)].T)  # [n, B]
        seg_last = seg[:, starts + lengths - 1].T  # [n, B]
        seg_xs = (seg_c, seg_open, seg_last)

    def body(state, xs):
        qc, kc, vc, length, segs = xs
        k_decay = jnp.where(idx < length, jnp.exp(-s[:, None] * jnp.maximum(length - 1 - idx, 0)), 0.0)[..., None]
        chunk_decay = jnp.exp(-s * length)[None, :, None, None]
        scores = dot("bhik,bhjk->bhij", qc, kc) * intra
        q_inter, k_state = q_decay * qc, k_decay * kc
        if segs is not None:
            seg_c, seg_open, seg_last = segs
            scores = scores * (seg_c[:, None, :, None] == seg_c[:, None, None, :])
            q_inter = q_inter * (seg_c == seg_open[:, None])[:, None, :, None]
            k_state = k_state * (seg_c == seg_last[:, None])[:, None, :, None]
            chunk_decay = chunk_decay * (seg_last == seg_open)[:, None, None, None]
        out = dot("bhij,bhjv->bhiv", scores, vc) + dot("bhik,bhkv->bhiv", q_inter, state)
        state = chunk_decay * state + dot("bhik,bhiv->bhkv", k_state, vc)
        return state, out

    state = (jnp.zeros((batch, heads, dk, dv), dtype) if initial_state is None
             else initial_state.astype(dtype))
    xs = (to_chunks(q), to_chunks(k), to_chunks(v), jnp.asarray(lengths, dtype), seg_xs)
    state, out = jax.lax.scan(body, state, xs)
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, n * chunk, heads, dv)[:, :seq]
    return out.astype(q.dtype), state
