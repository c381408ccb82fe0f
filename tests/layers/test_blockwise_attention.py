"""Blockwise softmax attention (online softmax over key blocks, custom backward) against a float64 softmax, and the
model on the blockwise path against the model on the one-einsum path."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m1jax
from m1jax.config import ModelConfig
from m1jax.layers import attention
from m1jax.layers.blockwise_attention import KeyMask, blockwise_attention
from m1jax.model import forward, init_model, params_of, with_params


def softmax_float64(q, k, v, allowed, scale):
    """[b, n, kv, g, d] outputs of a masked softmax in float64; queries that may read nothing output 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqkgd,bskd->bkgqs", q, k) * scale
    s = np.where(allowed[:, None, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(allowed[:, None, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    l = p.sum(-1, keepdims=True)
    p = np.divide(p, l, out=np.zeros_like(p), where=l > 0)
    return np.einsum("bkgqs,bskd->bqkgd", p, v)


def case(seed, dtype=jnp.float32, packed=False):
    """2 rows, 13 queries at slots 20..32 of a 45-slot cache; row 1 left-padded over slots 0..24, so its first
    queries read nothing; with `packed`, no cache (queries = keys) and three documents."""
    rng = np.random.default_rng(seed)
    b, kv, g, d = 2, 2, 3, 16
    n, slots, offset = (24, 24, 0) if packed else (13, 45, 20)
    q = rng.standard_normal((b, n, kv, g, d))
    k, v = rng.standard_normal((b, slots, kv, d)), rng.standard_normal((b, slots, kv, d))
    valid = np.ones((b, slots), bool)
    valid[1, :25 if not packed else 3] = False
    seg = np.repeat([[0] * 7 + [1] * 10 + [2] * 7], b, 0).astype(np.int32) if packed else None
    query_slot = offset + np.arange(n)
    allowed = valid[:, None, :] & (np.arange(slots)[None, None, :] <= query_slot[None, :, None])
    if packed:
        allowed &= seg[:, :, None] == seg[:, None, :]
    mask = KeyMask(jnp.asarray(valid), jnp.asarray(query_slot), *(2 * (None if seg is None else jnp.asarray(seg),)))
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    return cast(q), cast(k), cast(v), mask, allowed


@pytest.mark.parametrize("block", [8, 64])  # 8: several query and key blocks, padded; 64: one of each
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_equals_float64_softmax_and_its_gradients(block, packed):
    q, k, v, mask, allowed = case(block + packed, packed=packed)
    scale = 16 ** -0.5
    want = softmax_float64(q, k, v, allowed, scale)
    got = blockwise_attention(q, k, v, mask, block=block, scale=scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    if not packed:
        assert not allowed[1, 0].any() and np.all(np.asarray(got)[1, 0] == 0)  # a query that may read nothing

    weights = jax.random.normal(jax.random.key(block), got.shape)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * weights), (0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(x, jnp.float64)

        def reference(q, k, v):  # the same float64 softmax, differentiable
            s = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * scale
            s = jnp.where(allowed[:, None, None], s, -1e300)
            p = jnp.where(allowed[:, None, None], jax.nn.softmax(s, -1), 0.0)
            return jnp.einsum("bkgqs,bskd->bqkgd", p, v)

        want_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * f64(weights)), (0, 1, 2))(f64(q), f64(k), f64(v))
    got_grads = grad(lambda *a: blockwise_attention(*a, mask, block=block, scale=scale))
    for name, g, w in zip("qkv", got_grads, want_grads):
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=f"d{name}")


def test_blockwise_bf16_within_tolerance():
    q, k, v, mask, allowed = case(5, jnp.bfloat16)
    want = softmax_float64(q, k, v, allowed, 0.25)
    got = blockwise_attention(q, k, v, mask, block=16, scale=0.25)
    assert float(np.abs(np.asarray(got) - want).max()) <= 5e-3 * np.abs(want).max()  # kernels.md's bf16 bound


CONFIG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     layer_types=("softmax", "lightning"), intermediate_size=96, num_experts=8, rotary_dim=8,
                     block_size=8, dtype="float32")


def test_model_on_the_blockwise_path(blockwise_only):
    """Packed training forward (logits and parameter gradients), chunked prefill into a cache and greedy
    generation give what the one-einsum path gives."""
    model = init_model(CONFIG, seed=0)
    ids = jax.random.randint(jax.random.key(4), (2, 40), 0, CONFIG.vocab_size)
    seg = jnp.asarray([[0] * 15 + [1] * 25, [3] * 40], jnp.int32)
    loss = lambda params: jnp.sum(forward(with_params(model, params), ids, segment_ids=seg).logits ** 2)
    prompts = [list(range(3, 40)), list(range(50, 61))]

    def run():
        logits = forward(model, ids, segment_ids=seg).logits
        out = m1jax.generate(model, prompts, max_new_tokens=6, prefill_chunk=8)
        return logits, jax.grad(loss)(params_of(model)), out

    blockwise = run()
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "MAX_SCORE_BYTES", 2**33)
        direct = run()
    np.testing.assert_allclose(blockwise[0], direct[0], rtol=0, atol=1e-5 * float(jnp.abs(direct[0]).max()))
    for g, w in zip(jax.tree.leaves(blockwise[1]), jax.tree.leaves(direct[1])):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())
    assert blockwise[2].tokens == direct[2].tokens
    np.testing.assert_allclose(blockwise[2].logprobs, direct[2].logprobs, atol=1e-5)
