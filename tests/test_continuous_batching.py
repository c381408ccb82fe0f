"""Continuous batching (`Generation.join`, `Generation.add_rows`, the engine): a row that joins a running batch
generates exactly what it generates alone, and the rows already running are unaffected, whichever way the cache
has to move or grow for it and however many rows the batch grows to.

One random m1-tiny model (fp32). The solo runs and most newcomers share one shape (1 row, 32 prompt slots, 48 steps).
"""

import threading

import numpy as np
import pytest

from infer.engine import Engine, Request
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


def stream(engine, prompt, max_new_tokens, on_delta, results, name):
    """Submit a greedy request whose deltas drive the test; wait until it is done (its Result in results[name])."""
    done = threading.Event()
    engine.submit(Request(prompt, max_new_tokens=max_new_tokens, temperature=0.0, on_delta=on_delta,
                          on_done=lambda r: (results.__setitem__(name, r), done.set())))
    assert done.wait(300)


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


def test_joins_that_grow_the_batch_from_one_row_to_two_and_four(model):
    """A lone sampled (top-k) row runs in a batch of 1; a newcomer needs a row: the batch grows to 2; two more
    newcomers: it grows to 4. Every row generates what it generates alone."""
    running, newcomer = SETTINGS["sampled"]
    gen = Generation(model, [A], max_new_tokens=24, **running, **SOLO)
    gen.step(4)
    gen.add_rows(1)
    assert gen.rows == 2 and gen.state.tokens.shape == (2, 48) and gen.finish_reasons == [None, "length"]
    gen.join(Generation(model, [C], max_new_tokens=12, **newcomer, **SOLO), [1])
    gen.step(4)
    gen.add_rows(2)
    assert gen.rows == 4 and gen.params.sampling.keys.shape == (4,) and gen.finish_reasons[2:] == ["length"] * 2
    with pytest.raises(ValueError, match="n must be >= 0"):
        gen.add_rows(-1)
    gen.join(Generation(model, [B, M], max_new_tokens=[10, 6], **SOLO), [3, 2])
    assert where(gen) == (40, 80, 48)  # 32 prompt slots + 8 steps; nothing moved
    out = gen.result()
    assert_same_row(out, 0, solo(model, A, max_new_tokens=24, **running))
    assert_same_row(out, 1, solo(model, C, max_new_tokens=12, **newcomer))
    assert_same_row(out, 3, solo(model, B, max_new_tokens=10))
    assert_same_row(out, 2, solo(model, M, max_new_tokens=6))
    assert out.prompt_lengths.tolist() == [len(A), len(C), len(M), len(B)]

    padded = Generation(model, [A], max_new_tokens=4, min_batch=2, **SOLO)  # its padding row is taken first
    padded.add_rows(1)
    assert padded.rows == 2 and padded.state.tokens.shape == (2, 48) and padded.finish_reasons == [None, "length"]


def test_a_batch_shrinks_to_its_running_rows(model):
    """Four sampled rows; two finish; the batch keeps rows 3 and 1 (in that order): they generate what they would
    unshrunk. Dropping a running row, or rows twice, is refused and changes nothing."""
    running, _ = SETTINGS["sampled"]
    budgets = [3, 20, 2, 14]
    unshrunk = Generation(model, [A, B, C, M], max_new_tokens=budgets, **running, **SOLO).result()
    gen = Generation(model, [A, B, C, M], max_new_tokens=budgets, **running, **SOLO)
    gen.step(4)
    assert gen.finish_reasons == ["length", None, "length", None]
    for bad in ([3], [3, 1, 1]):
        with pytest.raises(ValueError, match="keep_rows"):
            gen.keep_rows(bad)
    assert gen.rows == 4
    gen.keep_rows([3, 1])
    assert gen.rows == 2 and gen.state.tokens.shape == (2, 48) and gen.params.sampling.keys.shape == (2,)
    out = gen.result()
    assert_same_row(out, 0, unshrunk, 3)
    assert_same_row(out, 1, unshrunk, 1)
    assert out.prompt_lengths.tolist() == [len(M), len(B)]


