"""The train step: loss, gradients (accumulated over micro-batches), AdamW, as one jitted function on a mesh.

loss = CE + aux_coef * L_aux + z_coef * L_z, where CE is the mean next-token cross-entropy of the fp32 LM head over
every real, same-document target token of the optimizer batch (padding and document boundaries excluded), and
L_aux / L_z are m1jax.losses' pooled load-balancing and router z-losses (averaged over micro-batches).
Parameters and optimizer state are fp32 (master weights); the forward pass runs with the parameters cast to
`run.compute_dtype` (the router and the LM head stay fp32 as in the model). A step whose loss or gradient norm
is not finite leaves parameters and optimizer state untouched and reports `skipped = 1`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from m1jax import losses
from m1jax.config import ModelConfig
from m1jax.model import M1Model, abstract_model, forward, init_model, next_token_logprobs, params_of, with_params
from m1jax.sharding import ShardingError, logical_spec, param_shardings, validate
from train.config import OptimSection, TrainConfig


class TrainState(NamedTuple):
    step: Int[Array, ""]  # optimizer steps taken (skipped non-finite steps included)
    params: dict  # fp32 master weights, the PARAMS.md tree
    opt_state: Any


# ---- optimizer -----------------------------------------------------------------------------------
def lr_schedule(o: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr` (lr * (n + 1) / warmup_steps at update n), then either constant or a cosine decay
    reaching `lr * min_lr_ratio` at `total_steps`."""
    warmup, decay_steps = max(o.warmup_steps, 1), max(total_steps - o.warmup_steps, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = o.lr * jnp.minimum(1.0, (count + 1) / warmup)
        if o.schedule == "constant":
            return warm
        progress = jnp.clip((count - o.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(count < o.warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: dict) -> dict:
    """Weight decay applies to matrices, not to norm weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params)


def make_optimizer(o: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled decay, scaled by the learning rate) after global-norm clipping."""
    return optax.named_chain(
        ("clip", optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity()),
        ("adam", optax.scale_by_adam(o.b1, o.b2, o.eps)),
        ("decay", optax.add_decayed_weights(o.weight_decay, decay_mask)),
        ("lr", optax.scale_by_learning_rate(lr_schedule(o, total_steps))),
    )


# ---- loss ----------------------------------------------------------------------------------------
def target_mask(segment_ids: Int[Array, "batch seq"], loss_mask: Bool[Array, "batch seq"]) -> Float[Array, "batch seq-1"]:
    """1 where token t+1 is a trainable token (loss_mask) of the same document as token t: the trained positions."""
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return (same_doc & loss_mask[:, 1:]).astype(jnp.float32)


def cross_entropy_sum(model: M1Model, hidden: Float[Array, "batch seq d"], input_ids: Int[Array, "batch seq"],
                      targets: Float[Array, "batch seq-1"]) -> Float[Array, ""]:
    """Summed next-token negative log-likelihood (fp32) over the positions where `targets` (target_mask) is 1."""
    return -jnp.sum(next_token_logprobs(model, hidden, input_ids) * targets)


def cast_for_compute(params: dict, dtype) -> dict:
    """Parameters in the compute dtype, except the router (fp32 in M1)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if getattr(path[-1], "key", None) == "router" else p.astype(dtype), params)


class LossTerms(NamedTuple):
    ce_sum: Float[Array, ""]
    aux: Float[Array, ""]
    z: Float[Array, ""]
    expert_tokens: Float[Array, "layers experts"]


def loss_terms(model: M1Model, params: dict, input_ids, segment_ids, loss_mask, compute_dtype, remat: str
               ) -> LossTerms:
    model = with_params(model, cast_for_compute(params, compute_dtype))
    out = forward(model, input_ids, attention_mask=segment_ids > 0, segment_ids=segment_ids,
                  remat=False if remat == "none" else remat, head=False)
    return LossTerms(cross_entropy_sum(model, out.hidden, input_ids, target_mask(segment_ids, loss_mask)),
                     losses.load_balancing_loss(out.router, model.config.num_experts),
                     losses.router_z_loss(out.router), losses.tokens_per_expert(out.router))


# ---- the step ------------------------------------------------------------------------------------
def loss_and_grads(model: M1Model, tcfg: TrainConfig, params: dict, input_ids, segment_ids, loss_mask):
    """(total loss, LossTerms summed over micro-batches, fp32 gradients) for one optimizer batch."""
    accum = tcfg.data.grad_accum
    aux_coef = model.config.router_aux_loss_coef if tcfg.loss.aux_coef is None else tcfg.loss.aux_coef
    z_coef = tcfg.loss.z_coef
    targets = jnp.maximum(jnp.sum(target_mask(segment_ids, loss_mask)), 1.0)

    def micro_loss(p, ids, seg, mask):
        t = loss_terms(model, p, ids, seg, mask, tcfg.run.compute_dtype, tcfg.run.remat)
        return t.ce_sum / targets + (aux_coef * t.aux + z_coef * t.z) / accum, t

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum == 1:
        (loss, terms), grads = grad_fn(params, input_ids, segment_ids, loss_mask)
        return loss, terms, grads

    # Row r of micro-batch a is row r * accum + a: each micro-batch keeps the batch axis' device split.
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, x.shape[1]).swapaxes(0, 1)

    def body(carry, mb):
        (loss, terms), grads = grad_fn(params, *mb)
        return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

    cfg = model.config
    zero = jnp.zeros((), jnp.float32)
    carry = (zero, LossTerms(zero, zero, zero, jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.float32)),
             jax.tree.map(jnp.zeros_like, params))
    (loss, terms, grads), _ = jax.lax.scan(body, carry, (split(input_ids), split(segment_ids), split(loss_mask)))
    return loss, terms, grads


def apply_update(tx: optax.GradientTransformation, schedule: optax.Schedule, state: TrainState, loss, grads
                 ) -> tuple[TrainState, dict]:
    """One optimizer update, skipped (parameters and optimizer state kept) when the loss or the gradient norm is
    not finite; metrics grad_norm, lr and skipped."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {"grad_norm": grad_norm, "lr": schedule(state.opt_state["lr"].count),
               "skipped": 1 - ok.astype(jnp.int32)}
    return TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state)), metrics


