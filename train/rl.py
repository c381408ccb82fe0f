"""`m1jax train rl`: reinforcement learning with CISPO (train/cispo.py) from verifiable rewards.

Each rollout batch: `rl.prompts` prompts of the task, `rl.group_size` completions each, sampled by the policy
being trained (m1jax.generation on the run's mesh, at temperature 1 without truncation, so the sampler's
log-probabilities are the behaviour policy's), rewarded by the task, group-relative advantages; then `rl.updates`
optimizer updates on the whole batch, each recomputing log π_θ with the training forward. Groups whose rewards
are all equal have no signal and are left out of the loss and its token count (DAPO's dynamic sampling, without
the resampling). `run.steps` counts optimizer updates; checkpoints (every `run.checkpoint_every`, a multiple of
`rl.updates`) fall between rollout batches and resume exactly (the batches' prompts and sampling keys follow from
the seed and the batch index). The policy is exported to `run.dir/model` (fp32, what `from_pretrained` reads).
"""

from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path
from typing import NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from m1jax import losses
from m1jax.generation import Generation
from m1jax.model import M1Model, abstract_model, forward, next_token_logprobs, with_params
from m1jax.sharding import make_mesh, split_count
from train.checkpointing import Checkpointer
from train.cispo import cispo_loss, group_advantages, importance_stats
from train.config import TrainConfig, TrainConfigError
from train.data import DataState
from train.distributed import maybe_initialize_distributed
from train.loop import NonFiniteLossError, RunResult, StopSignal, initial_params, starting_model
from train.metrics import MetricsLogger
from train.step import TrainState, apply_update, cast_for_compute, expert_load, make_trainer, on_mesh


class Task(Protocol):
    """Prompts with a verifiable reward. `problems(n, batch)`: n problems of rollout batch `batch` (deterministic);
    `prompt(problem)`: its text; `reward(problem, completion_text)`: a float."""

    def problems(self, n: int, batch: int) -> list: ...
    def prompt(self, problem) -> str: ...
    def reward(self, problem, completion: str) -> float: ...


class ArithmeticTask:
    """The default model's problems (train/recipes/arithmetic.py, training share); reward 1 for the right final
    answer after the scratchpad, else 0."""

    def __init__(self, seed: int):
        from train.recipes import arithmetic
        self.recipe, self.task, self.seed = arithmetic, arithmetic.Task(seed=seed), seed

    def problems(self, n: int, batch: int) -> list:
        return self.recipe.problems(self.task, n, False, 1_000_003 * (self.seed + 1) + batch)

    def prompt(self, problem) -> str:
        return self.recipe.prompt(*problem)

    def reward(self, problem, completion: str) -> float:
        return float(self.recipe.answer_of(completion) == str(self.recipe.result(*problem)))


TASKS = {"arithmetic": ArithmeticTask}


class RolloutBatch(NamedTuple):
    """Sampled sequences [prompt (left-padded) | completion (right-padded)] and what CISPO needs per target
    position t (predicting token t + 1)."""

    tokens: np.ndarray  # [batch, seq] int32
    attention_mask: np.ndarray  # [batch, seq] bool: prompt and generated tokens
    completion_mask: np.ndarray  # [batch, seq-1] float32: the generated tokens
    old_logprobs: np.ndarray  # [batch, seq-1] float32: the sampler's log-probabilities of those tokens
    advantages: np.ndarray  # [batch] float32


