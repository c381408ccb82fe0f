"""`m1jax serve`: an HTTP server (FastAPI + uvicorn) over the request-batching engine.

    POST /v1/minimax-m1/generate   {"input", "max_output_tokens", "context_window", "expert_threshold",
                                    "temperature", "top_p", "top_k", "seed", "stop", "thinking_budget", "stream"}
    POST /v1/chat/completions      OpenAI-compatible; "stream": true sends server-sent events
    POST /v1/completions           OpenAI-compatible; "stream": true sends server-sent events
    GET  /v1/models, GET /health

A bad request gets a 4xx JSON error {"error": {"message", "type", "param"}} naming the problem, and the server
keeps serving; a body over `max_body_bytes` is refused with 413 before it is read whole.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from infer.engine import Engine, Request as EngineRequest, Result
from m1jax.generation import Delta


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclasses.dataclass(frozen=True)
class Limits:
    max_context: int  # input + output tokens one request may use
    max_output_tokens: int
    max_body_bytes: int = 1 << 20


_MISSING = object()


# ---- request parsing -------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    """The JSON object body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the JSON body must be an object, got {type(body).__name__}")
    return body


def _field(body: dict, name: str, kinds: tuple, default=_MISSING, what: str = ""):
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise RequestError(400, f"missing required field '{name}'", name)
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(400, f"field '{name}' must be {what}, got {type(value).__name__} {value!r:.60}", name)
    return value


def _int(body, name, default=_MISSING, lo: int | None = None, hi: int | None = None, hi_why: str = "") -> int:
    value = _field(body, name, (int,), default, "an integer")
    if value is not None and lo is not None and value < lo:
        raise RequestError(400, f"field '{name}' must be >= {lo}, got {value}", name)
    if value is not None and hi is not None and value > hi:
        raise RequestError(400, f"field '{name}' = {value} exceeds {hi_why or 'the limit'} ({hi})", name)
    return value


