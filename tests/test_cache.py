"""The hybrid cache: layout, byte count, sharding, snapshots (bit-exact round trip, any capacity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.cache import (append_rows, cache_bytes, cache_capacity, first_used_slot, init_cache, load_cache,
                         place_rows, resize_cache, save_cache, shift_cache)
from m1jax.config import get_preset
from m1jax.sharding import ShardingError, make_mesh

TINY = get_preset("m1-tiny")  # cycle (L, L, L, S), one cycle


def random_cache(config, batch, max_len, used, seed=0):
    """A cache filled with random values, as if `used` tokens had been prefilled (row i left-padded by i)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for j, kind in enumerate(config.cycle):
        if kind == "lightning":
            layers[j] = jnp.asarray(rng.standard_normal((config.num_cycles, batch, config.num_heads,
                                                         config.head_dim, config.head_dim)), jnp.float32)
        else:
            kv = rng.standard_normal((2, config.num_cycles, batch, max_len, config.num_kv_heads, config.head_dim))
            kv[:, :, :, used:] = 0  # slots past the used ones stay empty
            layers[j] = tuple(jnp.asarray(a, config.jnp_dtype) for a in kv)
    slots = np.arange(max_len)
    valid = (slots[None, :] < used) & (slots[None, :] >= np.arange(batch)[:, None])
    return {"layers": layers, "key_valid": jnp.asarray(valid), "offset": jnp.int32(used),
            "next_position": jnp.asarray(used - np.arange(batch), jnp.int32)}


def test_layout_is_what_forward_reads():
    cfg = TINY.replace(layer_types=("lightning", "softmax") * 2, dtype="bfloat16")  # 2 cycles of (L, S)
    cache = init_cache(cfg, batch=3, max_len=10)
    h, d = cfg.num_heads, cfg.head_dim
    assert cache["layers"][0].shape == (2, 3, h, d, d) and cache["layers"][0].dtype == jnp.float32
    k, v = cache["layers"][1]
    assert k.shape == v.shape == (2, 3, 10, cfg.num_kv_heads, d) and k.dtype == jnp.bfloat16
    assert cache["key_valid"].shape == (3, 10) and not cache["key_valid"].any()
    assert int(cache["offset"]) == 0 and cache["next_position"].tolist() == [0, 0, 0]
    assert cache_capacity(cache) == 10


def test_cache_bytes_counts_every_buffer():
    cfg = TINY.replace(dtype="bfloat16")
    cache = init_cache(cfg, batch=2, max_len=7)
    assert cache_bytes(cfg, 2, 7) == sum(a.nbytes for a in jax.tree.leaves(cache))


def test_m1_cache_bytes_match_the_architecture_arithmetic():
    """architecture.md §5.5: 70 x 64 x 128 x 128 x 4 B of fp32 states, 10 x 2 x 8 x 128 x 2 B of KV per token."""
    m1 = get_preset("minimax-m1-80k")
    states, kv_per_token = 70 * 64 * 128 * 128 * 4, 10 * 2 * 8 * 128 * 2
    assert states == 293_601_280 and kv_per_token == 40_960
    for tokens in (1, 1_000_000, 1 << 20):
        # + 1 byte per slot for key_valid, + offset and next_position (4 B each)
        assert cache_bytes(m1, 1, tokens) == states + kv_per_token * tokens + tokens + 8
    # per device of expert=8 x tensor=2: one of 8 rows, half the heads and KV heads
    assert cache_bytes(m1, 8, 1000, {"expert": 8, "tensor": 2}) == states // 2 + kv_per_token // 2 * 1000 + 1000 + 8
    with pytest.raises(ShardingError, match="'batch' of size 3 does not divide over mesh axes expert=8"):
        cache_bytes(m1, 3, 1000, {"expert": 8})


