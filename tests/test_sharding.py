"""The mesh, the sharding rules and the memory plan; the sharded model against the single-device model.

Golden listings: regenerate with `M1JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py -k golden`
after an intended change to the rules, and review the diff.
"""

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from m1jax import sharding
from m1jax.cache import init_cache
from m1jax.config import ModelConfig, get_preset
from m1jax.layers.moe_ep import ExpertParallel
from m1jax.loading import from_pretrained, shard_model
from m1jax.model import abstract_model, forward, init_model, params_of, with_params
from m1jax.plan import main as plan_main, memory_plan
from m1jax.sharding import ShardingError, make_mesh, mesh_shape, param_shardings, spec_listing, validate

GOLDEN = Path(__file__).parent / "golden"
CONFIG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     layer_types=("lightning", "softmax"), intermediate_size=96, num_experts=8, rotary_dim=8,
                     block_size=8, dtype="float32")


def test_make_mesh_fills_and_checks_axes():
    mesh = make_mesh(data=2, expert=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 1, "expert": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 5
    with pytest.raises(ShardingError, match="has 4 devices but 8 are available"):
        make_mesh(expert=4)
    with pytest.raises(ShardingError, match="only one mesh axis may be -1"):
        mesh_shape(data=-1, expert=-1, devices=8)
    with pytest.raises(ShardingError, match="not a multiple"):
        mesh_shape(expert=3, data=-1, devices=8)


@pytest.mark.parametrize("sizes, message", [
    (dict(tensor=8), "num_heads=4: dimension 'heads' of size 4 does not divide over mesh axes tensor=8 = 8"),
    (dict(tensor=4), "num_kv_heads=2: .* tensor=4 = 4"),
    (dict(expert=16), "num_experts=8: .* expert=16 = 16"),
    (dict(fsdp=3), "hidden_size=64: .* fsdp=3 = 3"),
])
def test_validation_names_the_numbers(sizes, message):
    with pytest.raises(ShardingError, match=message):
        validate(CONFIG, sizes)


def test_batch_must_divide_before_compiling():
    message = "size 4 does not divide over mesh axes data=1 \\* fsdp=1 \\* expert=8 = 8"
    with jax.set_mesh(make_mesh(expert=8)), pytest.raises(ShardingError, match=message):
        jax.eval_shape(lambda m, ids: forward(m, ids).logits, abstract_model(CONFIG), jnp.zeros((4, 8), jnp.int32))


def test_forward_reports_dropped_copies_per_layer():
    def router(model, ids):
        return forward(model, ids, dispatch=ExpertParallel(capacity_factor=1.0)).router

    with jax.set_mesh(make_mesh(data=2, expert=4)):
        stats = jax.eval_shape(router, abstract_model(CONFIG), jnp.zeros((8, 8), jnp.int32))
    assert stats["dropped"].shape == (CONFIG.num_layers,)
    assert stats["selected"].shape == (CONFIG.num_layers, CONFIG.num_experts_per_tok, CONFIG.num_experts)


@pytest.mark.parametrize("sizes", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_golden_sharding_listing(sizes):
    name = "sharding_" + "_".join(f"{a}{n}" for a, n in sizes.items()) + ".txt"
    listing = spec_listing(CONFIG, sizes)
    if os.environ.get("M1JAX_UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(listing)
    assert listing == (GOLDEN / name).read_text(), f"sharding rules changed: compare with tests/golden/{name}"


def test_from_pretrained_places_every_parameter(monkeypatch, capsys):
    monkeypatch.setattr(sharding, "_announced", set())
    mesh = make_mesh(fsdp=2, expert=4)
    model = from_pretrained("preset:m1-tiny", mesh=mesh, num_experts=8)
    shardings = param_shardings(model.config, mesh)
    jax.tree.map(lambda a, s: assert_placed(a, s), params_of(model), shardings)
    w1 = params_of(model)["cycles"]["layers"][0]["moe"]["w1"]
    assert w1.addressable_shards[0].data.shape == (1, 2, 32, 96)  # 2 of 8 experts, half the hidden dim
    report = capsys.readouterr().err
    assert report.count("m1jax mesh: data=1 fsdp=2 context=1 expert=4 tensor=1") == 1
    assert "experts per layer 8 -> 2 per device (over expert=4)" in report


def assert_placed(array, expected):
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)


# ---- the sharded model equals the single-device model --------------------------------------------
BATCH, SEQ = 8, 8


@pytest.fixture(scope="module")
def reference():
    model = init_model(CONFIG, seed=0)
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, CONFIG.vocab_size)
    mask = jnp.ones((BATCH, SEQ), bool).at[3, :3].set(False)  # one left-padded row
    cot = jax.random.normal(jax.random.key(2), (BATCH, SEQ, CONFIG.vocab_size)) * mask[..., None]
    logits, grads = logits_and_grads(model, ids, mask, cot, "dense", scan=False)
    return model, ids, mask, cot, logits, grads


def logits_and_grads(model, ids, mask, cot, dispatch, scan):
    def loss(params):
        out = forward(with_params(model, params), ids, attention_mask=mask, dispatch=dispatch, scan=scan)
        return jnp.sum(out.logits * cot), out.logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params_of(model))
    return logits, grads


# scan=False compiles twice as fast; one mesh keeps the scanned stack (exactly equal: tests/test_model.py)
@pytest.mark.parametrize("sizes, scan", [(dict(expert=8), False), (dict(data=2, expert=4), True),
                                         (dict(data=4, expert=2), False), (dict(data=8), False),
                                         (dict(fsdp=2, expert=4), False), (dict(data=2, expert=2, tensor=2), False)])
