"""Lightning attention layer (architecture.md §5): fused per-head qkv, activation, decayed linear attention,
joint RMSNorm (eps 1e-6) over all heads, sigmoid output gate from the layer input, output projection."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from m1jax.config import ModelConfig, alibi_slopes
from m1jax.layers.common import ACTIVATIONS, dense_param
from m1jax.layers.norms import rms_norm
from m1jax.layers.context_parallel import join_pieces
from m1jax.sharding import length_pieces, per_device
from pallas_kernels import lightning_attention, lightning_decode_step


def lightning_slopes(config: ModelConfig) -> np.ndarray:
    """Per-layer, per-head decay rates s[l, h] = ALiBi(H)[h] * (1 - l/(L-1) + 1e-5), l the absolute layer index.

    Computed in float64 and rounded once to fp32, like the reference. Softmax layers get rows too (unused).
    """
    sigma = np.asarray(alibi_slopes(config.num_heads), np.float64)
    layers = np.arange(config.num_layers, dtype=np.float64)
    factor = 1 - layers / (config.num_layers - 1) + 1e-5 if config.num_layers > 1 else np.full(1, 1 + 1e-5)
    return (sigma[None, :] * factor[:, None]).astype(np.float32)


# Logical names of the kernels' operands: heads are independent, so each device runs them on its own shards
SEQUENCE = ("batch", "length", "heads", None)  # q, k, v, out [batch, seq, heads, head_dim]
TOKEN = ("batch", "heads", None)  # one decode token
STATE = ("batch", "heads", None, None)
PIECE_STATES = ("length", "batch", "heads", None, None)  # one state per piece of the sequence (context axis)


def _attend(q, k, v, slopes, state, segment_ids, *, impl, chunk):
    return lightning_attention(q, k, v, slopes, initial_state=state, segment_ids=segment_ids, impl=impl,
                               chunk_size=chunk)


def _attend_piece(q, k, v, slopes, segment_ids, *, impl, chunk):
    """This device's piece of the sequence from a zero state; its final state with a leading piece axis."""
    out, state = _attend(q, k, v, slopes, None, segment_ids, impl=impl, chunk=chunk)
    return out, state[None]


class LightningAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs):
        d, inner = config.hidden_size, config.num_heads * config.head_dim
        dt = config.jnp_dtype
        self.qkv_proj = dense_param(rngs, (d, 3 * inner), d, dt, stack)
        self.output_gate = dense_param(rngs, (d, inner), d, dt, stack)
        self.out_proj = dense_param(rngs, (inner, d), inner, dt, stack)
        self.norm = nnx.Param(jnp.ones(stack + (inner,), dt))
        self.config = config

    def __call__(
        self,
        h: Float[Array, "batch seq d"],
        slopes: Float[Array, " heads"],
        *,
        token_mask: Float[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        state: Float[Array, "batch heads head_dim head_dim"] | None = None,
    ) -> tuple[Float[Array, "batch seq d"], Float[Array, "batch heads head_dim head_dim"]]:
        cfg = self.config
        b, n, _ = h.shape
        qkv = ACTIVATIONS[cfg.hidden_act](h @ self.qkv_proj[...])
        qkv = qkv.reshape(b, n, cfg.num_heads, 3, cfg.head_dim)  # per-head interleaved [q | k | v]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if token_mask is not None:  # pads contribute nothing to the state (left padding keeps it zero)
            m = token_mask[:, :, None, None].astype(q.dtype)
            q, k, v = q * m, k * m, v * m
        if n == 1 and state is not None:  # a decode step: one state update, no chunk padding
            step = per_device(functools.partial(lightning_decode_step, impl=cfg.lightning_impl),
                              (TOKEN, TOKEN, TOKEN, ("heads",), STATE), (TOKEN, STATE))
            o, new_state = step(q[:, 0], k[:, 0], v[:, 0], slopes, state)
            o = o[:, None]
        elif length_pieces(n) > 1:  # context parallel: pieces from zero states, then joined (context_parallel.py)
            o, piece_states = per_device(
                functools.partial(_attend_piece, impl=cfg.lightning_impl, chunk=cfg.block_size),
                (SEQUENCE, SEQUENCE, SEQUENCE, ("heads",), ("batch", "length")),
                (SEQUENCE, PIECE_STATES))(q, k, v, slopes, segment_ids)
            o, new_state = join_pieces(o, piece_states, q, slopes, state, segment_ids)
        else:
            o, new_state = per_device(functools.partial(_attend, impl=cfg.lightning_impl, chunk=cfg.block_size),
                                      (SEQUENCE, SEQUENCE, SEQUENCE, ("heads",), STATE, ("batch", "length")),
                                      (SEQUENCE, STATE))(q, k, v, slopes, state, segment_ids)
        y = rms_norm(o.reshape(b, n, -1), self.norm[...], cfg.lightning_norm_eps)
        gate = jax.nn.sigmoid(h @ self.output_gate[...])
        return (gate * y) @ self.out_proj[...], new_state
