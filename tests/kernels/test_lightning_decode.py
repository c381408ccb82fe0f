"""Lightning decode step: Pallas kernels (interpret mode) vs the float64 oracle, and prefill + decode == one pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lightning_oracle import make_inputs, minimax_slopes, oracle, rel_err

from pallas_kernels import lightning_attention, lightning_decode_step

DECODE_IMPLS = ["xla", "pallas_gpu", "pallas_tpu"]


@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_prefill_then_decode_equals_one_pass(impl):
    """Prefill 70 tokens (crossing chunks), then decode 6 one by one: outputs and state match the oracle over 76."""
    prefill, steps = 70, 6
    x = make_inputs(11, 2, prefill + steps, 3, 64, slopes=minimax_slopes(40, [0, 31, 63]))
    prefill_impl = "xla" if impl == "xla" else impl
    _, state = lightning_attention(x["q"][:, :prefill], x["k"][:, :prefill], x["v"][:, :prefill], x["slopes"],
                                   initial_state=x["h0"], impl=prefill_impl, chunk_size=16)
    step = jax.jit(lambda q, k, v, s: lightning_decode_step(q, k, v, x["slopes"], s, impl=impl), donate_argnums=3)
    outs = []
    for t in range(prefill, prefill + steps):
        out, state = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state)
        outs.append(out)
    ref_out, ref_state, _ = oracle(x["q"], x["k"], x["v"], x["slopes"], x["h0"], None, x["do"], x["d_final"])
    assert rel_err(jnp.stack(outs, axis=1), ref_out[:, prefill:]) < 1e-5
    assert rel_err(state, ref_state) < 1e-5


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_decode_kernel_bf16_inputs(impl):
    keys = jax.random.split(jax.random.key(3), 5)
    q, k, v = (jax.random.normal(kk, (3, 5, 128), jnp.bfloat16) for kk in keys[:3])
    slopes = minimax_slopes(0, [0, 10, 20, 40, 63])
    state = jax.random.normal(keys[4], (3, 5, 128, 128))
    out, new_state = lightning_decode_step(q, k, v, slopes, state, impl=impl)
    ref_out, ref_state = lightning_decode_step(q, k, v, slopes, state, impl="xla")
    assert out.dtype == jnp.bfloat16 and new_state.dtype == jnp.float32
    assert rel_err(out, np.asarray(ref_out, np.float64)) < 5e-3
    assert rel_err(new_state, np.asarray(ref_state, np.float64)) < 1e-6


def test_decode_refuses_bad_shapes():
    q = jnp.ones((2, 3, 48))
    with pytest.raises(ValueError, match="power of two"):
        lightning_decode_step(q, q, q, jnp.ones(3), jnp.ones((2, 3, 48, 48)), impl="pallas_gpu")
    with pytest.raises(ValueError, match="state"):
        lightning_decode_step(q, q, q, jnp.ones(3), jnp.ones((2, 3, 48, 32)))


def test_decode_kernel_lowers_to_triton_with_the_state_aliased():
    sd = jax.ShapeDtypeStruct
    row = sd((4, 8, 128), jnp.bfloat16)
    step = jax.jit(lambda q, k, v, s, st: lightning_decode_step(q, k, v, s, st, impl="pallas_gpu", interpret=False),
                   donate_argnums=4)
    text = step.trace(row, row, row, sd((8,), jnp.float32), sd((4, 8, 128, 128), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "output_operand_aliases" in text
