"""The MoE dispatches against the dense reference: expert parallel (dropless, adversarial routing, capacity
drops, both transports), the compiled collectives, and the router losses against independent formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers import moe_ep
from m1jax.layers.moe import DISPATCH, choose_dispatch, experts_dense, route, router_stats
from m1jax.layers.moe_ep import ExpertParallel, resolve_dispatch
from m1jax.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from jax.sharding import NamedSharding

from m1jax.sharding import ShardingError, logical_spec, make_mesh

D, I = 16, 24  # hidden, expert width


def experts_weights(num_experts, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (num_experts, D, I)) / math.sqrt(D),
            jax.random.normal(k2, (num_experts, D, I)) / math.sqrt(D),
            jax.random.normal(k3, (num_experts, I, D)) / math.sqrt(I))


def routed(tokens, num_experts, top_k=2, seed=1):
    kx, kr = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (tokens, D))
    _, _, weights, experts = route(x, jax.random.normal(kr, (D, num_experts)), top_k)
    return x, weights, experts


def rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def ep_and_grads(mesh, dispatch, x, w, weights, experts, mask):
    """EP output, dropped count, and d(sum y^2)/d(x, w1, w3, w2, routing weights) in one compile."""

    def loss(x, w1, w3, w2, weights):
        y, dropped = dispatch(x, w1, w3, w2, weights, experts, jax.nn.silu, token_mask=mask)
        return jnp.sum(y ** 2), (y, dropped)

    with jax.set_mesh(mesh):
        (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(
            x, *w, weights)
    return y, dropped, grads


def dense_and_grads(x, w, weights, experts):
    def loss(x, w1, w3, w2, weights):
        y = experts_dense(x, w1, w3, w2, weights, experts, jax.nn.silu)
        return jnp.sum(y ** 2), y

    (_, y), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(x, *w, weights)
    return y, grads


def assert_matches_dense(mesh, dispatch, x, w, weights, experts, mask=None):
    mask = jnp.ones(x.shape[0], bool) if mask is None else mask
    y, dropped, grads = ep_and_grads(mesh, dispatch, x, w, weights, experts, mask)
    y_ref, grads_ref = dense_and_grads(x, w, weights, experts)
    assert float(dropped) == 0
    assert rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("x", "w1", "w3", "w2", "weights"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("shape", [dict(expert=8), dict(data=2, expert=2, tensor=2), dict(data=4, tensor=2)])
def test_dropless_under_adversarial_routing(shape):
    """Every token picks experts 0 and 1 (both on device 0 when ep=8): device 0 receives the worst case,
    the other experts get no tokens; 60 tokens do not divide the token shards (padding path). With expert=1
    nothing travels (the local path)."""
    e = 16
    x, weights, _ = routed(60, e)
    experts = jnp.broadcast_to(jnp.array([1, 0]), (60, 2))
    assert_matches_dense(make_mesh(**shape), ExpertParallel(), x, experts_weights(e), weights, experts)


def test_dropless_random_routing_on_fsdp_mesh():
    x, weights, experts = routed(64, 8, seed=3)
    assert_matches_dense(make_mesh(fsdp=2, expert=4), ExpertParallel(), x, experts_weights(8), weights, experts)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """ragged_all_to_all as its docstring defines it, from all_gathers (XLA:CPU has no ragged-all-to-all)."""
    del recv_sizes
    gather = lambda a: jax.lax.all_gather(a, axis_name)
    ops, starts, sizes, dests = map(gather, (operand, input_offsets, send_sizes, output_offsets))
    me, rows = jax.lax.axis_index(axis_name), jnp.arange(output.shape[0])
    for src in range(ops.shape[0]):
        begin, n = dests[src, me], sizes[src, me]
        take = (rows >= begin) & (rows < begin + n)
        picked = ops[src][jnp.clip(rows - begin + starts[src, me], 0, operand.shape[0] - 1)]
        output = jnp.where(take.reshape((-1,) + (1,) * (output.ndim - 1)), picked, output)
    return output


def test_ragged_transport_bookkeeping(monkeypatch):
    """The ragged transport's offsets, checked on CPU against an emulation of ragged_all_to_all."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, weights, experts = routed(64, 8, seed=4)
    experts = experts.at[:20].set(jnp.array([3, 2]))  # skewed counts, so the offsets matter
    assert_matches_dense(make_mesh(data=2, expert=4), ExpertParallel(transport="ragged"), x, experts_weights(8),
                         weights, experts)


