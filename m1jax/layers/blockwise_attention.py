"""Softmax attention over blocks of key slots with an online softmax (FlashAttention's algorithm, in XLA).

The scores of a chunk of n queries against S key slots take n * S * heads fp32 numbers: at M1's 1M-token context a
2048-token prefill chunk would need half a terabyte per softmax layer. Here the keys are visited `block` slots at a
time, keeping a running maximum, normaliser and output per query, so memory grows with n * block; slots past the
last query's causal frontier are not visited. The backward (a `jax.custom_vjp`) recomputes each block's
probabilities from the saved log-sum-exp instead of storing them. Fully masked queries (left padding) output 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)


class KeyMask(NamedTuple):
    """Which key slots each query may read: valid slots at or before its own slot, in its own packed segment."""

    key_valid: Bool[Array, "batch slots"]
    query_slot: Int[Array, " seq"]
    query_segment: Int[Array, "batch seq"] | None = None
    key_segment: Int[Array, "batch slots"] | None = None

    def block(self, start, size: int) -> Bool[Array, "batch 1 1 seq size"]:
        slots = start + jnp.arange(size)
        ok = jax.lax.dynamic_slice_in_dim(self.key_valid, start, size, 1)[:, None, :]
        ok = ok & (slots[None, None, :] <= self.query_slot[None, :, None])
        if self.query_segment is not None:
            key_segment = jax.lax.dynamic_slice_in_dim(self.key_segment, start, size, 1)
            ok = ok & (self.query_segment[:, :, None] == key_segment[:, None, :])
        return ok[:, None, None]


def blockwise_attention(
    q: Float[Array, "batch seq kv_heads groups head_dim"],
    k: Float[Array, "batch slots kv_heads head_dim"],
    v: Float[Array, "batch slots kv_heads head_dim"],
    mask: KeyMask,
    *,
    block: int,
    scale: float,
) -> Float[Array, "batch seq kv_heads groups head_dim"]:
    """softmax(scale * q k^T, masked) v in fp32, for grouped queries (query head (h, g) reads KV head h)."""
    slots = k.shape[1]
    block = min(block, slots)
    pad = -slots % block
    if pad:
        widen = lambda a, value=0: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=value)
        k, v = widen(k), widen(v)
        mask = mask._replace(key_valid=widen(mask.key_valid, False),
                             key_segment=None if mask.key_segment is None else widen(mask.key_segment))
    last = mask.query_slot[-1]  # the queries are consecutive slots: the last one sees the most keys
    blocks = jnp.minimum((last + block) // block, k.shape[1] // block)
    out = _attend(q, k, v, mask, blocks, block, scale)
    return out.transpose(0, 3, 1, 2, 4)


def _scores(q, k_block, scale):
    return jnp.einsum("bqkgd,bskd->bkgqs", q, k_block, preferred_element_type=F32) * scale


def _forward(q, k, v, mask, blocks, block, scale):
    b, n, kv, g, _ = q.shape
    rows = (b, kv, g, n)

    def visit(j, carry):
        m, l, acc = carry
        start = j * block
        ok = mask.block(start, block)
        s = jnp.where(ok, _scores(q, jax.lax.dynamic_slice_in_dim(k, start, block, 1), scale), NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        rescale = jnp.exp(m - m_new)
        v_block = jax.lax.dynamic_slice_in_dim(v, start, block, 1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_block, preferred_element_type=F32)
        return m_new, rescale * l + p.sum(-1), rescale[..., None] * acc + pv

    init = (jnp.full(rows, NEG, F32), jnp.zeros(rows, F32), jnp.zeros(rows + (v.shape[-1],), F32))
    m, l, acc = jax.lax.fori_loop(0, blocks, visit, init)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q, k, v, mask, blocks, block, scale):
    return _forward(q, k, v, mask, blocks, block, scale)[0]


def _attend_fwd(q, k, v, mask, blocks, block, scale):
    out, lse = _forward(q, k, v, mask, blocks, block, scale)
    return out, (q, k, v, mask, blocks, out, lse)


def _attend_bwd(block, scale, residuals, d_out):
    q, k, v, mask, blocks, out, lse = residuals
    delta = jnp.sum(d_out * out, -1)  # [b, kv, g, n]
    q32 = q.astype(F32)

    def visit(j, carry):
        dq, dk, dv = carry
        start = j * block
        k_block = jax.lax.dynamic_slice_in_dim(k, start, block, 1).astype(F32)
        v_block = jax.lax.dynamic_slice_in_dim(v, start, block, 1).astype(F32)
        p = jnp.where(mask.block(start, block), jnp.exp(_scores(q32, k_block, scale) - lse[..., None]), 0.0)
        dp = jnp.einsum("bkgqd,bskd->bkgqs", d_out, v_block)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_block)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, jnp.einsum("bkgqs,bqkgd->bskd", ds, q32), start, 1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, jnp.einsum("bkgqs,bkgqd->bskd", p, d_out), start, 1)
        return dq, dk, dv

    zeros = lambda a: jnp.zeros(a.shape, F32)
    dq, dk, dv = jax.lax.fori_loop(0, blocks, visit, (zeros(q), zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
