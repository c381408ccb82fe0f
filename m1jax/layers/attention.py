"""Softmax GQA attention with partial NeoX RoPE (architecture.md §6).

Only the first `rotary_dim` dims of each head rotate, pairs (i, i + rotary_dim/2), angles and rotation in fp32;
scores scaled by 1/sqrt(head_dim); query head j reads KV head j // (heads / kv_heads).
Keys and values are written into a buffer at `offset` (the whole sequence when there is no cache), so prefill,
chunked prefill and decode share one code path.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from m1jax.config import ModelConfig
from m1jax.layers.common import dense_param
from m1jax.sharding import constrain

KEYS = ("batch", None, "kv_heads", None)  # every key slot on every device: queries split over "context" read all


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
        slots = jnp.arange(k_all.shape[1])
        allowed = key_valid[:, None, :] & (slots[None, None, :] <= offset + jnp.arange(n)[None, :, None])
        if segment_ids is not None:
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]

        groups = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, n, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k_all.astype(q.dtype),
                            preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
        o = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_all).reshape(b, n, -1).astype(h.dtype)
        return o @ self.o_proj[...], (k_all, v_all)
