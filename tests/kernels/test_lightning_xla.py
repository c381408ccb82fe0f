"""Chunked XLA lightning attention vs the float64 token recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lightning_attention, lightning_decode_step


def _inputs(seed, batch, seq, heads, dim, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, dim), dtype) for kk in keys[:3])
    slopes = jnp.exp(jax.random.uniform(keys[3], (heads,), minval=np.log(1e-5), maxval=np.log(0.92)))
    h0 = jax.random.normal(keys[4], (batch, heads, dim, dim), jnp.float32)
    return q, k, v, slopes, h0


def _f64_recurrence(q, k, v, slopes, h0=None, seg=None):
    q, k, v, s = (np.asarray(x, np.float64) for x in (q, k, v, slopes))
    batch, seq, heads, dim = q.shape
    state = np.zeros((batch, heads, dim, v.shape[-1])) if h0 is None else np.asarray(h0, np.float64).copy()
    out = np.zeros(v.shape)
    for t in range(seq):
        keep = np.ones(batch) if seg is None or t == 0 else (seg[:, t] == seg[:, t - 1]).astype(np.float64)
        state = keep[:, None, None, None] * np.exp(-s)[None, :, None, None] * state
        state += np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        out[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
    return out, state


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("seq,chunk,with_h0,packed", [(1, 16, False, False), (63, 16, True, False),
                                                       (65, 32, True, True), (130, 64, False, True)])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_matches_float64_recurrence(impl, seq, chunk, with_h0, packed):
    q, k, v, slopes, h0 = _inputs(seq, 2, seq, 3, 16)
    h0 = h0 if with_h0 else None
    seg = np.cumsum(np.random.default_rng(seq).random((2, seq)) < 0.05, axis=1).astype(np.int32) if packed else None
    out, state = lightning_attention(q, k, v, slopes, initial_state=h0, impl=impl, chunk_size=chunk,
                                     segment_ids=None if seg is None else jnp.asarray(seg))
    ref_out, ref_state = _f64_recurrence(q, k, v, slopes, h0, seg)
    assert _rel(out, ref_out) < 1e-5
    assert _rel(state, ref_state) < 1e-5


def test_decode_continues_prefill():
    q, k, v, slopes, h0 = _inputs(0, 2, 40, 3, 16)
    out, state = lightning_attention(q[:, :32], k[:, :32], v[:, :32], slopes, initial_state=h0, impl="xla")
    steps = []
    for t in range(32, 40):
        o, state = lightning_decode_step(q[:, t], k[:, t], v[:, t], slopes, state)
        steps.append(o)
    ref_out, ref_state = _f64_recurrence(q, k, v, slopes, h0)
    assert _rel(jnp.stack(steps, 1), ref_out[:, 32:]) < 1e-5
    assert _rel(state, ref_state) < 1e-5
