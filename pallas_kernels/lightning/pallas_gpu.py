"""Lightning attention for Hopper GPUs (H100/H200) with the Pallas **Triton** backend, forward and backward.

Sequence-split design (kernels.md §5.2-5.3), so that batch 1 still fills the GPU. The sequence is cut into
blocks of ``chunks_per_block`` chunks of ``chunk`` tokens; states are only ever materialised at block boundaries:

forward   1. ``_local_kernel``  (parallel over batch, heads, blocks, v-tiles): each block's own state contribution
             ``L_b = sum_i lam^(end-1-i) k_i^T v_i``.
          2. ``_scan_kernel``   (parallel over batch, heads, k-rows): ``S_b = g_b S_{b-1} + L_b``, storing the state
             entering every block (fp32) and the final state.
          3. ``_output_kernel`` (parallel over batch, heads, blocks, v-tiles): walks the block's chunks from its entry
             state: ``o = ((Q K^T) * D) V + a * (Q S)``, ``S <- gamma S + (b * K)^T V``.
fused     (``Tuning.fused_forward``) the forward as one single-pass kernel, ``_fused_forward_kernel``: each program
forward   computes its block's local state, waits for the predecessor block's published state (a chained scan with
          look-back, ordered by atomic tickets), publishes its own, then computes the block's output; k and v are
          read from HBM once if their second read (a moment after the first) hits L2, so the forward moves q, k,
          v and o once (4x the size of q instead of 6x); the running state lives in one fp32 slot per (batch,
          head, v-tile), which ends as the final state.
backward  the same two passes recompute the entry states (nothing but q, k, v is saved), the mirrored pair gives the
          state gradient at every block end (``G_{b-1} = g_b G_b + sum_i lam^(i+1) q_i^T do_i``, ending in d
          initial_state), then ``_dqk_kernel`` (forward sweep for dq, reverse sweep for dk) and ``_dv_kernel``
          (reverse sweep) run in parallel over blocks. The fused forward shares the backward unchanged.

All dots take operands in the input dtype with fp32 accumulation; states and decays are fp32. Shapes the Triton
compiler cannot take (non-power-of-two tiles, dims below 16) are refused in ``check_shapes`` with a ValueError,
because interpret mode does not check them.

Path to Mosaic GPU (the Triton backend is deprecated since jax 0.11): keep this decomposition and wrapper and port
the kernels one at a time to ``plgpu.kernel`` (TMA into a swizzled SMEM ring, the state as a ``plgpu.ACC``
accumulator, ``plgpu.wgmma`` for the chunk products, producer/consumer warpgroups); details in README.md.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.lightning import chunk
from pallas_kernels.lightning.xla import segment_index

F32 = chunk.F32


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Tile and launch parameters of the chunk kernels (no autotuner: benchmarks/lightning_attention.py sweeps them
    on the device). Tiles are clipped to the head dims; all must be powers of two >= 16."""
    chunks_per_block: int = 8   # chunks between stored states: 512 tokens at the default chunk of 64
    block_k: int = 64           # dk tile of the dq/dk kernel
    block_v: int = 64           # dv tile of the output and dv kernels
    local_block_v: int = 64     # dv tile of the local-state kernel
    num_warps: int = 8          # of the chunk kernels (the state scan uses 4)
    num_stages: int = 2         # Triton's pipelining of the chunk loads: at 2 the next chunk's loads are issued
                                # after this chunk's work (no overlap), at 3 one chunk ahead (more shared memory)
    fused_forward: bool = False  # forward as one single-pass kernel (chained scan) instead of three; its v tile is
                                 # block_v (local_block_v then only serves the backward)


