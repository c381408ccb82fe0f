"""The float64 oracle for every lightning-attention test, and its own checks.

``oracle`` runs the token recurrence ``S_t = keep_t lam S_{t-1} + k_t^T v_t, o_t = q_t S_t`` and its exact reverse
mode in numpy float64. The other test files import it (pytest puts this directory on sys.path).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lightning_attention

F32 = jnp.float32
NUM_LAYERS, NUM_HEADS = 80, 64


def minimax_slopes(layer: int, heads=None) -> np.ndarray:
    """M1 slope of each head: alibi(64)[h] * (1 - layer/79 + 1e-5), with alibi(64)[h] = 2^(-(h+1)/8)."""
    heads = np.arange(NUM_HEADS) if heads is None else np.asarray(heads)
    return (2.0 ** (-(heads + 1) / 8) * (1 - layer / (NUM_LAYERS - 1) + 1e-5)).astype(np.float32)


def make_inputs(seed, batch, seq, heads, dim, dtype=jnp.float32, slopes=None, packed=False):
    """Fresh random q, k, v, initial state, output/state cotangents, slopes and (optionally) packed segment ids."""
    keys = jax.random.split(jax.random.key(seed), 7)
    q, k, v, do = (jax.random.normal(kk, (batch, seq, heads, dim), F32).astype(dtype) for kk in keys[:4])
    h0, d_final = (jax.random.normal(kk, (batch, heads, dim, dim), F32) for kk in keys[4:6])
    if slopes is None:  # log-uniform over the whole MiniMax range, plus the extremes
        slopes = np.exp(np.random.default_rng(seed).uniform(np.log(1e-5), np.log(0.92), heads))
        slopes[0], slopes[-1] = 1e-5, 0.92
    seg = None
    if packed:  # documents of random lengths, some shorter than a chunk
        starts = np.random.default_rng(seed + 1).random((batch, seq)) < 8 / max(seq, 8)
        seg = jnp.asarray(np.cumsum(starts, axis=1) + 3, jnp.int32)
    return dict(q=q, k=k, v=v, do=do, h0=h0, d_final=d_final, slopes=jnp.asarray(slopes, F32), seg=seg)


def oracle(q, k, v, slopes, h0=None, seg=None, do=None, d_final=None):
    """float64 outputs, final state and gradients (dq, dk, dv, dh0) of ``sum(o*do) + sum(final*d_final)``."""
    q, k, v, do = (np.asarray(jnp.asarray(x, F32), np.float64) for x in (q, k, v, do))
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    lam = np.exp(-np.asarray(slopes, np.float64))[None, :, None, None]
    keep = np.ones((batch, seq))
    if seg is not None:
        seg = np.asarray(seg)
        keep[:, 1:] = seg[:, 1:] == seg[:, :-1]
    decay = lambda t: keep[:, t, None, None, None] * lam
    state = np.zeros((batch, heads, dk, dv)) if h0 is None else np.asarray(h0, np.float64).copy()
    out, dq = np.zeros(v.shape), np.zeros(q.shape)
    for t in range(seq):
        state = decay(t) * state + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        out[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
        dq[:, t] = np.einsum("bhv,bhkv->bhk", do[:, t], state)
    grad = np.asarray(d_final, np.float64).copy()
    dk_, dv_ = np.zeros(k.shape), np.zeros(v.shape)
    for t in reversed(range(seq)):
        grad = grad + np.einsum("bhk,bhv->bhkv", q[:, t], do[:, t])
        dk_[:, t] = np.einsum("bhkv,bhv->bhk", grad, v[:, t])
        dv_[:, t] = np.einsum("bhkv,bhk->bhv", grad, k[:, t])
        grad = decay(t) * grad
    return out, state, (dq, dk_, dv_, grad)


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, F32), np.float64)
    assert np.all(np.isfinite(x)), "non-finite values (NaN-initialised output never written?)"
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def run_impl(impl, inputs, chunk_size=None, with_h0=True, grads=True):
    """Outputs, final state and (dq, dk, dv, dh0) of one implementation, jitted."""
    x = inputs
    seg = x["seg"]

    def loss(q, k, v, h0):
        out, final = lightning_attention(q, k, v, x["slopes"], initial_state=h0 if with_h0 else None,
                                         segment_ids=seg, impl=impl, chunk_size=chunk_size)
        return (jnp.sum(out.astype(F32) * x["do"].astype(F32)) + jnp.sum(final * x["d_final"])), (out, final)

    args = (x["q"], x["k"], x["v"], x["h0"])
    if not grads:
        return jax.jit(loss)(*args)[1], None
    (_, (out, final)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return (out, final), g


def check_against_oracle(impl, inputs, tol, grad_tol, chunk_size=None, with_h0=True, grads=True):
    x = inputs
    (out, final), g = run_impl(impl, x, chunk_size, with_h0, grads)
    assert out.dtype == x["q"].dtype and final.dtype == F32
    ref_out, ref_final, ref_g = oracle(x["q"], x["k"], x["v"], x["slopes"], x["h0"] if with_h0 else None,
                                       x["seg"], x["do"], x["d_final"])
    errors = {"out": rel_err(out, ref_out), "final_state": rel_err(final, ref_final)}
    if grads:
        names = ("dq", "dk", "dv", "dh0") if with_h0 else ("dq", "dk", "dv")
        errors |= {n: rel_err(gi, ri) for n, gi, ri in zip(names, g, ref_g)}
    bad = {n: e for n, e in errors.items() if e > (tol if n in ("out", "final_state") else grad_tol)}
    assert not bad, f"{impl}: relative errors above tolerance: {bad} (all: {errors})"


def test_oracle_gradients_match_autodiff_of_reference():
    """The hand-written float64 reverse mode agrees with jax.grad of the lax.scan reference."""
    x = make_inputs(0, 2, 37, 3, 16, packed=True)
    check_against_oracle("reference", x, tol=1e-5, grad_tol=1e-5)


def test_minimax_slopes_match_the_model_card_formula():
    s = minimax_slopes(0)
    assert s.shape == (64,) and np.isclose(s[0], 2 ** -0.125 * (1 + 1e-5)) and np.isclose(s[-1], 2 ** -8 * (1 + 1e-5))
    assert np.allclose(minimax_slopes(78), minimax_slopes(0) * (1 - 78 / 79 + 1e-5) / (1 + 1e-5))


@pytest.mark.parametrize("seq,chunk", [(1, 16), (65, 16), (300, 64)])
def test_xla_matches_oracle(seq, chunk):
    x = make_inputs(seq, 2, seq, 3, 16, packed=seq > 1)
    check_against_oracle("xla", x, tol=1e-5, grad_tol=1e-4, chunk_size=chunk)
