"""Many callers on one gateway (``pagedserve up`` as real processes, gRPC and HTTP over
loopback): a burst past the in-flight bound is refused call by call, each refusal
RESOURCE_EXHAUSTED and counted; a request id and an Abort belong to their caller, its API key
(or its connection when the server has no keys)."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import openai
import pytest

from tests.serving_stack import pb, start_stack, stop_stack, stub

MAX_INFLIGHT = 8
KEY_A, KEY_B = "key-a", "key-b"
OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with two API keys (two callers)."""
    s = start_stack(
        tmp_path_factory.mktemp("callers"),
        "--max-inflight", str(MAX_INFLIGHT), "--api-key", KEY_B,
        api_key=KEY_A,
    )  # fmt: skip
    yield s
    assert stop_stack(s) == 0, s.log()


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _generate_total(metrics: dict[str, float], code: str) -> float:
    return metrics.get(f'pagedserve_requests_total{{code="{code}",method="Generate"}}', 0.0)


# -- overload ----------------------------------------------------------------------------------
# grpc core holds calls the gateway's event loop has not yet taken in a pending queue; past
# 1,000 of them it starts ending new ones with CANCELLED (all of them past 3,000), before any
# handler sees them. A burst this large got hundreds of uncounted CANCELLED answers.
BURST = 3000


async def _burst(stack, count: int) -> list[grpc.StatusCode]:
    """``count`` short streams at once on one channel; the status each ended with."""

    async def one(c) -> grpc.StatusCode:
        req = pb.GenerateRequest(text="Burst:", max_tokens=2, ignore_eos=True)
        call = c.Generate(req, metadata=_auth(KEY_A), timeout=120)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return OK

    async with grpc.aio.insecure_channel(stack.target) as ch:
        c = stub(ch)
        return await asyncio.gather(*[one(c) for _ in range(count)])


def test_a_burst_past_the_inflight_bound_is_refused_and_counted_call_by_call(keyed):
    before = keyed.metrics()
    codes = Counter(asyncio.run(_burst(keyed, BURST)))
    assert set(codes) <= {OK, EXHAUSTED}, f"every call succeeds or is refused: {codes}"
    # The first MAX_INFLIGHT calls the gateway takes find room; later ones find it as streams end.
    assert codes[OK] >= MAX_INFLIGHT and codes[EXHAUSTED] >= 1, codes
    after = keyed.metrics()
    # Both are counted before the call's status is sent, so they are in by now.
    counted = {
        code: _generate_total(after, code.name) - _generate_total(before, code.name)
        for code in (OK, EXHAUSTED)
    }
    assert counted == {OK: codes[OK], EXHAUSTED: codes[EXHAUSTED]}, (counted, codes)


# -- request ids and Abort belong to their caller -----------------------------------------------
def _request(rid: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text="Count slowly:", max_tokens=max_tokens, ignore_eos=True, request_id=rid
    )


async def _until_first_delta(call, then) -> tuple[list[pb.GenerateResponse], object]:
    """The whole stream of ``call``, and what ``then()`` returned, called once its first delta
    came (so it runs while the request is in the engine)."""
    responses, result = [], None
    async for r in call:
        responses.append(r)
        if len(responses) == 1:
            result = await then()
    return responses, result


async def _collect(call) -> list[pb.GenerateResponse]:
    return [r async for r in call]


def _abort(c, key_or_none: str | None, rid: str):
    metadata = _auth(key_or_none) if key_or_none else ()
    return c.Abort(pb.AbortRequest(request_ids=[rid]), metadata=metadata, timeout=30)


def _final(responses: list[pb.GenerateResponse], rid: str) -> pb.Final:
    assert [r.request_id for r in responses] == [rid] * len(responses), "the client's own id"
    assert responses[-1].HasField("final"), responses[-1]
    return responses[-1].final


def test_another_keys_abort_is_not_found_and_the_stream_runs_on(keyed):
    async def run():
        async with grpc.aio.insecure_channel(keyed.target) as ch:
            c = stub(ch)
            call = c.Generate(_request("theirs", 48), metadata=_auth(KEY_A), timeout=120)
            responses, ab = await _until_first_delta(call, lambda: _abort(c, KEY_B, "theirs"))
            return responses, ab, await call.code()

    responses, ab, code = asyncio.run(run())
    assert (list(ab.aborted), list(ab.not_found)) == ([], ["theirs"])
    final = _final(responses, "theirs")
    assert (code, final.finish_reason, final.usage.completion_tokens) == (OK, pb.LENGTH, 48)


