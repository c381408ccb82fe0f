"""Checkpoints and faults: bit-exact resume, a save cut short, SIGTERM, a run of non-finite losses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train_fixtures import compilation_cache, tiny_config  # noqa: F401 (fixture)
from train import loop
from train.checkpointing import Checkpointer
from train.loop import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_stopped_and_resumed_run_matches_the_uninterrupted_one_bit_for_bit(tmp_path):
    whole = tiny_config(tmp_path / "a")
    straight = train(whole)
    assert straight.step == 6 and Checkpointer(whole.run.dir + "/checkpoints", 2, 3).all_steps() == [2, 4, 6]

    parts = tiny_config(tmp_path / "b", corpus_path=whole.data.path)
    first = train(parts, until=3)  # stops between two checkpoint steps: the stop itself saves
    assert first.step == 3
    assert Checkpointer(parts.run.dir + "/checkpoints", 2, 3).latest_step() == 3
    second = train(parts)
    assert second.step == 6
    assert losses(Path(parts.run.dir)) == losses(Path(whole.run.dir))  # exact float equality, every step
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, second.state),
                 jax.tree.map(np.asarray, straight.state))


def test_a_save_cut_short_leaves_the_previous_checkpoint_loadable(tmp_path):
    tcfg = tiny_config(tmp_path, run={"steps": 4})
    result = train(tcfg)
    ckpt_dir = Path(tcfg.run.dir) / "checkpoints"
    # What a process killed while writing step 6 leaves behind: orbax's temporary directory, half written.
    partial = ckpt_dir / "6.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckpt_dir / "4", partial)
    for f in sorted(partial.rglob("*"))[::2]:
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    resumed = train(tcfg.replace(run={"steps": 6}))
    assert not partial.exists()  # cleaned up when the directory was reopened
    rows = losses(Path(tcfg.run.dir))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]  # resumed from step 4, not from the broken step 6
    assert resumed.step == 6 and int(result.state.step) == 4


def run_cli(tmp_path: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    tcfg = tiny_config(tmp_path)
    config = tmp_path / "train.json"
    config.write_text(json.dumps(tcfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, "-m", "m1jax.cli", "train", "--config", str(config), *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not reach the step in time")


def test_sigterm_saves_and_exits_then_sigkill_during_saves_keeps_a_loadable_checkpoint(tmp_path,
                                                                                      compilation_cache):
    run_dir = tmp_path / "run"
    proc = run_cli(tmp_path, compilation_cache, "run.steps=100000", "run.checkpoint_every=1000")
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopping at step" in err
    last_logged = max(r[0] for r in losses(run_dir))
    assert Checkpointer(run_dir / "checkpoints", 1, 3).latest_step() == last_logged

    # Now save every step and kill -9 while orbax's temporary directory of a save in progress exists.
    proc = run_cli(tmp_path, compilation_cache, "run.steps=100000", "run.checkpoint_every=1")
    wait_for_step(run_dir, last_logged + 3, proc)
    deadline = time.time() + 30
    while not list((run_dir / "checkpoints").glob("*orbax-checkpoint-tmp*")) and time.time() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    ckpt = Checkpointer(run_dir / "checkpoints", 1, 3)
    latest = ckpt.latest_step()
    assert latest is not None and latest >= last_logged
    state, data, _ = ckpt.restore(_abstract_state(tmp_path))
    assert int(state.step) == latest and data.cursor > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _abstract_state(tmp_path):
    from m1jax.sharding import make_mesh
    from train.step import make_trainer
    tcfg = tiny_config(tmp_path)
    return make_trainer(tcfg.model_config(), tcfg, make_mesh(devices=jax.devices()[:1])).abstract_state


def test_consecutive_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    def poisoned(trainer, pretrained):
        params = trainer.random_params()
        params["final_norm"]["weight"] = params["final_norm"]["weight"] * np.nan
        return params

    monkeypatch.setattr(loop, "initial_params", poisoned)
    tcfg = tiny_config(tmp_path, run={"steps": 20, "max_nonfinite": 3})
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row \(steps 1..3\)"):
        train(tcfg)
    rows = [json.loads(line) for line in (Path(tcfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["loss"]) for r in rows] == [(1, 1, "nan"), (2, 1, "nan"), (3, 1, "nan")]


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from m1jax.model import init_model, params_of
    from tests.train_fixtures import TINY_MODEL
    tcfg = tiny_config(tmp_path, model={"preset": None, "init_from": "preset:m1-tiny"}, run={"steps": 2})
    config, params = loop.starting_model(tcfg)
    assert config == tcfg.replace(model={"preset": "m1-tiny", "init_from": None}).model_config()
    jax.tree.map(np.testing.assert_array_equal, params, params_of(init_model(config, 0)))
    assert config.hidden_size == TINY_MODEL["overrides"]["hidden_size"]
    assert train(tcfg).step == 2
