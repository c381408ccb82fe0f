"""The M1 decoder: embedding, a scanned stack of layer cycles, final norm, fp32 LM head (architecture.md §3-4).

The layer stack is a pattern cycle (for M1: 7 lightning + 1 softmax) repeated `num_cycles` times; every
parameter of a cycle carries a leading [num_cycles] axis and the stack runs as one `lax.scan` (or a Python
loop with `scan=False`, for debugging; both give identical logits).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from m1jax.config import LayerType, ModelConfig
from m1jax.layers.attention import SoftmaxAttention
from m1jax.layers.common import dense_param, fp32_matmul
from m1jax.layers.lightning import LightningAttention, lightning_slopes
from m1jax.layers.moe import MoE
from m1jax.layers.norms import RMSNorm
from m1jax.sharding import constrain, length_pieces, residual_names


class Context(NamedTuple):
    """Per-call token bookkeeping shared by every layer."""

    positions: Int[Array, "batch seq"]
    token_mask: Array  # [batch, seq] bool: real tokens (False at left padding)
    segment_ids: Array | None  # [batch, seq] int32 for packed documents
    key_valid: Array | None  # [batch, slots] bool: valid KV-cache slots after this call's write
    offset: Array | int  # KV-cache slot of this call's first token
    expert_threshold: Array | None = None  # inference-time expert skipping (see layers.moe.route)


class DecoderLayer(nnx.Module):
    """x' = alpha * h + beta * attn(h), h = norm(x) (post-norm: the residual is the normalised input)."""

    def __init__(self, config: ModelConfig, layer_type: LayerType, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        d, dt = config.hidden_size, config.jnp_dtype
        self.layer_type = layer_type
        self.input_norm = RMSNorm(d, config.rms_norm_eps, stack=stack, dtype=dt)
        attention = LightningAttention if layer_type == "lightning" else SoftmaxAttention
        self.attn = attention(config, stack=stack, rngs=rngs)
        self.post_attention_norm = RMSNorm(d, config.rms_norm_eps, stack=stack, dtype=dt)
        self.moe = MoE(config, stack=stack, rngs=rngs)
        self.config = config

    def __call__(self, x, ctx: Context, slopes, cache, dispatch: str):
        attn_alpha, attn_beta, mlp_alpha, mlp_beta = self.config.residual_scales(self.layer_type)
        postnorm = self.config.postnorm

        h = self.input_norm(x)
        if self.layer_type == "lightning":
            a, cache = self.attn(h, slopes, token_mask=ctx.token_mask, segment_ids=ctx.segment_ids, state=cache)
        else:
            a, cache = self.attn(h, ctx.positions, token_mask=ctx.token_mask, segment_ids=ctx.segment_ids,
                                 kv=cache, key_valid=ctx.key_valid, offset=ctx.offset)
        x = (h if postnorm else x) * attn_alpha + checkpoint_name(a, "attention_out") * attn_beta

        h = self.post_attention_norm(x)
        m, stats = self.moe(h, ctx.token_mask, dispatch, ctx.expert_threshold)
        x = (h if postnorm else x) * mlp_alpha + checkpoint_name(m, "moe_out") * mlp_beta
        return x, cache, stats


class LayerCycle(nnx.Module):
    """One period of the layer pattern; its parameters are stacked over the cycles."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        stack = (config.num_cycles,)
        self.layers = nnx.List([DecoderLayer(config, t, stack=stack, rngs=rngs) for t in config.cycle])

    def __call__(self, x, ctx: Context, slopes, caches, dispatch: str):
        new_caches, stats = {}, {}
        for j, layer in enumerate(self.layers):
            x, new_caches[j], stats[j] = layer(x, ctx, slopes[j], caches[j], dispatch)
            x = constrain(x, residual_names(x.shape[1]))
        return x, new_caches, stats


class Output(NamedTuple):
    logits: Float[Array, "batch seq vocab"] | None  # fp32; None with head=False
    cache: Any  # updated per-layer caches ({cycle position: stacked cache}) or None
    router: dict  # per-layer router statistics, each with a leading [num_layers] axis
    hidden: Float[Array, "batch seq d"] | None = None  # the final-normed hidden states, with head=False


class M1Model(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, v, dt = config.hidden_size, config.vocab_size, config.jnp_dtype
        self.config = config
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32).astype(dt))
        self.cycles = LayerCycle(config, rngs=rngs)
        self.final_norm = RMSNorm(d, config.rms_norm_eps, dtype=dt)
        if not config.tie_word_embeddings:
            self.lm_head = dense_param(rngs, (d, v), d, dt)

    def __call__(self, input_ids: Int[Array, "batch seq"], attention_mask: Array | None = None
                 ) -> Float[Array, "batch seq vocab"]:
        """fp32 logits for a batch of (left-padded) token ids."""
        return forward(self, input_ids, attention_mask=attention_mask).logits

    def head(self, y: Float[Array, "... d"]) -> Float[Array, "... vocab"]:
        """The LM head in fp32 (the M1 report's fix): fp32(y) @ fp32(W) at full fp32 precision."""
        w = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return fp32_matmul(y, w)


def default_positions(token_mask: Array, segment_ids: Array | None) -> Int[Array, "batch seq"]:
    """Positions counting real tokens only (left padding) and restarting at each packed document."""
    if segment_ids is None:
        return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1, 0)
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    new_doc = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(new_doc, idx, 0), axis=1)