def test_sharded_cache_follows_the_activation_layout():
    mesh = make_mesh(data=4, tensor=2)
    cache = init_cache(TINY, batch=4, max_len=6, mesh=mesh)
    state_spec = cache["layers"][0].sharding.spec
    k_spec = cache["layers"][3][0].sharding.spec
    assert "data" in state_spec[1] and state_spec[2] == "tensor"  # [C, batch, heads, D, D]
    assert "data" in k_spec[1] and k_spec[3] == "tensor"  # [C, batch, slots, kv_heads, D]
    assert cache["layers"][0].addressable_shards[0].data.shape == (1, 1, TINY.num_heads // 2, 16, 16)
    with pytest.raises(ShardingError, match="batch.*size 3"):
        init_cache(TINY, batch=3, max_len=6, mesh=mesh)


def test_resize_keeps_the_used_slots():
    cache = random_cache(TINY, 2, 8, used=5)
    grown = resize_cache(cache, 12)
    assert cache_capacity(grown) == 12
    np.testing.assert_array_equal(grown["layers"][3][0][:, :, :8], cache["layers"][3][0])
    assert not grown["key_valid"][:, 8:].any()
    cut = resize_cache(cache, 5)
    np.testing.assert_array_equal(cut["key_valid"], cache["key_valid"][:, :5])
    with pytest.raises(ValueError, match="holds 5 tokens"):
        resize_cache(cache, 4)


def test_shift_moves_every_row_and_drops_what_leaves_the_buffer():
    cache = random_cache(TINY, 2, 8, used=5)  # row 0 holds slots 0..4, row 1 slots 1..4
    k = np.asarray(cache["layers"][3][0])
    assert first_used_slot(cache) == 0 and first_used_slot(cache, [False, True]) == 1
    assert first_used_slot(cache, [False, False]) == 5  # no tokens: the offset
    right = shift_cache(cache, 3, 12)
    assert int(right["offset"]) == 8 and cache_capacity(right) == 12
    np.testing.assert_array_equal(right["layers"][3][0][:, :, 3:8], k[:, :, :5])
    moved_k = np.asarray(right["layers"][3][0])
    assert not moved_k[:, :, :3].any() and not moved_k[:, :, 8:].any()
    np.testing.assert_array_equal(right["key_valid"][:, 3:11], cache["key_valid"])
    np.testing.assert_array_equal(right["layers"][0], cache["layers"][0])  # lightning states do not move
    np.testing.assert_array_equal(right["next_position"], cache["next_position"])
    left = shift_cache(cache, -1)  # row 0's first token leaves the buffer
    assert int(left["offset"]) == 4 and cache_capacity(left) == 8
    np.testing.assert_array_equal(left["layers"][3][1][:, 1, :4], np.asarray(cache["layers"][3][1])[:, 1, 1:5])
    assert left["key_valid"].tolist() == [[True] * 4 + [False] * 4] * 2
    with pytest.raises(ValueError, match="offset 5 moved by 4 leaves a buffer of 8 slots"):
        shift_cache(cache, 4)


def test_place_rows_puts_the_rows_tokens_before_the_offset():
    cache = random_cache(TINY, 3, 10, used=6)
    new = random_cache(TINY, 2, 5, used=4, seed=2)  # its row 0 holds slots 0..3
    before = jax.tree.map(np.asarray, cache)
    placed = place_rows(cache, new, jnp.asarray([2, 3]))  # row 3 is past the batch: dropped
    assert int(placed["offset"]) == 6
    assert placed["key_valid"][2].tolist() == [False] * 2 + [True] * 4 + [False] * 4
    np.testing.assert_array_equal(placed["layers"][3][0][:, 2, 2:6], new["layers"][3][0][:, 0, :4])
    assert not np.asarray(placed["layers"][3][0])[:, 2, :2].any()
    np.testing.assert_array_equal(placed["layers"][1][:, 2], new["layers"][1][:, 0])
    assert int(placed["next_position"][2]) == int(new["next_position"][0])
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(before)):  # rows 0 and 1 are untouched
        a, b = np.asarray(a), b
        if a.ndim:
            rows = (slice(None), slice(0, 2)) if a.ndim == 5 else (slice(0, 2),)
            np.testing.assert_array_equal(a[rows], b[rows])


def test_append_rows_adds_empty_rows_and_keeps_the_others():
    cache = random_cache(TINY, 2, 8, used=5)
    grown = append_rows(cache, 3)
    assert int(grown["offset"]) == 5 and cache_capacity(grown) == 8
    assert grown["key_valid"].shape == (5, 8) and not grown["key_valid"][2:].any()
    assert grown["next_position"].tolist() == cache["next_position"].tolist() + [0, 0, 0]
    for a, b in zip(jax.tree.leaves(grown["layers"]), jax.tree.leaves(cache["layers"])):
        assert a.shape[1] == 5 and a.dtype == b.dtype  # [C, batch, ...]
        np.testing.assert_array_equal(a[:, :2], b)
        assert not np.asarray(a[:, 2:]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_snapshot_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = TINY.replace(dtype=dtype)
    cache = random_cache(cfg, 2, 9, used=6, seed=1)
    tokens = np.arange(12).reshape(2, 6)
    path = save_cache(tmp_path / "doc", cache, cfg, tokens=tokens)
    assert path.suffix == ".npz"
    snap = load_cache(path, max_len=9, config=cfg)
    assert snap.num_tokens == 6 and snap.config == cfg
    np.testing.assert_array_equal(snap.tokens, tokens)
    for a, b in zip(jax.tree.leaves(snap.cache), jax.tree.leaves(cache)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert cache_capacity(load_cache(path).cache) == 6  # just the used slots


def test_snapshot_refuses_another_model_and_bad_files(tmp_path):
    path = save_cache(tmp_path / "c.npz", random_cache(TINY, 1, 4, used=3), TINY)
    with pytest.raises(ValueError, match="hidden_size"):
        load_cache(path, config=TINY.replace(hidden_size=32))
    load_cache(path, config=TINY.replace(lightning_impl="reference"))  # execution-only fields may differ
    with pytest.raises(ValueError, match="holds 3 tokens"):
        load_cache(path, max_len=2)
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an m1jax cache snapshot"):
        load_cache(tmp_path / "other.npz")
