"""The device mesh and the logical-axis rules: the one place that says where every tensor lives.

Every parameter and activation dimension carries a logical name ("experts", "embed", "batch", ...);
`RULES` maps each name to the mesh axes it is split over. Layers never name a mesh axis.

The mesh axes are ("data", "fsdp", "context", "expert", "tensor"), tensor innermost (neighbouring devices), all of type
`AxisType.Auto`: parameters are placed by `param_shardings`, a few activations are pinned with
`constrain`, and XLA propagates the rest. (Explicit axes would make every op in every layer state its
output sharding; only the expert-parallel MoE needs manual control, and it takes it with `jax.shard_map`.)
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from m1jax.config import ModelConfig

AXES = ("data", "fsdp", "context", "expert", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "experts": ("expert",),
    "mlp": ("tensor",),  # the expert width
    "layers": (),
    "norm": (),
    "router_experts": (),
    # activations; the expert axis splits the batch outside the MoE layers (data parallelism there)
    "batch": ("data", "fsdp", "expert"),
    "tokens": ("context", "data", "fsdp", "expert"),  # the MoE's tokens, flattened piece-major (layers/moe.py)
    "length": ("context",),  # context parallelism: each device holds a contiguous piece of every sequence
    "act_embed": (),
}

# Logical names of every parameter, by its leaf name (`weight`: every RMSNorm's scale).
# Leaves under `cycles` carry a leading "layers" axis on top of these.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "weight": ("norm",),
    "qkv_proj": ("embed", "heads"),
    "output_gate": ("embed", "heads"),
    "out_proj": ("heads", "embed"),
    "norm": ("heads",),  # the lightning output norm over all heads
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "router": ("embed", "router_experts"),
    "w1": ("experts", "embed", "mlp"),
    "w3": ("experts", "embed", "mlp"),
    "w2": ("experts", "mlp", "embed"),
}

ACTIVATION = ("batch", "length", "act_embed")  # the residual stream [batch, seq, d]


def residual_names(seq: int) -> tuple[str | None, ...]:
    """The residual stream's logical names; a single token per row (a decode step) is not split over "context"."""
    return ACTIVATION if seq > 1 else ("batch", None, "act_embed")


class ShardingError(ValueError):
    """A mesh that cannot hold the model or batch as asked."""


