"""Lightning attention for TPUs with Mosaic TPU kernels, forward and backward (kernels.md §5.5).

Layout ``[B, H, T, d]`` inside (the wrapper transposes). Grid ``(B, H, T / block)`` with the block axis
"arbitrary": the fp32 state lives in VMEM scratch across grid steps, and each step walks its ``block / chunk``
chunks with an unrolled inner loop. The backward runs the same grid with every sequence ``index_map`` reversed and
the state gradient in VMEM. It needs the state entering each block, which a states-only run of the forward kernel
recomputes (nothing but q, k, v is saved); inside a block the chunk states are recomputed into VMEM.
Per-head slopes live in SMEM. Tested with the TPU interpreter; no TPU was available to compile it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning import chunk
from pallas_kernels.lightning.xla import segment_index

F32 = chunk.F32
CHUNKS_PER_BLOCK = 4   # 512 tokens per grid step at the default chunk of 128


@dataclasses.dataclass(frozen=True)
class Config:
    seq: int          # true sequence length
    chunk: int        # tokens per intra-chunk product (128 fits v5 MXUs, 256 v6e)
    block: int        # tokens per grid step (a multiple of chunk)
    segmented: bool
    interpret: bool

    @property
    def n_chunks(self) -> int:
        return self.block // self.chunk


def make_config(seq: int, chunk_size: int, segmented: bool, interpret: bool) -> Config:
    """Mosaic tiling: chunks of a multiple of 8 rows; compiled, blocks of a multiple of 128 tokens (segment rows)."""
    n_chunks = -(-seq // chunk_size)
    block = chunk_size * min(CHUNKS_PER_BLOCK, n_chunks)
    if chunk_size % 8 or (not interpret and block < seq and block % 128):
        raise ValueError(f"lightning_attention(impl='pallas_tpu'): chunk_size = {chunk_size} must be a multiple of 8, "
                         f"and of {128 // CHUNKS_PER_BLOCK} when compiled for TPU")
    return Config(seq=seq, chunk=chunk_size, block=block, segmented=segmented, interpret=interpret)


def _segments(seg_refs, sl):
    if seg_refs is None:
        return None
    seg_col, seg_row, seg_prev_col = seg_refs
    return seg_col[sl, :], seg_row[:, sl], seg_prev_col[sl, :]


def _chunk_slice(r, cfg: Config):
    return pl.ds(pl.multiple_of(r * cfg.chunk, cfg.chunk), cfg.chunk)


def _forward_kernel(slopes_ref, q_ref, k_ref, v_ref, *refs, cfg: Config, emit_states: bool):
    """One block of one (batch, head): outputs (or the state entering the block), carrying the state in VMEM."""
    n_seg = 3 if cfg.segmented else 0
    seg_refs = refs[:n_seg] if n_seg else None
    h0_ref, out_ref, final_ref, state_scr = refs[n_seg:]
    step, n_steps = pl.program_id(2), pl.num_programs(2)
    s = slopes_ref[pl.program_id(1)]
    intra = chunk.intra_decay(s, cfg.chunk)

    @pl.when(step == 0)
    def _():
        state_scr[...] = h0_ref[...]

    if emit_states:
        out_ref[...] = state_scr[...]

    def body(r, state):
        sl = _chunk_slice(r, cfg)
        f = chunk.chunk_factors(s, step * cfg.block + r * cfg.chunk, cfg.seq, intra, _segments(seg_refs, sl))
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        if not emit_states:
            scores = chunk.mm_t(q, k) * f.intra
            out = chunk.mm(scores.astype(v.dtype), v) + f.a * chunk.mm(q, state.astype(q.dtype))
            out_ref[sl, :] = out.astype(out_ref.dtype)
        return f.gamma * state + chunk.t_mm(chunk.scale_rows(k, f.b), v)

    state_scr[...] = jax.lax.fori_loop(0, cfg.n_chunks, body, state_scr[...], unroll=True)

    @pl.when(step == n_steps - 1)
    def _():
        final_ref[...] = state_scr[...]


def _backward_kernel(slopes_ref, q_ref, k_ref, v_ref, do_ref, *refs, cfg: Config):
    """One block, visited last to first: dq, dk, dv from the block's entry state and the carried state gradient."""
    n_seg = 3 if cfg.segmented else 0
    seg_refs = refs[:n_seg] if n_seg else None
    s_in_ref, d_final_ref, dq_ref, dk_ref, dv_ref, dh0_ref, dstate_scr, states_scr = refs[n_seg:]
    step, n_steps = pl.program_id(2), pl.num_programs(2)
    block = n_steps - 1 - step
    s = slopes_ref[pl.program_id(1)]
    intra = chunk.intra_decay(s, cfg.chunk)

    @pl.when(step == 0)
    def _():
        dstate_scr[...] = d_final_ref[...]

    def factors(r):
        sl = _chunk_slice(r, cfg)
        return sl, chunk.chunk_factors(s, block * cfg.block + r * cfg.chunk, cfg.seq, intra, _segments(seg_refs, sl))

    def forward(r, state):  # recompute the state entering every chunk of the block
        sl, f = factors(r)
        states_scr[r] = state
        return f.gamma * state + chunk.t_mm(chunk.scale_rows(k_ref[sl, :], f.b), v_ref[sl, :])

    def backward(j, dstate):  # dstate: gradient of the state leaving chunk r
        r = cfg.n_chunks - 1 - j
        sl, f = factors(r)
        q, k, v, do = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :]
        scores = chunk.mm_t(q, k) * f.intra
        dp = chunk.mm_t(do, v) * f.intra
        state = states_scr[r]
        dq_ref[sl, :] = (chunk.mm(dp.astype(k.dtype), k)
                         + f.a * chunk.mm_t(do, state.astype(do.dtype))).astype(dq_ref.dtype)
        dk_ref[sl, :] = (chunk.t_mm(dp.astype(q.dtype), q)
                         + f.b * chunk.mm_t(v, dstate.astype(v.dtype))).astype(dk_ref.dtype)
        dv_ref[sl, :] = (chunk.t_mm(scores.astype(do.dtype), do)
                         + f.b * chunk.mm(k, dstate.astype(k.dtype))).astype(dv_ref.dtype)
        return f.gamma * dstate + chunk.t_mm(chunk.scale_rows(q, f.a), do)

    jax.lax.fori_loop(0, cfg.n_chunks, forward, s_in_ref[...], unroll=True)
    dstate_scr[...] = jax.lax.fori_loop(0, cfg.n_chunks, backward, dstate_scr[...], unroll=True)

    @pl.when(step == n_steps - 1)
    def _():
        dh0_ref[...] = dstate_scr[...]


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k, v, do [B, H, Tp, d]; segments [B, Tp, 1], [B, 1, Tp], [B, Tp, 1].


