"""The OpenAI-compatible HTTP front of a real ``pagedserve up`` (default model), through the
official ``openai`` Python client (sync and async) and raw HTTP for what a client library would
not send: malformed bodies, huge bodies, connections closed mid-stream."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import time

import grpc
import openai
import pytest

from tests.serving_stack import collect, pb, start_stack, stop_stack, stub
from tests.test_node_client import node_client  # noqa: F401 (a fixture)

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("stack"), "--max-inflight", "4")
    yield s
    assert stop_stack(s) == 0, s.log()


@pytest.fixture()
def client(stack):
    with openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0) as c:
        yield c


def _raw(stack, method: str, path: str, body: bytes | None = None, headers=None, key=True):
    """(status, parsed JSON or text, headers) of one plain HTTP request."""
    conn = http.client.HTTPConnection("localhost", stack.http_port, timeout=120)
    h = {"content-type": "application/json", **(headers or {})}
    if key:
        h["authorization"] = f"Bearer {stack.api_key}"
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read().decode()
        try:
            return r.status, json.loads(data), dict(r.getheaders())
        except json.JSONDecodeError:
            return r.status, data, dict(r.getheaders())
    finally:
        conn.close()


# -- the official client --------------------------------------------------------------------
def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "pagedserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_chat_greedy_matches_grpc_chat_and_its_stream(client, stack):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL and r.system_fingerprint and r.created > 0
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    with stack.channel() as ch:
        req = pb.ChatRequest(
            messages=[pb.ChatMessage(**m) for m in HI], max_tokens=24, temperature=0
        )
        g = collect(stub(ch).Chat(req, metadata=stack.auth, timeout=120))[0]
    assert choice.message.content == g["text"]
    assert r.usage.completion_tokens == g["final"].usage.completion_tokens
    assert r.usage.prompt_tokens == g["final"].usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == choice.finish_reason and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(g["token_ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_same_seed_gives_the_same_tokens_on_both_fronts(client, stack):
    kw = dict(max_tokens=24, temperature=1.0, seed=1234)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", **kw, logprobs=0)
    again = client.completions.create(model=MODEL, prompt="Once upon a time", **kw, logprobs=0)
    assert r.choices[0].text == again.choices[0].text
    with stack.channel() as ch:
        req = pb.GenerateRequest(text="Once upon a time", logprobs=0, **kw)
        grpc_bytes, text = [], ""
        for resp in stub(ch).Generate(req, metadata=stack.auth, timeout=120):
            if resp.HasField("delta"):
                text += resp.delta.text
                grpc_bytes += [lp.bytes for lp in resp.delta.logprobs]
    assert r.choices[0].text == text
    # token by token: the HTTP logprobs' tokens are the same tokens' bytes
    http_tokens = r.choices[0].logprobs.tokens
    assert len(http_tokens) == len(grpc_bytes) == r.usage.completion_tokens
    assert [t.encode() for t in http_tokens] == grpc_bytes


def _tokens(stack, prompt: str) -> list[int]:
    status, out, _ = _raw(stack, "POST", "/tokenize", json.dumps({"prompt": prompt}).encode())
    assert status == 200, out
    return out["tokens"]


def test_completions_prompt_forms_n_echo_and_stop(client, stack):
    greedy = dict(model=MODEL, max_tokens=8, temperature=0)
    one = client.completions.create(prompt="The capital of France is", **greedy)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    text = one.choices[0].text
    ids = _tokens(stack, "The capital of France is")
    by_ids = client.completions.create(prompt=ids, **greedy)
    assert by_ids.choices[0].text == text
    two = client.completions.create(prompt=["The capital of France is", "1, 2, 3,"], **greedy)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + len(_tokens(stack, "1, 2, 3,"))
    lists = client.completions.create(prompt=[ids, ids], **greedy)
    assert [c.text for c in lists.choices] == [text, text]
    echoed = client.completions.create(prompt="The capital of France is", echo=True, **greedy)
    assert echoed.choices[0].text == "The capital of France is" + text
    n2 = client.completions.create(
        prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0, seed=7, model=MODEL
    )
    assert sorted(c.index for c in n2.choices) == [0, 1]
    assert n2.usage.completion_tokens == 16
    stop_at = text.strip().split()[0]  # the first word the model writes, e.g. "Paris"
    stopped = client.completions.create(prompt="The capital of France is", stop=[stop_at], **greedy)
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_at not in stopped.choices[0].text


def test_chat_n2_stream_and_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, n=2, max_tokens=6, temperature=0.9, seed=3, stream=True,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    texts, lps = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs:
                lps[c.index] += c.logprobs.content
    for i in (0, 1):
        assert "".join(e.token for e in lps[i]) == texts[i]
        for e in lps[i]:
            assert bytes(e.bytes).decode() == e.token and e.logprob <= 0
            assert len(e.top_logprobs) == 2
            assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    r = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, temperature=0, logprobs=True
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and content[0].top_logprobs == []


def test_async_client_streams_and_awaits_concurrently(stack):
    async def run():
        async with openai.AsyncOpenAI(
            base_url=stack.base_url, api_key=stack.api_key, max_retries=0
        ) as c:
            whole = c.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=16, temperature=0
            )
            streamed = await c.completions.create(
                model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stream=True
            )

            async def drain():
                return "".join([ch.choices[0].text async for ch in streamed if ch.choices])

            return await asyncio.gather(whole, drain())

    whole, text = asyncio.run(run())
    assert whole.choices[0].message.content and text


def _node_chat(node_dir, stack, key: str, request: dict) -> dict:
    r = subprocess.run(
        ["node", str(node_dir / "openai_chat.js"), stack.base_url, key, json.dumps(request)],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_node_openai_package_streams_chat(node_client, client, stack):  # noqa: F811
    """The official `openai` npm package, from Node, streams the same greedy chat."""
    req = {"model": MODEL, "messages": HI, "max_tokens": 16, "temperature": 0}
    out = _node_chat(node_client, stack, stack.api_key, req)
    assert out["error"] is None
    chunks = out["chunks"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    r = client.chat.completions.create(**req)
    assert text == r.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == r.choices[0].finish_reason
    denied = _node_chat(node_client, stack, "wrong", req)
    assert denied["error"]["status"] == 401
    assert denied["error"]["name"] == "AuthenticationError"


def test_errors_are_the_clients_exceptions(client, stack):
    with openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=HI)
    assert e.value.status_code == 401 and e.value.body["code"] == "UNAUTHENTICATED"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=HI)
    assert "not served here" in e.value.body["message"] and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:  # found over the context by the worker
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=HI, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert e.value.body["param"] == "tools"


def test_overload_is_a_rate_limit_error_and_closing_a_stream_frees_its_blocks(client, stack):
    """--max-inflight 4: four open streams (gRPC and HTTP count together) and the fifth
    request gets 429; closing the HTTP connections mid-stream aborts the requests in the engine
    (their KV blocks freed)."""
    long = dict(model=MODEL, prompt="Write a long essay:", max_tokens=4000, extra_body={
        "ignore_eos": True})  # fmt: skip
    streams = [client.completions.create(stream=True, **long) for _ in range(3)]
    for s in streams:
        next(iter(s))  # each one is running
    with stack.channel() as ch:
        grpc_call = stub(ch).Generate(
            pb.GenerateRequest(text="Go on:", max_tokens=4000, ignore_eos=True),
            metadata=stack.auth,
        )
        next(grpc_call)
        stack.wait_metric("pagedserve_streams_in_flight", lambda v: v == 4)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert e.value.body["code"] == "RESOURCE_EXHAUSTED"
        grpc_call.cancel()
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 3, timeout=30)
    assert stack.metrics()["pagedserve_engine_kv_blocks_used"] > 0
    before = stack.metrics()
    for s in streams:
        s.close()
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 0, timeout=30)
    stack.wait_metric("pagedserve_engine_kv_blocks_used", lambda v: v == 0)
    stack.wait_metric("pagedserve_streams_in_flight", lambda v: v == 0)
    key = 'pagedserve_requests_total{code="CANCELLED",method="POST /v1/completions"}'
    stack.wait_metric(key, lambda v: v == before.get(key, 0) + 3)
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3  # and the server still serves


def test_a_non_streaming_request_is_aborted_when_its_client_leaves(stack):
    body = json.dumps(
        {"model": MODEL, "prompt": "Write:", "max_tokens": 4000, "ignore_eos": True}
    ).encode()
    with socket.create_connection(("localhost", stack.http_port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {stack.api_key}\r\n".encode()
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 1, timeout=30)
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 0, timeout=30)
    stack.wait_metric("pagedserve_engine_kv_blocks_used", lambda v: v == 0)
    stack.wait_metric("pagedserve_streams_in_flight", lambda v: v == 0)


def test_request_id_header_in_and_out(stack):
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2}).encode()
    status, out, headers = _raw(
        stack, "POST", "/v1/chat/completions", body, {"x-request-id": "my-id-1"}
    )
    assert status == 200 and out["id"] == "chatcmpl-my-id-1"
    assert headers["x-request-id"] == "my-id-1"
    status, out, _ = _raw(stack, "POST", "/v1/chat/completions", body, {"x-request-id": "a/b"})
    assert status == 400 and "request_id" in out["error"]["message"]


def test_tokenize_detokenize_health_and_metrics(stack):
    status, out, _ = _raw(
        stack, "POST", "/tokenize", b'{"prompt": "hello world", "return_token_strs": true}'
    )
    assert status == 200 and out["count"] == len(out["tokens"]) == 2
    assert out["token_strs"] == ["hello", "\u0120world"] and out["max_model_len"] == 8192
    status, back, _ = _raw(stack, "POST", "/detokenize", json.dumps({"tokens": out["tokens"]}))
    assert status == 200 and back == {"prompt": "hello world"}
    msgs = json.dumps({"messages": HI}).encode()
    status, chat, _ = _raw(stack, "POST", "/tokenize", msgs)
    assert status == 200 and chat["count"] > out["count"]
    assert _raw(stack, "GET", "/health", key=False)[0] == 200
    status, text, _ = _raw(stack, "GET", "/metrics", key=False)
    assert status == 200 and 'method="POST /tokenize"' in text
    assert _raw(stack, "POST", "/tokenize", b'{"prompt": "x"}', key=False)[0] == 401


# -- bad input: the documented status, never a 500, and the server keeps serving --------------
BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x"', 400, "not valid JSON"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "object"),
    ("not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "JSON"),
    ("no prompt", "/v1/completions", b"{}", 400, "prompt"),
    ("prompt a number", "/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("mixed prompt list", "/v1/completions", b'{"prompt": ["a", 1]}', 400, "prompt"),
    ("max_tokens a string", "/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', 400,
     "max_tokens"),
    ("max_tokens 0", "/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", b'{"prompt": "x", "max_tokens": -3}', 400,
     "max_tokens"),
    ("huge int", "/v1/completions", b'{"prompt": "x", "seed": 99999999999999999999999}', 400,
     "seed"),
    ("temperature a string", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400,
     "temperature"),
    ("top_p 0", "/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("n 100", "/v1/completions", b'{"prompt": "x", "n": 100}', 400, "n must be"),
    ("logit_bias key", "/v1/completions", b'{"prompt": "x", "logit_bias": {"a": 1}}', 400,
     "logit_bias"),
    ("logprobs 50", "/v1/completions", b'{"prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ("top_logprobs alone", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
     "top_logprobs"),
    ("empty messages", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("message without role", "/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400,
     "role"),
    ("image part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     400, "only text parts"),
    ("token id outside vocab", "/v1/completions", b'{"prompt": [1, 99999999]}', 400,
     "vocabulary"),
    ("echo with logprobs", "/v1/completions", b'{"prompt": "x", "echo": true, "logprobs": 1}',
     400, "echo"),
    ("unknown model", "/v1/completions", b'{"prompt": "x", "model": "nope"}', 404,
     "not served here"),
    ("max_tokens over 32 bits", "/v1/completions", b'{"prompt": "x", "max_tokens": 1099511627776}',
     400, "max_tokens"),
    ("priority over 32 bits", "/v1/completions", b'{"prompt": "x", "priority": -1099511627776}',
     400, "priority"),
    ("top_k over 32 bits", "/v1/completions", b'{"prompt": "x", "top_k": 2147483648}', 400,
     "top_k"),
    ("min_tokens over 32 bits", "/v1/completions", b'{"prompt": "x", "min_tokens": 8589934592}',
     400, "min_tokens"),
    ("unknown route", "/v1/embeddings", b'{"input": "x"}', 404, "no route"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_the_documented_status(stack, path, body, status, message):
    got, out, _ = _raw(stack, "POST", path, body)
    assert got == status, out
    err = out["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_optional_fields_may_be_null(stack):
    """OpenAI's spec marks these nullable; generated clients send null for unset fields."""
    body = {
        "model": MODEL, "messages": HI, "max_tokens": 2, "stream": None, "logprobs": None,
        "top_logprobs": None, "stream_options": None, "n": None, "temperature": None,
        "stop": None, "seed": None, "echo": None, "priority": None, "user": None,
        "add_generation_prompt": None,
    }  # fmt: skip
    status, out, _ = _raw(stack, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and out["usage"]["completion_tokens"] <= 2, out
    body = {"prompt": "x", "max_tokens": 2, "echo": None, "logprobs": None, "stream": None,
            "add_special_tokens": None, "best_of": None}  # fmt: skip
    status, out, _ = _raw(stack, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200 and out["usage"]["completion_tokens"] <= 2, out


def test_huge_bodies_are_refused_with_413_before_they_are_read(stack):
    big = b'{"prompt": "' + b"a" * (8 * 1024 * 1024) + b'"}'
    status, out, _ = _raw(stack, "POST", "/v1/completions", big)
    assert status == 413 and "over" in out["error"]["message"]
    # without a content-length (chunked): refused once the bound is passed
    conn = http.client.HTTPConnection("localhost", stack.http_port, timeout=60)
    try:
        chunks = (b"x" * 65536 for _ in range(200))  # 13 MB
        conn.request(
            "POST", "/v1/completions", body=chunks, encode_chunked=True,
            headers={"authorization": f"Bearer {stack.api_key}"},
        )  # fmt: skip
        r = conn.getresponse()
        assert r.status == 413, r.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the client was still sending
    finally:
        conn.close()
    assert _raw(stack, "GET", "/health", key=False)[0] == 200


def test_metrics_count_http_calls_by_method_and_code(stack):
    before = stack.metrics()
    _raw(stack, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}')
    _raw(stack, "POST", "/v1/completions", b"{}")
    after = stack.metrics()
    for code in ("OK", "INVALID_ARGUMENT"):
        key = f'pagedserve_requests_total{{code="{code}",method="POST /v1/completions"}}'
        assert after[key] == before.get(key, 0) + 1, key


def test_http_and_grpc_share_one_server_process(stack):
    """Both fronts answer while the stack runs, from the gateway process."""
    with stack.channel() as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
    assert _raw(stack, "GET", "/health", key=False)[0] == 200
    gateways = [p for p in stack.processes() if "pagedserve.cli gateway " in p]
    assert len(gateways) == 1 and f"--http-port {stack.http_port}" in gateways[0]
    # the ready banner names both, with commands that run as printed
    end = time.monotonic() + 10
    while "Ctrl-C stops everything" not in stack.log() and time.monotonic() < end:
        time.sleep(0.2)
    log = stack.log()
    assert f"OpenAI API on http://localhost:{stack.http_port}/v1: curl " in log
    assert "-H 'authorization: Bearer KEY'" in log  # the stack has a key
    grpcurl = re.search(r"try: (\S+) -plaintext", log).group(1)
    assert shutil.which(grpcurl), f"{grpcurl} is not a command the user can run"


def test_shutdown_ends_open_generations_with_unavailable(tmp_path):
    """Ctrl-C while HTTP generations run: a stream gets an error event and [DONE], a
    non-streamed request a 503, both in OpenAI's shape, and the stack exits 0."""
    s = start_stack(tmp_path)
    results: dict[str, object] = {}
    long = {"model": MODEL, "prompt": "Write:", "max_tokens": 4000, "ignore_eos": True}

    def streamed():
        with openai.OpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0) as c:
            events = []
            kw = {k: v for k, v in long.items() if k != "ignore_eos"}
            with c.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}) as stream:
                try:
                    for chunk in stream:
                        events.append(chunk)
                except openai.APIError as e:  # the client raises the error event
                    results["stream_error"] = e
            results["stream_chunks"] = events

    def whole():
        status, out, _ = _raw(s, "POST", "/v1/completions", json.dumps(long).encode())
        results["whole"] = (status, out)

    import threading

    threads = [threading.Thread(target=streamed), threading.Thread(target=whole)]
    for t in threads:
        t.start()
    try:
        s.wait_metric("pagedserve_engine_num_running", lambda v: v == 2, timeout=60)
    finally:
        code = stop_stack(s)
    for t in threads:
        t.join(60)
    assert code == 0, s.log()
    assert results["stream_chunks"], "the stream was running"
    err = results["stream_error"]
    assert "shutting down" in str(err), err
    status, out = results["whole"]
    assert status == 503 and out["error"]["code"] == "UNAVAILABLE", out
    assert "Traceback" not in s.log(), s.log()
