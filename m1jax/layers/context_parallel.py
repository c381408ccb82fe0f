"""Context parallelism for lightning attention: each device runs the kernel on its own piece of the sequence.

With the mesh axis "context" of size P, every sequence is split into P contiguous pieces of L tokens (the
logical axis "length"). Each device runs lightning attention on its piece from a zero state and returns its
output and the state the piece ends with; `join_pieces` then adds what the earlier pieces contribute, as in
LASP-2 (Sun et al. 2025): the pieces' final states are gathered (P fp32 states, small next to the activations),
the state entering every piece follows from a P-step recurrence, and each token adds `q_t λ^(t+1) S_in` (t its
position in the piece) until its piece's first new packed document. Softmax layers split their queries the same
way and read every key (layers/attention.py gathers K and V over the context axis).

Why this is exact: the recurrence `S_t = λ S_{t-1} + k_t^T v_t` is linear, so the state after a piece is
`λ^L S_in + S_piece` and a token's output is `q_t S_t = q_t (λ^(t+1) S_in + S_t^piece)`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.lightning.reference import segment_starts


def join_pieces(
    out: Float[Array, "batch seq heads dv"],
    piece_states: Float[Array, "pieces batch heads dk dv"],
    q: Float[Array, "batch seq heads dk"],
    slopes: Float[Array, " heads"],
    initial_state: Float[Array, "batch heads dk dv"] | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, "batch seq heads dv"], Float[Array, "batch heads dk dv"]]:
    """Whole-sequence lightning attention from its P pieces each computed from a zero state.

    `out` holds the pieces' outputs side by side, `piece_states[p]` the state piece p ends with (fp32). Returns
    the output with the earlier pieces' (and `initial_state`'s) contribution added and the final state, as one
    `lightning_attention` over the whole sequence would. Packed segments: the state resets at every token whose
    id differs from the previous token's, across piece boundaries too; `initial_state` belongs to the first segment.
    """
    pieces, b, h, dk, dv = piece_states.shape
    n = q.shape[1]
    length = n // pieces
    if length * pieces != n or out.shape != (b, n, h, dv):
        raise ValueError(f"join_pieces: {pieces} piece states do not split output {out.shape} / q {q.shape}")
    f32 = jnp.float32
    rate = jax.lax.stop_gradient(slopes).astype(f32)
    if segment_ids is None:
        reached = jnp.ones((b, pieces, length), bool)
    else:  # reached[t]: no segment starts in the piece up to and including t, so the entering state still counts
        starts = segment_starts(segment_ids).reshape(b, pieces, length)
        reached = jnp.cumsum(starts, axis=2) == 0
    # carry[p]: how much of the state entering piece p leaves it (λ^L, or 0 if a segment starts inside)
    carry = reached[:, :, -1].T[:, :, None] * jnp.exp(-rate * length)  # [pieces, b, h]

    def enter(state, xs):
        piece_state, keep = xs
        return keep[..., None, None] * state + piece_state, state

    start = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    final, entering = jax.lax.scan(enter, start, (piece_states.astype(f32), carry))  # entering [pieces, b, h, ...]

    decay = jnp.exp(-rate[None, :] * jnp.arange(1, length + 1, dtype=f32)[:, None])  # [L, h]: λ^(t+1)
    weight = reached[..., None] * decay  # [b, pieces, L, h]
    qp = q.reshape(b, pieces, length, h, dk).astype(f32) * weight[..., None]
    correction = jnp.einsum("bpthk,pbhkv->bpthv", qp, entering, precision=jax.lax.Precision.HIGHEST)
    joined = out.astype(f32) + correction.reshape(b, n, h, dv)
    return joined.astype(out.dtype), final