# Remat policies for the layer cycle: recompute everything, keep matmul outputs, or keep the named sublayer
# outputs ("attention_out", "moe_out") so the backward recomputes inside a sublayer but not across them.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "sublayers": jax.checkpoint_policies.save_only_these_names("attention_out", "moe_out")}


@functools.partial(jax.jit, static_argnames=("scan", "dispatch", "remat", "last_only", "head"))
def forward(
    model: M1Model,
    input_ids: Int[Array, "batch seq"],
    *,
    attention_mask: Array | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    cache: dict | None = None,
    scan: bool = True,
    dispatch: str = "auto",
    remat: bool | str = False,
    expert_threshold: Array | float | None = None,
    last_only: bool = False,
    head: bool = True,
) -> Output:
    """The whole decoder as one pure function.

    `cache` (see m1jax.cache) is {"layers": {cycle position j: fp32 state [C, batch, heads, D, D] (lightning) or
    (k, v) buffers [C, batch, slots, kv_heads, D] (softmax)}, "key_valid": [batch, slots] bool, "offset": int32
    (first free slot), "next_position": [batch] int32}; the returned cache has this call's tokens appended.
    Without it every lightning layer starts from a zero state and attention sees this call's tokens only.
    `dispatch` (layers/moe.py): "auto" (expert parallel under a multi-device `jax.set_mesh` mesh, else "gather"
    for a few tokens, else "ragged"), "ragged", "gather", "dense", "ep", or an ExpertParallel (layers/moe_ep.py,
    e.g. with a capacity factor).
    `expert_threshold` (scalar or [batch]) skips selected experts whose routing weight is below it (inference
    only; 0 skips nothing) and adds per-row counts "row_selected"/"row_skipped" [layers, batch, E] to `router`.
    `last_only`: logits of the last position only ([batch, 1, vocab]; prefill needs no more).
    `head=False`: no logits; `hidden` holds the final-normed hidden states (for `next_token_logprobs`).
    """
    cfg = model.config
    b, n = input_ids.shape
    token_mask = jnp.ones((b, n), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = default_positions(token_mask, segment_ids)
        if cache is not None:
            positions = positions + cache["next_position"][:, None]
    if cache is None:
        layer_caches, ctx = None, Context(positions, token_mask, segment_ids, None, 0, expert_threshold)
    else:
        layer_caches, offset = cache["layers"], cache["offset"]
        key_valid = jax.lax.dynamic_update_slice(cache["key_valid"], token_mask, (0, offset))
        ctx = Context(positions, token_mask, segment_ids, key_valid, offset, expert_threshold)

    x = constrain(jnp.take(model.embed_tokens[...], input_ids, axis=0), residual_names(n))
    period = len(cfg.cycle)
    slopes = jnp.asarray(lightning_slopes(cfg).reshape(cfg.num_cycles, period, cfg.num_heads))
    if layer_caches is None:
        layer_caches = {j: None for j in range(period)}

    def run_cycle(x, cycle, slopes_c, caches_c):
        return cycle(x, ctx, slopes_c, caches_c, dispatch)

    if remat:  # True means "full"; see REMAT_POLICIES
        run_cycle = jax.checkpoint(run_cycle, policy=REMAT_POLICIES["full" if remat is True else remat])

    if scan:
        def body(x, xs):
            cycle, slopes_c, caches_c = xs
            x, new_caches, stats = run_cycle(x, cycle, slopes_c, caches_c)
            return x, (new_caches, stats)

        x, (new_caches, stats) = jax.lax.scan(body, x, (model.cycles, slopes, layer_caches))
    else:
        outs = []
        for c in range(cfg.num_cycles):
            cycle_c, caches_c = jax.tree.map(lambda a: a[c], (model.cycles, layer_caches))
            x, new_c, stats_c = run_cycle(x, cycle_c, slopes[c], caches_c)
            outs.append((new_c, stats_c))
        new_caches, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)

    y = model.final_norm(x[:, -1:] if last_only else x)
    # stats: {j: leaf [num_cycles, ...]} -> leaf [num_layers, ...] in absolute layer order
    router = jax.tree.map(lambda *per_j: jnp.stack(per_j, 1).reshape((cfg.num_layers,) + per_j[0].shape[1:]),
                          *[stats[j] for j in range(period)])
    out_cache = None if cache is None else {
        "layers": new_caches, "key_valid": ctx.key_valid, "offset": ctx.offset + n,
        "next_position": cache["next_position"] + jnp.sum(token_mask, axis=1, dtype=jnp.int32)}
    return Output(model.head(y), out_cache, router) if head else Output(None, out_cache, router, y)


