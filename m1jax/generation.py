"""Generation: chunked prefill into the hybrid cache, then sampling inside one jitted `lax.while_loop`.

Pure jitted pieces: `prefill_step` (one chunk of prompt tokens into the cache), `decode_step` (one token per
row), `decode` (the whole sampling loop: sample -> stop/budget/thinking bookkeeping -> one-token forward, until
every row is done or a step limit). `Generation` drives them from the host: it left-pads the prompts, prefills
chunk by chunk, and runs `decode` either to the end (one dispatch) or in segments of a few tokens so a caller
can stream text and apply stop strings between segments; between segments, `Generation.join` puts the rows of
another, freshly prefilled batch into finished rows (continuous batching: `splice_rows`, `place_rows`), and
`Generation.add_rows` appends finished rows for it (`append_free_rows`).
`generate` is the one-call API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from m1jax.cache import (append_filled, append_rows, cache_capacity, first_used_slot, init_cache, place_rows,
                         resize_cache, shift_cache, take_rows)
from m1jax.model import M1Model, forward
from m1jax.sharding import split_count

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ---- sampling ------------------------------------------------------------------------------------------
class Sampling(NamedTuple):
    """Per-row sampling parameters."""

    temperature: Float[Array, " batch"]  # <= 0: greedy
    top_k: Int[Array, " batch"]  # <= 0: no top-k
    top_p: Float[Array, " batch"]  # >= 1: no nucleus
    keys: Array  # [batch] PRNG keys, one per row (folded with the row's token count)


def sampling_mode(temperature, top_k, top_p) -> str:
    """The cheapest sampler that serves every row: "greedy", "sample" (no filtering) or "filtered" (top-k/p)."""
    t, k, p = (np.asarray(a) for a in (temperature, top_k, top_p))
    if not np.any(t > 0):
        return "greedy"
    return "filtered" if np.any((k > 0) & (t > 0)) or np.any((p < 1) & (t > 0)) else "sample"


def sample(logits: Float[Array, "batch vocab"], s: Sampling, count: Int[Array, " batch"] | int,
           mode: str) -> Int[Array, " batch"]:
    """Next tokens: argmax for rows with temperature 0, else a draw from softmax(logits / T) after top-k
    (the k most likely) then top-p (the smallest set of the top-k distribution whose mass reaches p).

    Row i draws with its key folded with count[i] (its tokens so far), and a row's draw does not depend on the
    mode (which only has to serve every row) nor on the other rows: the same tokens in any batch.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    keys = jax.vmap(jax.random.fold_in)(s.keys, jnp.broadcast_to(count, s.keys.shape))
    hot = s.temperature > 0
    scaled = logits / jnp.where(hot, s.temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    if mode == "filtered":
        order = jnp.argsort(-scaled, axis=-1, stable=True)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(ranked.shape[-1])[None, :]
        k = jnp.where(s.top_k > 0, s.top_k, ranked.shape[-1])[:, None]
        ranked = jnp.where(rank < k, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < s.top_p[:, None]) | (rank == 0)
        r = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
        filtered = (s.top_k > 0) | (s.top_p < 1)
        drawn = jnp.where(filtered, jnp.take_along_axis(order, r[:, None], axis=-1)[:, 0], drawn)
    return jnp.where(hot, drawn.astype(jnp.int32), greedy)


def row_keys(seeds: Sequence[int]) -> Array:
    return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds).astype(np.uint32)))


# ---- the jitted steps ----------------------------------------------------------------------------------
def _row_counts(router: dict) -> tuple[Array, Array]:
    """forward's per-row routing counts [layers, batch, E] -> int32 [batch, layers, E] (selected, skipped)."""
    f = lambda a: jnp.swapaxes(a, 0, 1).astype(jnp.int32)
    return f(router["row_selected"]), f(router["row_skipped"])


@functools.partial(jax.jit, static_argnames=("dispatch",), donate_argnames=("cache",))
def prefill_step(model: M1Model, cache: dict, tokens: Int[Array, "batch chunk"], mask: Bool[Array, "batch chunk"],
                 expert_threshold: Float[Array, " batch"], dispatch: str = "auto"):
    """Append one chunk to the cache. Returns (logits of the chunk's last token [batch, vocab], cache,
    routing counts [batch, layers, E], skipped counts [batch, layers, E])."""
    out = forward(model, tokens, attention_mask=mask, cache=cache, expert_threshold=expert_threshold,
                  dispatch=dispatch, last_only=True)
    return (out.logits[:, -1], out.cache) + _row_counts(out.router)


def prefill(model: M1Model, cache: dict, tokens: Int[Array, "batch len"], mask: Bool[Array, "batch len"] | None = None,
            *, chunk_size: int = 2048, expert_threshold=None, dispatch: str = "auto"):
    """Append a (left-padded) prompt to the cache chunk by chunk: peak activation memory follows `chunk_size`.

    The first chunk takes the remainder, so left padding only ever precedes real tokens (where a zero lightning
    state stays zero); every chunk is one `prefill_step` call. Returns what `prefill_step` returns, with the
    routing counts summed over the chunks.
    """
    for out in prefill_chunks(model, cache, tokens, mask, chunk_size=chunk_size, expert_threshold=expert_threshold,
                              dispatch=dispatch):
        pass
    return out[:4]


