"""Request batching: a background thread gathers the requests that arrive within a few milliseconds and runs
them as one `Generation`, padded to bucketed shapes (batch, prompt length, step buffer) to bound recompiles.

A batch runs to completion in segments of `segment` tokens; after each segment every request gets its new
tokens and text through its `on_delta` callback (called on the engine thread). Requests that arrive meanwhile
wait for the next batch.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from m1jax.generation import Delta, Generation
from m1jax.model import M1Model


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: Sequence[str] = ()
    thinking_budget: int | None = None
    expert_threshold: float = 0.0
    on_delta: Callable[[Delta], None] = lambda delta: None
    on_done: Callable[["Result | BaseException"], None] = lambda result: None
    cancelled: bool = False  # set by the caller (e.g. the client went away); checked between segments


@dataclasses.dataclass
class Result:
    tokens: list[int]
    text: str | None
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    routing: dict  # {"input" | "output" | "skipped": [layers][experts] counts}
    batch_size: int  # requests that ran in the same batch


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << (max(int(n), minimum, 1) - 1).bit_length()


class Engine:
    def __init__(self, model: M1Model, tokenizer=None, *, max_batch: int = 8, batch_window_ms: float = 5.0,
                 segment: int = 16, prefill_chunk: int = 2048, min_batch_bucket: int = 1,
                 min_prompt_bucket: int = 16, min_steps_bucket: int = 16):
        if max_batch < 1 or segment < 1:
            raise ValueError(f"max_batch and segment must be >= 1, got {max_batch}, {segment}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window = max_batch, batch_window_ms / 1000
        self.segment, self.prefill_chunk = segment, prefill_chunk
        self.min_batch_bucket = min_batch_bucket
        self.min_prompt_bucket, self.min_steps_bucket = min_prompt_bucket, min_steps_bucket
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="m1jax-engine", daemon=True)
        self._closed = False

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._queue.put(request)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    r = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if r is None:
                    self._queue.put(None)
                    break
                batch.append(r)
            batch = [r for r in batch if not r.cancelled]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        try:
            self._generate(batch)
        except BaseException as e:  # noqa: BLE001 - the engine must survive one bad batch
            traceback.print_exc()
            for r in batch:
                r.on_done(e)

    def _generate(self, batch: list[Request]) -> None:
        n = len(batch)
        self.stats["batches"] += 1
        self.stats["requests"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        longest = max(len(r.prompt) for r in batch)
        prompt_bucket = bucket(longest, self.min_prompt_bucket)
        if prompt_bucket > self.prefill_chunk:  # long prompts: a whole number of prefill chunks
            prompt_bucket = -(-longest // self.prefill_chunk) * self.prefill_chunk
        thinking = [r.thinking_budget for r in batch]
        gen = Generation(
            self.model, [r.prompt for r in batch],
            max_new_tokens=[r.max_new_tokens for r in batch], temperature=[r.temperature for r in batch],
            top_k=[r.top_k for r in batch], top_p=[r.top_p for r in batch], seed=[r.seed for r in batch],
            stop_strings=[list(r.stop) for r in batch],
            thinking_budget=None if all(t is None for t in thinking) else [-1 if t is None else t for t in thinking],
            expert_threshold=[r.expert_threshold for r in batch], tokenizer=self.tokenizer,
            prefill_chunk=self.prefill_chunk, min_batch=bucket(n, self.min_batch_bucket),
            min_prompt_len=prompt_bucket,
            min_new_tokens=bucket(max(r.max_new_tokens for r in batch), self.min_steps_bucket))
        for deltas in gen.stream(self.segment):
            for r, d in zip(batch, deltas):
                if d.tokens or d.text:
                    r.on_delta(d)
            gen.cancel([i for i, r in enumerate(batch) if r.cancelled])
        out = gen.result()
        for i, r in enumerate(batch):
            k = int(out.lengths[i])
            r.on_done(Result(
                tokens=out.tokens[i], text=None if out.text is None else out.text[i],
                logprobs=out.logprobs[i, :k].tolist(), finish_reason=out.finish_reasons[i],
                prompt_tokens=int(out.prompt_lengths[i]),
                routing={"input": out.routing.prompt[i].tolist(), "output": out.routing.generated[i].tolist(),
                         "skipped": out.routing.skipped[i].tolist()},
                batch_size=n))
