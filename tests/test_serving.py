"""End-to-end: ``pagedserve up`` (engine + 2 tokenizer workers + gateway as real processes,
ZeroMQ over ipc://, gRPC over loopback) serving the default model."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from engine_svc import LLM, SamplingParams
from tests.serving_stack import collect, pb, start_stack, stop_stack, stub

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors:",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("stack"), "--max-inflight", "128")
    yield s
    code = stop_stack(s)
    assert code == 0, s.log()
    assert s.processes() == [], "processes left behind after Ctrl-C"


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=8)


@pytest.fixture()
def client(stack):
    with grpc.insecure_channel(stack.target) as ch:
        yield stub(ch)


def generate(client, stack, **fields):
    return collect(client.Generate(pb.GenerateRequest(**fields), metadata=stack.auth, timeout=120))


# -- streaming, equality with the offline engine -----------------------------------------------
def test_generate_streams_deltas_then_one_final(client, stack):
    out = generate(client, stack, text="Hello, my name is", max_tokens=12, temperature=0)
    assert list(out) == [0]
    o = out[0]
    assert o["deltas"] >= 2
    f = o["final"]
    assert f.finish_reason in (pb.LENGTH, pb.STOP)
    assert f.usage.completion_tokens == len(o["token_ids"]) <= 12
    assert f.usage.prompt_tokens > 0
    assert f.timing.total_ms >= f.timing.ttft_ms > 0


def test_greedy_text_equals_offline_engine(client, stack, llm):
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, offline):
        out = generate(client, stack, text=prompt, max_tokens=24, temperature=0)[0]
        assert out["token_ids"] == ref.outputs[0].token_ids, prompt
        assert out["text"] == ref.outputs[0].text, prompt
        assert out["final"].usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_uses_template_and_stops_at_end_token(client, stack, llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    req = pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in msgs], temperature=0, max_tokens=64)
    out = collect(client.Chat(req, metadata=stack.auth, timeout=120))[0]
    assert out["text"] == ref.outputs[0].text
    assert out["final"].finish_reason == pb.STOP
    im_end = llm.tokenizer.token_id("<|im_end|>")
    assert out["final"].stop_token_id == im_end
    assert "<|im_end|>" not in out["text"]


def test_tokenize_and_detokenize_match_offline_tokenizer(client, stack, llm):
    text = "Paged attention keeps KV blocks small. ünïcödé 🙂"
    r = client.Tokenize(pb.TokenizeRequest(text=text), metadata=stack.auth, timeout=30)
    assert list(r.token_ids) == llm.tokenizer.encode(text)
    assert r.count == len(r.token_ids)
    d = client.Detokenize(pb.DetokenizeRequest(token_ids=r.token_ids), metadata=stack.auth)
    assert d.text == llm.tokenizer.decode(list(r.token_ids))
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    r = client.Tokenize(pb.TokenizeRequest(messages=msgs), metadata=stack.auth, timeout=30)
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert r.rendered_prompt == rendered
    assert list(r.token_ids) == llm.tokenizer.encode(rendered, add_special_tokens=False)


def test_stop_string_ends_stream_and_is_reported(client, stack, llm):
    ref = (
        llm.generate(
            ["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    stop = ref[4:7]  # three characters the greedy output is known to contain
    cut = ref[: ref.index(stop)]
    out = generate(
        client, stack, text="Count: 1, 2, 3,", max_tokens=32, temperature=0, stop=[stop]
    )[0]
    assert out["final"].finish_reason == pb.STOP_SEQUENCE
    assert out["final"].stop_str == stop
    assert out["text"] == cut


def test_n_streams_every_index_and_seed_reproduces(client, stack):
    fields = dict(text="Tell me a story:", max_tokens=10, temperature=1.0, seed=7, n=3)
    a = generate(client, stack, **fields)
    b = generate(client, stack, **fields)
    assert sorted(a) == [0, 1, 2]
    assert all(a[i]["final"] is not None for i in a)
    assert [a[i]["token_ids"] for i in a] == [b[i]["token_ids"] for i in a]


def test_logprobs_and_prompt_token_ids(client, stack, llm):
    out = generate(
        client, stack, text="The sky is", max_tokens=4, temperature=0, logprobs=3,
        return_prompt_token_ids=True,
    )[0]  # fmt: skip
    assert list(out["final"].prompt_token_ids) == llm.tokenizer.encode("The sky is")
    resp = list(
        client.Generate(
            pb.GenerateRequest(text="The sky is", max_tokens=4, temperature=0, logprobs=3),
            metadata=stack.auth,
        )
    )
    lps = [lp for r in resp if r.HasField("delta") for lp in r.delta.logprobs]
    assert len(lps) == 4
    for lp in lps:
        assert len(lp.top) == 3
        assert lp.top[0].token_id == lp.token_id  # greedy: the sampled token is the likeliest
        assert lp.logprob <= 0.0 and lp.top[0].token


# -- metadata, health, reflection --------------------------------------------------------------
def test_request_id_is_echoed(client, stack):
    call = client.Generate(
        pb.GenerateRequest(text="Hi", max_tokens=2, request_id="my-id-1"), metadata=stack.auth
    )
    responses = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "my-id-1"
    assert {r.request_id for r in responses} == {"my-id-1"}


def test_model_info_and_list_models(client, stack):
    info = client.GetModelInfo(pb.GetModelInfoRequest(), metadata=stack.auth)
    assert info.id == "SmolLM2-135M-Instruct"
    assert info.max_model_len > 0 and info.vocab_size == 49152
    assert info.limits.max_n == 16 and info.defaults.max_tokens == 256
    assert info.has_chat_template  # SmolLM2-Instruct ships one
    models = client.ListModels(pb.ListModelsRequest(), metadata=stack.auth)
    assert [m.id for m in models.models] == ["SmolLM2-135M-Instruct"]


def test_unset_max_tokens_takes_the_server_default(client, stack):
    """No max_tokens: the server's --default-max-tokens (256, as GetModelInfo says), not the
    offline SamplingParams default of 16; min_tokens above 16 is then no conflict either."""
    out = generate(client, stack, text="Hi", ignore_eos=True, temperature=0)[0]
    assert out["final"].usage.completion_tokens == 256 == len(out["token_ids"])
    assert out["final"].finish_reason == pb.LENGTH
    out = generate(client, stack, text="Hi", min_tokens=20, temperature=0)[0]
    assert out["final"].usage.completion_tokens >= 20


def test_grpcurl_lists_and_streams_without_proto_file(stack):
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run(
        [grpcurl, "-plaintext", stack.target, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "pagedserve.v1.Inference" in listed.stdout.split()
    gen = subprocess.run(
        [
            grpcurl, "-plaintext", "-H", f"authorization: Bearer {stack.api_key}",
            "-d", '{"text": "Hello", "max_tokens": 8, "temperature": 0}',
            stack.target, "pagedserve.v1.Inference/Generate",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    msgs = [json.loads(m) for m in _json_objects(gen.stdout)]
    assert len(msgs) >= 2
    assert all("delta" in m for m in msgs[:-1])
    final = msgs[-1]["final"]
    assert final["finish_reason"] in ("LENGTH", "STOP")  # grpcurl prints the proto field names
    tokens = sum(len(m["delta"]["token_ids"]) for m in msgs[:-1])
    assert final["usage"]["completion_tokens"] == tokens
    assert isinstance(final["usage"]["prompt_tokens"], int)  # uint32: a number, not a string


def _json_objects(text: str) -> list[str]:
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        _, end = dec.raw_decode(text, i)
        out.append(text[i:end])
        i = end


# -- concurrency, cancellation, overload -------------------------------------------------------
async def _stream(client, stack, timeout=None, **fields):
    call = client.Generate(pb.GenerateRequest(**fields), metadata=stack.auth, timeout=timeout)
    return collect([r async for r in call])


def test_50_concurrent_streams_complete_and_are_batched(stack):
    async def run():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            return await asyncio.gather(
                *[
                    _stream(c, stack, text=f"Request {i}: the weather is", max_tokens=16,
                            ignore_eos=True, temperature=0.8, seed=i)
                    for i in range(50)
                ]
            )  # fmt: skip

    results = asyncio.run(run())
    for out in results:
        f = out[0]["final"]
        assert f.finish_reason == pb.LENGTH
        assert f.usage.completion_tokens == 16 == len(out[0]["token_ids"])
    assert stack.metrics()["pagedserve_engine_max_step_num_seqs"] > 1


def _requests_metric(method: str, code: str) -> str:
    return f'pagedserve_requests_total{{code="{code}",method="{method}"}}'


def _requests(metrics: dict[str, float], method: str, code: str) -> float:
    return metrics.get(_requests_metric(method, code), 0.0)


def test_requests_and_ttft_metrics_count_each_rpc_once(client, stack):
    """Unary successes count as OK; a stream of n outputs is one time-to-first-token sample."""
    before = stack.metrics()
    client.GetModelInfo(pb.GetModelInfoRequest(), metadata=stack.auth, timeout=30)
    client.Tokenize(pb.TokenizeRequest(text="hi"), metadata=stack.auth, timeout=30)
    generate(client, stack, text="Tell me:", max_tokens=3, n=3, temperature=1.0, seed=1)
    after = stack.metrics()
    for method in ("GetModelInfo", "Tokenize", "Generate"):
        assert _requests(after, method, "OK") == _requests(before, method, "OK") + 1, method
    ttft = "pagedserve_time_to_first_token_seconds_count"
    assert after[ttft] == before.get(ttft, 0.0) + 1


def test_cancelled_and_timed_out_streams_free_every_block(stack):
    async def cancel_one(c):
        call = c.Generate(
            pb.GenerateRequest(text="Write a long essay:", max_tokens=400, ignore_eos=True),
            metadata=stack.auth,
        )
        got = 0
        async for r in call:
            got += r.HasField("delta")
            if got == 2:
                call.cancel()
                break
        return await call.code()

    async def time_out_one(c):
        try:
            await _stream(c, stack, timeout=1.5, text="Write a long essay:", max_tokens=400,
                          ignore_eos=True)  # fmt: skip
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def run():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            return await asyncio.gather(
                *[cancel_one(c) for _ in range(50)], *[time_out_one(c) for _ in range(50)]
            )

    before = stack.metrics()
    codes = asyncio.run(run())
    assert codes[:50] == [grpc.StatusCode.CANCELLED] * 50
    assert codes[50:] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 50

    # Each stream counted once: the 50 cancels (no deadline) as CANCELLED; a timed-out one
    # as DEADLINE_EXCEEDED, or as CANCELLED when the client's cancel beat the server's clock.
    def counted(m, code):
        return _requests(m, "Generate", code) - _requests(before, "Generate", code)

    end = time.monotonic() + 10
    while counted(m := stack.metrics(), "CANCELLED") + counted(m, "DEADLINE_EXCEEDED") < 100:
        assert time.monotonic() < end, m
        time.sleep(0.2)
    assert counted(m, "CANCELLED") + counted(m, "DEADLINE_EXCEEDED") == 100
    assert counted(m, "CANCELLED") >= 50
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 0)
    stack.wait_metric("pagedserve_engine_kv_blocks_used", lambda v: v == 0)
    stack.wait_metric("pagedserve_streams_in_flight", lambda v: v == 0)
    # ... and the server still serves.
    with grpc.insecure_channel(stack.target) as ch:
        out = generate(stub(ch), stack, text="Still there?", max_tokens=3, ignore_eos=True)
    assert out[0]["final"].usage.completion_tokens == 3


def test_abort_rpc_ends_stream_with_aborted_final(stack):
    async def run():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            call = c.Generate(
                pb.GenerateRequest(
                    text="Go on forever:", max_tokens=400, ignore_eos=True, request_id="to-abort"
                ),
                metadata=stack.auth,
            )
            responses = []
            async for r in call:
                responses.append(r)
                if len(responses) == 2:
                    ab = await c.Abort(
                        pb.AbortRequest(request_ids=["to-abort", "nope"]), metadata=stack.auth
                    )
                    assert list(ab.aborted) == ["to-abort"] and list(ab.not_found) == ["nope"]
            return responses, await call.code()

    responses, code = asyncio.run(run())
    assert code == grpc.StatusCode.OK
    final = responses[-1].final
    assert final.finish_reason == pb.ABORTED
    assert final.usage.completion_tokens == sum(len(r.delta.token_ids) for r in responses[:-1])
    assert final.timing.queue_ms > 0  # the engine's queue time, as a finished stream reports it
    stack.wait_metric("pagedserve_engine_kv_blocks_used", lambda v: v == 0)


def _concurrent(stack, count: int, **fields) -> list:
    """Run `count` identical streams at once; each gives its completion tokens or its code.
    The deadline only guards against a hang: 128 streams of 24 tokens took over 60 s on a
    machine with other work on both cores."""

    async def one(c):
        try:
            out = await _stream(c, stack, timeout=600, **fields)
            return out[0]["final"].usage.completion_tokens
        except grpc.aio.AioRpcError as e:
            return e.code()

    async def run():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            return await asyncio.gather(*[one(c) for _ in range(count)])

    return asyncio.run(run())


def test_overload_gets_resource_exhausted_and_the_rest_complete(stack):
    results = _concurrent(stack, 160, text="Overload:", max_tokens=24, ignore_eos=True)
    exhausted = [r for r in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
    done = [r for r in results if r == 24]
    assert len(exhausted) + len(done) == 160, set(map(str, results))
    assert len(exhausted) >= 160 - 128 and len(done) >= 1


# -- invalid requests: documented status codes, and the server keeps serving ------------------
INVALID = "INVALID_ARGUMENT"
BAD_GENERATE = [
    ("empty prompt", dict(text=""), INVALID, "text is empty"),
    ("no prompt", dict(), INVALID, "set the prompt"),
    ("empty token ids", dict(token_ids=pb.TokenIds(ids=[])), INVALID, "token_ids is empty"),
    ("unknown model", dict(text="hi", model="gpt-5"), "NOT_FOUND", "not served here"),
    # echoed cut short: a 1 MB name in the status message would pass gRPC's metadata limit
    ("huge model name", dict(text="hi", model="m" * 10**6), "NOT_FOUND", "(1000000 characters)"),
    # refused before tokenizing (which would take the worker seconds): too long whatever the
    # tokenization
    ("text that cannot fit", dict(text="\U0001f642" * 900_000), INVALID, "has at least"),
    # read whole before any check: bounded by the longest acceptable prompt, not 64 MB
    ("over the receive bound", dict(text="x" * 8_000_000), "RESOURCE_EXHAUSTED", "larger than max"),
    ("temperature < 0", dict(text="hi", temperature=-1), INVALID, "temperature"),
    ("temperature absurd", dict(text="hi", temperature=1e9), INVALID, "temperature"),
    ("top_p 0", dict(text="hi", top_p=0), INVALID, "top_p"),
    ("top_p > 1", dict(text="hi", top_p=1.5), INVALID, "top_p"),
    ("top_k < -1", dict(text="hi", top_k=-5), INVALID, "top_k must be -1, 0 (off) or >= 1, got -5"),
    ("min_p > 1", dict(text="hi", min_p=2), INVALID, "min_p"),
    ("max_tokens 0", dict(text="hi", max_tokens=0), INVALID, "max_tokens must be >= 1 (leave it unset"),
    ("min > max tokens", dict(text="hi", max_tokens=2, min_tokens=5), INVALID, "min_tokens"),
    ("n over the limit", dict(text="hi", n=17), INVALID, "n must be in [1, 16], got 17"),
    ("too many stops", dict(text="hi", stop=[f"s{i}" for i in range(17)]), INVALID, "stop"),
    ("empty stop string", dict(text="hi", stop=[""]), INVALID, "stop"),
    ("logprobs over limit", dict(text="hi", logprobs=21), INVALID, "logprobs"),
    ("repetition penalty 0", dict(text="hi", repetition_penalty=0), INVALID, "repetition"),
    ("presence penalty", dict(text="hi", presence_penalty=3), INVALID, "presence"),
    ("logit bias value", dict(text="hi", logit_bias={5: 500.0}), INVALID, "logit_bias"),
    ("logit bias token", dict(text="hi", logit_bias={10**6: 1.0}), INVALID, "vocabulary"),
    ("stop token id", dict(text="hi", stop_token_ids=[10**6]), INVALID, "vocabulary"),
    ("token id over vocab", dict(token_ids=pb.TokenIds(ids=[1, 10**6])), INVALID, "vocabulary"),
    ("prompt over context", dict(token_ids=pb.TokenIds(ids=[100] * 9000)), INVALID, "context"),
    ("prompt + max_tokens", dict(text="hi", max_tokens=100_000), INVALID, "context"),
    ("prompt + min_tokens", dict(text="hi", min_tokens=9000), INVALID, "+ min_tokens (9000)"),
    ("bad request id", dict(text="hi", request_id="a/b"), INVALID, "request_id"),
    ("non-ASCII request id", dict(text="hi", request_id="h\u00e9llo"), INVALID, "ASCII"),
]


@pytest.mark.parametrize(
    "fields,code,message", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE]
)
def test_invalid_generate_gets_documented_status(client, stack, fields, code, message):
    with pytest.raises(grpc.RpcError) as e:
        generate(client, stack, **fields)
    assert e.value.code().name == code, e.value.details()
    assert message in e.value.details()
    ok = generate(
        client, stack, text="ok", max_tokens=2, ignore_eos=True
    )  # the server keeps serving
    assert ok[0]["final"].usage.completion_tokens == 2


def test_invalid_chat_and_tokenize_requests(client, stack):
    cases = [
        (client.Chat, pb.ChatRequest(), INVALID, "messages is empty"),
        (client.Chat, pb.ChatRequest(messages=[pb.ChatMessage(content="x")]), INVALID, "role"),
        (
            client.Chat,
            pb.ChatRequest(messages=[pb.ChatMessage(role="u" * 65, content="x")]),
            INVALID,
            "longer than 64",
        ),  # fmt: skip
        (client.Tokenize, pb.TokenizeRequest(), INVALID, "set text or messages"),
        (client.Detokenize, pb.DetokenizeRequest(token_ids=[10**6]), INVALID, "vocabulary"),
        (client.GetModelInfo, pb.GetModelInfoRequest(model="nope"), "NOT_FOUND", "nope"),
    ]
    for method, req, code, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            r = method(req, metadata=stack.auth, timeout=30)
            list(r) if not hasattr(r, "DESCRIPTOR") else r
        assert e.value.code().name == code, (req, e.value.details())
        assert message in e.value.details()


def test_chat_takes_the_documented_count_of_stop_token_ids(client, stack):
    """64 stop ids are allowed; the chat template's end-of-turn id the worker adds on top must
    not push a Chat request over the limit."""
    ids = list(range(1000, 1064))
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=2,
                         stop_token_ids=ids)  # fmt: skip
    out = collect(client.Chat(req, metadata=stack.auth, timeout=60))
    assert out[0]["final"].usage.completion_tokens >= 1
    req.stop_token_ids.append(2000)
    with pytest.raises(grpc.RpcError) as e:
        collect(client.Chat(req, metadata=stack.auth, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64 stop_token_ids" in e.value.details()


def test_malformed_bytes_are_invalid_argument(stack):
    # A text field holding invalid UTF-8 cannot be built with the generated classes: send the
    # raw bytes. Field 3 (text), wire type 2, length 2, bytes 0xff 0xfe.
    with grpc.insecure_channel(stack.target) as ch:
        raw = ch.unary_stream("/pagedserve.v1.Inference/Generate")
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\x1a\x02\xff\xfe", metadata=stack.auth, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in e.value.details()


@pytest.mark.parametrize(
    "metadata,message",
    [((), "missing API key"), ((("authorization", "Bearer wrong"),), "invalid API key")],
)
def test_api_key_is_required(client, stack, metadata, message):
    with pytest.raises(grpc.RpcError) as e:
        list(client.Generate(pb.GenerateRequest(text="hi"), metadata=metadata, timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == message
    with pytest.raises(grpc.RpcError) as e:
        client.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = client.GetModelInfo(
        pb.GetModelInfoRequest(), metadata=(("x-api-key", stack.api_key),), timeout=30
    )
    assert ok.id


def test_api_key_is_not_on_the_gateway_command_line(stack):
    """`up` hands its keys to the gateway in the environment: command lines are public."""
    gateways = [p for p in stack.processes() if "pagedserve.cli gateway" in p]
    assert len(gateways) == 1
    assert stack.api_key not in gateways[0]


def test_same_request_id_twice_at_once_one_is_refused_none_hangs(stack):
    results = _concurrent(
        stack, 4, text="Twice:", max_tokens=8, ignore_eos=True, request_id="dup-1"
    )
    assert 8 in results, results  # at least one ran, and every one ended (no hang)
    assert set(results) <= {8, grpc.StatusCode.INVALID_ARGUMENT}, results