# The LM head over a whole training batch: logits above this many bytes (fp32) are computed LOGIT_CHUNK positions at
# a time and recomputed in the backward (M1's 200K vocabulary at 32K tokens would take 26 GB per sequence).
MAX_LOGIT_BYTES = 2**32
LOGIT_CHUNK = 1024


def next_token_logprobs(model: M1Model, hidden: Float[Array, "batch seq d"], tokens: Int[Array, "batch seq"]
                        ) -> Float[Array, "batch seq-1"]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) (fp32) from the final hidden states (`forward(..., head=False)`).

    Large batches take the head chunk by chunk of positions within each piece of the sequence (so that under
    context parallelism every device works on its own positions); each chunk's logits are recomputed in the
    backward instead of kept. The result does not depend on the chunking."""
    b, n, _ = hidden.shape
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # position t predicts t+1; the last unused

    def logprobs(h, t):
        logits = model.head(h)
        return jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    if b * n * model.config.vocab_size * 4 <= MAX_LOGIT_BYTES:
        return logprobs(hidden, targets)[:, :-1]
    pieces = length_pieces(n)
    length = n // pieces
    chunk = min(LOGIT_CHUNK, length)
    pad = -length % chunk

    def chunked(a):  # [b, n, ...] -> [chunks, b, pieces, chunk, ...]
        a = a.reshape(b, pieces, length, *a.shape[2:])
        a = jnp.pad(a, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 3))
        return jnp.moveaxis(a.reshape(b, pieces, -1, chunk, *a.shape[3:]), 2, 0)

    out = jax.lax.map(jax.checkpoint(lambda xs: logprobs(*xs)), (chunked(hidden), chunked(targets)))
    out = jnp.moveaxis(out, 0, 2).reshape(b, pieces, length + pad)[:, :, :length]
    return out.reshape(b, n)[:, :-1]


# ---- construction and accounting ---------------------------------------------------------------
def init_model(config: ModelConfig, seed: int = 0) -> M1Model:
    """A randomly initialised model (LeCun-normal weights)."""
    return M1Model(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> M1Model:
    """The model with jax.ShapeDtypeStruct leaves: shapes and dtypes without allocating anything."""
    return nnx.eval_shape(lambda: M1Model(config, rngs=nnx.Rngs(0)))


def abstract_params(config: ModelConfig) -> dict:
    """The parameter tree (its tensor-name mapping is in m1jax.weights) as ShapeDtypeStructs."""
    return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))


def params_of(model: M1Model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model: M1Model, params: dict) -> M1Model:
    """A copy of `model` (concrete or abstract) whose parameters are `params` (a pure dict)."""
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total parameters and parameters active per token (top-k experts only, excluding embeddings and LM head)."""
    params = abstract_params(config)
    size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    total = size(params)
    embeddings = size(params["embed_tokens"]) + size(params.get("lm_head", {}))
    experts = sum(size([layer["moe"][w] for w in ("w1", "w2", "w3")])
                  for layer in params["cycles"]["layers"].values())
    active_experts = experts * config.num_experts_per_tok // config.num_experts
    return {
        "total": total,
        "embeddings": embeddings,
        "experts": experts,
        "active": total - embeddings - experts + active_experts,
    }
