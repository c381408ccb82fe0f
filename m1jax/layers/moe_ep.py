"""Expert-parallel MoE dispatch: each token copy travels to the device holding its expert and back.

One `jax.shard_map` over the whole current mesh (`jax.set_mesh`). Each device holds a block of tokens (split over
the "tokens" axes: context, data, fsdp, expert) and E/ep experts (split over "expert", their width over "tensor"). It
  1. sorts its token copies by expert (with a capacity factor: keeps the first `capacity` copies of each
     expert in token order and counts the rest as dropped; padding tokens never leave),
  2. exchanges per-expert counts, then the rows, over the expert axis: `ragged_all_to_all` where the
     backend has it (GPU, TPU), else an `all_to_all` of a worst-case padded buffer (XLA:CPU lacks
     ragged-all-to-all); both land the rows in the same [source device, slot] layout,
  3. regroups the received rows by local expert and runs the SwiGLU with three grouped matmuls,
  4. sends the results back the same way, weights each copy and sums a token's copies (psum over tensor).
Dropless by default: the receive buffer holds the worst case, ep * tokens * min(top_k, E/ep) rows. Where the
expert axis has size 1 (data, fsdp or tensor parallel meshes), steps 2-4's exchange and regrouping are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from m1jax.sharding import ShardingError, logical_spec, mesh_axes, split_count

TRANSPORTS = ("auto", "ragged", "padded")


def default_grouped_matmul() -> Callable:
    """The Pallas grouped matmul (pallas_kernels.grouped_matmul) when installed, else jax.lax.ragged_dot."""
    try:
        from pallas_kernels.grouped_matmul import grouped_matmul
    except ImportError:
        return jax.lax.ragged_dot
    return grouped_matmul


def resolve_dispatch(dispatch: "str | ExpertParallel") -> "str | ExpertParallel":
    """"auto" -> ExpertParallel() under a multi-device current mesh, else "ragged"; "ep" -> ExpertParallel().

    A single-device dispatch ("dense", "ragged") under a mesh that splits the experts is refused: it would
    quietly gather every expert onto every device instead of running expert-parallel.
    """
    if isinstance(dispatch, ExpertParallel):
        return dispatch
    mesh = jax.sharding.get_abstract_mesh()
    multi = not mesh.empty and mesh.size > 1 and not mesh.are_all_axes_manual
    if dispatch == "ep" or (dispatch == "auto" and multi):
        return ExpertParallel()
    if dispatch == "auto":
        return "ragged"
    ep = split_count("experts", mesh.shape) if multi else 1
    if ep > 1:
        raise ShardingError(f"dispatch={dispatch!r} runs on one device, but the mesh splits the experts over "
                            f"{ep} devices; use dispatch='ep' (or 'auto')")
    return dispatch


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """The `dispatch` of forward()/MoE that runs experts where they live (hashable: a static jit argument).

    capacity_factor: None for dropless; else each device sends at most ceil(cf * tokens * top_k / E) copies
    to each expert (tokens = the device's token block) and drops the rest, later tokens first.
    transport: "ragged" (ragged_all_to_all), "padded" (all_to_all of the worst-case buffer) or "auto".
    grouped_matmul: (lhs, rhs, group_sizes) -> out, like jax.lax.ragged_dot; None picks default_grouped_matmul().
    """

    capacity_factor: float | None = None
    transport: str = "auto"
    grouped_matmul: Callable | None = None

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"ExpertParallel.transport={self.transport!r} not in {TRANSPORTS}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"ExpertParallel.capacity_factor must be > 0 or None, got {self.capacity_factor}")

    def __call__(
        self,
        x: Float[Array, "tokens d"],
        w1: Float[Array, "experts d inter"],
        w3: Float[Array, "experts d inter"],
        w2: Float[Array, "experts inter d"],
        weights: Float[Array, "tokens k"],
        experts: Int[Array, "tokens k"],
        act: Callable,
        *,
        token_mask: Bool[Array, " tokens"],
    ) -> tuple[Float[Array, "tokens d"], Float[Array, ""]]:
        """The MoE output for every token and the number of dropped (real) token copies."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ShardingError("dispatch 'ep' needs a device mesh: call forward inside "
                                "`with jax.set_mesh(m1jax.make_mesh(...)):`")
        token_axes, expert_axes = mesh_axes("tokens", mesh.shape), mesh_axes("experts", mesh.shape)
        width_axes = mesh_axes("mlp", mesh.shape)
        ep = split_count("experts", mesh.shape)
        num_experts = w1.shape[0]
        if num_experts % ep:
            raise ShardingError(f"num_experts={num_experts} does not divide over mesh axes {expert_axes} = {ep}")
        transport = self.transport
        if transport == "auto":
            platform = getattr(mesh.abstract_device, "platform", None) or jax.default_backend()
            transport = "padded" if platform == "cpu" else "ragged"

        t = x.shape[0]
        pad = -t % split_count("tokens", mesh.shape)  # padded tokens are masked: they never leave
        if pad:
            x, weights, experts = (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (x, weights, experts))
            token_mask = jnp.pad(token_mask, (0, pad))

        local = functools.partial(
            _expert_parallel_local, act=act, num_experts=num_experts, capacity_factor=self.capacity_factor,
            transport=transport, grouped_matmul=self.grouped_matmul or default_grouped_matmul(),
            token_axes=token_axes, expert_axes=expert_axes, width_axes=width_axes)
        spec = lambda *names: logical_spec(names, mesh.shape)  # expert weights: gathered over fsdp here
        tok, w13 = spec("tokens", None), spec("experts", None, "mlp")
        y, dropped = jax.shard_map(
            local, mesh=mesh, in_specs=(tok, tok, tok, spec("tokens"), w13, w13, spec("experts", "mlp", None)),
            out_specs=(tok, P()),
            check_vma=False,  # Pallas kernels (the grouped matmul) declare no varying-axis types for their outputs
        )(x, weights, experts, token_mask.astype(bool), w1, w3, w2)
        return y[:t], dropped


