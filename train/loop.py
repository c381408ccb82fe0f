"""The training loop: build (or resume) the state on the mesh, feed packed batches, log, checkpoint, stop safely.

Resuming: when the run directory holds a checkpoint, the latest complete one is restored (params, optimizer
state, step, data position), so a stopped run continues with exactly the losses it would have had.
Stopping: SIGTERM/SIGINT finish the current step, save, and return the signal's exit status (128 + signum).
Divergence: a step with a non-finite loss or gradient norm is skipped and logged; `run.max_nonfinite` of them in
a row stop the run with NonFiniteLossError.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from m1jax.sharding import make_mesh
from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.data import DataState, PackedBatches, TokenDataset
from train.distributed import maybe_initialize_distributed
from train.metrics import MetricsLogger, peak_flops_per_device, train_flops_per_token
from train.step import TrainState, make_trainer


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunResult(NamedTuple):
    step: int  # the last completed step
    exit_code: int  # 0 when run.steps was reached (or `until`), 128 + signum when stopped by a signal
    state: TrainState


class StopSignal:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; restores the previous handlers on exit."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def starting_model(tcfg: TrainConfig):
    """(model config, pretrained fp32 parameters or None) of a run; `model.init_from` is loaded here once."""
    if tcfg.model.init_from is None:
        return tcfg.model_config(), None
    from m1jax.loading import from_pretrained
    from m1jax.model import params_of
    model = from_pretrained(tcfg.model.init_from, dtype="float32", **tcfg.model.overrides)
    return model.config, params_of(model)


def initial_params(trainer, pretrained: dict | None) -> dict:
    """The starting weights, placed in their shardings: the pretrained ones, or a seeded random model."""
    if pretrained is None:
        return trainer.random_params()
    return jax.device_put(pretrained, trainer.state_shardings.params)


def train(tcfg: TrainConfig, *, until: int | None = None) -> RunResult:
    """Run (or resume) training as configured; `until` stops (with a checkpoint) after that step."""
    maybe_initialize_distributed()
    run_dir = Path(tcfg.run.dir)
    main_process = jax.process_index() == 0
    mesh = make_mesh(**tcfg.run.mesh)
    config, pretrained = starting_model(tcfg)
    trainer = make_trainer(config, tcfg, mesh)
    dataset = TokenDataset(tcfg.data.path)
    dataset.check_vocab(config.vocab_size)
    ckpt = Checkpointer(run_dir / "checkpoints", tcfg.run.checkpoint_every, tcfg.run.keep_checkpoints,
                        tcfg.run.async_checkpoints)
    meta = {"train_config": tcfg.to_dict(), "model_config": config.to_dict()}
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(meta, indent=1))

    if ckpt.latest_step() is not None:
        state, data_state, _ = ckpt.restore(trainer.abstract_state)
    else:
        state, data_state = trainer.init(initial_params(trainer, pretrained)), DataState(0, 0)
    del pretrained
    step = int(state.step)
    batches = PackedBatches(dataset, tcfg.data.seq_len, tcfg.data.batch_size, tcfg.run.seed, data_state,
                            jax.process_index(), jax.process_count())
    last = tcfg.run.steps if until is None else min(until, tcfg.run.steps)
    log = MetricsLogger(run_dir, tcfg.run.steps, step, tensorboard=tcfg.run.tensorboard,
                        progress=tcfg.run.progress, enabled=main_process)
    if step:
        log.message(f"m1jax train: resumed from {ckpt.directory}/{step} (data epoch {data_state.epoch}, "
                    f"piece {data_state.cursor})")
    flops_per_token = train_flops_per_token(config, tcfg.data.seq_len)
    peak = peak_flops_per_device()
    bad_run, exit_code = 0, 0

    def global_array(x: np.ndarray) -> jax.Array:
        shape = (tcfg.data.batch_size, tcfg.data.seq_len)
        return jax.make_array_from_process_local_data(trainer.batch_sharding, x, shape)

    with StopSignal() as stop:
        try:
            saved = step
            batch, after = next(batches), batches.state
            tic = time.perf_counter()
            while step < last:
                tokens = int(np.sum(batch.segment_ids > 0)) * jax.process_count()
                state, metrics = trainer.step(state, *map(global_array, batch))
                step, data_state = step + 1, after
                if step < last:  # pack the next batch while the device works
                    batch, after = next(batches), batches.state
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                toc = time.perf_counter()
                metrics["tokens_per_s"] = tokens / (toc - tic)
                if peak is not None:
                    metrics["mfu"] = flops_per_token * tokens / ((toc - tic) * peak * jax.device_count())
                tic = toc
                bad_run = bad_run + 1 if metrics["skipped"] else 0
                if bad_run:
                    log.message(f"m1jax train: step {step}: non-finite loss={metrics['loss']} or "
                                f"grad_norm={metrics['grad_norm']}; update skipped ({bad_run} in a row)")
                if bad_run or step % tcfg.run.log_every == 0 or step == last:
                    log.log(step, metrics)
                log.advance()
                if bad_run >= tcfg.run.max_nonfinite:
                    raise NonFiniteLossError(
                        f"the loss or gradient was non-finite for {bad_run} steps in a row (steps "
                        f"{step - bad_run + 1}..{step}); the parameters are those of step {step - bad_run}; "
                        f"checkpoints are in {ckpt.directory}. Lower optim.lr, tighten optim.clip_norm, or check "
                        f"the data")
                if ckpt.save(step, state, data_state, meta):
                    saved = step
                if stop.requested():
                    exit_code = 128 + (stop.signum or signal.SIGTERM)
                    log.message(f"m1jax train: stopping at step {step} on signal {stop.signum}; saving")
                    break
            if saved != step:
                ckpt.save(step, state, data_state, meta, force=True)
            ckpt.wait()
        finally:
            log.close()
            ckpt.close()
    return RunResult(step, exit_code, state)
