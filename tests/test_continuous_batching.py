"""Continuous batching (`Generation.join`): a row that joins a running batch generates exactly what it generates
alone, and the rows already running are unaffected, whichever way the cache has to move or grow for it.

One random m1-tiny model (fp32). The solo runs and most newcomers share one shape (1 row, 32 prompt slots, 48 steps).
"""

import numpy as np
import pytest

from m1jax.cache import cache_capacity
from m1jax.config import get_preset
from m1jax.generation import Generation
from m1jax.model import init_model

RNG = np.random.default_rng(0)
A, B, C, L, M, N = (RNG.integers(0, 128, n).tolist() for n in (7, 12, 9, 19, 5, 10))
SOLO = dict(min_prompt_len=32, min_new_tokens=48)


@pytest.fixture(scope="module")
def model():
    return init_model(get_preset("m1-tiny"), seed=1)


def solo(model, prompt, **kw):
    return Generation(model, [prompt], **kw, **SOLO).result()


def where(gen):
    return int(gen.state.cache["offset"]), cache_capacity(gen.state.cache), gen.steps


def assert_same_row(got, i, want, j=0):
    assert got.tokens[i] == want.tokens[j] and got.finish_reasons[i] == want.finish_reasons[j]
    n = int(want.lengths[j])
    np.testing.assert_allclose(got.logprobs[i, :n], want.logprobs[j, :n], atol=1e-5)


# the running rows filter (top-k); the newcomer samples without filtering, which alone is another sampler mode
SETTINGS = {"greedy": ({}, {}),
            "sampled": (dict(temperature=1.0, top_k=8, seed=3), dict(temperature=0.8, seed=11))}


@pytest.mark.parametrize("kind", SETTINGS)
def test_a_joined_row_generates_what_it_generates_alone(model, kind):
    running, newcomer = SETTINGS[kind]
    budgets = [16, 16, 2]
    unjoined = Generation(model, [A, B, C], max_new_tokens=budgets, **running, **SOLO).result()
    gen = Generation(model, [A, B, C], max_new_tokens=budgets, **running, **SOLO)
    gen.step(4)  # row 2 finishes after 2 tokens
    assert gen.finish_reasons == [None, None, "length"]
    other = Generation(model, [C], max_new_tokens=12, **newcomer, **SOLO)
    with pytest.raises(ValueError, match="finished rows"):
        gen.join(other, [0])
    gen.join(other, [2])
    assert where(gen) == (36, 80, 48)  # 9 prompt tokens <= offset 36, and 36 + 12 slots fit: nothing moved
    out = gen.result()
    for i in (0, 1):
        assert_same_row(out, i, unjoined, i)
    assert_same_row(out, 2, solo(model, C, max_new_tokens=12, **newcomer))


def test_joins_that_move_and_grow_the_cache(model):
    """Short prompts run; a prompt longer than the offset joins (the slots move right), then one whose budget
    does not fit after the offset (dead slots are dropped), then one that needs more slots and steps (growth)."""
    start = lambda: Generation(model, [A[:3], B[:4]], max_new_tokens=[12, 3], min_new_tokens=48)
    gen = start()
    assert where(gen) == (4, 52, 48)
    gen.step(4)
    out_b = gen.output([1])
    gen.join(Generation(model, [L], max_new_tokens=6, **SOLO), [1])
    assert where(gen) == (19, 52, 48)  # moved right to hold L's 19 tokens
    gen.step(6)
    out_l = gen.output([1])
    gen.join(Generation(model, [M], max_new_tokens=30, **SOLO), [1])
    assert where(gen) == (13, 52, 48)  # 25 + 30 > 52: moved left past the 12 dead slots before A's first token
    gen.step(2)
    out_a = gen.output([0])
    gen.join(Generation(model, [N], max_new_tokens=44, min_prompt_len=32, min_new_tokens=64), [0])
    assert where(gen) == (10, 64, 64)  # 15 + 44 > 52 and only 8 dead slots: grown to 64 slots, 64 steps
    out = gen.result()

    unjoined = start().result()
    assert_same_row(out_a, 0, unjoined, 0)
    assert_same_row(out_b, 0, unjoined, 1)
    assert_same_row(out_l, 0, solo(model, L, max_new_tokens=6))
    assert_same_row(out, 1, solo(model, M, max_new_tokens=30))
    assert_same_row(out, 0, solo(model, N, max_new_tokens=44))
    assert out.lengths.tolist() == [44, 30]