def expert_load(expert_tokens: Float[Array, "layers experts"]) -> dict:
    """Busiest expert / mean expert per layer: the worst layer's and the mean over layers."""
    ratio = jnp.max(expert_tokens, axis=1) / jnp.maximum(jnp.mean(expert_tokens, axis=1), 1e-9)
    return {"expert_load_max": jnp.max(ratio), "expert_load_mean": jnp.mean(ratio)}


def train_step(model: M1Model, tcfg: TrainConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
               state: TrainState, input_ids, segment_ids, loss_mask) -> tuple[TrainState, dict]:
    loss, terms, grads = loss_and_grads(model, tcfg, state.params, input_ids, segment_ids, loss_mask)
    targets = jnp.sum(target_mask(segment_ids, loss_mask))
    state, update = apply_update(tx, schedule, state, loss, grads)
    accum = tcfg.data.grad_accum
    metrics = {
        "loss": loss,
        "ce": terms.ce_sum / jnp.maximum(targets, 1.0),
        "aux_loss": terms.aux / accum,
        "z_loss": terms.z / accum,
        **update,
        "target_tokens": targets,
        **expert_load(terms.expert_tokens),  # summed over micro-batches
    }
    return state, metrics


class Trainer(NamedTuple):
    """The compiled pieces of a run on one mesh."""

    config: ModelConfig
    random_params: Callable[[], dict]  # the seeded initial model, created already sharded
    init: Callable[[dict], TrainState]  # a fresh state around sharded fp32 parameters
    step: Callable[..., tuple[TrainState, dict]]  # (state, input_ids, segment_ids, loss_mask); donates the state
    state_shardings: TrainState
    batch_sharding: NamedSharding
    abstract_state: TrainState  # ShapeDtypeStructs with shardings, for restoring checkpoints
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule


def make_trainer(config: ModelConfig, tcfg: TrainConfig, mesh: Mesh) -> Trainer:
    """Jit the init and step functions with explicit shardings on `mesh`: parameters as m1jax.sharding says,
    optimizer moments like their parameters, the batch split over the batch axes, scalars replicated."""
    if config.dtype != "float32":
        raise ValueError(f"make_trainer: master weights must be float32, got config.dtype={config.dtype!r}")
    micro = tcfg.data.batch_size // tcfg.data.grad_accum
    try:
        validate(config, mesh.shape, batch=micro, length=tcfg.data.seq_len)
    except ShardingError as e:
        raise ShardingError(f"{e} (the micro-batch is data.batch_size / data.grad_accum = {micro} rows of "
                            f"data.seq_len = {tcfg.data.seq_len} tokens)") from None
    model = abstract_model(config)
    tx = make_optimizer(tcfg.optim, tcfg.run.steps)
    schedule = lr_schedule(tcfg.optim, tcfg.run.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shard = param_shardings(config, mesh)
    abstract_opt = jax.eval_shape(tx.init, params_of(model))
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated)
    shardings = TrainState(replicated, p_shard, opt_shard)
    batch_sharding = NamedSharding(mesh, logical_spec(("batch", "length"), mesh.shape))

    def init(params: dict) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    init = jax.jit(init, in_shardings=(p_shard,), out_shardings=shardings)
    random_params = jax.jit(lambda: params_of(init_model(config, tcfg.run.seed)), out_shardings=p_shard)
    step = jax.jit(functools.partial(train_step, model, tcfg, tx, schedule),
                   in_shardings=(shardings, batch_sharding, batch_sharding, batch_sharding),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init, params_of(model)), shardings)
    return Trainer(config, on_mesh(mesh, random_params), on_mesh(mesh, init), on_mesh(mesh, step), shardings,
                   batch_sharding, abstract, tx, schedule)


def on_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced and run under `jax.set_mesh(mesh)`, so the model's sharding constraints and the
    expert-parallel MoE dispatch see the mesh."""
    @functools.wraps(fn)
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return call