def _float(body, name, default, lo: float, hi: float, lo_open: bool = False) -> float:
    value = float(_field(body, name, (int, float), default, "a number"))
    if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
        raise RequestError(400, f"field '{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value


def _stop(body) -> list[str]:
    stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise RequestError(400, "field 'stop' must be a non-empty string or a list of at most 16 of them", "stop")
    return stop


# ---- the app -----------------------------------------------------------------------------------------------
class Service:
    """Turns validated requests into engine requests and engine results into responses."""

    def __init__(self, engine: Engine, model_id: str, limits: Limits):
        self.engine, self.model_id, self.limits = engine, model_id, limits
        self.tokenizer = engine.tokenizer
        self.config = engine.model.config
        self.created = int(time.time())

    # -- inputs
    def check_model(self, body: dict) -> None:
        name = _field(body, "model", (str,), self.model_id, "a string")
        if name != self.model_id:
            raise RequestError(404, f"model '{name}' is not served here; this server serves '{self.model_id}'",
                               "model")

    def encode(self, value: Any, param: str) -> list[int]:
        """A prompt given as text, token ids, or chat messages -> token ids."""
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            return self.encode(self.render(value, None, param), param)
        if isinstance(value, str):
            if self.tokenizer is None:
                raise RequestError(400, f"'{param}': this model has no tokenizer; send a list of token ids", param)
            ids = self.tokenizer.encode(value)
        elif isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            ids = value
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise RequestError(400, f"'{param}' has token ids outside [0, {self.config.vocab_size}): {bad[:5]}",
                                   param)
        else:
            raise RequestError(400, f"'{param}' must be a string, a list of token ids or a list of chat messages",
                               param)
        if not ids:
            raise RequestError(400, f"'{param}' is empty: at least one input token is needed", param)
        return ids

    def render(self, messages, tools, param: str) -> str:
        from m1jax.chat_template import render_chat
        if self.tokenizer is None:
            raise RequestError(400, "chat messages need a tokenizer; this model has none", param)
        try:
            return render_chat(messages, tools=tools)
        except ValueError as e:
            raise RequestError(400, f"'{param}': {e}", param) from None

    def budget(self, prompt: list[int], max_output: int, context_window: int | None) -> int:
        """Output tokens allowed: max_output, capped by what the context window leaves after the input."""
        if context_window is None:
            window, name = self.limits.max_context, "the model's limit"
        else:
            window, name = context_window, "context_window"
        if len(prompt) > window:
            raise RequestError(400, f"the input has {len(prompt)} tokens, more than {name} ({window} tokens)",
                               "context_window" if context_window else "input")
        return min(max_output, window - len(prompt))

    def sampling(self, body: dict, temperature: float, top_p: float) -> dict:
        return dict(temperature=_float(body, "temperature", temperature, 0.0, 100.0),
                    top_p=_float(body, "top_p", top_p, 0.0, 1.0, lo_open=True),
                    top_k=_int(body, "top_k", 0, lo=0),
                    seed=_int(body, "seed", 0, lo=0, hi=2**32 - 1, hi_why="the largest seed"),
                    stop=_stop(body))

    # -- running
    async def run(self, request: EngineRequest) -> Result:
        events = self.submit(request)
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                raise RequestError(500, f"generation failed: {event}")
            if isinstance(event, Result):
                return event

    def submit(self, request: EngineRequest) -> asyncio.Queue:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request.on_delta = lambda d: loop.call_soon_threadsafe(events.put_nowait, d)
        request.on_done = lambda r: loop.call_soon_threadsafe(events.put_nowait, r)
        self.engine.submit(request)
        return events

    async def stream(self, request: EngineRequest, render_delta, render_end):
        """Server-sent events: one per delta, then the closing event(s) and [DONE]."""
        events = self.submit(request)
        try:
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    yield _sse(render_delta(event))
                elif isinstance(event, Result):
                    for end in render_end(event):
                        yield _sse(end)
                    break
                else:
                    yield _sse({"error": {"message": f"generation failed: {event}", "type": "server_error"}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            request.cancelled = True  # no-op when finished; stops the row if the client went away

    def text(self, result_or_delta) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, result_or_delta.tokens))
        return result_or_delta.text


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(engine: Engine, *, model_id: str, limits: Limits) -> FastAPI:
    app = FastAPI(title="m1jax", description=__doc__)
    svc = Service(engine, model_id, limits)
    app.state.service = svc

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param}}, status_code=e.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": svc.created,
                                            "owned_by": "m1jax", "max_context": limits.max_context}]}

    @app.post("/v1/minimax-m1/generate")
    async def minimax_generate(request: Request):
        body = await read_json(request, limits.max_body_bytes)
        prompt = svc.encode(_field(body, "input", (str, list), what="a string, token ids or chat messages"),
                            "input")
        window = _int(body, "context_window", None, lo=1, hi=limits.max_context, hi_why="the model's limit")
        max_out = _int(body, "max_output_tokens", min(256, limits.max_output_tokens), lo=0, hi=limits.max_output_tokens,
                       hi_why="the server's max_output_tokens")
        thinking = _int(body, "thinking_budget", None, lo=0)
        req = EngineRequest(prompt, svc.budget(prompt, max_out, window), **svc.sampling(body, 1.0, 1.0),
                            thinking_budget=thinking,
                            expert_threshold=_float(body, "expert_threshold", 0.0, 0.0, 1.0))
        output = lambda r: r.text if svc.tokenizer is not None else r.tokens

        def final(r: Result) -> dict:
            return {"output": output(r), "output_ids": r.tokens, "finish_reason": r.finish_reason,
                    "usage": {"input_tokens": r.prompt_tokens, "output_tokens": len(r.tokens)},
                    "routing": r.routing, "logprobs": r.logprobs}

        if _field(body, "stream", (bool,), False, "a boolean"):
            return StreamingResponse(svc.stream(req, lambda d: {"delta": output(d), "delta_ids": d.tokens},
                                                lambda r: [final(r)]), media_type="text/event-stream")
        return final(await svc.run(req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, limits.max_body_bytes)
        svc.check_model(body)
        _check_n(body)
        raw = _field(body, "prompt", (str, list), what="a string or a list of token ids")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
            raw = raw[0]  # a batch of one prompt
        prompt = svc.encode(raw, "prompt")
        max_out = _int(body, "max_tokens", min(16, limits.max_output_tokens), lo=0, hi=limits.max_output_tokens,
                       hi_why="the server's max_output_tokens")
        req = EngineRequest(prompt, svc.budget(prompt, max_out, None), **svc.sampling(body, 1.0, 1.0))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}

        def choice(text: str, reason) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if _field(body, "stream", (bool,), False, "a boolean"):
            return StreamingResponse(
                svc.stream(req, lambda d: {**head, "choices": [choice(svc.text(d), None)]},
                           lambda r: [{**head, "choices": [choice("", r.finish_reason)], "usage": _usage(r)}]),
                media_type="text/event-stream")
        r = await svc.run(req)
        return {**head, "choices": [choice(svc.text(r), r.finish_reason)], "usage": _usage(r)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, limits.max_body_bytes)
        svc.check_model(body)
        _check_n(body)
        messages = _field(body, "messages", (list,), what="a list of messages")
        tools = _field(body, "tools", (list,), None, "a list of tool schemas")
        prompt = svc.encode(svc.render(messages, tools, "messages"), "messages")
        max_out = _int(body, "max_completion_tokens", None, lo=0, hi=limits.max_output_tokens,
                       hi_why="the server's max_output_tokens")
        if max_out is None:
            max_out = _int(body, "max_tokens", limits.max_output_tokens, lo=0, hi=limits.max_output_tokens,
                           hi_why="the server's max_output_tokens")
        req = EngineRequest(prompt, svc.budget(prompt, max_out, None), **svc.sampling(body, 1.0, 1.0),
                            thinking_budget=_int(body, "thinking_budget", None, lo=0))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_id}

        if _field(body, "stream", (bool,), False, "a boolean"):
            chunk = lambda delta, reason: {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            first = [True]

            def on_delta(d: Delta) -> dict:
                delta = {"content": svc.text(d)}
                if first[0]:
                    delta, first[0] = {"role": "assistant", **delta}, False
                return chunk(delta, None)

            return StreamingResponse(
                svc.stream(req, on_delta, lambda r: [{**chunk({}, r.finish_reason), "usage": _usage(r)}]),
                media_type="text/event-stream")
        r = await svc.run(req)
        return {**head, "object": "chat.completion", "usage": _usage(r), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": svc.text(r)}, "logprobs": None,
             "finish_reason": r.finish_reason}]}

    return app