# ---- the mesh ------------------------------------------------------------------------------------
def mesh_shape(data: int = 1, fsdp: int = 1, context: int = 1, expert: int = 1, tensor: int = 1, *,
               devices: int) -> dict[str, int]:
    """Axis sizes with one -1 filled so that their product is `devices`; ShardingError if it cannot be."""
    sizes = {"data": data, "fsdp": fsdp, "context": context, "expert": expert, "tensor": tensor}
    bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or (s < 1 and s != -1)}
    if bad:
        raise ShardingError(f"mesh axis sizes must be positive ints (or one -1), got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if devices % known:
            raise ShardingError(f"cannot fill mesh axis {fill[0]!r}: {devices} devices are not a multiple of "
                                f"the other axes' product {known}")
        sizes[fill[0]] = devices // known
    elif known != devices:
        raise ShardingError(f"mesh {format_mesh(sizes)} has {known} devices but {devices} are available "
                            f"(the product must match; use -1 for one axis to fill it)")
    return sizes


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=8,expert=8" -> {"fsdp": 8, "expert": 8} (the --mesh flag of the CLIs; sizes checked by mesh_shape)."""
    sizes = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        axis, eq, value = item.partition("=")
        if not eq or axis not in AXES:
            raise ShardingError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS one of {AXES}")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise ShardingError(f"--mesh item {item!r}: size {value!r} is not an integer") from None
    return sizes


def make_mesh(data: int = 1, fsdp: int = 1, context: int = 1, expert: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "context", "expert", "tensor") mesh over `devices` (default: all); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(data, fsdp, context, expert, tensor, devices=len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def format_mesh(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{a}={s}" for a, s in sizes.items())


# ---- logical names -> mesh axes ------------------------------------------------------------------
def mesh_axes(name: str | None, mesh_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes (present in the mesh) that logical axis `name` is split over."""
    if name is None:
        return ()
    if name not in RULES:
        raise ShardingError(f"no sharding rule for logical axis {name!r}; known: {sorted(RULES)}")
    return tuple(a for a in RULES[name] if a in mesh_sizes)


def logical_spec(names: Sequence[str | None], mesh_sizes: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names (None: not split)."""
    return PartitionSpec(*(mesh_axes(n, mesh_sizes) or None for n in names))


def split_count(name: str | None, mesh_sizes: Mapping[str, int]) -> int:
    """Into how many parts logical axis `name` is split on a mesh of these sizes."""
    return math.prod(mesh_sizes[a] for a in mesh_axes(name, mesh_sizes))


def check_divisible(what: str, shape: Sequence[int], names: Sequence[str | None],
                    mesh_sizes: Mapping[str, int]) -> None:
    """ShardingError naming the numbers unless every dimension divides the mesh axes it is split over."""
    for dim, name in zip(shape, names):
        axes = mesh_axes(name, mesh_sizes)
        parts = math.prod(mesh_sizes[a] for a in axes)
        if dim % parts:
            split = " * ".join(f"{a}={mesh_sizes[a]}" for a in axes)
            raise ShardingError(f"{what}: dimension {name!r} of size {dim} does not divide over mesh axes "
                                f"{split} = {parts}")


def local_shape(shape: Sequence[int], names: Sequence[str | None], mesh_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The shard of an array with these logical axis names that each device holds (dimensions assumed to divide)."""
    return tuple(d // split_count(n, mesh_sizes) for d, n in zip(shape, names))


def split_mesh():
    """The current mesh (`jax.set_mesh`) when it splits work over several devices (not inside a shard_map), else
    None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual else mesh


def length_pieces(seq: int) -> int:
    """Into how many pieces the current mesh's "context" axis splits a sequence of `seq` tokens (1 for one token)."""
    mesh = split_mesh()
    return 1 if mesh is None or seq == 1 else split_count("length", mesh.shape)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation to its logical sharding on the current mesh (`jax.set_mesh`); no-op without one."""
    mesh = split_mesh()
    if mesh is None:
        return x
    check_divisible(f"activation {tuple(names)} of shape {x.shape}", x.shape, names, mesh.shape)
    return jax.lax.with_sharding_constraint(x, logical_spec(names, mesh.shape))


Names = tuple[str | None, ...]


def per_device(fn: Callable, in_names: Sequence[Names], out_names: Sequence[Names]) -> Callable:
    """`fn` run on each device's shards over the current mesh: a `jax.shard_map` whose specs follow these logical
    names (one tuple per operand and per output); `fn` itself without a multi-device mesh.

    For work that is independent along the split dimensions but that XLA cannot split itself: a Pallas kernel is
    an opaque custom call, which the partitioner would run whole on every device after gathering its operands.
    None operands stay None.
    """

    @functools.wraps(fn)
    def run(*args):
        mesh = split_mesh()
        if mesh is None:
            return fn(*args)
        present = [i for i, a in enumerate(args) if a is not None]
        for i in present:
            check_divisible(f"operand {i} {tuple(in_names[i])} of shape {args[i].shape}", args[i].shape,
                            in_names[i], mesh.shape)

        def local(*xs):
            full = list(args)
            for i, x in zip(present, xs):
                full[i] = x
            return fn(*full)

        spec = lambda names: logical_spec(names, mesh.shape)
        return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(in_names[i]) for i in present),
                             out_specs=tuple(map(spec, out_names)),
                             check_vma=False,  # Pallas calls declare no varying-axis types for their outputs
                             )(*(args[i] for i in present))

    return run


# ---- parameters ----------------------------------------------------------------------------------
def param_logical_axes(config: ModelConfig) -> dict:
    """The PARAMS.md tree with each leaf's tuple of logical axis names."""
    def names(path, leaf):
        keys = [getattr(k, "key", k) for k in path]
        key = keys[-1]
        if key not in PARAM_AXES:
            raise ShardingError(f"parameter {'/'.join(map(str, keys))} has no entry in m1jax.sharding.PARAM_AXES")
        axes = (("layers",) if keys[0] == "cycles" else ()) + PARAM_AXES[key]
        if len(axes) != len(leaf.shape):
            raise ShardingError(f"parameter {'/'.join(map(str, keys))} has shape {leaf.shape} but logical axes "
                                f"{axes}")
        return axes

    return jax.tree_util.tree_map_with_path(names, _abstract_params(config))


def validate(config: ModelConfig, mesh_sizes: Mapping[str, int], batch: int | None = None,
             length: int | None = None) -> None:
    """Check, before anything compiles, that the model (and a batch size and sequence length) can be split as the
    rules say."""
    sizes = {a: mesh_sizes.get(a, 1) for a in AXES}
    need = [("num_heads", config.num_heads, "heads"), ("num_kv_heads", config.num_kv_heads, "kv_heads"),
            ("num_experts", config.num_experts, "experts"), ("intermediate_size", config.intermediate_size, "mlp"),
            ("hidden_size", config.hidden_size, "embed"), ("vocab_size", config.vocab_size, "vocab")]
    if batch is not None:
        need.append(("batch", batch, "batch"))
    if length is not None:
        need.append(("sequence length", length, "length"))
    for field, value, name in need:
        check_divisible(f"{field}={value}", (value,), (name,), sizes)
    abstract = _abstract_params(config)
    jax.tree.map(lambda a, names: check_divisible(f"parameter of shape {a.shape}", a.shape, names, sizes),
                 abstract, param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))


@functools.lru_cache(maxsize=8)
def _abstract_params(config: ModelConfig) -> dict:
    from m1jax.model import abstract_params  # m1jax.model imports the layers, which import this module
    return abstract_params(config)


def param_specs(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> dict:
    """PartitionSpecs in the PARAMS.md tree (mesh axes of size 1 included, so listings show every rule)."""
    return jax.tree.map(lambda names: logical_spec(names, mesh_sizes), param_logical_axes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


_announced: set = set()


def param_shardings(config: ModelConfig, mesh: Mesh, *, announce: bool = True) -> dict:
    """NamedShardings in the PARAMS.md tree; validates the mesh and prints the layout once per (config, mesh)."""
    validate(config, mesh.shape)
    if announce and (config, tuple(mesh.shape.items())) not in _announced:
        _announced.add((config, tuple(mesh.shape.items())))
        print(layout_report(config, mesh.shape), file=sys.stderr)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh.shape),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---- accounting ----------------------------------------------------------------------------------
class ParamInfo(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple[str, ...]  # logical axes
    spec: PartitionSpec
    local_shape: tuple[int, ...]  # the shard each device holds


def param_table(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> list[ParamInfo]:
    """Every parameter with its logical axes, PartitionSpec and per-device shard shape (no allocation)."""
    sizes = {a: mesh_sizes.get(a, 1) for a in AXES}
    validate(config, sizes)
    abstract = jax.tree_util.tree_flatten_with_path(_abstract_params(config))[0]
    names = jax.tree.leaves(param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    rows = []
    for (path, a), n in zip(abstract, names):
        rows.append(ParamInfo("/".join(str(getattr(k, "key", k)) for k in path), tuple(a.shape), np.dtype(a.dtype),
                              n, logical_spec(n, sizes), local_shape(a.shape, n, sizes)))
    return rows


def is_expert_weight(info: ParamInfo) -> bool:
    return "experts" in info.names


def param_bytes(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> dict[str, int]:
    """Parameter bytes, total and per device, for the routed experts (w1/w2/w3) and everything else."""
    out = dict.fromkeys(("experts_total", "experts_per_device", "other_total", "other_per_device"), 0)
    for p in param_table(config, mesh_sizes):
        kind = "experts" if is_expert_weight(p) else "other"
        out[f"{kind}_total"] += math.prod(p.shape) * p.dtype.itemsize
        out[f"{kind}_per_device"] += math.prod(p.local_shape) * p.dtype.itemsize
    return out


def layout_report(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> str:
    """The effective parallel layout in a few lines: what the mesh does to this model."""
    sizes = {a: mesh_sizes.get(a, 1) for a in AXES}
    b = param_bytes(config, sizes)
    total, per_device = b["experts_total"] + b["other_total"], b["experts_per_device"] + b["other_per_device"]

    def split(name: str, n: int) -> str:
        axes = mesh_axes(name, sizes)
        parts = math.prod(sizes[a] for a in axes)
        return f"{n} -> {n // parts} per device (over {' * '.join(f'{a}={sizes[a]}' for a in axes) or 'nothing'})"

    return "\n".join([
        f"m1jax mesh: {format_mesh(sizes)} ({math.prod(sizes.values())} devices)",
        f"  experts per layer {split('experts', config.num_experts)}; "
        f"expert width {split('mlp', config.intermediate_size)}",
        f"  heads {split('heads', config.num_heads)}; KV heads {split('kv_heads', config.num_kv_heads)}; "
        f"hidden dim of parameters {split('embed', config.hidden_size)}",
        f"  batch split {split_count('batch', sizes)} ways over {RULES['batch']}; "
        f"sequences split {split_count('length', sizes)} ways over {RULES['length']}",
        f"  parameters per device: {format_bytes(per_device)} of {format_bytes(total)} "
        f"(experts {format_bytes(b['experts_per_device'])}, other {format_bytes(b['other_per_device'])})",
    ])


def format_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as GPU memory sizes are quoted."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def spec_listing(config: ModelConfig, mesh_sizes: Mapping[str, int]) -> str:
    """One line per parameter: path, shape, dtype, logical axes, PartitionSpec, per-device shape (for goldens)."""
    lines = [f"# mesh {format_mesh({a: mesh_sizes.get(a, 1) for a in AXES})}"]
    lines += [f"{p.path} {list(p.shape)} {p.dtype.name} {list(p.names)} {p.spec} -> {list(p.local_shape)}"
              for p in param_table(config, mesh_sizes)]
    return "\n".join(lines) + "\n"
