"""CISPO (train/cispo.py) against its analytic gradient, and `m1jax train rl` (train/rl.py) on the default model:
the sampler's log-probabilities equal the training forward's, runs resume exactly, bad configs are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m1jax
from m1jax.default_model import default_model_path
from m1jax.model import forward, next_token_logprobs, params_of
from m1jax.tokenizer import load_tokenizer
from train import rl as rl_module
from train.cispo import cispo_loss, group_advantages, importance_stats
from train.config import RLSection, TrainConfig, TrainConfigError

EPS_HIGH, EPS_LOW = 0.5, 0.3


def random_tokens(seed, shape=(3, 7)):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    logp = -jax.random.uniform(k1, shape, minval=0.1, maxval=3.0)
    old = logp + jax.random.normal(k2, shape)  # ratios from ~0.05 to ~20: both clips are hit
    advantages = jax.random.normal(k3, shape[:1])
    mask = (jax.random.uniform(k4, shape) < 0.7).astype(jnp.float32)
    return logp, old, advantages, mask


@pytest.mark.parametrize("eps_low", [None, EPS_LOW])
def test_cispo_gradient_is_the_clipped_weight_times_the_advantage(eps_low):
    """d(-J)/d log π = -sg(clip(r)) * A / N on every masked token, clipped ones included (they keep a gradient,
    unlike PPO's); without the stop-gradient the gradient would differ."""
    logp, old, adv, mask = random_tokens(0)
    ratio = np.exp(np.asarray(logp - old, np.float64))
    weight = np.minimum(ratio, 1 + EPS_HIGH) if eps_low is None else np.clip(ratio, 1 - eps_low, 1 + EPS_HIGH)
    want = -weight * np.asarray(adv)[:, None] * np.asarray(mask) / np.asarray(mask).sum()
    grad = jax.grad(lambda lp: cispo_loss(lp, old, adv, mask, eps_high=EPS_HIGH, eps_low=eps_low))(logp)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
    clipped = (ratio > 1 + EPS_HIGH) & (np.asarray(mask) > 0)
    assert clipped.any() and np.all(np.asarray(grad)[clipped] != 0)
    value = cispo_loss(logp, old, adv, mask, eps_high=EPS_HIGH, eps_low=eps_low)
    np.testing.assert_allclose(value, np.sum(want * np.asarray(logp)), rtol=1e-5)

    def without_stop_gradient(lp):  # EasyDeL's form (reference/jax_ecosystem.md §3.4)
        w = jnp.minimum(jnp.exp(lp - old), 1 + EPS_HIGH)
        return -jnp.sum(w * adv[:, None] * lp * mask) / jnp.sum(mask)

    assert not np.allclose(jax.grad(without_stop_gradient)(logp), want, rtol=1e-3)


def test_importance_stats():
    logp, old, _, mask = random_tokens(1)
    stats = importance_stats(logp, old, mask, eps_high=EPS_HIGH, eps_low=EPS_LOW)
    m = np.asarray(mask) > 0
    ratio = np.exp(np.asarray(logp - old, np.float64))[m]
    np.testing.assert_allclose(stats["ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["clipped_high"], np.mean(ratio > 1 + EPS_HIGH), rtol=1e-6)
    np.testing.assert_allclose(stats["clipped_low"], np.mean(ratio < 1 - EPS_LOW), rtol=1e-6)
    np.testing.assert_allclose(stats["logp_mismatch"], np.abs(np.asarray(logp - old))[m].mean(), rtol=1e-5)


def test_group_advantages():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 2.0, -1.0, 0.0]])
    adv = group_advantages(rewards)
    for row, a in zip(rewards, adv):
        want = np.zeros(4) if row.std() == 0 else (row - row.mean()) / row.std()
        np.testing.assert_allclose(a, want, rtol=1e-6)


@pytest.fixture(scope="module")
def default_policy():
    return m1jax.from_pretrained(), load_tokenizer(default_model_path())


