"""Continuous batching: a background thread keeps one running `Generation` and advances it in segments of
`segment` tokens; after each segment every request gets its new tokens and text through its `on_delta` callback,
and finished requests get their `Result` through `on_done` (both called on the engine thread).

When nothing runs, the first request starts a new batch with those that arrive within `batch_window_ms`, of
`bucket(n, min_batch_bucket)` rows for n requests (a lone request decodes one row). Requests that arrive while it
runs join it, taking the rows of finished ones: the newcomers are prefilled on their own (one batch of them,
bucketed shapes), one `prefill_chunk` between two segments of the running batch (so a long prompt does not stall
the others' streams), then spliced in with `Generation.join`, which says where their cache goes and when it grows.
When they need more rows than are free, the batch first grows (`Generation.add_rows`) to the next power of two
that holds every running request and newcomer, at most `bucket(max_batch, min_batch_bucket)` rows. When the
running requests fit in half the rows or fewer, the batch shrinks to their bucket (`Generation.keep_rows`); its
cache is freed when its last request finishes. A row produces the same tokens whenever it joins and whatever the
batch size. At most `max_batch` requests run at once; the others wait (first come, first served). With `mesh` (a
model whose parameters live on it), every batch runs on that mesh, its rows padded to whole rows per device.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from m1jax.generation import THINK_CLOSE, THINK_OPEN, Delta, Generation, context_pieces
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
    batch_size: int  # the most requests that ran in the batch at once while this one ran


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << (max(int(n), minimum, 1) - 1).bit_length()


class Engine:
    def __init__(self, model: M1Model, tokenizer=None, *, max_batch: int = 8, batch_window_ms: float = 5.0,
                 segment: int = 16, prefill_chunk: int = 2048, min_batch_bucket: int = 1,
                 min_prompt_bucket: int = 16, min_steps_bucket: int = 16, mesh=None):
        if max_batch < 1 or segment < 1:
            raise ValueError(f"max_batch and segment must be >= 1, got {max_batch}, {segment}")
        context_pieces(mesh, prefill_chunk)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_batch, self.window = max_batch, batch_window_ms / 1000
        self.segment, self.prefill_chunk = segment, prefill_chunk
        self.min_batch_bucket = min_batch_bucket
        self.min_prompt_bucket, self.min_steps_bucket = min_prompt_bucket, min_steps_bucket
        self.rows = bucket(max_batch, min_batch_bucket)  # the most rows of the running batch
        # batches: started from idle; joined: requests that joined a running batch; grown/shrunk: row-count changes
        self.stats = {"batches": 0, "requests": 0, "joined": 0, "grown": 0, "shrunk": 0, "largest_batch": 0}
        ids = None if tokenizer is None else (tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE))
        self._think_ids = None if ids is None or None in ids else ids
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._gen: Generation | None = None
        self._joining: tuple[Generation, list[Request]] | None = None  # newcomers being prefilled, chunk by chunk
        self._owners: list[Request | None] = []  # the request of each row of the running batch
        self._peers: list[int] = []  # per row: the most requests that ran at once alongside (batch_size)
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

    # ---- the engine thread
    def _loop(self) -> None:
        accepting = True
        while accepting or self._running() or self._waiting or self._joining:
            if accepting:
                accepting = self._receive()
            self._admit()
            if self._running():
                self._advance()

    def _running(self) -> int:
        return sum(r is not None for r in self._owners)

    def _receive(self) -> bool:
        """Move new requests to the waiting line: when idle, block for one, then gather those arriving within
        the batch window; else take what has arrived. False once the engine is closed."""
        if not self._running() and not self._waiting and not self._joining:
            first = self._queue.get()
            if first is None:
                return False
            self._waiting.append(first)
            deadline = time.monotonic() + self.window
            while len(self._waiting) < self.max_batch:
                try:
                    r = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return True
                if r is None:
                    return False
                self._waiting.append(r)
            return True
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                return True
            if r is None:
                return False
            self._waiting.append(r)

    def _admit(self) -> None:
        """Start a batch with waiting requests when none runs; else prefill them one chunk per call (between the
        running batch's segments) and then let them join into free rows, first growing the batch to the next power
        of two that fits when too few rows are free."""
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if self._joining is not None:
            return self._join()
        running = self._running()
        n = min(len(self._waiting), self.max_batch - running)
        if n <= 0:
            return
        batch = [self._waiting.popleft() for _ in range(n)]
        try:
            gen = self._generation(batch, rows=None if running else bucket(n, self.min_batch_bucket),
                                   lazy_prefill=bool(running))
        except BaseException as e:  # noqa: BLE001 - the engine must survive bad requests
            return self._fail(batch, e)
        self.stats["requests"] += n
        if running:
            self._joining = (gen, batch)
            return self._join()
        self._start(gen, batch)

    def _start(self, gen: Generation, batch: list[Request]) -> None:
        """`gen` (holding `batch` in its first rows) becomes the running batch."""
        self._gen, self._owners, self._peers = gen, batch + [None] * (gen.rows - len(batch)), [0] * gen.rows
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self._running())

    def _join(self) -> None:
        """Prefill one more chunk of the joining requests; once done, move them into the running batch (or let
        them become the batch when it has ended meanwhile)."""
        gen, batch = self._joining
        n = len(batch)
        try:
            if not gen.prefill_step():
                return
        except BaseException as e:  # noqa: BLE001 - the engine must survive bad requests
            self._joining = None
            return self._fail(batch, e)
        self._joining = None
        running = self._running()
        if not running:
            return self._start(gen, batch)
        free = [i for i, r in enumerate(self._owners) if r is None]
        if len(free) < n:  # running + n <= max_batch: the bucket is at most self.rows
            more = bucket(running + n, self.min_batch_bucket) - len(self._owners)
            try:
                self._gen.add_rows(more)
            except BaseException as e:  # noqa: BLE001 - add_rows changes nothing when it raises
                return self._fail(batch, e)
            self._owners += [None] * more
            self._peers += [0] * more
            free += list(range(len(self._owners) - more, len(self._owners)))
            self.stats["grown"] += 1
        try:
            self._gen.join(gen, free[:n])
        except BaseException as e:  # noqa: BLE001 - the running batch may be broken: end it
            return self._fail(batch + [r for r in self._owners if r is not None], e, reset=True)
        for r, i in zip(batch, free):
            self._owners[i], self._peers[i] = r, 0
        self.stats["joined"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self._running())

    def _generation(self, batch: list[Request], rows: int | None, lazy_prefill: bool = False) -> Generation:
        """The requests as a batch, padded to bucketed shapes and prefilled (unless `lazy_prefill`); with `rows`,
        filled up to that many rows with finished placeholder rows (free for joining)."""
        n = len(batch)
        pad = 0 if rows is None else rows - n
        longest = max(len(r.prompt) for r in batch)
        prompt_bucket = bucket(longest, self.min_prompt_bucket)
        if prompt_bucket > self.prefill_chunk:  # long prompts: a whole number of prefill chunks
            prompt_bucket = -(-longest // self.prefill_chunk) * self.prefill_chunk
        value = lambda name, placeholder: [getattr(r, name) for r in batch] + [placeholder] * pad
        thinking = value("thinking_budget", None)
        if self._think_ids is None and all(t is None for t in thinking):
            thinking = None
        else:  # with the think ids known, every batch tracks <think> blocks (-1: no cap), so rows can move
            thinking = [-1 if t is None else t for t in thinking]
        return Generation(
            self.model, [r.prompt for r in batch] + [[0]] * pad,
            max_new_tokens=value("max_new_tokens", 0), temperature=value("temperature", 0.0),
            top_k=value("top_k", 0), top_p=value("top_p", 1.0), seed=value("seed", 0),
            stop_strings=[list(r.stop) for r in batch] + [[]] * pad, thinking_budget=thinking,
            think_ids=self._think_ids, expert_threshold=value("expert_threshold", 0.0), tokenizer=self.tokenizer,
            prefill_chunk=self.prefill_chunk, mesh=self.mesh, min_batch=rows or bucket(n, self.min_batch_bucket),
            min_prompt_len=prompt_bucket,
            min_new_tokens=bucket(max(r.max_new_tokens for r in batch), self.min_steps_bucket),
            lazy_prefill=lazy_prefill)

    def _advance(self) -> None:
        """One segment of the running batch: stream the deltas, then hand out the finished requests."""
        gen, owners = self._gen, self._owners
        try:
            deltas = gen.step(self.segment)
            running = self._running()
            for i, (r, d) in enumerate(zip(owners, deltas)):
                if r is not None:
                    self._peers[i] = max(self._peers[i], running)
                    if d.tokens or d.text:
                        r.on_delta(d)
            gen.cancel([i for i, r in enumerate(owners) if r is not None and r.cancelled])
            reasons = gen.finish_reasons
            done = [i for i, r in enumerate(owners) if r is not None and reasons[i] is not None]
            out = gen.output(done) if done else None
        except BaseException as e:  # noqa: BLE001 - the engine must survive one bad batch
            return self._fail([r for r in owners if r is not None], e, reset=True)
        for k, i in enumerate(done):
            n = int(out.lengths[k])
            owners[i].on_done(Result(
                tokens=out.tokens[k], text=None if out.text is None else out.text[k],
                logprobs=out.logprobs[k, :n].tolist(), finish_reason=out.finish_reasons[k],
                prompt_tokens=int(out.prompt_lengths[k]),
                routing={"input": out.routing.prompt[k].tolist(), "output": out.routing.generated[k].tolist(),
                         "skipped": out.routing.skipped[k].tolist()},
                batch_size=self._peers[i]))
            owners[i] = None
        running = self._running()
        if not running:
            self._gen, self._owners = None, []  # free the cache; the next request starts afresh
        elif bucket(running, self.min_batch_bucket) <= len(owners) // 2 and self._joining is None:
            self._shrink(bucket(running, self.min_batch_bucket))

    def _shrink(self, rows: int) -> None:
        """Compact the running batch to `rows` rows: the running requests first, then free rows."""
        owners = self._owners
        keep = [i for i, r in enumerate(owners) if r is not None]
        keep += [i for i, r in enumerate(owners) if r is None][:rows - len(keep)]
        try:
            self._gen.keep_rows(keep)
        except BaseException as e:  # noqa: BLE001 - keep_rows changes nothing when it raises: go on unshrunk
            traceback.print_exception(e)
            return
        self._owners, self._peers = [owners[i] for i in keep], [self._peers[i] for i in keep]
        self.stats["shrunk"] += 1

    def _fail(self, requests: list[Request], error: BaseException, reset: bool = False) -> None:
        traceback.print_exception(error)
        for r in requests:
            r.on_done(error)
        if reset:
            self._gen, self._owners = None, []
