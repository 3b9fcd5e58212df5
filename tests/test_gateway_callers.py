"""Many callers on one gateway (``pagedserve up`` as real processes, gRPC over loopback): a burst
past the in-flight bound is refused call by call, each refusal RESOURCE_EXHAUSTED and counted."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from tests.serving_stack import pb, start_stack, stop_stack, stub

MAX_INFLIGHT = 8
KEY_A = "key-a"
OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = start_stack(
        tmp_path_factory.mktemp("callers"), "--max-inflight", str(MAX_INFLIGHT), api_key=KEY_A
    )
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