def test_two_keys_use_one_id_at_once_and_each_abort_stops_only_its_own(keyed):
    async def run():
        async with grpc.aio.insecure_channel(keyed.target) as ch:
            c = stub(ch)
            a = c.Generate(_request("same-id", 1000), metadata=_auth(KEY_A), timeout=120)
            b = c.Generate(_request("same-id", 24), metadata=_auth(KEY_B), timeout=120)
            a_side = _until_first_delta(a, lambda: _abort(c, KEY_A, "same-id"))
            (a_out, ab), b_out = await asyncio.gather(a_side, _collect(b))
            return a_out, ab, await a.code(), b_out, await b.code()

    a_out, ab, a_code, b_out, b_code = asyncio.run(run())
    assert (list(ab.aborted), list(ab.not_found)) == (["same-id"], [])
    assert (a_code, _final(a_out, "same-id").finish_reason) == (OK, pb.ABORTED)
    b_final = _final(b_out, "same-id")
    assert (b_code, b_final.finish_reason, b_final.usage.completion_tokens) == (OK, pb.LENGTH, 24)
    keyed.wait_metric("pagedserve_engine_kv_blocks_used", lambda v: v == 0)


def test_an_abort_reaches_its_keys_http_request_and_no_other_keys(keyed):
    """The caller is the key on both fronts: a gRPC Abort stops the same key's HTTP request."""
    with openai.OpenAI(base_url=keyed.base_url, api_key=KEY_A, max_retries=0) as client:
        chunks = client.completions.create(
            model="", prompt="Count slowly:", max_tokens=1000, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "over-http"},
        )  # fmt: skip
        with chunks, grpc.insecure_channel(keyed.target) as ch:
            c = stub(ch)
            first = next(iter(chunks))
            other = c.Abort(pb.AbortRequest(request_ids=["over-http"]), metadata=_auth(KEY_B))
            own = c.Abort(pb.AbortRequest(request_ids=["over-http"]), metadata=_auth(KEY_A))
            rest = list(chunks)
    assert (list(other.aborted), list(other.not_found)) == ([], ["over-http"])
    assert (list(own.aborted), list(own.not_found)) == (["over-http"], [])
    assert first.id == "cmpl-over-http"
    assert [ch.choices[0].finish_reason for ch in rest if ch.choices][-1] == "abort"


@pytest.fixture(scope="module")
def keyless(tmp_path_factory):
    """A server without API keys: a caller is its connection."""
    s = start_stack(tmp_path_factory.mktemp("keyless"), api_key=None)
    yield s
    assert stop_stack(s) == 0, s.log()


def _own_connection(stack) -> grpc.aio.Channel:
    # grpc shares connections between a process's channels to one target unless told not to.
    return grpc.aio.insecure_channel(stack.target, options=[("grpc.use_local_subchannel_pool", 1)])


def test_without_keys_each_connection_is_a_caller(keyless):
    async def run():
        async with _own_connection(keyless) as ch1, _own_connection(keyless) as ch2:
            c1, c2 = stub(ch1), stub(ch2)
            call = c1.Generate(_request("conn-id", 1000), timeout=120)

            async def from_the_other_connection():
                other = await _abort(c2, None, "conn-id")
                # ... which may use the same id meanwhile,
                mine = await _collect(c2.Generate(_request("conn-id", 24), timeout=120))
                own = await _abort(c1, None, "conn-id")  # ... while only ch1 stops ch1's.
                return other, mine, own

            responses, (other, mine, own) = await _until_first_delta(
                call, from_the_other_connection
            )
            return responses, await call.code(), other, mine, own

    responses, code, other, mine, own = asyncio.run(run())
    assert (list(other.aborted), list(other.not_found)) == ([], ["conn-id"])
    mine_final = _final(mine, "conn-id")
    assert (mine_final.finish_reason, mine_final.usage.completion_tokens) == (pb.LENGTH, 24)
    assert (list(own.aborted), list(own.not_found)) == (["conn-id"], [])
    assert (code, _final(responses, "conn-id").finish_reason) == (OK, pb.ABORTED)