def rollout(policy: M1Model, tokenizer, task: Task, rl, batch: int, seed: int, mesh) -> tuple[RolloutBatch, dict]:
    """Rollout batch number `batch`: sample, reward, advantages. Returns the batch and its statistics."""
    problems = task.problems(rl.prompts, batch)
    prompts = [tokenizer.encode(task.prompt(p)) for p in problems for _ in range(rl.group_size)]
    width = 1 << (max(map(len, prompts)) - 1).bit_length()  # bucketed: few compiles
    out = Generation(policy, prompts, max_new_tokens=rl.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     seed=seed * 1_000_003 + batch * len(prompts), tokenizer=tokenizer, mesh=mesh,
                     min_prompt_len=width, min_new_tokens=rl.max_new_tokens).result()
    rewards = np.asarray([task.reward(p, text) for p, text in zip(
        [p for p in problems for _ in range(rl.group_size)], out.text)]).reshape(rl.prompts, rl.group_size)
    advantages = group_advantages(rewards).reshape(-1)

    rows, new = out.logprobs.shape
    w = out.sequences.shape[1] - new  # the padded prompt width
    seq = w + rl.max_new_tokens
    tokens = np.zeros((rows, seq), np.int32)  # after a completion: masked out
    tokens[:, :w + new] = out.sequences
    generated = np.arange(rl.max_new_tokens)[None, :] < out.lengths[:, None]
    prompt_mask = np.arange(w)[None, :] >= w - out.prompt_lengths[:, None]
    completion_mask = np.zeros((rows, seq - 1), np.float32)
    completion_mask[:, w - 1:] = generated
    old_logprobs = np.zeros((rows, seq - 1), np.float32)
    old_logprobs[:, w - 1:w - 1 + new] = out.logprobs
    stats = {"reward_mean": float(rewards.mean()), "signal_groups": float(np.mean(rewards.std(axis=1) > 0)),
             "completion_tokens": float(out.lengths.mean())}
    return RolloutBatch(tokens, np.concatenate([prompt_mask, generated], 1), completion_mask, old_logprobs,
                        advantages), stats


