"""The hybrid decode cache (architecture.md §5.5): fp32 state per lightning layer, KV buffer per softmax layer.

The structure is exactly what `m1jax.model.forward(cache=...)` reads and returns::

    {"layers": {j: state [C, batch, heads, D, D] fp32          (config.cycle[j] == "lightning")
                   or (k, v) [C, batch, max_len, kv_heads, D]  (softmax; model dtype)},
     "key_valid": [batch, max_len] bool      KV slots that hold real tokens
     "offset": int32                         first free KV slot (shared by the batch)
     "next_position": [batch] int32}         RoPE position of each row's next token

C = config.num_cycles (the layer stack is scanned over cycles). Lightning states do not grow with the sequence;
the KV buffers are preallocated for `max_len` tokens. Snapshots (`save_cache` / `load_cache`) keep only the
used slots, so a snapshot of a long document can be restored into a buffer of any larger size.
For continuous batching, `shift_cache` moves every row's slots (and the offset), `append_rows` adds empty rows
and `place_rows` puts another batch's rows in, their tokens ending at the shared offset.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Int

from m1jax.config import ModelConfig

SNAPSHOT_FORMAT = "m1jax-cache-v1"


def cache_shapes(config: ModelConfig, batch: int, max_len: int) -> dict:
    """The cache as a tree of jax.ShapeDtypeStruct (nothing allocated)."""
    c, d = config.num_cycles, config.head_dim
    layers = {}
    for j, kind in enumerate(config.cycle):
        if kind == "lightning":
            layers[j] = jax.ShapeDtypeStruct((c, batch, config.num_heads, d, d), jnp.float32)
        else:
            kv = jax.ShapeDtypeStruct((c, batch, max_len, config.num_kv_heads, d), config.jnp_dtype)
            layers[j] = (kv, kv)
    return {
        "layers": layers,
        "key_valid": jax.ShapeDtypeStruct((batch, max_len), jnp.bool_),
        "offset": jax.ShapeDtypeStruct((), jnp.int32),
        "next_position": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }


def cache_axes(config: ModelConfig) -> dict:
    """Logical axis names of every cache leaf (m1jax.sharding's rules map them to mesh axes)."""
    kv = ("layers", "batch", None, "kv_heads", None)  # every slot on every device (layers/attention.py KEYS)
    layers = {j: ("layers", "batch", "heads", None, None) if kind == "lightning" else (kv, kv)
              for j, kind in enumerate(config.cycle)}
    return {"layers": layers, "key_valid": ("batch", None), "offset": (), "next_position": ("batch",)}


def _axis_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None)))
                                                                             for n in x))


def cache_shardings(config: ModelConfig, mesh: Mesh, batch: int | None = None, max_len: int | None = None) -> dict:
    """NamedShardings laid out like the activations: rows over the batch axes, heads over the tensor axis.

    With `batch` and `max_len`, every dimension is first checked to divide over its mesh axes.
    """
    from m1jax.sharding import check_divisible, logical_spec

    sizes = dict(mesh.shape)
    axes = cache_axes(config)
    if batch is not None and max_len is not None:
        shapes = jax.tree.leaves(cache_shapes(config, batch, max_len))
        for names, shape in zip(_axis_leaves(axes), shapes):
            check_divisible(f"cache buffer {shape.shape}", shape.shape, names, sizes)
    specs = [NamedSharding(mesh, logical_spec(names, sizes)) for names in _axis_leaves(axes)]
    return jax.tree.unflatten(jax.tree.structure(cache_shapes(config, 1, 1)), specs)