def capacity_reference(x, w, weights, experts, mask, shards, capacity):
    """Each token shard keeps, per expert, its first `capacity` real copies in token order; the rest drop."""
    keep = np.zeros(experts.shape, bool)
    for block in np.split(np.arange(x.shape[0]), shards):
        seen = {}
        for t in block:
            for j, e in enumerate(np.asarray(experts[t])):
                if mask[t]:
                    seen[e] = seen.get(e, 0) + 1
                    keep[t, j] = seen[e] <= capacity
    dropped = int(np.sum(np.asarray(mask)[:, None] & ~keep))
    return experts_dense(x, *w, jnp.where(keep, weights, 0.0), experts, jax.nn.silu), dropped


@pytest.mark.parametrize("shape", [dict(data=2, expert=4), dict(data=8)])
def test_capacity_factor_drops_and_counts(shape):
    e, t, shards = 8, 64, 8  # 8 token shards of 8 tokens (data=8: every expert local, nothing travels)
    x, weights, experts = routed(t, e, seed=5)
    experts = experts.at[::3].set(jnp.array([0, 1]))  # overload experts 0 and 1
    mask = jnp.ones(t, bool).at[5].set(False)  # a padding token takes no capacity and is not counted
    w = experts_weights(e)
    capacity = math.ceil(1.0 * (t // shards) * 2 / e)
    y, dropped, _ = ep_and_grads(make_mesh(**shape), ExpertParallel(capacity_factor=1.0), x, w, weights,
                                 experts, mask)
    y_ref, dropped_ref = capacity_reference(x, w, weights, experts, mask, shards, capacity)
    assert dropped_ref > 0 and float(dropped) == dropped_ref
    real = np.asarray(mask)
    assert rel_err(y[real], y_ref[real]) < 1e-5
    np.testing.assert_array_equal(y[~real], 0)  # padding tokens are not dispatched


def test_compiled_ep_has_all_to_all_and_split_experts():
    mesh = make_mesh(data=2, expert=4)
    x, weights, experts = routed(64, 8)
    placed = NamedSharding(mesh, logical_spec(("experts", "embed", "mlp"), mesh.shape))
    w = [jax.device_put(a, placed) for a in experts_weights(8)]
    f = jax.jit(lambda x, w1, w3, w2: ExpertParallel()(x, w1, w3, w2, weights, experts, jax.nn.silu,
                                                       token_mask=jnp.ones(64, bool))[0])
    with jax.set_mesh(mesh):
        hlo = f.lower(x, *w).compile().as_text()
    assert hlo.count("all-to-all(") >= 3  # counts, rows out, rows back
    assert "all-gather(" not in hlo  # no expert weight is gathered
    assert placed.shard_shape((8, D, I)) == (2, D, I)
    assert f"f32[2,{D},{I}]" in hlo  # the per-device program sees 2 of the 8 experts


@pytest.mark.parametrize("dispatch", ["ragged", "gather"])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_single_device_dispatches_match_dense(dispatch, tokens):
    """Outputs and gradients (x, expert weights, routing weights), with a skipped (zero-weight) selection."""
    x, weights, experts = routed(tokens, 8, seed=tokens)
    weights = weights.at[0, 1].set(0.0)
    w = experts_weights(8, seed=tokens)

    def run(fn):
        def loss(x, w1, w3, w2, weights):
            y = fn(x, w1, w3, w2, weights, experts, jax.nn.silu)
            return jnp.sum(y ** 2), y
        return jax.value_and_grad(loss, argnums=range(5), has_aux=True)(x, *w, weights)

    (_, y), grads = run(DISPATCH[dispatch])
    (_, y_ref), grads_ref = run(experts_dense)
    assert rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("x", "w1", "w3", "w2", "weights"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


def test_dispatch_resolution(monkeypatch):
    assert resolve_dispatch("auto") == "ragged"
    assert choose_dispatch("auto", copies=4, num_experts=8) == "ragged"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_dispatch("auto", copies=4, num_experts=8) == "gather"  # decode: batch 2, top-2 of 8
    assert choose_dispatch("auto", copies=6, num_experts=8) == "ragged"
    assert choose_dispatch("ragged", copies=2, num_experts=8) == "ragged"  # an explicit choice stays
    monkeypatch.undo()
    assert isinstance(resolve_dispatch("ep"), ExpertParallel)
    with jax.set_mesh(make_mesh(expert=8)):
        assert isinstance(resolve_dispatch("auto"), ExpertParallel)
        with pytest.raises(ShardingError, match="splits the experts over 8 devices"):
            resolve_dispatch("ragged")
    with jax.set_mesh(make_mesh(data=8)):
        assert resolve_dispatch("dense") == "dense"
    x, weights, experts = routed(8, 4)
    with pytest.raises(ShardingError, match="needs a device mesh"):
        ExpertParallel()(x, *experts_weights(4), weights, experts, jax.nn.silu, token_mask=jnp.ones(8, bool))
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertParallel(capacity_factor=0.0)
    assert moe_ep.default_grouped_matmul() is not None


# ---- router losses --------------------------------------------------------------------------------
def layer_stats(num_layers=3, tokens=40, e=8, k=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_layers + 1)
    mask = jax.random.uniform(keys[-1], (tokens,)) > 0.25
    logits = [jax.random.normal(kk, (tokens, e)) * 2 for kk in keys[:-1]]
    stats = []
    for lg in logits:
        probs = jax.nn.softmax(lg, -1)
        _, experts = jax.lax.top_k(probs, k)
        stats.append(router_stats(lg, probs, experts, mask))
    return [np.asarray(lg) for lg in logits], np.asarray(mask), jax.tree.map(lambda *a: jnp.stack(a), *stats)


def numpy_aux_loss(logits, mask, e, k):
    """architecture.md §7.3: pooled over all layers' real tokens."""
    g = np.concatenate(logits)
    m = np.tile(mask, len(logits)).astype(np.float64)
    p = np.exp(g - g.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sel = np.argsort(-p, -1)[:, :k]
    onehot = np.eye(e)[sel]  # [N, k, E]
    f = (onehot * m[:, None, None]).sum(0) / m.sum()
    prob = (p * m[:, None]).sum(0) / m.sum()
    lse = np.log(np.exp(g).sum(-1))
    return e * np.sum(f * prob[None]), float((lse ** 2 * m).sum() / m.sum())


def test_aux_and_z_loss_match_numpy():
    logits, mask, stats = layer_stats()
    aux, z = numpy_aux_loss(logits, mask, 8, 2)
    np.testing.assert_allclose(float(load_balancing_loss(stats, 8)), aux, rtol=1e-5)
    np.testing.assert_allclose(float(router_z_loss(stats)), z, rtol=1e-5)
    counts = np.asarray(tokens_per_expert(stats))
    np.testing.assert_array_equal(counts.sum(-1), np.full(3, 2 * mask.sum()))


def test_aux_loss_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.minimax.modeling_minimax import load_balancing_loss_func

    logits, mask, stats = layer_stats(seed=1)
    expected = load_balancing_loss_func(tuple(torch.tensor(lg) for lg in logits), 8, 2,
                                        torch.tensor(mask[None].astype(np.int64)))
    np.testing.assert_allclose(float(load_balancing_loss(stats, 8)), float(expected), rtol=1e-5)