def cispo_step(model: M1Model, tcfg: TrainConfig, tx, schedule, state: TrainState, batch: RolloutBatch
               ) -> tuple[TrainState, dict]:
    """One optimizer update on a rollout batch: CISPO plus the MoE auxiliary losses (the `loss` section)."""
    aux_coef = model.config.router_aux_loss_coef if tcfg.loss.aux_coef is None else tcfg.loss.aux_coef

    def loss_fn(params):
        policy_model = with_params(model, cast_for_compute(params, tcfg.run.compute_dtype))
        out = forward(policy_model, batch.tokens, attention_mask=batch.attention_mask,
                      remat=False if tcfg.run.remat == "none" else tcfg.run.remat, head=False)
        logp, clip = next_token_logprobs(policy_model, out.hidden, batch.tokens), dict(eps_high=tcfg.rl.eps_high,
                                                                                       eps_low=tcfg.rl.eps_low)
        signal = batch.completion_mask * (batch.advantages != 0)[:, None]  # groups with equal rewards: left out
        policy = cispo_loss(logp, batch.old_logprobs, batch.advantages, signal, **clip)
        stats = importance_stats(logp, batch.old_logprobs, batch.completion_mask, **clip)
        aux = losses.load_balancing_loss(out.router, model.config.num_experts)
        z = losses.router_z_loss(out.router)
        return policy + aux_coef * aux + tcfg.loss.z_coef * z, (policy, aux, z, losses.tokens_per_expert(out.router),
                                                                stats)

    (loss, (policy, aux, z, load, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, update = apply_update(tx, schedule, state, loss, grads)
    return state, {"loss": loss, "cispo_loss": policy, "aux_loss": aux, "z_loss": z, **stats, **update,
                   **expert_load(load)}


def train_rl(tcfg: TrainConfig, *, until: int | None = None) -> RunResult:
    """Run (or resume) CISPO as configured; `until` stops (with a checkpoint) after that many updates (rounded
    down to whole rollout batches)."""
    rl, run = tcfg.rl, tcfg.run
    if rl.task not in TASKS:
        raise TrainConfigError(f"rl.task {rl.task!r} is not one of {sorted(TASKS)}")
    if tcfg.model.init_from is None:
        raise TrainConfigError("model.init_from: RL starts from a trained policy (a model directory, or 'default')")
    for name in ("steps", "checkpoint_every"):
        if getattr(run, name) % rl.updates:
            raise TrainConfigError(f"run.{name}={getattr(run, name)} must be a multiple of rl.updates={rl.updates}: "
                                   f"runs stop and save between rollout batches")
    from m1jax.tokenizer import load_tokenizer

    maybe_initialize_distributed()
    if jax.process_count() > 1:
        raise TrainConfigError(f"m1jax train rl runs on one host (rewards are computed from the gathered text); "
                               f"this run has {jax.process_count()} processes")
    source = _model_directory(tcfg.model.init_from)
    tcfg = tcfg.replace(model={"init_from": source},
                        data={"batch_size": rl.prompts * rl.group_size, "grad_accum": 1})
    run_dir, main_process = Path(run.dir), jax.process_index() == 0
    mesh = make_mesh(**run.mesh)
    split = split_count("batch", mesh.shape)
    if (rl.prompts * rl.group_size) % split:
        raise TrainConfigError(f"rl.prompts * rl.group_size = {rl.prompts * rl.group_size} rollouts do not divide "
                               f"over the mesh's {split}-way batch split ({run.mesh})")
    config, pretrained = starting_model(tcfg)
    tokenizer = load_tokenizer(source)
    trainer = make_trainer(config, tcfg, mesh)  # the state, its shardings and the optimizer of the run
    model = abstract_model(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    per_token, per_row = trainer.batch_sharding, NamedSharding(mesh, PartitionSpec(trainer.batch_sharding.spec[0]))
    batch_shardings = RolloutBatch(per_token, per_token, per_token, per_token, per_row)
    step_fn = on_mesh(mesh, jax.jit(functools.partial(cispo_step, model, tcfg, trainer.optimizer, trainer.schedule),
                                    in_shardings=(trainer.state_shardings, batch_shardings),
                                    out_shardings=(trainer.state_shardings, replicated), donate_argnums=0))
    task = TASKS[rl.task](run.seed)
    ckpt = Checkpointer(run_dir / "checkpoints", run.checkpoint_every, run.keep_checkpoints, run.async_checkpoints)
    meta = {"train_config": tcfg.to_dict(), "model_config": config.to_dict()}
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(meta, indent=1))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(trainer.abstract_state)[0]
    else:
        state = trainer.init(initial_params(trainer, pretrained))
    del pretrained
    step = int(state.step)
    last = run.steps if until is None else min(until - until % rl.updates, run.steps)
    log = MetricsLogger(run_dir, run.steps, step, tensorboard=run.tensorboard, progress=run.progress,
                        enabled=main_process)
    bad_run, exit_code, saved = 0, 0, step
    with StopSignal() as stop:
        try:
            while step < last:
                tic = time.perf_counter()
                policy = with_params(model, cast_for_compute(state.params, run.compute_dtype))
                batch, stats = rollout(policy, tokenizer, task, rl, step // rl.updates, run.seed, mesh)
                stats["rollout_s"] = time.perf_counter() - tic
                batch = jax.device_put(batch, batch_shardings)
                for _ in range(rl.updates):
                    state, metrics = step_fn(state, batch)
                    step += 1
                    metrics = {**{k: float(v) for k, v in jax.device_get(metrics).items()}, **stats}
                    stats = {}
                    bad_run = bad_run + 1 if metrics["skipped"] else 0
                    if bad_run or step % run.log_every == 0 or step == last or "reward_mean" in metrics:
                        log.log(step, metrics)
                    log.advance()
                    if bad_run >= run.max_nonfinite:
                        raise NonFiniteLossError(f"the loss or gradient was non-finite for {bad_run} updates in a "
                                                 f"row (to update {step}); lower optim.lr or rl.eps_high")
                if ckpt.save(step, state, DataState(0, step // rl.updates), meta):  # the rollout batches done
                    saved = step
                if stop.requested():
                    exit_code = 128 + (stop.signum or signal.SIGTERM)
                    log.message(f"m1jax train rl: stopping at update {step} on signal {stop.signum}")
                    break
            if saved != step:
                ckpt.save(step, state, DataState(0, step // rl.updates), meta, force=True)
            ckpt.wait()
        finally:
            log.close()
            ckpt.close()
    if main_process and step == run.steps:
        from m1jax.loading import save_pretrained
        save_pretrained(with_params(model, jax.device_get(state.params)), run_dir / "model", tokenizer=tokenizer)
    return RunResult(step, exit_code, state)


def _model_directory(init_from: str) -> str:
    """model.init_from as a directory: 'default' is the embedded default model."""
    if init_from == "default":
        from m1jax.default_model import default_model_path
        return str(default_model_path())
    if not Path(init_from).is_dir():
        raise TrainConfigError(f"model.init_from: {init_from} is not a model directory (RL needs its tokenizer)")
    return init_from
