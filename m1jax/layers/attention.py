"""Softmax GQA attention with partial NeoX RoPE (architecture.md §6).

Only the first `rotary_dim` dims of each head rotate, pairs (i, i + rotary_dim/2), angles and rotation in fp32;
scores scaled by 1/sqrt(head_dim); query head j reads KV head j // (heads / kv_heads).
Keys and values are written into a buffer at `offset` (the whole sequence when there is no cache), so prefill,
chunked prefill and decode share one code path. Long contexts take the blockwise path, whose memory does not grow
with the number of key slots.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from m1jax.config import ModelConfig
from m1jax.layers.blockwise_attention import KeyMask, blockwise_attention
from m1jax.layers.common import dense_param
from m1jax.sharding import constrain

KEYS = ("batch", None, "kv_heads", None)  # every key slot on every device: queries split over "context" read all
# Scores of a call above this many bytes (fp32, all heads) are never materialised: queries and key slots are taken
# in blocks of BLOCK (layers/blockwise_attention.py). Below it one einsum is faster (training at 4K, decode).
MAX_SCORE_BYTES = 2**33
BLOCK = 1024


def rope_inv_freq(rotary_dim: int, theta: float) -> Float[Array, " half"]:
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def apply_partial_rope(
    x: Float[Array, "batch seq heads head_dim"], positions: Int[Array, "batch seq"], rotary_dim: int, theta: float
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate x[..., :rotary_dim] NeoX-style (half split) in fp32; the remaining dims pass through."""
    ang = positions.astype(jnp.float32)[..., None] * rope_inv_freq(rotary_dim, theta)  # [b, n, R/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :rotary_dim], x32[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = rot * cos + jnp.concatenate([-rot[..., half:], rot[..., :half]], -1) * sin
    return jnp.concatenate([rotated, rest], -1).astype(x.dtype)


def dense_attention(
    q: Float[Array, "batch seq kv_heads groups head_dim"],
    k: Float[Array, "batch slots kv_heads head_dim"],
    v: Float[Array, "batch slots kv_heads head_dim"],
    mask: KeyMask,
    *,
    scale: float,
) -> Float[Array, "batch seq kv_heads groups head_dim"]:
    """The masked softmax of all the scores at once (fp32), probabilities in v's dtype: the transformers port."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask.block(0, k.shape[1]), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


class SoftmaxAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        dt = config.jnp_dtype
        self.q_proj = dense_param(rngs, (d, config.num_heads * hd), d, dt, stack)
        self.k_proj = dense_param(rngs, (d, config.num_kv_heads * hd), d, dt, stack)
        self.v_proj = dense_param(rngs, (d, config.num_kv_heads * hd), d, dt, stack)
        self.o_proj = dense_param(rngs, (config.num_heads * hd, d), config.num_heads * hd, dt, stack)
        self.config = config

    def __call__(
        self,
        h: Float[Array, "batch seq d"],
        positions: Int[Array, "batch seq"],
        *,
        token_mask: Bool[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"] | None = None,
        kv: tuple[Array, Array] | None = None,
        key_valid: Bool[Array, "batch slots"] | None = None,
        offset: Int[Array, ""] | int = 0,
    ) -> tuple[Float[Array, "batch seq d"], tuple[Array, Array]]:
        """Attend causally over the cache buffer `kv` ([batch, slots, kv_heads, head_dim] each) after writing
        this chunk's keys at `offset`; without a cache the buffer is this chunk alone. `key_valid` marks the
        buffer slots holding real tokens (after this chunk's write). Returns the output and the updated buffer."""
        cfg = self.config
        b, n, _ = h.shape
        q = (h @ self.q_proj[...]).reshape(b, n, cfg.num_heads, cfg.head_dim)
        k = (h @ self.k_proj[...]).reshape(b, n, cfg.num_kv_heads, cfg.head_dim)
        v = (h @ self.v_proj[...]).reshape(b, n, cfg.num_kv_heads, cfg.head_dim)
        q = apply_partial_rope(q, positions, cfg.rotary, cfg.rope_theta)
        k = apply_partial_rope(k, positions, cfg.rotary, cfg.rope_theta)
        if kv is None:
            k_all, v_all, key_valid = k, v, token_mask
        else:
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, offset, 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, offset, 0, 0))
        k_all, v_all = constrain(k_all, KEYS), constrain(v_all, KEYS)
        slots = k_all.shape[1]
        mask = KeyMask(key_valid, offset + jnp.arange(n), segment_ids, segment_ids)  # segments: no cache only

        groups = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, n, cfg.num_kv_heads, groups, cfg.head_dim)
        scale = cfg.head_dim ** -0.5
        if b * cfg.num_heads * n * slots * 4 > MAX_SCORE_BYTES:  # long context: never all the scores at once
            o = blockwise_attention(qg, k_all.astype(q.dtype), v_all, mask, block=BLOCK, scale=scale)
        else:
            o = dense_attention(qg, k_all.astype(q.dtype), v_all, mask, scale=scale)
        return o.reshape(b, n, -1).astype(h.dtype) @ self.o_proj[...], (k_all, v_all)
