"""Tile sizes and the row-tile schedule shared by the Pallas grouped matmuls (megablox's group metadata).

Rows are sorted by group: rows [offsets[g], offsets[g+1]) belong to group g. They are cut into tiles of
`tile` rows, and a *work item* is one (group, row tile) pair that the group touches, listed in row order.
A tile that straddles a group boundary is therefore visited once per group it holds (each visit masks
the other groups' rows), and a group never shares a work item with another.
"""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Int


class Tiling(NamedTuple):
    """Block sizes of one grouped-matmul kernel.

    Every product (forward, dlhs, drhs) computes output tiles of block_m x block_n and steps over its
    contraction in chunks of block_k. num_warps and num_stages are Triton's and ignored on TPU.
    """

    block_m: int
    block_k: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


class TileSchedule(NamedTuple):
    """Work items over row tiles; arrays of work items have length num_tiles + num_groups - 1."""

    group_offsets: Int[Array, " groups_plus_2"]  # group g spans rows [g_o[g], g_o[g+1]); g_o[-2] == g_o[-1]
    group_ids: Int[Array, " work"]  # group of each work item; num_groups (an empty group) past the last
    row_tiles: Int[Array, " work"]  # row tile of each work item, non-decreasing
    num_work: Int[Array, ""]  # how many work items are real


def make_schedule(
    group_sizes: Int[Array, " groups"], num_rows: int, tile: int, *, visit_empty_groups: bool
) -> TileSchedule:
    """Work items for `num_rows` rows (a multiple of `tile`) split into groups of `group_sizes` rows.

    Groups past row `num_rows` are cut off. An empty group gets one work item (on the tile where it
    would start) when `visit_empty_groups`, so a kernel indexed by group can still zero its output.
    """
    num_groups = group_sizes.shape[0]
    num_tiles = num_rows // tile
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first_tile = starts // tile
    touched = (ends + tile - 1) // tile - first_tile
    items = jnp.where(ends > starts, touched, int(visit_empty_groups))

    max_work = num_tiles + num_groups - 1
    work = jnp.arange(max_work, dtype=jnp.int32)
    num_work = items.sum()
    group_ids = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), items, total_repeat_length=max_work)
    first_item = jnp.cumsum(items) - items
    row_tiles = jnp.minimum(first_tile[group_ids] + work - first_item[group_ids], num_tiles - 1)
    group_ids = jnp.where(work < num_work, group_ids, num_groups)
    group_offsets = jnp.concatenate([starts, ends[-1:], ends[-1:]])
    return TileSchedule(group_offsets, group_ids, row_tiles, num_work)


def pad_rows(x: Array, multiple: int) -> Array:
    """`x` with zero rows appended so its row count is a multiple of `multiple`."""
    extra = -x.shape[0] % multiple
    return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)) if extra else x