def prefill_chunks(model: M1Model, cache: dict, tokens: Int[Array, "batch len"], mask=None, *, chunk_size: int = 2048,
                   expert_threshold=None, dispatch: str = "auto") -> Iterator[tuple]:
    """`prefill` one chunk at a time: after each chunk yields what `prefill` returns so far, and whether that was
    the last chunk."""
    if chunk_size <= 0:
        raise ValueError(f"prefill chunk_size must be positive, got {chunk_size}")
    tokens = np.asarray(tokens, np.int32)  # sliced on the host: no compile per chunk boundary
    b, width = tokens.shape
    mask = np.ones((b, width), bool) if mask is None else np.asarray(mask, bool)
    threshold = jnp.broadcast_to(jnp.asarray(0.0 if expert_threshold is None else expert_threshold, jnp.float32),
                                 (b,))
    first = width - (-(-width // chunk_size) - 1) * chunk_size
    bounds = [0] + list(range(first, width + 1, chunk_size))
    routing = skipped = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, cache, r, s = prefill_step(model, cache, tokens[:, lo:hi], mask[:, lo:hi], threshold,
                                           dispatch=dispatch)
        routing, skipped = routing + r, skipped + s
        yield logits, cache, routing, skipped, hi == width


@functools.partial(jax.jit, static_argnames=("dispatch",), donate_argnames=("cache",))
def decode_step(model: M1Model, cache: dict, tokens: Int[Array, " batch"], dispatch: str = "auto"):
    """One token per row through the model: (next-token logits [batch, vocab] fp32, cache)."""
    out = forward(model, tokens[:, None], cache=cache, dispatch=dispatch)
    return out.logits[:, 0], out.cache


class DecodeParams(NamedTuple):
    """Everything the loop reads but does not change."""

    sampling: Sampling
    budget: Int[Array, " batch"]  # max new tokens per row
    think_budget: Int[Array, " batch"]  # max tokens inside <think>...</think>; < 0: no cap
    think_ids: Int[Array, " 2"]  # (<think>, </think>) ids, -1 if unknown
    stop_ids: Int[Array, " stops"]  # padded with -1
    vocab_limit: Int[Array, ""]  # ids >= this are never sampled (tokenizer smaller than the embedding)
    expert_threshold: Float[Array, " batch"]
    pad_id: Int[Array, ""]


class DecodeState(NamedTuple):
    cache: dict
    logits: Float[Array, "batch vocab"]  # logits for the next token
    tokens: Int[Array, "batch steps"]  # row i's generated tokens in columns [0, length[i]) (pad_id after)
    logprobs: Float[Array, "batch steps"]  # log p(token) under the model (temperature 1, unfiltered)
    step: Int[Array, ""]  # loop iterations so far
    done: Bool[Array, " batch"]
    length: Int[Array, " batch"]  # tokens generated per row
    in_think: Bool[Array, " batch"]
    think_count: Int[Array, " batch"]  # tokens generated inside the open <think> block
    routing: Int[Array, "batch layers experts"]  # expert selections of the generated tokens
    skipped: Int[Array, "batch layers experts"]


@functools.partial(jax.jit, static_argnames=("mode", "dispatch"), donate_argnames=("state",))
def decode(model: M1Model, state: DecodeState, params: DecodeParams, until: Int[Array, ""], mode: str,
           dispatch: str = "auto") -> DecodeState:
    """Sample until step `until` or every row is done, all inside one `lax.while_loop`.

    Each iteration samples one token per running row, applies the thinking budget (a row whose open <think>
    block holds `think_budget` tokens is given </think>), marks rows that emitted a stop id or used their budget
    as done, and feeds the tokens through the model (done rows are masked out) to get the next logits.
    """
    close_id = params.think_ids[1]
    vocab_ok = jnp.arange(state.logits.shape[-1]) < params.vocab_limit

    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        active = ~s.done
        tok = sample(jnp.where(vocab_ok, s.logits, -jnp.inf), params.sampling, s.length, mode)
        forced = s.in_think & (params.think_budget >= 0) & (s.think_count >= params.think_budget)
        tok = jnp.where(forced, close_id, tok)
        logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        length = s.length + active
        stopped = jnp.any(tok[:, None] == params.stop_ids[None, :], axis=-1)
        opened, closed = tok == params.think_ids[0], tok == close_id
        in_think = jnp.where(active, (s.in_think | opened) & ~closed, s.in_think)
        think_count = jnp.where(active & ~opened & ~closed & s.in_think, s.think_count + 1,
                                jnp.where(active & opened, 0, s.think_count))
        out = forward(model, tok[:, None], attention_mask=active[:, None], cache=s.cache,
                      expert_threshold=params.expert_threshold, dispatch=dispatch)
        selected, skipped = _row_counts(out.router)
        at = (jnp.arange(tok.shape[0]), jnp.where(active, s.length, s.tokens.shape[1]))  # done rows: dropped
        return DecodeState(
            cache=out.cache,
            logits=out.logits[:, 0],
            tokens=s.tokens.at[at].set(tok, mode="drop"),
            logprobs=s.logprobs.at[at].set(logp, mode="drop"),
            step=s.step + 1,
            done=s.done | (active & (stopped | (length >= params.budget))),
            length=length,
            in_think=in_think,
            think_count=think_count,
            routing=s.routing + selected,
            skipped=s.skipped + skipped,
        )

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, donate_argnames=("state",))
def splice_rows(state: DecodeState, params: DecodeParams, new: DecodeState, new_params: DecodeParams,
                rows: Int[Array, " n"]) -> tuple[DecodeState, DecodeParams]:
    """Row rows[k] of (state, params) replaced by row k of (new, new_params), a batch of n freshly prefilled rows
    (its cache placed by `place_rows`); rows[k] >= batch drops row k. The shared fields (stop ids, ...) stay."""
    put = lambda x, y: x.at[rows].set(y, mode="drop")
    state = state._replace(
        cache=place_rows(state.cache, new.cache, rows), logits=put(state.logits, new.logits),
        tokens=put(state.tokens, params.pad_id), logprobs=put(state.logprobs, 0.0), done=put(state.done, new.done),
        length=put(state.length, new.length), in_think=put(state.in_think, new.in_think),
        think_count=put(state.think_count, new.think_count), routing=put(state.routing, new.routing),
        skipped=put(state.skipped, new.skipped))
    params = params._replace(
        sampling=Sampling(*map(put, params.sampling, new_params.sampling)),
        budget=put(params.budget, new_params.budget), think_budget=put(params.think_budget, new_params.think_budget),
        expert_threshold=put(params.expert_threshold, new_params.expert_threshold))
    return state, params


@functools.partial(jax.jit, static_argnames=("n",))
def append_free_rows(state: DecodeState, params: DecodeParams, prompt_routing: Int[Array, "batch layers experts"],
                     n: int) -> tuple[DecodeState, DecodeParams, Array]:
    """(state, params, prompt_routing) with n finished placeholder rows appended to every per-row field: done,
    nothing generated, an empty cache row (`append_rows`), budget 0, greedy, no thinking cap, no expert
    threshold. `splice_rows` fills them like any finished row."""
    more = lambda x, value=0: append_filled(x, n, 0, value)

    state = state._replace(
        cache=append_rows(state.cache, n), logits=more(state.logits), tokens=more(state.tokens, params.pad_id),
        logprobs=more(state.logprobs), done=more(state.done, True), length=more(state.length),
        in_think=more(state.in_think), think_count=more(state.think_count), routing=more(state.routing),
        skipped=more(state.skipped))
    s = params.sampling
    params = params._replace(
        sampling=Sampling(more(s.temperature), more(s.top_k), more(s.top_p, 1.0),
                          jnp.concatenate([s.keys, row_keys(np.zeros(n, np.uint32))])),
        budget=more(params.budget), think_budget=more(params.think_budget, -1),
        expert_threshold=more(params.expert_threshold))
    return state, params, more(prompt_routing)


@jax.jit
def keep_state_rows(state: DecodeState, params: DecodeParams, prompt_routing: Int[Array, "batch layers experts"],
                    rows: Int[Array, " n"]) -> tuple[DecodeState, DecodeParams, Array]:
    """(state, params, prompt_routing) of rows `rows` only, in that order; the shared fields stay."""
    take = lambda x: x[rows]
    per_row = jax.tree.map(take, state._replace(cache=None, step=None))
    state = per_row._replace(cache=take_rows(state.cache, rows), step=state.step)
    params = params._replace(sampling=jax.tree.map(take, params.sampling), budget=take(params.budget),
                             think_budget=take(params.think_budget), expert_threshold=take(params.expert_threshold))
    return state, params, take(prompt_routing)


# ---- host driver ---------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """Expert selections per row, layer and expert (counts of tokens; top-k selections each)."""

    prompt: np.ndarray  # [batch, layers, E] over the prompt tokens
    generated: np.ndarray  # [batch, layers, E] over the generated tokens
    skipped: np.ndarray  # [batch, layers, E] selections dropped by expert_threshold (prompt + generated)


@dataclasses.dataclass
class GenerationOutput:
    sequences: np.ndarray  # [batch, prompt + new] the (left-padded) prompt then the new tokens, pad after the end
    logprobs: np.ndarray  # [batch, new] log-probability of each generated token under the model (fp32 head)
    lengths: np.ndarray  # [batch] generated tokens per row (stop token included)
    prompt_lengths: np.ndarray  # [batch] real (unpadded) prompt tokens
    finish_reasons: list[str]  # "stop" (stop token or string) or "length"
    routing: Routing
    text: list[str] | None  # the generated text (stop token and stop string excluded) when a tokenizer is known
    cache: dict  # the cache after the last step (exact for rows that ran until the last step)

    @property
    def tokens(self) -> list[list[int]]:
        width = self.sequences.shape[1] - self.logprobs.shape[1]
        return [row[width:width + n].tolist() for row, n in zip(self.sequences, self.lengths)]


@dataclasses.dataclass
class Delta:
    """What one row produced in one segment."""

    tokens: list[int]
    text: str  # "" without a tokenizer
    finish_reason: str | None  # set once the row is finished


class _RowText:
    """Incremental text of one row, holding back text that may be the start of a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.decoder = tokenizer.stream_decoder()
        self.text, self.sent = "", 0

    def push(self, ids: list[int], final: bool) -> tuple[str, int | None]:
        """(new text to emit, index in `ids` of the token completing a stop string or None)."""
        before = len(self.text)
        self.text += self.decoder.push(ids)
        if final:
            self.text += self.decoder.flush()
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            end, stop = min(hits)
            cut = self._tokens_until(ids, before, end + len(stop))
            delta, self.text = self.text[self.sent:end], self.text[:end]
            self.sent = end
            return delta, cut
        hold = 0 if final else max((n for s in self.stops for n in range(1, len(s))
                                    if self.text.endswith(s[:n])), default=0)
        delta = self.text[self.sent:len(self.text) - hold]
        self.sent += len(delta)
        return delta, None

    def _tokens_until(self, ids: list[int], before: int, chars: int) -> int:
        """Index of the first of `ids` whose text reaches `chars` characters of the row's text."""
        head = self.text[:before]
        for n in range(1, len(ids) + 1):
            if len(head) + len(self.tokenizer.decode_continuation(ids[:n]) if head else
                               self.tokenizer.decode(ids[:n])) >= chars:
                return n - 1
        return len(ids) - 1


def context_pieces(mesh, prefill_chunk: int) -> int:
    """Into how many pieces prefill splits sequences over the mesh's "context" axis; ValueError unless prefill
    chunks divide into them."""
    pieces = 1 if mesh is None else split_count("length", mesh.shape)
    if prefill_chunk % pieces:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be a multiple of the mesh's context axis ({pieces})")
    return pieces


class Generation:
    """A batch being generated: prefilled on construction, then advanced with `step()` / iterated with `stream()`.

    prompts: lists of ids (left-padded here) or an int array [batch, len] with an optional left-padding
    `attention_mask`. Per-row settings (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`,
    `thinking_budget`, `expert_threshold`) take a scalar or one value per row; row i samples with seed
    `seed + i` when `seed` is a scalar, so a row gives the same tokens whatever batch it runs in.
    `min_batch`, `min_prompt_len`, `min_new_tokens` pad the shapes up to buckets, so that servers reuse compiles.
    `lazy_prefill`: prefill nothing on construction; `prefill_step()` prefills one chunk of `prefill_chunk` tokens
    at a time (a server interleaves them with another batch's decoding).
    `mesh`: run on this mesh (for a model whose parameters live on it, e.g. `from_pretrained(..., mesh=mesh)`): the
    cache is created sharded like the activations, the model runs under `jax.set_mesh(mesh)` (expert-parallel MoE,
    per-device lightning kernels), and the batch is padded to a multiple of the mesh's batch split. A "context"
    axis splits the prefill's sequences (prompts left-padded to a multiple of it); decode steps are not split over it.
    A `cache` passed in is consumed (its buffers are donated to the computation). A row samples with its key
    folded with its own token count, so it gives the same tokens whenever it joins a batch (`join`).
    """

    def __init__(self, model: M1Model, prompts, *, attention_mask=None, max_new_tokens=64, temperature=0.0,
                 top_k=0, top_p=1.0, seed=0, stop_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | Sequence[Sequence[str]] = (), thinking_budget=None,
                 think_ids: tuple[int, int] | None = None, expert_threshold=None, tokenizer=None,
                 cache: dict | None = None, prefill_chunk: int = 2048, mesh=None,
                 min_batch: int = 1, min_prompt_len: int = 1, min_new_tokens: int = 1, dispatch: str = "auto",
                 lazy_prefill: bool = False):
        cfg = model.config
        self.model, self.tokenizer, self.dispatch = model, tokenizer, dispatch
        tokens, mask = _left_padded(prompts, attention_mask, cfg.vocab_size)
        rows = tokens.shape[0]
        self.rows = rows
        per_row = lambda v, name, dtype: _per_row(v, rows, name, dtype)
        budget = per_row(max_new_tokens, "max_new_tokens", np.int32)
        if np.any(budget < 0):
            raise ValueError(f"max_new_tokens must be >= 0, got {budget.tolist()}")
        temperature, top_k = per_row(temperature, "temperature", np.float32), per_row(top_k, "top_k", np.int32)
        top_p = per_row(top_p, "top_p", np.float32)
        if np.any(temperature < 0) or np.any(top_p <= 0) or np.any(top_p > 1) or np.any(top_k < 0):
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                             f"temperature={temperature.tolist()}, top_p={top_p.tolist()}, top_k={top_k.tolist()}")
        seeds = per_row(seed, "seed", np.int64)
        if np.ndim(seed) == 0:
            seeds = seeds + np.arange(rows)
        think = per_row(-1 if thinking_budget is None else thinking_budget, "thinking_budget", np.int32)
        if thinking_budget is not None:
            if think_ids is None and tokenizer is not None:
                think_ids = (tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE))
            if think_ids is None or None in think_ids:
                raise ValueError("thinking_budget needs <think> and </think> to be single tokens: pass a tokenizer "
                                 "that has them or think_ids=(open_id, close_id)")
        think_ids = (-1, -1) if think_ids is None else tuple(int(i) for i in think_ids)
        threshold = per_row(0.0 if expert_threshold is None else expert_threshold, "expert_threshold", np.float32)
        if np.any(threshold < 0) or np.any(threshold > 1):
            raise ValueError(f"expert_threshold must be in [0, 1], got {threshold.tolist()}")
        if stop_token_ids is None:
            stop_token_ids = _default_stop_ids(cfg, tokenizer)
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        if all(isinstance(x, str) for x in stop_strings):
            stop_strings = [stop_strings] * rows
        if len(stop_strings) != rows:
            raise ValueError(f"stop_strings: one list for all prompts or one per prompt ({rows}), "
                             f"got {len(stop_strings)}")
        if any(stop_strings) and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the output")
        self.pad_id = self.stop_token_ids[0] if self.stop_token_ids else 0

        # pad to buckets: more rows (done from the start), more left padding, a longer step buffer
        self.mesh = mesh
        batch = self._whole_rows(max(rows, min_batch))
        pieces = context_pieces(mesh, prefill_chunk)
        width = -(-max(tokens.shape[1], min_prompt_len) // pieces) * pieces
        if cache is not None and int(cache["offset"]) and tokens.shape[1] % pieces:
            raise ValueError(f"continuing a non-empty cache on a mesh with context={pieces} needs inputs of a "
                             f"multiple of {pieces} tokens (left padding would decay the carried lightning state); "
                             f"got {tokens.shape[1]}")
        tokens = np.pad(tokens, ((0, batch - rows), (width - tokens.shape[1], 0)), constant_values=self.pad_id)
        mask = np.pad(mask, ((0, batch - rows), (width - mask.shape[1], 0)))
        pad_rows = lambda a, v=0: np.concatenate([a, np.full(batch - rows, v, a.dtype)])
        budget, temperature, top_k = pad_rows(budget), pad_rows(temperature), pad_rows(top_k)
        top_p, think, threshold = pad_rows(top_p, 1.0), pad_rows(think, -1), pad_rows(threshold)
        seeds = pad_rows(seeds)
        self.steps = max(int(budget.max(initial=0)), min_new_tokens, 1)
        self.prompt_tokens, self.prompt_mask = tokens, mask
        self.prompt_lengths = mask.sum(1)[:rows]
        empty = np.flatnonzero(self.prompt_lengths == 0)
        if len(empty):
            raise ValueError(f"prompt {int(empty[0])} is empty: generation needs at least one input token")

        # prefill
        if cache is None:
            cache = init_cache(cfg, batch, width + self.steps, mesh=mesh)
        else:
            if cache["key_valid"].shape[0] != batch:
                raise ValueError(f"the cache holds {cache['key_valid'].shape[0]} sequences; the input has {batch}")
            if int(cache["offset"]) and not mask.all():
                raise ValueError("continuing a non-empty cache needs inputs of equal length without padding "
                                 "(padding would decay the carried lightning state)")
            need = int(cache["offset"]) + width + self.steps
            if cache_capacity(cache) < need:
                cache = resize_cache(cache, need)
        self._chunks = prefill_chunks(model, cache, tokens, mask, chunk_size=prefill_chunk,
                                      expert_threshold=threshold, dispatch=dispatch)
        self.state = self.prompt_routing = None
        self._in_think = np.zeros(batch, bool)
        if think_ids[0] >= 0:  # a prompt that ends inside an open <think> block
            for i, row in enumerate(tokens):
                opens, closes = np.flatnonzero(row == think_ids[0]), np.flatnonzero(row == think_ids[1])
                self._in_think[i] = len(opens) > 0 and (len(closes) == 0 or opens[-1] > closes[-1])
        vocab_limit = cfg.vocab_size if tokenizer is None else min(cfg.vocab_size, tokenizer.vocab_size)
        self.params = DecodeParams(
            sampling=Sampling(jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p), row_keys(seeds)),
            budget=jnp.asarray(budget), think_budget=jnp.asarray(think), think_ids=jnp.asarray(think_ids, jnp.int32),
            stop_ids=jnp.asarray(self.stop_token_ids or (-1,), jnp.int32), vocab_limit=jnp.int32(vocab_limit),
            expert_threshold=jnp.asarray(threshold), pad_id=jnp.int32(self.pad_id))
        self._budget, self._sampling = budget, (temperature, top_k, top_p)  # per row, on the host
        self._texts = None if tokenizer is None else [_RowText(tokenizer, stops) for stops in stop_strings]
        self._emitted = np.zeros(rows, np.int64)  # tokens handed out per row
        self._cut = np.full(rows, -1, np.int64)  # generated length after a stop string, -1 if none
        self._finished = np.asarray(budget[:rows] <= 0)
        self._reasons: list[str | None] = ["length" if f else None for f in self._finished]
        while not lazy_prefill and not self.prefill_step():
            pass

    @property
    def prefilled(self) -> bool:
        return self.state is not None

    def prefill_step(self) -> bool:
        """Prefill the next chunk of the prompts (all of them are prefilled on construction unless `lazy_prefill`);
        True once the batch is ready to decode."""
        if self.prefilled:
            return True
        with self._on_mesh():
            logits, cache, routing, skipped, last = next(self._chunks)
        if last:
            batch = len(self._budget)
            self.prompt_routing, self._chunks = routing, None
            self.state = DecodeState(
                cache=cache, logits=logits,
                tokens=jnp.full((batch, self.steps), self.pad_id, jnp.int32),
                logprobs=jnp.zeros((batch, self.steps), jnp.float32),
                step=jnp.int32(0), done=jnp.asarray(self._budget <= 0), length=jnp.zeros(batch, jnp.int32),
                in_think=jnp.asarray(self._in_think), think_count=jnp.zeros(batch, jnp.int32),
                routing=jnp.zeros((batch,) + routing.shape[1:], jnp.int32), skipped=skipped)
        return last

    def _need_prefilled(self, what: str) -> None:
        if not self.prefilled:
            raise ValueError(f"{what}: the prompts are not prefilled yet (call prefill_step() until it returns True)")

    def _whole_rows(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the mesh's batch split (every device holds whole rows)."""
        split = 1 if self.mesh is None else split_count("batch", self.mesh.shape)
        return -(-rows // split) * split

    def _on_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @property
    def done(self) -> bool:
        return bool(self._finished.all())

    @property
    def finish_reasons(self) -> list[str | None]:
        """Per row: None while it runs, else "stop", "length" or "cancelled"."""
        return list(self._reasons)

    def step(self, max_tokens: int | None = None) -> list[Delta]:
        """Run the loop for up to `max_tokens` more tokens (default: to the end); the new output of every row."""
        self._need_prefilled("step")
        if self.done:
            return [Delta([], "", None) for _ in range(self.rows)]
        until = int(self.state.step) + (self.steps if max_tokens is None else max_tokens)
        live = np.flatnonzero(~self._finished)
        mode = sampling_mode(*(a[live] for a in self._sampling))  # the cheapest sampler for the running rows
        with self._on_mesh():
            self.state = decode(self.model, self.state, self.params, jnp.int32(until), mode, self.dispatch)
        tokens, lengths, done = jax.device_get((self.state.tokens, self.state.length, self.state.done))
        deltas = []
        for i in range(self.rows):
            if self._finished[i]:
                deltas.append(Delta([], "", None))
                continue
            prev = int(self._emitted[i])
            new = tokens[i, prev:lengths[i]].tolist()
            self._emitted[i] = lengths[i]
            finished = bool(done[i])
            reason = None if not finished else "stop" if new and new[-1] in self.stop_token_ids else "length"
            text = ""
            if self._texts is not None:
                visible = new[:-1] if reason == "stop" else new
                text, cut = self._texts[i].push(visible, final=finished)
                if cut is not None:
                    new = new[:cut + 1]
                    self._cut[i] = prev + cut + 1
                    finished, reason = True, "stop"
            if finished:
                self._finished[i], self._reasons[i] = True, reason
            deltas.append(Delta(new, text, reason))
        if np.any(self._finished & ~done[:self.rows]):  # stopped by a stop string: stop on the device too
            self.cancel([])
        return deltas

    def cancel(self, rows: Sequence[int]) -> None:
        """Finish these rows now (finish reason "cancelled"); the others go on."""
        self._need_prefilled("cancel")
        for i in rows:
            if not self._finished[i]:
                self._finished[i], self._reasons[i] = True, "cancelled"
        self.state = self.state._replace(done=self.state.done.at[:self.rows].set(
            self.state.done[:self.rows] | jnp.asarray(self._finished)))

    def stream(self, segment: int = 8) -> Iterator[list[Delta]]:
        """Yield every row's new output after each segment of `segment` tokens, until all rows are done."""
        while not self.done:
            yield self.step(segment)

    def result(self) -> GenerationOutput:
        """Run to the end (if not done) and collect the output."""
        while not self.done:
            self.step()
        return self.output()

    def output(self, rows: Sequence[int] | None = None) -> GenerationOutput:
        """The output so far of these rows (default: all), final for the finished ones (see `finish_reasons`)."""
        self._need_prefilled("output")
        rows = np.arange(self.rows) if rows is None else np.asarray(rows, np.int64).reshape(-1)
        s = jax.device_get(self.state._replace(cache=None, logits=None))
        n = int(s.length[rows].max(initial=0))
        lengths = np.where(self._cut[rows] >= 0, self._cut[rows], s.length[rows])
        tokens, logprobs = s.tokens[rows, :n].copy(), s.logprobs[rows, :n].copy()
        for i, k in enumerate(lengths):
            tokens[i, k:], logprobs[i, k:] = self.pad_id, 0.0
        return GenerationOutput(
            sequences=np.concatenate([self.prompt_tokens[rows], tokens], axis=1),
            logprobs=logprobs, lengths=lengths.astype(np.int64), prompt_lengths=self.prompt_lengths[rows],
            finish_reasons=[self._reasons[i] for i in rows],
            routing=Routing(np.asarray(self.prompt_routing)[rows], s.routing[rows], s.skipped[rows]),
            text=None if self._texts is None else [self._texts[i].text for i in rows], cache=self.state.cache)

    def add_rows(self, n: int) -> None:
        """Continuous batching: n more rows (self.rows .. self.rows + n - 1), finished placeholders for `join`.

        The batch's padding rows (`min_batch`, mesh rounding) are taken first; past them every per-row array grows
        by the missing rows, rounded up to whole rows per device (a new batch shape: callers bucket the row count to
        bound compiles). The other rows generate what they would generate without it. Nothing changes if it raises.
        """
        self._need_prefilled("add_rows")
        if n < 0:
            raise ValueError(f"add_rows: n must be >= 0, got {n}")
        extra = self._whole_rows(self.rows + n) - len(self._budget)
        state, params, routing = self.state, self.params, self.prompt_routing
        budget, sampling = self._budget, self._sampling
        tokens, mask = self.prompt_tokens, self.prompt_mask
        if extra > 0:
            state, params, routing = append_free_rows(state, params, routing, extra)
            more = lambda a, value=0: np.concatenate([a, np.full((extra,) + a.shape[1:], value, a.dtype)])
            budget, sampling = more(budget), tuple(more(a, v) for a, v in zip(sampling, (0, 0, 1)))
            tokens, mask = more(tokens, self.pad_id), more(mask, False)
        self.state, self.params, self.prompt_routing = state, params, routing
        self._budget, self._sampling, self.prompt_tokens, self.prompt_mask = budget, sampling, tokens, mask
        self.prompt_lengths = np.concatenate([self.prompt_lengths, np.zeros(n, self.prompt_lengths.dtype)])
        self._emitted = np.concatenate([self._emitted, np.zeros(n, np.int64)])
        self._cut = np.concatenate([self._cut, np.full(n, -1, np.int64)])
        self._finished = np.concatenate([self._finished, np.ones(n, bool)])
        self._reasons += ["length"] * n
        if self._texts is not None:
            self._texts += [_RowText(self.tokenizer, []) for _ in range(n)]
        self.rows += n

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Continuous batching: keep only these rows, renumbered 0.. in this order, and drop the others, which must
        be finished: the batch shrinks (a new batch shape: callers bucket the row count to bound compiles). The
        kept rows generate what they would generate without it. Nothing changes if it raises."""
        self._need_prefilled("keep_rows")
        rows = [int(i) for i in rows]
        dropped = sorted(set(range(len(self._budget))) - set(rows))
        live = [i for i in dropped if i < self.rows and not self._finished[i]]
        if live or len(set(rows)) != len(rows) or not all(0 <= i < self.rows for i in rows) or not rows:
            raise ValueError(f"keep_rows: rows {rows} must be distinct rows of this batch (of {self.rows}), and every "
                             f"row dropped must be finished; running and dropped: {live}")
        index = np.asarray(rows + dropped[:self._whole_rows(len(rows)) - len(rows)])  # finished rows as padding
        self.state, self.params, self.prompt_routing = keep_state_rows(self.state, self.params, self.prompt_routing,
                                                                       jnp.asarray(index))
        self._budget, self._sampling = self._budget[index], tuple(a[index] for a in self._sampling)
        self.prompt_tokens, self.prompt_mask = self.prompt_tokens[index], self.prompt_mask[index]
        self.prompt_lengths, self._emitted = self.prompt_lengths[rows], self._emitted[rows]
        self._cut, self._finished = self._cut[rows], self._finished[rows]
        self._reasons = [self._reasons[i] for i in rows]
        if self._texts is not None:
            self._texts = [self._texts[i] for i in rows]
        self.rows = len(rows)

    def join(self, other: "Generation", rows: Sequence[int]) -> None:
        """Continuous batching: row k of `other` (a batch prefilled on its own and not stepped) replaces the
        finished row rows[k] of this batch from the next step on, and generates what it would generate alone.
        `other` is consumed (its cache moves into this one).

        Where a newcomer goes (rules in this order): its tokens end at the shared write offset, which first moves
        right when it is shorter than a newcomer's tokens; if the slots after it cannot hold every running row's
        remaining budget and every newcomer's budget, the slots before every live row's first token are dropped
        (the offset moves left); if that is not enough, the buffers grow to the next power of two. The step
        buffer grows to `other`'s when that is wider. Moves and growth are exact (attention reads slots by
        `key_valid`; keys carry their positions), and shapes only change when the buffers grow.
        """
        self._need_prefilled("join")
        other._need_prefilled("join (the joining batch)")
        rows = [int(i) for i in rows]
        busy = [i for i in rows if not 0 <= i < self.rows or not self._finished[i]]
        if busy or len(set(rows)) != len(rows):
            raise ValueError(f"join: rows {rows} must be distinct finished rows of this batch (of {self.rows}); "
                             f"not free: {busy}")
        if len(rows) != other.rows:
            raise ValueError(f"join: {len(rows)} rows for the {other.rows} rows of the joining batch")
        if int(other.state.step):
            raise ValueError("join: the joining batch has already been stepped")
        shared = lambda g: (id(g.model), g.mesh, g.dispatch, g.stop_token_ids, g.pad_id, g._texts is None,
                            np.asarray(g.params.think_ids).tolist(), int(g.params.vocab_limit))
        if shared(self) != shared(other):
            raise ValueError("join: the joining batch differs in model, mesh, dispatch, stop ids, think ids, "
                             "vocabulary limit, pad id or tokenizer")
        cache, new_cache = self.state.cache, other.state.cache
        offset, capacity = int(cache["offset"]), cache_capacity(cache)
        live = np.zeros(len(self._budget), bool)
        live[:self.rows] = ~self._finished
        remaining = (self._budget - np.asarray(self.state.length))[live]
        real = np.arange(len(other._budget)) < other.rows
        span = int(new_cache["offset"]) - first_used_slot(new_cache, real)  # slots of the newcomers' tokens
        need = max(int(remaining.max(initial=0)), int(other._budget[real].max(initial=0)))
        target = max(offset, span)
        if target + need > capacity:
            target = max(offset - first_used_slot(cache, live), span)
            if target + need > capacity:
                capacity = 1 << (target + need - 1).bit_length()
        if (target, capacity) != (offset, cache_capacity(cache)):
            cache = shift_cache(cache, target - offset, capacity)
        state = self.state._replace(cache=cache)
        if other.steps > self.steps:
            wider = lambda a, value: jnp.pad(a, ((0, 0), (0, other.steps - self.steps)), constant_values=value)
            state = state._replace(tokens=wider(state.tokens, self.pad_id), logprobs=wider(state.logprobs, 0.0))
            self.steps = other.steps
        index = np.full(len(other._budget), len(self._budget), np.int32)  # padding rows of `other`: dropped
        index[:other.rows] = rows
        self.state, self.params = splice_rows(state, self.params, other.state, other.params, jnp.asarray(index))
        self.prompt_routing = self.prompt_routing.at[index].set(other.prompt_routing, mode="drop")

        width = max(self.prompt_tokens.shape[1], other.prompt_tokens.shape[1])
        left = lambda a, value: np.pad(a, ((0, 0), (width - a.shape[1], 0)), constant_values=value)
        self.prompt_tokens, self.prompt_mask = left(self.prompt_tokens, self.pad_id), left(self.prompt_mask, False)
        self.prompt_tokens[rows] = left(other.prompt_tokens[:other.rows], other.pad_id)
        self.prompt_mask[rows] = left(other.prompt_mask[:other.rows], False)
        self.prompt_lengths[rows] = other.prompt_lengths
        self._budget[rows] = other._budget[:other.rows]
        for mine, theirs in zip(self._sampling, other._sampling):
            mine[rows] = theirs[:other.rows]
        self._emitted[rows], self._cut[rows], self._finished[rows] = 0, -1, other._finished
        for k, i in enumerate(rows):
            self._reasons[i] = other._reasons[k]
            if self._texts is not None:
                self._texts[i] = other._texts[k]


def generate(model: M1Model, inputs, *, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=0,
             stop=None, thinking_budget=None, tokenizer=None, expert_threshold=None, attention_mask=None,
             cache: dict | None = None, prefill_chunk: int = 2048, chat: bool = False,
             think_ids: tuple[int, int] | None = None, mesh=None, dispatch: str = "auto") -> GenerationOutput:
    """Generate continuations of a batch of prompts; see `Generation` for the per-row settings.

    inputs: a string or list of strings (needs `tokenizer`; with `chat=True` each string is a user message
    rendered with M1's chat template), a list of ids, a list of id lists, or an int array [batch, len]
    (left-padded, with `attention_mask`). `stop`: stop strings and/or stop token ids (default stop ids: the
    tokenizer's, else config.eos_token_id). `cache`: continue after the tokens already in this cache.
    `think_ids`: the (<think>, </think>) ids for `thinking_budget` (default: looked up in the tokenizer).
    """
    prompts = encode_prompts(inputs, tokenizer, chat)
    stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    stop_ids = [s for s in stop if isinstance(s, (int, np.integer))]
    stop_strings = [s for s in stop if isinstance(s, str)]
    if len(stop_ids) + len(stop_strings) != len(stop):
        raise ValueError(f"stop must hold strings and/or token ids, got {stop!r}")
    defaults = _default_stop_ids(model.config, tokenizer)
    run = Generation(model, prompts, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop_token_ids=tuple(defaults) + tuple(stop_ids), stop_strings=stop_strings,
                     thinking_budget=thinking_budget, think_ids=think_ids, expert_threshold=expert_threshold,
                     tokenizer=tokenizer, cache=cache, prefill_chunk=prefill_chunk, mesh=mesh, dispatch=dispatch)
    if stop_strings:  # check stop strings every few tokens so rows can finish early
        for _ in run.stream(32):
            pass
    return run.result()


def encode_prompts(inputs, tokenizer=None, chat: bool = False):
    """Strings -> id lists (through the tokenizer, optionally as chat user turns); ids pass through."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, str) for x in inputs):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (pass tokenizer=..., or token ids)")
        if chat:
            from m1jax.chat_template import render_chat
            inputs = [render_chat([{"role": "user", "content": x}]) for x in inputs]
        return [tokenizer.encode(x) for x in inputs]
    if chat:
        raise ValueError("chat=True needs text prompts")
    return inputs


def _default_stop_ids(config, tokenizer) -> tuple[int, ...]:
    if tokenizer is not None:
        return tuple(tokenizer.stop_token_ids)
    return () if config.eos_token_id is None else (config.eos_token_id,)


def _per_row(value, rows: int, name: str, dtype) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64 if np.dtype(dtype).kind == "f" else None)
    if a.ndim == 0:
        a = np.full(rows, a)
    if a.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or one value per prompt ({rows}), got shape {a.shape}")
    if np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got {value!r}")
    return a.astype(dtype)


def _left_padded(prompts, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [batch, len] int32, mask [batch, len] bool) with every row's tokens at the right end."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        ids = np.asarray(prompts)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input ids must be an int array [batch, len], got {ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from the input ids {ids.shape}")
        if np.any(mask[:, :-1] & ~mask[:, 1:]):
            raise ValueError("attention_mask must be left padding (no real token followed by a pad)")
        rows = [row[m].tolist() for row, m in zip(ids, mask)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with an id array; lists of ids are padded here")
        rows = list(prompts)
        if rows and all(isinstance(x, (int, np.integer)) for x in rows):
            rows = [rows]
        if not rows or not all(isinstance(r, (list, tuple, np.ndarray)) for r in rows):
            raise ValueError("inputs must be a string, a list of strings, a list of ids or a list of id lists")
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        r = np.asarray(r, np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): "
                             f"{sorted(set(r[(r < 0) | (r >= vocab_size)].tolist()))[:5]}")
        if r.size:
            ids[i, width - r.size:], mask[i, width - r.size:] = r, True
    return ids, mask
