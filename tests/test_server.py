"""The HTTP server: a real uvicorn on a free local port, real HTTP requests (httpx).

One tiny random model with a small trained BPE tokenizer. The engine pads every batch to 4 rows, prompts to 64
tokens and outputs to 16 steps, so all requests share one compiled prefill and one decode loop (greedy).
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from infer.engine import Engine
from infer.server import Limits, create_app
from m1jax.config import get_preset
from m1jax.generation import Generation
from m1jax.model import init_model
from m1jax.tokenizer import train_bpe_tokenizer

CORPUS = ["the cat sat on the mat.", "a dog ran in the park!", "we like to think about numbers: 1 2 3."] * 30
BUCKETS = dict(min_batch_bucket=4, min_prompt_bucket=64, min_steps_bucket=16)
LIMITS = Limits(max_context=128, max_output_tokens=16, max_body_bytes=4096)


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300)
    model = init_model(get_preset("m1-tiny").replace(vocab_size=300), seed=3)
    engine = Engine(model, tok, max_batch=4, batch_window_ms=300, segment=4, prefill_chunk=64, **BUCKETS).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_id="tiny", limits=LIMITS), fd=sock.fileno(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=300) as client:
        yield client, engine, model, tok
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    sock.close()


def post(client, path, body, **kw):
    return client.post(path, content=body if isinstance(body, (str, bytes)) else json.dumps(body), **kw)


def events(response) -> list:
    """The JSON payloads of a server-sent-event stream, which must end with [DONE]."""
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_generate_endpoint_returns_output_usage_and_routing(setup):
    client, _, model, tok = setup
    r = post(client, "/v1/minimax-m1/generate", {"input": "the cat", "max_output_tokens": 9, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = tok.encode("the cat")
    assert out["usage"] == {"input_tokens": len(ids), "output_tokens": len(out["output_ids"])}
    cfg = model.config
    direct = Generation(model, [ids], max_new_tokens=9, tokenizer=tok, min_batch=4, min_prompt_len=64,
                        min_new_tokens=16).result()  # the library, same shapes
    assert out["output_ids"] == direct.tokens[0] and out["output"] == direct.text[0]
    with client.stream("POST", "/v1/minimax-m1/generate", content=json.dumps({
            "input": "the cat", "max_output_tokens": 9, "temperature": 0, "stream": True})) as r:
        streamed = events(r)
    assert "".join(e["delta"] for e in streamed[:-1]) == out["output"]
    assert streamed[-1]["usage"] == out["usage"] and streamed[-1]["output_ids"] == out["output_ids"]
    routing = out["routing"]
    assert len(routing["input"]) == cfg.num_layers and len(routing["input"][0]) == cfg.num_experts
    assert sum(map(sum, routing["input"])) == len(ids) * cfg.num_layers * cfg.num_experts_per_tok
    assert sum(map(sum, routing["skipped"])) == 0
    # with expert_threshold = 1 only the top expert runs: one skipped selection per token and layer
    r = post(client, "/v1/minimax-m1/generate", {"input": "the cat", "max_output_tokens": 9, "temperature": 0,
                                                 "expert_threshold": 1.0, "context_window": 64})
    skipped = sum(map(sum, r.json()["routing"]["skipped"]))
    assert skipped == (len(ids) + r.json()["usage"]["output_tokens"]) * cfg.num_layers


def test_chat_completions_stream_equals_the_whole_answer(setup):
    client = setup[0]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 12,
            "temperature": 0}
    whole = post(client, "/v1/chat/completions", body).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    assert whole["usage"]["completion_tokens"] <= 12
    with client.stream("POST", "/v1/chat/completions", content=json.dumps({**body, "stream": True})) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert len(chunks) >= 3  # several segments of 4 tokens arrived separately


def test_completions_stop_string_truncates_streamed_and_whole(setup):
    client = setup[0]
    body = {"model": "tiny", "prompt": "a dog", "max_tokens": 16, "temperature": 0}
    full = post(client, "/v1/completions", body).json()["choices"][0]["text"]
    assert len(full) > 6
    stop = full[3:6]
    cut = post(client, "/v1/completions", {**body, "stop": stop}).json()
    assert cut["choices"][0]["text"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["object"] == "text_completion"
    with client.stream("POST", "/v1/completions", content=json.dumps({**body, "stop": [stop], "stream": True})) as r:
        chunks = events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.index(stop)]


def test_concurrent_requests_are_batched(setup):
    client, engine, _, _ = setup
    prompts = ["the cat", "a dog ran", "we like", "numbers: 1"]
    alone = [post(client, "/v1/minimax-m1/generate", {"input": p, "max_output_tokens": 8, "temperature": 0})
             .json()["output_ids"] for p in prompts]
    before = dict(engine.stats)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: post(client, "/v1/minimax-m1/generate", {
            "input": p, "max_output_tokens": 8, "temperature": 0}).json()["output_ids"], prompts))
    assert together == alone  # a row's output does not depend on its batch
    assert engine.stats["requests"] - before["requests"] == 4
    assert engine.stats["batches"] - before["batches"] < 4 and engine.stats["largest_batch"] >= 2


def test_a_later_short_request_joins_the_running_batch_and_finishes_first(setup, monkeypatch):
    """While a long streaming request runs, a short one sent after its first delta joins the running batch at a
    segment boundary and finishes first instead of waiting; both outputs equal their solo runs."""
    client, engine, _, _ = setup
    long = {"input": "we like", "max_output_tokens": 16, "temperature": 0}
    short = {"input": "a dog", "max_output_tokens": 3, "temperature": 0}
    alone = [post(client, "/v1/minimax-m1/generate", b).json()["output_ids"] for b in (long, short)]
    assert len(alone[0]) == 16  # four segments
    step = Generation.step
    monkeypatch.setattr(Generation, "step", lambda self, *a: (time.sleep(0.25), step(self, *a))[1])  # slow segments
    joined = engine.stats["joined"]
    with ThreadPoolExecutor(1) as pool:
        with client.stream("POST", "/v1/minimax-m1/generate", content=json.dumps({**long, "stream": True})) as r:
            lines = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
            first = next(lines)
            later = pool.submit(lambda: (post(client, "/v1/minimax-m1/generate", short).json(), time.monotonic()))
            *_, last = lines
            long_end = time.monotonic()
        short_out, short_end = later.result()
    assert short_end < long_end and engine.stats["joined"] == joined + 1
    assert first["delta_ids"] and last["output_ids"] == alone[0] and short_out["output_ids"] == alone[1]


BAD = [
    ("/v1/minimax-m1/generate", '{"input": "the', 400, "malformed JSON"),
    ("/v1/minimax-m1/generate", "[1, 2]", 400, "must be an object"),
    ("/v1/minimax-m1/generate", {"max_output_tokens": 4}, 400, "missing required field 'input'"),
    ("/v1/minimax-m1/generate", {"input": 5}, 400, "'input' must be"),
    ("/v1/minimax-m1/generate", {"input": ""}, 400, "is empty"),
    ("/v1/minimax-m1/generate", {"input": [1, 99999]}, 400, "outside [0, 300)"),
    ("/v1/minimax-m1/generate", {"input": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/minimax-m1/generate", {"input": "hi", "max_output_tokens": -1}, 400, "must be >= 0"),
    ("/v1/minimax-m1/generate", {"input": "hi", "max_output_tokens": 1000}, 400, "max_output_tokens"),
    ("/v1/minimax-m1/generate", {"input": "hi", "max_output_tokens": True}, 400, "must be an integer"),
    ("/v1/minimax-m1/generate", {"input": "the cat sat on the mat", "context_window": 2}, 400,
     "more than context_window"),
    ("/v1/minimax-m1/generate", {"input": "hi", "context_window": 10_000}, 400, "exceeds the model's limit"),
    ("/v1/minimax-m1/generate", {"input": [1] * 200}, 400, "more than the model's limit"),
    ("/v1/minimax-m1/generate", {"input": "hi", "top_p": 0}, 400, "'top_p' must be in (0.0, 1.0]"),
    ("/v1/minimax-m1/generate", {"input": "hi", "expert_threshold": 2}, 400, "'expert_threshold'"),
    ("/v1/minimax-m1/generate", {"input": "hi", "thinking_budget": -3}, 400, "'thinking_budget' must be >= 0"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "'gpt-4' is not served"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role 'robot'"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "'messages' must be a list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n = 1"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "'stop'"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[b[3] for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_problem(setup, path, body, status, message):
    r = post(setup[0], path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_oversized_bodies_are_refused_and_the_server_keeps_serving(setup):
    client = setup[0]
    big = json.dumps({"input": "x" * 10_000})
    r = post(client, "/v1/minimax-m1/generate", big)
    assert r.status_code == 413 and "exceeds the limit of 4096 bytes" in r.json()["error"]["message"]
    chunked = client.post("/v1/completions", content=(big[i:i + 1000].encode() for i in range(0, len(big), 1000)))
    assert chunked.status_code == 413  # no Content-Length: refused while streaming in
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["object"] == "list"