def _expert_parallel_local(x, weights, experts, token_mask, w1, w3, w2, *, act, num_experts, capacity_factor,
                           transport, grouped_matmul, token_axes, expert_axes, width_axes):
    """Per-device body: x [t, d] this device's tokens; w* [E/ep, d, I/tp] this device's experts."""
    t, k = experts.shape
    e, el = num_experts, w1.shape[0]
    ep = e // el
    copies = t * k

    # 1. sort copies by expert; copies of padding tokens (and dropped ones) get the key e: they sort last
    flat = jnp.where(token_mask[:, None], experts, e).reshape(-1)
    counts = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    slot_rows = t * min(k, el)  # most rows one device can send another: each token's k experts differ
    order = jnp.argsort(flat, stable=True)
    if capacity_factor is None:
        kept = counts
    else:
        capacity = math.ceil(capacity_factor * t * k / e)
        slot_rows = min(slot_rows, el * capacity)
        key = flat[order]
        rank = jnp.arange(copies) - (jnp.cumsum(counts) - counts)[jnp.minimum(key, e - 1)]
        key = jnp.where((key < e) & (rank < capacity), key, e)
        order = order[jnp.argsort(key, stable=True)]
        kept = jnp.minimum(counts, capacity)
    dropped = jnp.sum(counts - kept).astype(jnp.float32)
    token_of = order // k
    rows = x[token_of]  # [copies, d]: the first sum(kept) rows are sent, grouped by expert

    if ep == 1:  # every expert is here: nothing travels, and the sent rows are already grouped by expert
        back = grouped_swiglu(rows, w1, w3, w2, kept, act, grouped_matmul)
    else:
        # 2. exchange: counts first, then rows into the [source device, slot_rows] layout
        send = kept.reshape(ep, el)
        recv = _all_to_all(send, expert_axes)  # recv[s, j]: rows device s sends to my local expert j
        received, send_back = _TRANSPORTS[transport](rows, send.sum(1), recv.sum(1), slot_rows, expert_axes)

        # 3. regroup by local expert (empty slots last), grouped SwiGLU, back to slot order, return trip
        local_expert = jax.vmap(lambda c: jnp.searchsorted(c, jnp.arange(slot_rows), side="right"))(
            jnp.cumsum(recv, 1))
        regroup = jnp.argsort(local_expert.reshape(-1), stable=True)
        xr = received[regroup]
        out = jnp.zeros_like(xr).at[regroup].set(grouped_swiglu(xr, w1, w3, w2, recv.sum(0), act, grouped_matmul))
        back = send_back(out)  # [copies, d], in `order`

    # 4. routing weights, sum each token's copies
    sent = jnp.arange(copies) < jnp.sum(kept)
    w = jnp.where(sent, weights.reshape(-1)[order], 0.0)
    y = jax.ops.segment_sum(jnp.where(sent[:, None], back, 0).astype(jnp.float32) * w[:, None], token_of,
                            num_segments=t)
    if width_axes:  # each device summed over its slice of the expert width
        y = jax.lax.psum(y, width_axes)
    return y.astype(x.dtype), jax.lax.psum(dropped, token_axes) if token_axes else dropped