def _check_n(body: dict) -> None:
    if _int(body, "n", 1, lo=1) != 1:
        raise RequestError(400, "only n = 1 is supported", "n")


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens),
            "total_tokens": r.prompt_tokens + len(r.tokens)}


# ---- `m1jax serve` -----------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    from infer.cli import add_model_arguments, load_model_and_tokenizer

    parser = argparse.ArgumentParser(prog="m1jax serve", description="Serve a model over HTTP.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-id", help="the name clients use in 'model' (default: from --model)")
    parser.add_argument("--max-context", type=int, default=32768,
                        help="input + output tokens per request (capped by the model's max_position_embeddings)")
    parser.add_argument("--max-output-tokens", type=int, default=4096)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--segment", type=int, default=16, help="tokens per decode dispatch (streaming granularity)")
    args = parser.parse_args(argv)

    import uvicorn

    model, tokenizer, name, mesh = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.mesh)
    limits = Limits(min(args.max_context, model.config.max_position_embeddings), args.max_output_tokens,
                    args.max_body_bytes)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                    segment=args.segment, prefill_chunk=args.prefill_chunk, mesh=mesh).start()
    try:
        uvicorn.run(create_app(engine, model_id=args.model_id or name, limits=limits), host=args.host,
                    port=args.port)
    finally:
        engine.close()
    return 0