# benchmarks/lightning_attention.py sweeps tunings on the GPU and prints the line to put here.
# The fastest forward of the H200 sweep (2026-11-26, benchmarks/RESULTS.md): 1.235 ms at T=32K vs 2.33 ms for
# Tuning(); fwd+bwd 4.29 ms. With packed segments its output kernel spills a few registers (still exact).
DEFAULT_TUNING = Tuning(chunks_per_block=32, block_k=32, block_v=64, local_block_v=64, num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel parameters; all tile sizes powers of two and >= 16."""
    seq: int                # true sequence length (the arrays are padded to a multiple of block)
    chunk: int              # tokens per intra-chunk product
    chunks_per_block: int   # chunks between stored states
    block_k: int            # dk tile of the dq/dk kernel
    block_v: int            # dv tile of the output and dv kernels
    local_block_v: int      # dv tile of the local-state kernel
    scan_rows: int          # dk rows per program of the state scan
    scan_unroll: int        # blocks per step of the state scan (their loads are issued together)
    num_warps: int          # of the chunk kernels (the scan uses 4)
    num_stages: int         # of the chunk kernels
    fused_forward: bool     # forward as ``_fused_forward_kernel``
    segmented: bool
    interpret: bool

    @property
    def block(self) -> int:
        return self.chunk * self.chunks_per_block


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supports(dk: int, dv: int, chunk: int) -> bool:
    """Whether the Triton kernels take these sizes: powers of two >= 16 (dot minimum), head dims <= 256, chunk <= 128
    (64 for head dims above 128): larger tiles overflow the 227 KB of shared memory (ptxas, sm_90a)."""
    pow2 = all(_is_pow2(n) and n >= 16 for n in (dk, dv, chunk))
    return pow2 and max(dk, dv) <= 256 and chunk <= (128 if max(dk, dv) <= 128 else 64)


def check_shapes(dk: int, dv: int, chunk: int) -> None:
    """Refuse what the Triton compiler cannot take (interpret mode would silently accept it)."""
    if not supports(dk, dv, chunk):
        raise ValueError(f"lightning_attention(impl='pallas_gpu'): head_dim of q/k = {dk}, head_dim of v = {dv} and "
                         f"chunk_size = {chunk} must be powers of two >= 16, head dims <= 256 and chunk_size <= 128 "
                         f"(<= 64 above head dim 128) for the Triton kernels (use impl='xla' for other shapes)")


def check_tuning(tuning: Tuning) -> None:
    tiles = (tuning.block_k, tuning.block_v, tuning.local_block_v)
    if not (all(_is_pow2(n) and n >= 16 for n in tiles) and tuning.chunks_per_block >= 1
            and tuning.num_warps in (1, 2, 4, 8, 16) and tuning.num_stages >= 1
            and isinstance(tuning.fused_forward, bool)):
        raise ValueError(f"lightning_attention(impl='pallas_gpu'): bad tuning {tuning}: tiles must be powers of two "
                         f">= 16, chunks_per_block and num_stages >= 1, num_warps a power of two <= 16, "
                         f"fused_forward a bool")


def make_config(seq: int, dk: int, dv: int, chunk: int, segmented: bool, interpret: bool,
                tuning: Tuning | None = None) -> Config:
    tuning = DEFAULT_TUNING if tuning is None else tuning
    check_shapes(dk, dv, chunk)
    check_tuning(tuning)
    n_chunks = -(-seq // chunk)
    return Config(seq=seq, chunk=chunk, chunks_per_block=min(tuning.chunks_per_block, n_chunks),
                  block_k=min(dk, tuning.block_k), block_v=min(dv, tuning.block_v),
                  local_block_v=min(dv, tuning.local_block_v), scan_rows=16, scan_unroll=4,
                  num_warps=tuning.num_warps,
                  num_stages=tuning.num_stages, fused_forward=tuning.fused_forward, segmented=segmented,
                  interpret=interpret)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Grid (tile, batch, heads, blocks) unless stated; refs are one block of one (batch, head). The Triton
# lowering makes the first axes the fastest-varying launch index, so the tiles of one block run side by side and
# share their q/k (or v/do) loads in L2. The block functions (``_local_state``, ``_output_block``) are shared by
# the three-kernel forward and the fused one.


def _chunk(r, cfg: Config):
    return pl.ds(pl.multiple_of(r * cfg.chunk, cfg.chunk), cfg.chunk)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One block of a whole-array ref, indexed like the block refs of the three-kernel design: ``rows[sl]`` is
    ``ref[*lead, start + sl, *trail]`` (read or write) for a chunk slice ``sl`` relative to the block start.
    The block functions below take either (the fused kernel indexes whole arrays by its ticket)."""
    ref: Any
    lead: tuple
    start: Any
    trail: tuple

    @property
    def dtype(self):
        return self.ref.dtype

    def _index(self, sl):
        return (*self.lead, pl.ds(self.start + sl.start, sl.size), *self.trail)

    def __getitem__(self, sl):
        return self.ref[self._index(sl)]

    def __setitem__(self, sl, value):
        self.ref[self._index(sl)] = value


def _segments(seg_refs, sl):
    """Segment ids of one chunk as (column, row, previous-token column), or None when not packed."""
    if seg_refs is None:
        return None
    seg, seg_prev = seg_refs[0][sl], seg_refs[1][sl]
    return seg[:, None], seg[None, :], seg_prev[:, None]


def _split(rest, cfg: Config):
    """Kernel refs after the dense inputs: (segment refs or None, the remaining refs)."""
    return (tuple(rest[:2]), rest[2:]) if cfg.segmented else (None, rest)


def _local_state(s, x, y, segs, start, shape, cfg: Config, backward: bool):
    """Block-local state contribution ``sum_i w_i x_i^T y_i`` (fp32, ``shape``) of the block starting at token
    ``start``; x, y and the segment ids ``segs`` are block refs or ``_Rows``.

    forward  (x=k, y=v):  w_i = lam^(end-1-i) on rows of the block's last segment (the state leaving the block);
    backward (x=q, y=do): w_i = lam^(i+1) on rows of the segment open at the block start (gradient entering it).
    """
    end = jnp.minimum(cfg.seq, start + cfg.block)
    if segs is not None:
        seg_open = jnp.min(segs[1][pl.ds(0, cfg.chunk)][:, None], axis=0, keepdims=True)
        seg_last = jnp.max(segs[0][pl.ds(cfg.block - cfg.chunk, cfg.chunk)][:, None], axis=0, keepdims=True)

    def body(r, acc):
        sl = _chunk(r, cfg)
        t = start + r * cfg.chunk + chunk.rows(cfg.chunk)
        w = chunk.decay_pow(s, t - start + 1 if backward else end - 1 - t)
        if segs is not None:
            w = jnp.where(segs[0][sl][:, None] == (seg_open if backward else seg_last), w, 0.0)
        return acc + chunk.t_mm(x[sl], chunk.scale_rows(y[sl], w))

    return jax.lax.fori_loop(0, cfg.chunks_per_block, body, jnp.zeros(shape, F32))


def _output_block(s, q, k, v, o, segs, start, state, cfg: Config):
    """Forward output of the block starting at token ``start`` (one v-tile), walking its chunks from ``state``
    (fp32 [dk, BV], the state entering the block); q, k, v, o and ``segs`` are block refs or ``_Rows``."""
    intra = chunk.intra_decay(s, cfg.chunk)

    def body(r, state):  # state: [dk, BV], entering chunk r
        sl = _chunk(r, cfg)
        f = chunk.chunk_factors(s, start + r * cfg.chunk, cfg.seq, intra, _segments(segs, sl))
        qc, kc, vc = q[sl], k[sl], v[sl]
        scores = chunk.mm_t(qc, kc) * f.intra
        out = chunk.mm(scores.astype(vc.dtype), vc) + f.a * chunk.mm(qc, state.astype(qc.dtype))
        o[sl] = out.astype(o.dtype)
        return f.gamma * state + chunk.t_mm(kc, chunk.scale_rows(vc, f.b))

    jax.lax.fori_loop(0, cfg.chunks_per_block, body, state)


def _local_kernel(s_ref, x_ref, y_ref, *rest, cfg: Config, backward: bool):
    seg_refs, (out_ref,) = _split(rest, cfg)
    out_ref[...] = _local_state(s_ref[0], x_ref, y_ref, seg_refs, pl.program_id(3) * cfg.block, out_ref.shape, cfg,
                                backward)


def _scan_kernel(g_ref, y_ref, init_ref, states_ref, last_ref, *, n_blocks: int, unroll: int, reverse: bool):
    """``X <- g_b X + Y_b`` over blocks (reversed for the gradient), storing X before each step; grid (B, H, rows).

    The chain is latency-bound: each loop step issues the loads of ``unroll`` blocks before using the first."""

    def body(i, x):
        blocks = [i * unroll + u for u in range(unroll)]
        blocks = [n_blocks - 1 - b for b in blocks] if reverse else blocks
        loaded = [(g_ref[b], y_ref[b]) for b in blocks]
        for b, (g, y) in zip(blocks, loaded):
            states_ref[b] = x
            x = g * x + y
        return x

    last_ref[...] = jax.lax.fori_loop(0, n_blocks // unroll, body, init_ref[...].astype(F32))


def _output_kernel(s_ref, q_ref, k_ref, v_ref, *rest, cfg: Config):
    seg_refs, (s_in_ref, o_ref) = _split(rest, cfg)
    _output_block(s_ref[0], q_ref, k_ref, v_ref, o_ref, seg_refs, pl.program_id(3) * cfg.block, s_in_ref[...], cfg)


def _barrier(cfg: Config):
    """``bar.sync``: every thread of the program gets here, and their memory accesses before it are ordered before
    any after it (CTA scope). Interpret mode runs one program at a time and has no rule for it."""
    if not cfg.interpret:
        plt.debug_barrier()


# Spins after which a waiting program goes on with whatever state is there: a bug or a broken memory-ordering
# assumption then shows as wrong outputs (the tests and the benchmark's error columns) instead of a hung GPU.
# Real waits are microseconds; this is seconds.
_SPIN_LIMIT = 1 << 24


def _fused_forward_kernel(s_ref, g_ref, q_ref, k_ref, v_ref, *rest, cfg: Config, batch: int, heads: int,
                          tiles: int):
    """The whole forward in one pass over q, k, v (a chained scan with look-back to the predecessor only, as the
    single-pass prefix scans of CUB); 1-D grid, one program per (block, batch, head, v-tile); refs are whole arrays.

    1. Take a ticket from an atomic counter and derive (block, batch, head, tile) from it, block-major. The
       predecessor block of a ticket holds a smaller ticket, so it has started and (by induction) will publish:
       the spin below cannot deadlock, whatever order or residency the hardware gives the programs.
    2. The block's local state ``L`` from k, v (as ``_local_kernel``).
    3. Spin with atomic reads (acq_rel, GPU scope; one thread, broadcast; bounded by ``_SPIN_LIMIT``) until the
       chain's count of published blocks reaches this block, then read the chain's state slot ``S_in`` (the
       initial state for block 0) with volatile loads (not from L1).
    4. Publish ``S_out = g_b S_in + L`` into the same slot (one per (batch, head, tile): the hand-offs of a chain are
       serialised, and each store depends on the load of its element), ``bar.sync``, then one thread's atomic
       (release) counts the block as published: the pattern of CUTLASS's split-K semaphore. After the last block
       the slot holds the final state.
    5. The block's output from ``S_in`` (as ``_output_kernel``); its k, v tiles were read in step 2 moments before,
       so with small enough blocks they come from L2.
    """
    seg_refs, (*_, o_ref, state_ref, ticket_ref, published_ref) = _split(rest, cfg)  # after the aliased inputs
    per_block = batch * heads * tiles
    ticket = plt.atomic_add(ticket_ref, jnp.int32(0), jnp.int32(1))
    n, bhj = ticket // per_block, ticket % per_block
    b, h, j = bhj // (heads * tiles), bhj // tiles % heads, bhj % tiles
    s = s_ref[h]
    start = n * cfg.block
    cols = pl.ds(pl.multiple_of(j * cfg.block_v, cfg.block_v), cfg.block_v)
    rows = lambda ref, *trail: _Rows(ref, (b,), start, trail)
    q, k, v, o = rows(q_ref, h, slice(None)), rows(k_ref, h, slice(None)), rows(v_ref, h, cols), rows(o_ref, h, cols)
    segs = None if seg_refs is None else tuple(rows(r) for r in seg_refs)
    local = _local_state(s, k, v, segs, start, (q_ref.shape[-1], cfg.block_v), cfg, backward=False)

    def spin(carry):  # adding ``count * 0`` is an atomic read (a literal 0 would be a loop constant)
        count, tries = carry
        return plt.atomic_add(published_ref, (b, h, j), count * 0), tries + 1

    jax.lax.while_loop(lambda c: (c[0] < n) & (c[1] < _SPIN_LIMIT), spin, (0, 0))
    _barrier(cfg)
    s_in = plt.load(state_ref.at[b, h, :, cols], volatile=True)
    state_ref[b, h, :, cols] = g_ref[b, h, n] * s_in + local
    _barrier(cfg)
    plt.atomic_add(published_ref, (b, h, j), jnp.int32(1))
    _output_block(s, q, k, v, o, segs, start, s_in, cfg)


def _dqk_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, *rest, cfg: Config):
    """dq (forward sweep from the entry state) and dk (reverse sweep from the exit gradient) for one dk tile."""
    seg_refs, (s_in_ref, g_out_ref, dq_ref, dk_ref) = _split(rest, cfg)
    s = s_ref[0]
    start = pl.program_id(3) * cfg.block
    intra = chunk.intra_decay(s, cfg.chunk)

    def load(r):
        sl = _chunk(r, cfg)
        f = chunk.chunk_factors(s, start + r * cfg.chunk, cfg.seq, intra, _segments(seg_refs, sl))
        do, v = do_ref[sl, :], v_ref[sl, :]
        return sl, f, q_ref[sl, :], k_ref[sl, :], do, chunk.mm_t(do, v) * f.intra, v

    def forward(r, state):  # state: [BK, dv], entering chunk r
        sl, f, q, k, do, dp, v = load(r)
        dq = chunk.mm(dp.astype(k.dtype), k) + f.a * chunk.mm_t(do, state.astype(do.dtype))
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        return f.gamma * state + chunk.t_mm(chunk.scale_rows(k, f.b), v)

    def backward(j, dstate):  # dstate: [BK, dv], gradient of the state leaving chunk r
        sl, f, q, k, do, dp, v = load(cfg.chunks_per_block - 1 - j)
        dk = chunk.t_mm(dp.astype(q.dtype), q) + f.b * chunk.mm_t(v, dstate.astype(v.dtype))
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        return f.gamma * dstate + chunk.t_mm(chunk.scale_rows(q, f.a), do)

    jax.lax.fori_loop(0, cfg.chunks_per_block, forward, s_in_ref[...])
    jax.lax.fori_loop(0, cfg.chunks_per_block, backward, g_out_ref[...])


def _dv_kernel(s_ref, q_ref, k_ref, do_ref, *rest, cfg: Config):
    """dv for one dv tile: reverse sweep from the gradient of the state leaving the block."""
    seg_refs, (g_out_ref, dv_ref) = _split(rest, cfg)
    s = s_ref[0]
    start = pl.program_id(3) * cfg.block
    intra = chunk.intra_decay(s, cfg.chunk)

    def backward(j, dstate):  # dstate: [dk, BV]
        r = cfg.chunks_per_block - 1 - j
        sl = _chunk(r, cfg)
        f = chunk.chunk_factors(s, start + r * cfg.chunk, cfg.seq, intra, _segments(seg_refs, sl))
        q, k, do = q_ref[sl, :], k_ref[sl, :], do_ref[sl, :]
        scores = chunk.mm_t(q, k) * f.intra
        dv = chunk.t_mm(scores.astype(do.dtype), do) + f.b * chunk.mm(k, dstate.astype(k.dtype))
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return f.gamma * dstate + chunk.t_mm(q, chunk.scale_rows(do, f.a))

    jax.lax.fori_loop(0, cfg.chunks_per_block, backward, g_out_ref[...])


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k, v, do [B, Tp, H, d]; block states [B, H, NB, dk, dv] fp32.


def _params(num_warps: int, num_stages: int):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _seq_spec(cfg: Config, width: int, tiled: bool):
    """Spec of a [B, Tp, H, d] array: one block of tokens, the full width or the grid's tile of it."""
    return pl.BlockSpec((None, cfg.block, None, width), lambda j, b, h, n: (b, n, h, j if tiled else 0))


def _state_spec(rows: int, cols: int, tile_rows: bool):
    """Spec of a [B, H, NB, dk, dv] block-state array: this block's state, tiled along dk or dv."""
    return pl.BlockSpec((None, None, None, rows, cols),
                        lambda j, b, h, n: (b, h, n, j, 0) if tile_rows else (b, h, n, 0, j))


def _common_specs(cfg: Config):
    slope = pl.BlockSpec((1,), lambda j, b, h, n: (h,))
    seg = [pl.BlockSpec((None, cfg.block), lambda j, b, h, n: (b, n))] * 2 if cfg.segmented else []
    return slope, seg


def _local_states(x, y, slopes, segs, cfg: Config, backward: bool):
    batch, tp, heads, dk = x.shape
    dv = y.shape[-1]
    nb = tp // cfg.block
    slope, seg = _common_specs(cfg)
    return pl.pallas_call(
        functools.partial(_local_kernel, cfg=cfg, backward=backward),
        grid=(dv // cfg.local_block_v, batch, heads, nb),
        in_specs=[slope, _seq_spec(cfg, dk, False), _seq_spec(cfg, cfg.local_block_v, True), *seg],
        out_specs=_state_spec(dk, cfg.local_block_v, False),
        out_shape=jax.ShapeDtypeStruct((batch, heads, nb, dk, dv), F32),
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_local_states",
    )(slopes, x, y, *segs)


def _scan(block_decay, local, init, cfg: Config, reverse: bool):
    batch, heads, nb, dk, dv = local.shape
    rows = cfg.scan_rows
    full = pl.BlockSpec((None, None, nb, rows, dv), lambda b, h, j: (b, h, 0, j, 0))
    one = pl.BlockSpec((None, None, rows, dv), lambda b, h, j: (b, h, j, 0))
    return pl.pallas_call(
        functools.partial(_scan_kernel, n_blocks=nb, unroll=math.gcd(nb, cfg.scan_unroll), reverse=reverse),
        grid=(batch, heads, dk // rows),
        in_specs=[pl.BlockSpec((None, None, nb), lambda b, h, j: (b, h, 0)), full, one],
        out_specs=[full, one],
        out_shape=[jax.ShapeDtypeStruct(local.shape, F32), jax.ShapeDtypeStruct(init.shape, F32)],
        compiler_params=_params(4, 3),
        interpret=cfg.interpret,
        name="lightning_state_scan",
    )(block_decay, local, init)


def _block_decay(slopes, segs, cfg: Config, batch: int, nb: int):
    """``g_b = lam^len_b``, zero where a segment starts inside block b: [B, H, nb] fp32 (plain XLA, tiny)."""
    starts = jnp.arange(nb) * cfg.block
    lengths = jnp.clip(cfg.seq - starts, 0, cfg.block).astype(F32)
    g = jnp.exp(-slopes.astype(F32)[:, None] * lengths[None, :])[None]
    if not segs:
        return jnp.broadcast_to(g, (batch, *g.shape[1:]))
    seg, segp = segs
    keep = seg[:, starts + cfg.block - 1] == segp[:, starts]
    return g * keep[:, None, :].astype(F32)


def _entry_states(k, v, slopes, h0, segs, cfg: Config):
    """State entering every block, [B, H, NB, dk, dv] fp32, and the final state."""
    local = _local_states(k, v, slopes, segs, cfg, backward=False)
    g = _block_decay(slopes, segs, cfg, k.shape[0], local.shape[2])
    return _scan(g, local, h0, cfg, reverse=False)


def _output(q, k, v, slopes, segs, s_in, cfg: Config):
    batch, tp, heads, dk = q.shape
    dv = v.shape[-1]
    slope, seg = _common_specs(cfg)
    return pl.pallas_call(
        functools.partial(_output_kernel, cfg=cfg),
        grid=(dv // cfg.block_v, batch, heads, tp // cfg.block),
        in_specs=[slope, _seq_spec(cfg, dk, False), _seq_spec(cfg, dk, False), _seq_spec(cfg, cfg.block_v, True),
                  *seg, _state_spec(dk, cfg.block_v, False)],
        out_specs=_seq_spec(cfg, cfg.block_v, True),
        out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_output",
    )(slopes, q, k, v, *segs, s_in)


def _fused_forward(q, k, v, slopes, h0, segs, cfg: Config):
    """Output and final state from ``_fused_forward_kernel``: the state slots start as (a copy of) the initial state,
    the ticket and published counts at zero (inputs aliased to outputs)."""
    batch, tp, heads, _ = q.shape
    nb, tiles = tp // cfg.block, v.shape[-1] // cfg.block_v
    ticket, published = jnp.zeros((1,), jnp.int32), jnp.zeros((batch, heads, tiles), jnp.int32)
    n_in = 5 + len(segs)
    out, final, _, _ = pl.pallas_call(
        functools.partial(_fused_forward_kernel, cfg=cfg, batch=batch, heads=heads, tiles=tiles),
        grid=(nb * batch * heads * tiles,),
        out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(h0.shape, F32),
                   jax.ShapeDtypeStruct(ticket.shape, ticket.dtype),
                   jax.ShapeDtypeStruct(published.shape, published.dtype)],
        input_output_aliases={n_in: 1, n_in + 1: 2, n_in + 2: 3},
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_fused_forward",
    )(slopes, _block_decay(slopes, segs, cfg, batch, nb), q, k, v, *segs, h0, ticket, published)
    return out, final


def _forward(cfg: Config, q, k, v, slopes, h0, segs):
    if cfg.fused_forward:
        return _fused_forward(q, k, v, slopes, h0, segs, cfg)
    s_in, final = _entry_states(k, v, slopes, h0, segs, cfg)
    return _output(q, k, v, slopes, segs, s_in, cfg), final


def _gradients(q, k, v, do, slopes, segs, s_in, g_out, cfg: Config):
    batch, tp, heads, dk = q.shape
    dv = v.shape[-1]
    nb = tp // cfg.block
    slope, seg = _common_specs(cfg)
    dq, dk_ = pl.pallas_call(
        functools.partial(_dqk_kernel, cfg=cfg),
        grid=(dk // cfg.block_k, batch, heads, nb),
        in_specs=[slope, _seq_spec(cfg, cfg.block_k, True), _seq_spec(cfg, cfg.block_k, True),
                  _seq_spec(cfg, dv, False), _seq_spec(cfg, dv, False), *seg,
                  _state_spec(cfg.block_k, dv, True), _state_spec(cfg.block_k, dv, True)],
        out_specs=[_seq_spec(cfg, cfg.block_k, True)] * 2,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)],
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_dqk",
    )(slopes, q, k, v, do, *segs, s_in, g_out)
    dv_ = pl.pallas_call(
        functools.partial(_dv_kernel, cfg=cfg),
        grid=(dv // cfg.block_v, batch, heads, nb),
        in_specs=[slope, _seq_spec(cfg, dk, False), _seq_spec(cfg, dk, False), _seq_spec(cfg, cfg.block_v, True),
                  *seg, _state_spec(dk, cfg.block_v, False)],
        out_specs=_seq_spec(cfg, cfg.block_v, True),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_dv",
    )(slopes, q, k, do, *segs, g_out)
    return dq, dk_, dv_


# ---------------------------------------------------------------------------------------------------------------
# custom_vjp over padded arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(cfg: Config, q, k, v, slopes, h0, segs):
    return _forward(cfg, q, k, v, slopes, h0, segs)


def _lightning_fwd(cfg, q, k, v, slopes, h0, segs):
    return _lightning(cfg, q, k, v, slopes, h0, segs), (q, k, v, slopes, h0, segs)


def _lightning_bwd(cfg, residuals, cotangents):
    q, k, v, slopes, h0, segs = residuals
    do, d_final = cotangents
    do = do.astype(q.dtype)
    s_in, _ = _entry_states(k, v, slopes, h0, segs, cfg)
    local = _local_states(q, do, slopes, segs, cfg, backward=True)
    g = _block_decay(slopes, segs, cfg, q.shape[0], local.shape[2])
    g_out, dh0 = _scan(g, local, d_final.astype(F32), cfg, reverse=True)
    dq, dk, dv = _gradients(q, k, v, do, slopes, segs, s_in, g_out, cfg)
    return dq, dk, dv, jnp.zeros_like(slopes), dh0.astype(h0.dtype), None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention_pallas_gpu(q, k, v, slopes, initial_state, segment_ids, *, chunk_size: int,
                                   interpret: bool, tuning: Tuning | None = None):
    """[B, T, H, d] in, ([B, T, H, dv], [B, H, dk, dv] fp32) out; pads T to a whole number of blocks.
    ``tuning`` defaults to ``DEFAULT_TUNING``."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    cfg = make_config(seq, dk, dv, chunk_size, segment_ids is not None, interpret, tuning)
    pad = -seq % cfg.block
    pad_seq = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    if segment_ids is None:
        segs = ()
    else:
        seg = jnp.pad(segment_index(segment_ids), ((0, 0), (0, pad)), mode="edge")
        segs = (seg, jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1))
    h0 = jnp.zeros((batch, heads, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    out, final = _lightning(cfg, pad_seq(q), pad_seq(k), pad_seq(v), slopes.astype(F32), h0, segs)
    return out[:, :seq], final