def test_the_samplers_logprobs_are_the_training_forwards(default_policy):
    """The importance ratio of the first update is 1: generation's fp32-head log-probabilities (decode steps)
    equal the training forward's (one parallel pass) on every generated token; the batch layout is right."""
    model, tok = default_policy
    rl = RLSection(prompts=3, group_size=4, max_new_tokens=40)
    batch, stats = rl_module.rollout(model, tok, rl_module.ArithmeticTask(0), rl, 0, 0, None)
    assert batch.tokens.shape[0] == 12 and batch.completion_mask.sum() == 12 * stats["completion_tokens"]
    hidden = forward(model, batch.tokens, attention_mask=batch.attention_mask, head=False).hidden
    logp = next_token_logprobs(model, hidden, batch.tokens)
    generated = batch.completion_mask > 0
    assert np.all(batch.old_logprobs[generated] <= 0) and np.all(batch.old_logprobs[~generated] == 0)
    np.testing.assert_allclose(np.asarray(logp)[generated], batch.old_logprobs[generated], atol=2e-5)
    assert 0 <= stats["reward_mean"] <= 1


class ParityTask(rl_module.ArithmeticTask):
    """Unfinished problems ("12+"), where the default model is unsure, rewarded by the parity of the completion's
    length: the groups have a signal."""

    def prompt(self, problem) -> str:
        return f"{problem[0]}{problem[1]}"

    def reward(self, problem, completion: str) -> float:
        return float(len(completion) % 2)


def rl_config(tmp_path, *extra, steps=4):
    return TrainConfig.load(rl_module.__file__.replace("rl.py", "configs/arithmetic_rl.yaml"), [
        f"run.dir={tmp_path}", f"run.steps={steps}", "rl.task=parity", "rl.prompts=4", "rl.group_size=4",
        "rl.updates=2", "rl.max_new_tokens=40", "run.checkpoint_every=2", "run.log_every=1", "optim.lr=1e-3", *extra])


def test_rl_runs_resumes_exactly_and_exports(tmp_path, monkeypatch):
    """On 8 devices (data=8): 2 rollout batches of 16 x 2 updates; stopped after the first batch and resumed,
    the run ends with the uninterrupted run's parameters; the exported model loads with them."""
    monkeypatch.setitem(rl_module.TASKS, "parity", ParityTask)
    whole = rl_module.train_rl(rl_config(tmp_path / "whole"))
    first = rl_module.train_rl(rl_config(tmp_path / "resumed"), until=3)  # rounded down to batch 1's end
    assert first.step == 2
    resumed = rl_module.train_rl(rl_config(tmp_path / "resumed"))
    assert resumed.step == whole.step == 4
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
        np.testing.assert_array_equal(a, b)
    start = params_of(m1jax.from_pretrained())
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(start)))

    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["signal_groups"] > 0 and abs(rows[0]["ratio_mean"] - 1) < 1e-4  # on-policy at first
    assert all(r["skipped"] == 0 and np.isfinite(r["cispo_loss"]) for r in rows)
    exported = params_of(m1jax.from_pretrained(tmp_path / "whole" / "model"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(whole.state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override, message", [
    ("rl.task=chess", "rl.task 'chess' is not one of"),
    ("run.steps=5", "run.steps=5 must be a multiple of rl.updates=2"),
    ("rl.prompts=3", "rl.prompts \\* rl.group_size = 12 rollouts do not divide over the mesh's 8-way batch split"),
    ("model.init_from=/nonexistent", "is not a model directory"),
    ("rl.eps_high=0", "need eps_high > 0"),
])
def test_bad_rl_configs_are_refused(tmp_path, monkeypatch, override, message):
    monkeypatch.setitem(rl_module.TASKS, "parity", ParityTask)
    with pytest.raises(TrainConfigError, match=message):
        rl_module.train_rl(rl_config(tmp_path, override))