def test_the_engine_runs_a_lone_request_in_one_row_and_grows_for_a_joiner(model, monkeypatch):
    """A lone request decodes one row; a request that arrives while it runs grows the batch to 2 rows and joins,
    and when it is done the batch shrinks to 1 row; both equal their solo runs. When growing fails, the joiner
    fails and the running request goes on."""
    engine = Engine(model, max_batch=4, segment=4, min_prompt_bucket=32, min_steps_bucket=16).start()
    results, rows = {}, []

    def run(joiner_fails: bool = False):
        short = Request(C, max_new_tokens=3, temperature=0.0, on_done=lambda r: results.__setitem__("short", r))

        def on_delta(delta):
            rows.append(engine._gen.rows)
            if len(rows) == 1:
                engine.submit(short)  # arrives during the first segment: joins at the next boundary

        stream(engine, A, 16, on_delta, results, "long")

    try:
        run()
        assert rows == [1, 2, 1, 1]  # the joiner's 3 tokens take one segment; then the batch shrinks back
        assert engine.stats["grown"] == 1 and engine.stats["joined"] == 1 and engine.stats["shrunk"] == 1
        assert results["short"].batch_size == 2
        same = lambda prompt, n: Generation(model, [prompt], max_new_tokens=n, min_prompt_len=32,
                                            min_new_tokens=16).result().tokens[0]
        assert results["long"].tokens == same(A, 16) and results["short"].tokens == same(C, 3)

        def broken(self, n):
            raise RuntimeError("no memory for more rows")

        monkeypatch.setattr(Generation, "add_rows", broken)
        rows.clear()
        run()
        assert isinstance(results["short"], RuntimeError) and rows == [1] * 4
        assert results["long"].tokens == same(A, 16)
    finally:
        engine.close()


def test_lazy_prefill_chunk_by_chunk(model):
    """With lazy_prefill nothing runs on construction; prefill_step() takes one chunk at a time (32 prompt slots
    in chunks of 8: 4 steps) and the batch then generates what an eagerly prefilled one does."""
    eager = Generation(model, [L, C], max_new_tokens=12, prefill_chunk=8, **SOLO).result()
    lazy = Generation(model, [L, C], max_new_tokens=12, prefill_chunk=8, lazy_prefill=True, **SOLO)
    with pytest.raises(ValueError, match="not prefilled yet"):
        lazy.step(4)
    assert [lazy.prefill_step() for _ in range(4)] == [False, False, False, True] and lazy.prefill_step()
    out = lazy.result()
    for i in (0, 1):
        assert_same_row(out, i, eager, i)


def test_the_engine_prefills_a_joiner_between_segments(model):
    """A newcomer's 19-token prompt (24 slots, chunks of 8) is prefilled one chunk per segment of the running
    request, which keeps streaming meanwhile; both equal their solo runs."""
    engine = Engine(model, max_batch=4, segment=4, prefill_chunk=8, min_prompt_bucket=32, min_steps_bucket=16).start()
    results, pending = {}, []
    newcomer = Request(L, max_new_tokens=6, temperature=0.0, on_done=lambda r: results.__setitem__("L", r))

    def on_delta(delta):
        pending.append(engine._joining is not None)
        if len(pending) == 1:
            engine.submit(newcomer)

    try:
        stream(engine, A, 20, on_delta, results, "A")
    finally:
        engine.close()
    assert pending[:4] == [False, True, True, False]  # chunks 1 and 2 between segments, chunk 3 then the join
    assert results["A"].tokens == solo(model, A, max_new_tokens=20).tokens[0]
    assert results["L"].tokens == solo(model, L, max_new_tokens=6).tokens[0] and engine.stats["joined"] == 1


@pytest.mark.parametrize("sizes", [dict(data=2, tensor=2),
                                   pytest.param(dict(data=2, context=2), marks=pytest.mark.slow)])
def test_the_engine_on_a_mesh(model, sizes):
    """On a data=2 x tensor=2 mesh (or data=2 x context=2: prompts split over two devices) every batch holds whole
    rows per device (a lone request: 1 row padded to 2); a joiner takes the padding row, a second one grows the
    batch to 4 rows; when both are done the batch shrinks back to 1 row; each request equals its unsharded solo
    run."""
    import jax

    from m1jax.loading import shard_model
    from m1jax.sharding import make_mesh

    mesh = make_mesh(**sizes, devices=jax.devices()[:4])
    engine = Engine(shard_model(model, mesh), max_batch=4, segment=4, min_prompt_bucket=32, min_steps_bucket=16,
                    mesh=mesh).start()
    results, shapes = {}, []
    joiners = [Request(C, max_new_tokens=12, temperature=0.0, on_done=lambda r: results.__setitem__("C", r)),
               Request(M, max_new_tokens=6, temperature=0.0, on_done=lambda r: results.__setitem__("M", r))]

    def on_delta(delta):
        shapes.append((engine._gen.rows, engine._gen.state.done.shape[0]))
        if joiners:
            engine.submit(joiners.pop(0))  # one joins at each of the next two segment boundaries

    try:
        stream(engine, A, 28, on_delta, results, "A")
    finally:
        engine.close()
    assert shapes[:3] == [(1, 2), (2, 2), (4, 4)]  # (rows, rows with padding)
    assert shapes[-1] == (1, 2) and engine.stats["shrunk"] >= 1  # C and M done: A alone, in 1 row (+1 padding)
    for name, prompt, n in (("A", A, 28), ("C", C, 12), ("M", M, 6)):
        assert results[name].tokens == solo(model, prompt, max_new_tokens=n).tokens[0], name