def init_cache(config: ModelConfig, batch: int, max_len: int, *, mesh: Mesh | None = None,
               shardings: Any = None) -> dict:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated).

    With `mesh` (or explicit `shardings`, a tree matching `cache_shapes`), every buffer is created directly in
    its sharding, never materialised whole on one device.
    """
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    if shardings is not None:
        return jax.jit(functools.partial(_zeros, config, batch, max_len), out_shardings=shardings)()
    return _zeros_in(config, batch, max_len, mesh)()


def _zeros(config: ModelConfig, batch: int, max_len: int) -> dict:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(config, batch, max_len))


@functools.lru_cache(maxsize=64)
def _zeros_in(config: ModelConfig, batch: int, max_len: int, mesh: Mesh | None):
    """The compiled cache constructor for these shapes (built once: generation makes a cache per request)."""
    shardings = None if mesh is None else cache_shardings(config, mesh, batch, max_len)
    return jax.jit(functools.partial(_zeros, config, batch, max_len), out_shardings=shardings)


def cache_bytes(config: ModelConfig, batch: int, max_len: int, mesh_sizes: dict[str, int] | None = None) -> int:
    """Bytes of `init_cache(config, batch, max_len)`; with mesh axis sizes, on one device of that mesh (ShardingError
    if a dimension does not divide over its axes)."""
    from m1jax.sharding import check_divisible, local_shape

    total = 0
    for names, leaf in zip(_axis_leaves(cache_axes(config)), jax.tree.leaves(cache_shapes(config, batch, max_len))):
        shape = leaf.shape
        if mesh_sizes is not None:
            check_divisible(f"cache buffer {shape}", shape, names, mesh_sizes)
            shape = local_shape(shape, names, mesh_sizes)
        total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def cache_capacity(cache: dict) -> int:
    """max_len: the number of KV slots of the buffers."""
    return cache["key_valid"].shape[1]


def resize_cache(cache: dict, max_len: int) -> dict:
    """The same cache with KV buffers of `max_len` slots (grown with empty slots, or cut to the used ones)."""
    used = int(cache["offset"])
    if max_len < used:
        raise ValueError(f"resize_cache: the cache holds {used} tokens; cannot shrink it to {max_len} slots")

    def fit(x, axis):
        n = x.shape[axis]
        if n >= max_len:
            return jax.lax.slice_in_dim(x, 0, max_len, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, max_len - n)
        return jnp.pad(x, pad)

    layers = {j: tuple(fit(a, 2) for a in c) if isinstance(c, tuple) else c for j, c in cache["layers"].items()}
    return {**cache, "layers": layers, "key_valid": fit(cache["key_valid"], 1)}


# ---- moving rows and slots (continuous batching) ---------------------------------------------------------
def first_used_slot(cache: dict, rows: Bool[Array, " batch"] | None = None) -> int:
    """The first KV slot holding a token of any of these rows (default: all); the offset if there is none."""
    rows = jnp.ones(cache["key_valid"].shape[0], bool) if rows is None else jnp.asarray(rows, bool)
    return int(_first_used(cache["key_valid"], rows, cache["offset"]))


@jax.jit
def _first_used(key_valid: Bool[Array, "batch slots"], rows: Bool[Array, " batch"], offset: Int[Array, ""]):
    slots = jnp.arange(key_valid.shape[1])
    return jnp.min(jnp.where(key_valid & rows[:, None], slots, offset))


def _move_slots(x: Array, source: Int[Array, " slots"], inside: Bool[Array, " slots"], axis: int) -> Array:
    """x with slot t (along `axis`) taken from slot source[t], empty (zero / False) where not `inside`."""
    shape = [1] * x.ndim
    shape[axis] = -1
    moved = jnp.take(x, jnp.clip(source, 0, x.shape[axis] - 1), axis=axis)
    return jnp.where(inside.reshape(shape), moved, jnp.zeros((), x.dtype))


def shift_cache(cache: dict, shift: int, max_len: int | None = None) -> dict:
    """The cache with every row's KV slots moved `shift` places (negative: towards slot 0) and the write offset
    with them, in buffers of `max_len` slots (default: as now). Attention reads slots by `key_valid` and keys carry
    their RoPE positions, so the model sees the same tokens. Slots moved out of the buffer are dropped: shift out
    only dead ones (finished rows', or those before every live row's first token)."""
    offset, max_len = int(cache["offset"]), cache_capacity(cache) if max_len is None else max_len
    if not 0 <= offset + shift <= max_len:
        raise ValueError(f"shift_cache: the write offset {offset} moved by {shift} leaves a buffer of {max_len} "
                         "slots")
    return _shift(cache, jnp.int32(shift), max_len)


@functools.partial(jax.jit, static_argnames=("max_len",))
def _shift(cache: dict, shift: Int[Array, ""], max_len: int) -> dict:
    source = jnp.arange(max_len) - shift
    inside = (source >= 0) & (source < cache_capacity(cache))
    move = lambda x, axis: _move_slots(x, source, inside, axis)
    layers = {j: tuple(move(a, 2) for a in c) if isinstance(c, tuple) else c for j, c in cache["layers"].items()}
    return {**cache, "layers": layers, "key_valid": move(cache["key_valid"], 1), "offset": cache["offset"] + shift}


def append_filled(x: Array, n: int, axis: int = 0, value=0) -> Array:
    """x with n entries of `value` appended along `axis`."""
    return jnp.concatenate([x, jnp.full(x.shape[:axis] + (n,) + x.shape[axis + 1:], value, x.dtype)], axis)


def _map_rows(cache: dict, fn) -> dict:
    """`cache` with fn(leaf, batch axis) applied to every per-row leaf (the offset is shared)."""
    layers = {j: tuple(fn(a, 1) for a in c) if isinstance(c, tuple) else fn(c, 1) for j, c in cache["layers"].items()}
    return {**cache, "layers": layers, "key_valid": fn(cache["key_valid"], 0),
            "next_position": fn(cache["next_position"], 0)}


@functools.partial(jax.jit, static_argnames=("n",))
def append_rows(cache: dict, n: int) -> dict:
    """The cache with n empty rows appended along the batch axis (zero states and KV, no valid slots, position
    0), for `place_rows` to fill; the other rows and the offset stay."""
    return _map_rows(cache, lambda x, axis: append_filled(x, n, axis))


@jax.jit
def take_rows(cache: dict, rows: Int[Array, " n"]) -> dict:
    """The cache of rows `rows` of `cache`, in that order (a smaller batch); the offset stays."""
    return _map_rows(cache, lambda x, axis: jnp.take(x, rows, axis=axis))


@functools.partial(jax.jit, donate_argnames=("cache",))
def place_rows(cache: dict, rows_cache: dict, rows: Int[Array, " n"]) -> dict:
    """`cache` with row rows[k] replaced by row k of `rows_cache` (a cache of n rows, any number of slots), whose
    tokens are moved to end at `cache`'s write offset (the shared offset stays); rows[k] >= batch drops row k.
    Tokens that would land before slot 0 are dropped: make the offset at least as long as the rows' tokens."""
    source = jnp.arange(cache_capacity(cache)) - cache["offset"] + rows_cache["offset"]
    inside = (source >= 0) & (source < rows_cache["offset"])
    move = lambda x, axis: _move_slots(x, source, inside, axis)
    put = lambda x, y, axis: x.at[(slice(None),) * axis + (rows,)].set(y, mode="drop")
    layers = {}
    for j, c in cache["layers"].items():
        new = rows_cache["layers"][j]
        layers[j] = tuple(put(a, move(b, 2), 1) for a, b in zip(c, new)) if isinstance(c, tuple) else put(c, new, 1)
    return {"layers": layers, "key_valid": put(cache["key_valid"], move(rows_cache["key_valid"], 1), 0),
            "offset": cache["offset"], "next_position": put(cache["next_position"], rows_cache["next_position"], 0)}