def _interpret(cfg: Config):
    return pltpu.InterpretParams() if cfg.interpret else False


def _specs(cfg: Config, reverse: bool):
    """Index-map helpers over grid (b, h, step), visiting blocks last to first when ``reverse``."""
    blk = (lambda n, c: n - 1 - c) if reverse else (lambda n, c: c)

    def seq(nb, d):
        return pl.BlockSpec((None, None, cfg.block, d), lambda b, h, c: (b, h, blk(nb, c), 0))

    def segs(nb):
        if not cfg.segmented:
            return []
        col = pl.BlockSpec((None, cfg.block, 1), lambda b, h, c: (b, blk(nb, c), 0))
        row = pl.BlockSpec((None, 1, cfg.block), lambda b, h, c: (b, 0, blk(nb, c)))
        return [col, row, col]

    return seq, segs


def _state_spec(dk, dv):
    return pl.BlockSpec((None, None, dk, dv), lambda b, h, c: (b, h, 0, 0))


def _slopes_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward(q, k, v, slopes, h0, segs, cfg: Config, emit_states: bool):
    batch, heads, tp, dk = q.shape
    dv = v.shape[-1]
    nb = tp // cfg.block
    seq, seg_specs = _specs(cfg, reverse=False)
    if emit_states:
        out_spec = pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c: (b, h, c, 0, 0))
        out_shape = jax.ShapeDtypeStruct((batch, heads, nb, dk, dv), F32)
    else:
        out_spec, out_shape = seq(nb, dv), jax.ShapeDtypeStruct(v.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, emit_states=emit_states),
        grid=(batch, heads, nb),
        in_specs=[_slopes_spec(), seq(nb, dk), seq(nb, dk), seq(nb, dv), *seg_specs(nb), _state_spec(dk, dv)],
        out_specs=[out_spec, _state_spec(dk, dv)],
        out_shape=[out_shape, jax.ShapeDtypeStruct((batch, heads, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(),
        interpret=_interpret(cfg),
        name="lightning_states_tpu" if emit_states else "lightning_forward_tpu",
    )(slopes, q, k, v, *segs, h0)


def _backward(q, k, v, do, slopes, segs, s_in, d_final, cfg: Config):
    batch, heads, tp, dk = q.shape
    dv = v.shape[-1]
    nb = tp // cfg.block
    seq, seg_specs = _specs(cfg, reverse=True)
    s_in_spec = pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c: (b, h, nb - 1 - c, 0, 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg),
        grid=(batch, heads, nb),
        in_specs=[_slopes_spec(), seq(nb, dk), seq(nb, dk), seq(nb, dv), seq(nb, dv), *seg_specs(nb),
                  s_in_spec, _state_spec(dk, dv)],
        out_specs=[seq(nb, dk), seq(nb, dk), seq(nb, dv), _state_spec(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32), pltpu.VMEM((cfg.n_chunks, dk, dv), F32)],
        compiler_params=_compiler_params(),
        interpret=_interpret(cfg),
        name="lightning_backward_tpu",
    )(slopes, q, k, v, do, *segs, s_in, d_final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(cfg: Config, q, k, v, slopes, h0, segs):
    return _forward(q, k, v, slopes, h0, segs, cfg, emit_states=False)


def _lightning_fwd(cfg, q, k, v, slopes, h0, segs):
    return _lightning(cfg, q, k, v, slopes, h0, segs), (q, k, v, slopes, h0, segs)


def _lightning_bwd(cfg, residuals, cotangents):
    q, k, v, slopes, h0, segs = residuals
    do, d_final = cotangents
    s_in, _ = _forward(q, k, v, slopes, h0, segs, cfg, emit_states=True)
    dq, dk, dv, dh0 = _backward(q, k, v, do.astype(q.dtype), slopes, segs, s_in, d_final.astype(F32), cfg)
    return dq, dk, dv, jnp.zeros_like(slopes), dh0, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention_pallas_tpu(q, k, v, slopes, initial_state, segment_ids, *, chunk_size: int,
                                   interpret: bool):
    """[B, T, H, d] in, ([B, T, H, dv], [B, H, dk, dv] fp32) out; pads T to a whole number of blocks."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    cfg = make_config(seq, chunk_size, segment_ids is not None, interpret)
    pad = -seq % cfg.block
    to_bhtd = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if segment_ids is None:
        segs = ()
    else:
        seg = jnp.pad(segment_index(segment_ids), ((0, 0), (0, pad)), mode="edge")
        seg_prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
        segs = (seg[:, :, None], seg[:, None, :], seg_prev[:, :, None])
    h0 = jnp.zeros((batch, heads, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    out, final = _lightning(cfg, to_bhtd(q), to_bhtd(k), to_bhtd(v), slopes.astype(F32), h0, segs)
    return out.transpose(0, 2, 1, 3)[:, :seq], final