def test_sharded_model_matches_single_device(reference, sizes, scan):
    model, ids, mask, cot, ref_logits, ref_grads = reference
    mesh = make_mesh(**sizes)
    with jax.set_mesh(mesh):
        logits, grads = logits_and_grads(shard_model(model, mesh), ids, mask, cot, "auto", scan)
    real = np.asarray(mask)  # padding positions differ: the EP dispatch does not send padding tokens
    scale = float(jnp.abs(ref_logits[real]).max())
    assert float(jnp.abs(logits[real] - ref_logits[real]).max()) <= 1e-5 * scale
    flat, flat_ref = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)
    for (path, g), g_ref in zip(flat, flat_ref):
        err = float(jnp.abs(g - g_ref).max() / jnp.abs(g_ref).max())
        assert err <= 1e-5, (jax.tree_util.keystr(path), err)


def pallas_sites(jaxpr, inside=False):
    """For every pallas_call in a jaxpr (nested ones included): whether it runs inside a shard_map."""
    for eqn in jaxpr.eqns:
        if "pallas_call" in eqn.primitive.name:
            yield inside
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from pallas_sites(sub, inside or eqn.primitive.name == "shard_map")


def test_lightning_kernels_run_per_device():
    """Under a mesh every lightning Pallas call (prefill and decode step) runs in a shard_map on the device's own
    rows and heads: XLA would otherwise gather the operands and run the opaque kernel whole on every device.
    Prefill logits and the decode step's logits equal the single-device ones (Pallas GPU kernels, interpret mode)."""
    config = dataclasses.replace(CONFIG, lightning_impl="pallas_gpu", block_size=16)
    model = init_model(config, seed=0)
    ids = jax.random.randint(jax.random.key(1), (4, 24), 0, config.vocab_size)
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])

    def prefill_then_step(model, cache):
        first = forward(model, ids[:, :-1], cache=cache)
        return first.logits, forward(model, ids[:, -1:], cache=first.cache).logits

    want = prefill_then_step(model, init_cache(config, 4, 24))
    with jax.set_mesh(mesh):
        sharded, cache = shard_model(model, mesh), init_cache(config, 4, 24, mesh=mesh)
        got = prefill_then_step(sharded, cache)
        sites = list(pallas_sites(jax.make_jaxpr(prefill_then_step)(sharded, cache).jaxpr))
    assert len(sites) >= 2 and all(sites)  # at least one prefill kernel and the decode step
    for g, w in zip(got, want):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


def test_per_device_lightning_kernels_give_the_single_device_gradients():
    """The Pallas backward (custom_vjp) inside the per-device shard_map: parameter gradients equal the single-device
    ones (interpret mode)."""
    config = dataclasses.replace(CONFIG, lightning_impl="pallas_gpu", block_size=16)
    model = init_model(config, seed=0)
    ids = jax.random.randint(jax.random.key(2), (4, 24), 0, config.vocab_size)
    loss = lambda params, model: jnp.sum(forward(with_params(model, params), ids).logits ** 2)
    want = jax.grad(loss)(params_of(model), model)
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        sharded = shard_model(model, mesh)
        got = jax.jit(jax.grad(loss))(params_of(sharded), sharded)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


# ---- memory plan ----------------------------------------------------------------------------------
def m1_hand_count():
    """MiniMax-M1 parameter counts from the architecture (architecture.md §1, §5-7)."""
    L, d, V, H, KV, D, I, E = 80, 6144, 200_064, 64, 8, 128, 9216, 32
    experts = L * E * 3 * d * I
    lightning = d * 3 * H * D + d * H * D + H * D * d + H * D
    softmax = d * H * D + 2 * d * KV * D + H * D * d
    other_bf16 = 2 * V * d + d + 70 * lightning + 10 * softmax + L * 2 * d
    return experts, other_bf16, L * d * E  # expert params, other bf16 params, router params


def test_plan_matches_hand_computation(capsys):
    experts, other, router = m1_hand_count()
    assert round(experts / 1e9, 1) == 434.9 and round((other + router) / 1e9, 1) == 21.2
    config = get_preset("minimax-m1-80k")

    plan = memory_plan(config, dict(expert=8))
    assert plan.experts == experts * 2 // 8
    assert plan.other == other * 2 + router * 4
    assert round(plan.parameters / 1e9) == 151
    assert plan.adam == 8 * (experts // 8 + other + router)
    assert plan.master == 4 * (experts // 8 + other)  # the fp32 router needs no master copy

    sharded = memory_plan(config, dict(fsdp=8, expert=8))  # 64 devices: no local devices needed
    assert sharded.experts == experts * 2 // 64
    assert sharded.other < plan.other / 7  # the non-expert share divides too (norms stay replicated)

    assert plan_main(["--config", "minimax-m1-80k", "--mesh", "expert=8"]) == 0
    out = capsys.readouterr().out
    assert "151.20 GB per device: does NOT fit on H100 (80.00 GB), H200 (141.00 GB)" in out
    assert plan_main(["--config", "minimax-m1-80k", "--devices", "64", "--mesh", "fsdp=8,expert=8"]) == 0
    assert "inference (parameters only): 18.90 GB per device: fits on H100, H200" in capsys.readouterr().out
    assert plan_main(["--config", "minimax-m1-80k", "--devices", "16", "--mesh", "fsdp=2,expert=8",
                      "--tokens", "1000000"]) == 0
    out = capsys.readouterr().out  # one 1M-token sequence: 41.25 GB (test_cache), one row on each device
    assert "cache for 1 x 1,000,000 tokens, padded to 16 rows (whole rows per device): 41.25 GB per device" in out
    assert plan_main(["--config", "minimax-m1-80k", "--mesh", "expert=64"]) == 2
    assert "num_experts=32" in capsys.readouterr().err