# ---- snapshots --------------------------------------------------------------------------------------
class Snapshot(NamedTuple):
    cache: dict
    config: ModelConfig
    tokens: np.ndarray | None  # [batch, n] ids the cache was built from (left padding included), if saved
    num_tokens: int  # KV slots in use (= cache["offset"])


def save_cache(path: str | Path, cache: dict, config: ModelConfig, tokens=None) -> Path:
    """Write the cache (used KV slots only), the model config and optionally the tokens to an .npz file."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    used = int(cache["offset"])
    arrays = {"key_valid": np.asarray(cache["key_valid"][:, :used]), "offset": np.asarray(cache["offset"]),
              "next_position": np.asarray(cache["next_position"])}
    dtypes = {}
    for j, c in cache["layers"].items():
        parts = {"state": c} if not isinstance(c, tuple) else {"k": c[0][:, :, :used], "v": c[1][:, :, :used]}
        for name, a in parts.items():
            a = np.asarray(a)
            dtypes[f"layers/{j}/{name}"] = str(a.dtype)
            # npz has no bfloat16: store the raw bits and the dtype name
            arrays[f"layers/{j}/{name}"] = a.view(np.uint16) if a.dtype.itemsize == 2 else a
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens, np.int32)
    meta = {"format": SNAPSHOT_FORMAT, "config": config.to_dict(), "num_tokens": used, "dtypes": dtypes}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_cache(path: str | Path, *, max_len: int | None = None, config: ModelConfig | None = None,
               mesh: Mesh | None = None) -> Snapshot:
    """Read a snapshot written by `save_cache`, with KV buffers of `max_len` slots (default: just the used ones).

    With `config`, the snapshot must have been taken with the same network (execution-only fields may differ).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache snapshot {path} does not exist")
    with np.load(path) as z:
        if "meta" not in z:
            raise ValueError(f"{path} is not an m1jax cache snapshot (no 'meta' entry)")
        meta = json.loads(z["meta"].tobytes())
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path}: unknown snapshot format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
        saved_config = ModelConfig.from_dict(meta["config"])
        if config is not None:
            _check_same_network(path, saved_config, config)
        used = meta["num_tokens"]
        max_len = used if max_len is None else max_len
        if max_len < max(used, 1):
            raise ValueError(f"{path}: the snapshot holds {used} tokens; max_len={max_len} is too small")

        def array(key):
            a = z[key]
            dtype = meta["dtypes"].get(key)
            return a.view(jnp.dtype(dtype)) if dtype is not None and a.dtype == np.uint16 else a

        layers = {}
        for j, kind in enumerate(saved_config.cycle):
            if kind == "lightning":
                layers[j] = jnp.asarray(array(f"layers/{j}/state"))
            else:
                layers[j] = (jnp.asarray(array(f"layers/{j}/k")), jnp.asarray(array(f"layers/{j}/v")))
        cache = {"layers": layers, "key_valid": jnp.asarray(z["key_valid"]),
                 "offset": jnp.asarray(z["offset"], jnp.int32), "next_position": jnp.asarray(z["next_position"])}
        tokens = np.asarray(z["tokens"]) if "tokens" in z else None
    cache = resize_cache(cache, max_len)
    if mesh is not None:
        cache = jax.device_put(cache, cache_shardings(saved_config, mesh))
    return Snapshot(cache, saved_config if config is None else config, tokens, used)


EXECUTION_FIELDS = ("lightning_impl", "max_position_embeddings", "eos_token_id")


def _check_same_network(path: Path, saved: ModelConfig, config: ModelConfig) -> None:
    a, b = saved.to_dict(), config.to_dict()
    diff = sorted(k for k in a if k not in EXECUTION_FIELDS and a[k] != b[k])
    if diff:
        raise ValueError(f"{path}: snapshot was taken with a different model config; differing fields: "
                         + ", ".join(f"{k} ({a[k]!r} vs {b[k]!r})" for k in diff))
