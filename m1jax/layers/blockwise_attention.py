"""Softmax attention in blocks of queries and key slots with an online softmax (FlashAttention's algorithm, in XLA).

The scores of a chunk of n queries against S key slots take n * S * heads fp32 numbers: at M1's 1M-token context a
2048-token prefill chunk would need half a terabyte per softmax layer. Here queries are taken `block` at a time, and
for each block the keys `block` slots at a time, keeping a running maximum, normaliser and output per query, so
memory grows with block * block; key blocks past a query block's causal frontier are not visited (half the work of
a causal training sequence). The backward (a `jax.custom_vjp`) recomputes each block's probabilities from the saved
log-sum-exp instead of storing them. Fully masked queries (left padding) output 0.
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

    def queries(self, start, size: int) -> KeyMask:
        """The mask of queries start .. start + size - 1."""
        segment = self.query_segment
        return self._replace(query_slot=jax.lax.dynamic_slice_in_dim(self.query_slot, start, size),
                             query_segment=None if segment is None else
                             jax.lax.dynamic_slice_in_dim(segment, start, size, 1))

    def block(self, start, size: int) -> Bool[Array, "batch 1 1 seq size"]:
        """Whether each query may read key slots start .. start + size - 1."""
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
    """softmax(scale * q k^T, masked) v in fp32, for grouped queries (query head (h, g) reads KV head h), in blocks
    of `block` queries x `block` key slots. The query slots must increase (they are consecutive cache slots)."""
    n, slots = q.shape[1], k.shape[1]
    q_block, k_block = min(block, n), min(block, slots)
    widen = lambda a, pad, value=0: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=value)
    k_pad, q_pad = -slots % k_block, -n % q_block
    k, v = widen(k, k_pad), widen(v, k_pad)
    mask = mask._replace(key_valid=widen(mask.key_valid, k_pad, False),
                         key_segment=None if mask.key_segment is None else widen(mask.key_segment, k_pad))
    # padded queries (sliced off below) repeat the last one's slot and segment: they read only real keys
    q = widen(q, q_pad)
    mask = mask._replace(query_slot=jnp.pad(mask.query_slot, (0, q_pad), mode="edge"),
                         query_segment=None if mask.query_segment is None else
                         jnp.pad(mask.query_segment, ((0, 0), (0, q_pad)), mode="edge"))
    return _attend(q, k, v, mask, q_block, k_block, scale)[:, :n]


def _scores(q, k_block, scale):
    return jnp.einsum("bqkgd,bskd->bkgqs", q, k_block, preferred_element_type=F32) * scale


def _frontier(mask: KeyMask, k_block: int, k_blocks: int):
    """How many key blocks a query block reads: up to its last query's slot (causal)."""
    return jnp.minimum((mask.query_slot[-1] + k_block) // k_block, k_blocks)


def _query_block(q, k, v, mask, k_block, scale):
    """Output [b, kv, g, qb, d] and log-sum-exp [b, kv, g, qb] of one block of queries (0 where they read nothing)."""
    b, n, kv, g, _ = q.shape
    rows = (b, kv, g, n)

    def visit(j, carry):
        m, l, acc = carry
        start = j * k_block
        ok = mask.block(start, k_block)
        s = jnp.where(ok, _scores(q, jax.lax.dynamic_slice_in_dim(k, start, k_block, 1), scale), NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        rescale = jnp.exp(m - m_new)
        v_block = jax.lax.dynamic_slice_in_dim(v, start, k_block, 1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_block, preferred_element_type=F32)
        return m_new, rescale * l + p.sum(-1), rescale[..., None] * acc + pv

    init = (jnp.full(rows, NEG, F32), jnp.zeros(rows, F32), jnp.zeros(rows + (v.shape[-1],), F32))
    m, l, acc = jax.lax.fori_loop(0, _frontier(mask, k_block, k.shape[1] // k_block), visit, init)
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    return jnp.where(seen[..., None], acc / l[..., None], 0.0), jnp.where(seen, m + jnp.log(l), 0.0)


def _forward(q, k, v, mask, q_block, k_block, scale):
    """Outputs [b, n, kv, g, d] and log-sum-exps [query blocks, b, kv, g, qb], one query block after another."""
    b, n, kv, g, d = q.shape

    def one(i):
        start = i * q_block
        return _query_block(jax.lax.dynamic_slice_in_dim(q, start, q_block, 1), k, v,
                            mask.queries(start, q_block), k_block, scale)

    out, lse = jax.lax.map(one, jnp.arange(n // q_block))  # out [blocks, b, kv, g, qb, d]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n, kv, g, d), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, mask, q_block, k_block, scale):
    return _forward(q, k, v, mask, q_block, k_block, scale)[0]


def _attend_fwd(q, k, v, mask, q_block, k_block, scale):
    out, lse = _forward(q, k, v, mask, q_block, k_block, scale)
    return out, (q, k, v, mask, out, lse)


def _attend_bwd(q_block, k_block, scale, residuals, d_out):
    """FlashAttention's backward: per query block, each key block's probabilities recomputed from the saved
    log-sum-exp; dq summed over key blocks, dk and dv over query blocks."""
    q, k, v, mask, out, lse = residuals
    to_rows = lambda a, start: jnp.moveaxis(jax.lax.dynamic_slice_in_dim(a, start, q_block, 1), 1, 3)
    k_blocks = k.shape[1] // k_block

    def one(i, carry):
        dq, dk, dv = carry
        start = i * q_block
        qi = jax.lax.dynamic_slice_in_dim(q, start, q_block, 1).astype(F32)
        d_out_i = to_rows(d_out, start)  # [b, kv, g, qb, d]
        delta = jnp.sum(d_out_i * to_rows(out, start), -1)
        mask_i = mask.queries(start, q_block)

        def visit(j, carry):
            dq_i, dk, dv = carry
            k_start = j * k_block
            k_j = jax.lax.dynamic_slice_in_dim(k, k_start, k_block, 1).astype(F32)
            v_j = jax.lax.dynamic_slice_in_dim(v, k_start, k_block, 1).astype(F32)
            p = jnp.where(mask_i.block(k_start, k_block), jnp.exp(_scores(qi, k_j, scale) - lse[i][..., None]), 0.0)
            ds = p * (jnp.einsum("bkgqd,bskd->bkgqs", d_out_i, v_j) - delta[..., None]) * scale
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
                acc, jax.lax.dynamic_slice_in_dim(acc, k_start, k_block, 1) + x, k_start, 1)
            return (dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j),
                    add(dk, jnp.einsum("bkgqs,bqkgd->bskd", ds, qi)),
                    add(dv, jnp.einsum("bkgqs,bkgqd->bskd", p, d_out_i)))

        dq_i, dk, dv = jax.lax.fori_loop(0, _frontier(mask_i, k_block, k_blocks), visit,
                                         (jnp.zeros(qi.shape, F32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, start, 1), dk, dv

    zeros = lambda a: jnp.zeros(a.shape, F32)
    dq, dk, dv = jax.lax.fori_loop(0, q.shape[1] // q_block, one, (zeros(q), zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)
