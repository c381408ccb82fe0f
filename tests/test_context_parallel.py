"""Context parallelism: sequences split over the mesh axis "context" give the single-device results.

The join of lightning-attention pieces against the float64 token recurrence (outputs, final state, gradients,
packed documents whose boundaries fall inside pieces and exactly on them), then the whole model on a CPU mesh.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m1jax
from m1jax.cache import init_cache
from m1jax.generation import prefill
from m1jax.layers.context_parallel import join_pieces
from m1jax.loading import shard_model
from m1jax.model import forward, init_model, params_of, with_params
from m1jax.sharding import ShardingError, make_mesh, validate
from pallas_kernels import lightning_attention
from tests.kernels.test_lightning_oracle import make_inputs, oracle, rel_err
from tests.test_sharding import CONFIG, pallas_sites


def split_run(q, k, v, slopes, segment_ids, pieces):
    """What the devices of a context axis compute: every piece from a zero state (pieces moved into the batch)."""
    b, n = q.shape[:2]
    length = n // pieces
    split = lambda x: x.reshape(b, pieces, length, *x.shape[2:]).swapaxes(0, 1).reshape(pieces * b, length,
                                                                                          *x.shape[2:])
    seg = None if segment_ids is None else split(segment_ids)
    out, states = lightning_attention(split(q), split(k), split(v), slopes, segment_ids=seg, impl="xla",
                                      chunk_size=8)
    out = out.reshape(pieces, b, length, *out.shape[2:]).swapaxes(0, 1).reshape(b, n, *out.shape[2:])
    return out, states.reshape(pieces, b, *states.shape[1:])


def packed_segments(b, n):
    seg = np.zeros((b, n), np.int32)
    seg[0, 24:], seg[0, 50:], seg[0, 51:] = 1, 2, 3  # on a piece boundary (24 of 4 x 24), inside, a 1-token doc
    seg[1, 30:] = 7
    return jnp.asarray(seg)


@pytest.mark.parametrize("pieces", [2, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_joined_pieces_equal_the_whole_sequence(pieces, packed, with_state):
    x = make_inputs(pieces + 2 * packed, batch=2, seq=96, heads=3, dim=8)
    seg = packed_segments(2, 96) if packed else None
    h0 = x["h0"] if with_state else None

    def loss(q, k, v, h0):
        out, states = split_run(q, k, v, x["slopes"], seg, pieces)
        out, final = join_pieces(out, states, q, x["slopes"], h0, seg)
        return jnp.sum(out * x["do"]) + jnp.sum(final * x["d_final"]), (out, final)

    (_, (out, final)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
        x["q"], x["k"], x["v"], h0)
    want_out, want_final, want_grads = oracle(x["q"], x["k"], x["v"], x["slopes"], h0, seg, x["do"], x["d_final"])
    assert rel_err(out, want_out) <= 1e-5 and rel_err(final, want_final) <= 1e-5
    for name, g, w in zip(("dq", "dk", "dv", "dh0"), grads, want_grads):
        if name != "dh0" or with_state:
            assert rel_err(g, w) <= 1e-4, name


def test_join_refuses_pieces_that_do_not_split_the_sequence():
    x = make_inputs(0, batch=1, seq=30, heads=3, dim=8)
    states = jnp.broadcast_to(x["h0"], (4,) + x["h0"].shape)
    with pytest.raises(ValueError, match="4 piece states do not split"):
        join_pieces(x["q"], states, x["q"], x["slopes"])


@pytest.mark.parametrize("sizes, key_blocks", [
    (dict(context=4, tensor=2), False),
    pytest.param(dict(context=4, tensor=2), True, marks=pytest.mark.slow),
    (dict(context=2, data=2, expert=2), False)])
def test_context_parallel_model_equals_single_device(sizes, key_blocks, request):
    """Sequences split in 4 over "context" (x 2 over "tensor"), or in 2 beside expert-parallel MoE layers (tokens
    exchanged over "expert"), packed documents, Pallas GPU kernels in interpret mode, softmax layers in one einsum or
    over key blocks: logits and every parameter gradient equal the single-device ones; every lightning kernel runs
    per device."""
    if key_blocks:
        request.getfixturevalue("blockwise_only")
    config = dataclasses.replace(CONFIG, lightning_impl="pallas_gpu", block_size=16)
    model = init_model(config, seed=0)
    ids = jax.random.randint(jax.random.key(3), (4, 32), 0, config.vocab_size)
    seg = jnp.asarray([[0] * 12 + [1] * 20, [4] * 8 + [5] * 9 + [6] * 15, [2] * 16 + [3] * 16, [1] * 32], jnp.int32)
    logits = lambda params, model: forward(with_params(model, params), ids, segment_ids=seg).logits
    loss = lambda params, model: jnp.sum(logits(params, model) ** 2)
    want, want_grads = logits(params_of(model), model), jax.grad(loss)(params_of(model), model)
    mesh = make_mesh(**sizes)
    with jax.set_mesh(mesh):
        sharded = shard_model(model, mesh)
        got = jax.jit(logits)(params_of(sharded), sharded)
        got_grads = jax.jit(jax.grad(loss))(params_of(sharded), sharded)
        sites = list(pallas_sites(jax.make_jaxpr(logits)(params_of(sharded), sharded).jaxpr))
    assert got.sharding.spec[1] == "context"
    assert sites and all(sites)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


def test_sequences_must_divide_over_the_context_axis():
    with pytest.raises(ShardingError, match="sequence length=30: dimension 'length' of size 30 does not divide "
                                            "over mesh axes context=4"):
        validate(CONFIG, {"context": 4}, length=30)
    model = init_model(CONFIG, seed=0)
    mesh = make_mesh(context=4, devices=jax.devices()[:4])
    with jax.set_mesh(mesh), pytest.raises(ShardingError, match="size 30 does not divide over mesh axes context=4"):
        forward(shard_model(model, mesh), jnp.ones((1, 30), jnp.int32))


def test_generation_continues_a_cache_on_a_context_mesh():
    """A document prefilled into a cache on context=2 (in chunks of 6), then a question continuing it: the tokens
    equal the single-device ones (the carried lightning states enter the first piece). A question whose length
    does not divide over the context axis is refused before anything runs, the cache intact."""
    model = init_model(CONFIG, seed=0)
    doc, question = [list(range(3, 21))], [[40, 41, 42, 43]]

    def prefilled(model, mesh=None):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return prefill(model, init_cache(CONFIG, 1, 40, mesh=mesh), doc, chunk_size=6)[1]

    want = m1jax.generate(model, question, cache=prefilled(model), max_new_tokens=5)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    sharded = shard_model(model, mesh)
    cache = prefilled(sharded, mesh)
    with pytest.raises(ValueError, match="needs inputs of a multiple of 2 tokens .* got 3"):
        m1jax.generate(sharded, [question[0][:3]], cache=cache, mesh=mesh, prefill_chunk=6)
    got = m1jax.generate(sharded, question, cache=cache, max_new_tokens=5, prefill_chunk=6, mesh=mesh)
    assert got.tokens == want.tokens