def grouped_swiglu(x, w1, w3, w2, sizes, act, grouped_matmul):
    """The experts' SwiGLU over rows grouped by expert (sizes[j] rows for local expert j, then unused rows)."""
    h = act(grouped_matmul(x, w1, sizes)) * grouped_matmul(x, w3, sizes)
    return grouped_matmul(h, w2, sizes)


def _all_to_all(a, axes):
    return jax.lax.all_to_all(a, axes, 0, 0, tiled=True) if axes else a


def _padded(rows, send_sizes, recv_sizes, slot_rows, axes):
    """all_to_all of a [ep, slot_rows, d] buffer: every pair of devices exchanges slot_rows rows."""
    del recv_sizes  # implied by the buffer
    ep, feature = send_sizes.shape[0], rows.shape[1:]
    ends = jnp.cumsum(send_sizes)
    i = jnp.arange(rows.shape[0])
    dest = jnp.searchsorted(ends, i, side="right")  # ep for the rows that are not sent
    pos = i - (ends - send_sizes)[jnp.minimum(dest, ep - 1)]
    buf = jnp.zeros((ep, slot_rows) + feature, rows.dtype).at[dest, pos].set(rows, mode="drop")

    def back(out):
        returned = _all_to_all(out.reshape((ep, slot_rows) + out.shape[1:]), axes)
        return returned.at[dest, pos].get(mode="fill", fill_value=0)

    return _all_to_all(buf, axes).reshape((ep * slot_rows,) + feature), back


def _ragged(rows, send_sizes, recv_sizes, slot_rows, axes):
    """ragged_all_to_all: only the rows sent travel; they land in the same [ep, slot_rows] layout."""
    ep, feature = send_sizes.shape[0], rows.shape[1:]
    starts = jnp.cumsum(send_sizes) - send_sizes
    slots = jnp.arange(ep, dtype=jnp.int32) * slot_rows
    mine = jnp.full((ep,), jax.lax.axis_index(axes) * slot_rows, jnp.int32)  # my slot on every device
    received = jax.lax.ragged_all_to_all(rows, jnp.zeros((ep * slot_rows,) + feature, rows.dtype), starts,
                                         send_sizes, mine, recv_sizes, axis_name=axes)

    def back(out):
        return jax.lax.ragged_all_to_all(out, jnp.zeros_like(rows), slots, recv_sizes, _all_to_all(starts, axes),
                                         send_sizes, axis_name=axes)

    return received, back


_TRANSPORTS = {"padded": _padded, "ragged": _ragged}
