"""Softmax attention: partial NeoX RoPE against a float64 transcription of architecture.md §6.2."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from m1jax.layers.attention import apply_partial_rope


def rope_float64(x: np.ndarray, positions: np.ndarray, rotary_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/R); ang = p * inv_freq; pairs (i, i + R/2) rotate; dims >= R pass through."""
    half = rotary_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2 / rotary_dim)
    ang = positions[..., None].astype(np.float64) * inv_freq  # [b, n, half]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    out = x.astype(np.float64).copy()
    a, b = x[..., :half].astype(np.float64), x[..., half:rotary_dim].astype(np.float64)
    out[..., :half] = a * cos - b * sin
    out[..., half:rotary_dim] = b * cos + a * sin
    return out


@pytest.mark.parametrize("rotary_dim,theta", [(64, 1e7), (128, 1e7), (16, 1e4)])
def test_partial_rope_matches_float64(rotary_dim, theta):
    rng = np.random.default_rng(rotary_dim)
    x = rng.standard_normal((2, 9, 3, 128)).astype(np.float32)
    positions = np.stack([np.arange(9), np.arange(1000, 1009)]).astype(np.int32)
    got = np.asarray(apply_partial_rope(jnp.asarray(x), jnp.asarray(positions), rotary_dim, theta))
    want = rope_float64(x, positions, rotary_dim, theta)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])  # the other half passes through


def test_partial_rope_is_not_full_rope():
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, 128))
    pos = jnp.arange(1, 5)[None]
    assert not np.allclose(apply_partial_rope(x, pos, 64, 1e7), apply_partial_rope(x, pos, 128, 1e7))
