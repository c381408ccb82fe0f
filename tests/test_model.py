"""The decoder's own invariants: scanned == unscanned, the MoE dispatches agree, cached chunks == one pass."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from m1jax.config import get_preset
from m1jax.layers.common import STACKED_ROWS, fp32_matmul
from m1jax.layers.moe import route
from m1jax.model import forward, init_model


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("m1-tiny").replace(layer_types=("lightning", "softmax") * 2)  # 2 cycles of (L, S)
    return init_model(cfg, seed=1)


def ids(shape, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_scanned_equals_unscanned(tiny):
    x = ids((2, 21), tiny.config.vocab_size)
    np.testing.assert_array_equal(forward(tiny, x).logits, forward(tiny, x, scan=False).logits)


@pytest.mark.parametrize("dispatch", ["ragged", "gather"])
def test_dispatches_agree_with_dense(tiny, dispatch):
    x = ids((2, 21), tiny.config.vocab_size, seed=1)
    a, b = forward(tiny, x, dispatch="dense").logits, forward(tiny, x, dispatch=dispatch).logits
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_router_stats_count_every_real_token(tiny):
    x = ids((2, 11), tiny.config.vocab_size, seed=2)
    mask = jnp.ones((2, 11), bool).at[1, :4].set(False)
    router = forward(tiny, x, attention_mask=mask).router
    cfg = tiny.config
    assert router["selected"].shape == (cfg.num_layers, cfg.num_experts_per_tok, cfg.num_experts)
    np.testing.assert_array_equal(router["tokens"], np.full(cfg.num_layers, 18.0))
    np.testing.assert_array_equal(router["selected"].sum(-1), np.full((cfg.num_layers, 2), 18.0))


def test_left_padding_equals_running_alone(tiny):
    v = tiny.config.vocab_size
    long, short = ids((1, 13), v, seed=3), ids((1, 8), v, seed=4)
    batch = jnp.concatenate([long, jnp.concatenate([jnp.zeros((1, 5), long.dtype), short], 1)])
    mask = jnp.ones((2, 13), bool).at[1, :5].set(False)
    both = forward(tiny, batch, attention_mask=mask).logits
    alone = forward(tiny, short).logits
    np.testing.assert_allclose(both[1, 5:], alone[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(alone).max()))


def test_packed_segments_equal_separate_documents(tiny):
    v = tiny.config.vocab_size
    a, b = ids((1, 7), v, seed=5), ids((1, 9), v, seed=6)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[0] * 7 + [1] * 9], jnp.int32)
    out = forward(tiny, packed, segment_ids=seg).logits
    scale = float(jnp.abs(out).max())
    np.testing.assert_allclose(out[0, :7], forward(tiny, a).logits[0], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(out[0, 7:], forward(tiny, b).logits[0], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("rows", [3, STACKED_ROWS + 1])  # one stacked matmul, three accumulated ones
def test_fp32_matmul_of_bf16_weights_is_fp32_accurate(rows):
    """Activations over 12 orders of magnitude (the M1 report's "high-magnitude activations" in the LM head)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (rows, 256)) * jnp.exp(jax.random.uniform(k2, (rows, 256), minval=-14, maxval=14))
    w = jax.random.normal(k3, (256, 96), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(fp32_matmul(x, w), np.float64)
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))  # condition of each sum
    assert np.max(np.abs(got - want) / scale) < 1e-6
    bf16_x = np.asarray(jnp.matmul(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32), np.float64)
    assert np.max(np.abs(bf16_x - want) / scale) > 1e-4  # what one bf16 pass would give: the test can fail


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lm_head_and_router_are_true_fp32_on_accelerators(tiny, platform):
    """JAX's default fp32 matmul is TF32 on recent GPUs and bf16 passes on TPU: a bf16 head must run as bf16
    products with fp32 accumulation (exact), an fp32 router (and fp32 head) with Precision.HIGHEST."""
    def dots(fn, *shapes):
        text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
        return [line for line in text.splitlines() if "dot_general" in line]

    cfg = tiny.config
    y = jax.ShapeDtypeStruct((2, cfg.hidden_size), jnp.float32)
    [bf16_head] = dots(init_model(cfg.replace(dtype="bfloat16")).head, y)
    assert "bf16" in bf16_head and "-> tensor<3x2x" in bf16_head and "f32>" in bf16_head.split("->")[1]
    [fp32_head] = dots(init_model(cfg).head, y)
    x = jax.ShapeDtypeStruct((3, cfg.hidden_size), jnp.bfloat16)
    router = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.num_experts), jnp.float32)
    [router_dot] = dots(lambda x, r: route(x, r, 2), x, router)
    assert "HIGHEST" in fp32_head and "HIGHEST" in router_dot
