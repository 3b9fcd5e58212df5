"""A part of the stack stops answering: health says NOT_SERVING (seen through a real
Health.Watch stream) and its streams fail with UNAVAILABLE instead of hanging. A killed engine
is restarted by the supervisor; a stalled tokenizer worker (SIGSTOP) is written off, and taken
back when it answers again (SIGCONT). Then health comes back and the server serves again.

(A killed tokenizer worker is restarted within about the 3 s the gateway waits before writing
it off, so health may never flip for it: the stall makes the flip certain.)"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving_stack import collect, pb, start_stack, stop_stack, stub, wait_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("resilience"))
    yield s
    assert stop_stack(s) == 0, s.log()
    assert s.processes() == []


def _pid(stack, part: str) -> int:
    """pid of the stack's child running `pagedserve <part>`."""
    for line in stack.processes():
        pid, args = line.strip().split(None, 1)
        if f"pagedserve.cli {part} " in args:
            return int(pid)
    raise AssertionError(f"no {part} process in {stack.processes()}")


class Watch:
    """Collects every status a Health.Watch stream sends, in a thread."""

    def __init__(self, target: str) -> None:
        self.statuses: list[int] = []
        self._ch = grpc.insecure_channel(target)
        self._call = health_pb2_grpc.HealthStub(self._ch).Watch(health_pb2.HealthCheckRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for r in self._call:
                self.statuses.append(r.status)
        except grpc.RpcError:
            pass

    def wait_for(self, sequence: list[int], timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if _contains_in_order(self.statuses, sequence):
                return
            time.sleep(0.1)
        raise AssertionError(f"watch saw {self.statuses}, wanted {sequence} in order")

    def close(self) -> None:
        self._call.cancel()
        self._ch.close()


def _contains_in_order(seen: list[int], wanted: list[int]) -> bool:
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


def _long_stream(stack, client):
    return client.Generate(
        pb.GenerateRequest(text="Write forever:", max_tokens=120, ignore_eos=True),
        metadata=stack.auth,
        timeout=60,
    )


@pytest.mark.parametrize("part", ["tokenizer", "engine"])
def test_part_stops_answering_health_drops_streams_fail_then_it_comes_back(stack, part):
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        watch = Watch(stack.target)
        stopped = False  # the victim worker is SIGSTOPped
        try:
            watch.wait_for([SERVING])
            # Open streams on both workers, so one surely sits on the victim.
            calls = [_long_stream(stack, client) for _ in range(4)]
            for c in calls:
                next(c)  # generating
            victim = _pid(stack, part)
            os.kill(victim, signal.SIGSTOP if part == "tokenizer" else signal.SIGKILL)
            stopped = part == "tokenizer"
            codes = []
            for c in calls:
                try:
                    for _ in c:
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            assert grpc.StatusCode.UNAVAILABLE in codes, codes
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK}, codes
            watch.wait_for([SERVING, NOT_SERVING])
            if stopped:
                os.kill(victim, signal.SIGCONT)
                stopped = False
            watch.wait_for([SERVING, NOT_SERVING, SERVING], timeout=90)
        finally:
            if stopped:  # a failure above must not leave the worker stopped for later tests
                os.kill(victim, signal.SIGCONT)
            watch.close()
        out = collect(
            client.Generate(
                pb.GenerateRequest(text="Back?", max_tokens=4, ignore_eos=True),
                metadata=stack.auth,
                timeout=60,
            )
        )
        assert out[0]["final"].usage.completion_tokens == 4
    if part == "engine":
        assert "engine exited with code -9; restarting" in stack.log()


def _serves_again(stack) -> None:
    with grpc.insecure_channel(stack.target) as ch:
        out = collect(
            stub(ch).Generate(
                pb.GenerateRequest(text="Back?", max_tokens=4, ignore_eos=True),
                metadata=stack.auth,
                timeout=60,
            )
        )
    assert out[0]["final"].usage.completion_tokens == 4


def _long_streams(stack, client, n: int, max_tokens: int = 3000) -> list:
    """n streams (3000 tokens: minutes here), each generating, all n running in the engine."""
    calls = [
        client.Generate(
            pb.GenerateRequest(text="Write forever:", max_tokens=max_tokens, ignore_eos=True),
            metadata=stack.auth,
            timeout=120,
        )
        for _ in range(n)
    ]
    for c in calls:
        next(c)  # generating
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == n)
    return calls


def test_killed_gateway_is_restarted_and_its_old_requests_stop(stack):
    """The gateway dies mid-stream: the supervisor restarts it, and the workers abort what the
    dead gateway had asked for instead of generating it to max_tokens for nobody."""
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        calls = _long_streams(stack, client, 3)
        os.kill(_pid(stack, "gateway"), signal.SIGKILL)
        for c in calls:
            with pytest.raises(grpc.RpcError) as err:
                for _ in c:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_serving(stack, timeout=60)
    # 3000 tokens each would take minutes on this machine; the aborts take a heartbeat or two.
    stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 0, timeout=15)
    assert "gateway exited with code -9; restarting" in stack.log()
    assert "the gateway went away; aborting" in stack.log()
    _serves_again(stack)


def _streams_until_done(calls) -> list[tuple[grpc.StatusCode, str]]:
    out = []
    for c in calls:
        try:
            for _ in c:
                pass
            out.append((grpc.StatusCode.OK, ""))
        except grpc.RpcError as e:
            out.append((e.code(), e.details()))
    return out


def test_gateway_stalled_briefly_keeps_its_streams(stack):
    """A gateway that does not run for longer than workers may stay silent (3 s; SIGSTOP
    here, a swapped-out or starved host in life) but shorter than the ZMTP ping timeout
    (5 s) must not write its workers off: the time it did not run is not theirs."""
    gateway = _pid(stack, "gateway")
    with grpc.insecure_channel(stack.target) as ch:
        calls = _long_streams(stack, stub(ch), 2, max_tokens=120)  # both running in the engine
        os.kill(gateway, signal.SIGSTOP)
        try:
            time.sleep(4.0)
        finally:
            os.kill(gateway, signal.SIGCONT)
        for c in calls:  # every token arrives and each stream ends with its final message
            assert collect(c)[0]["final"].usage.completion_tokens == 120
    assert "the gateway stalled for" in stack.log()


def test_gateway_stalled_past_the_ping_timeout_fails_its_streams_and_serves_on(stack):
    """A gateway that does not run past the workers' ZMTP ping timeout counts as gone: the
    workers abort its requests in the engine and queue UNAVAILABLE errors, which the same
    gateway receives when it runs again, so its clients' streams end instead of hanging. It
    is not restarted, and serves again."""
    went_away = stack.log().count("the gateway went away; aborting")
    restarts = stack.log().count("gateway exited")
    log_start = len(stack.log())
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        gateway = _pid(stack, "gateway")
        calls = _long_streams(stack, client, 3)
        # and one that ends while the gateway is stopped: its last delta is sent to the
        # stopped gateway, before the workers give up on it
        short = client.Generate(
            pb.GenerateRequest(text="Short:", max_tokens=8, ignore_eos=True),
            metadata=stack.auth,
            timeout=60,
        )
        next(short)
        os.kill(gateway, signal.SIGSTOP)
        try:
            # Each worker pings every 1 s and gives up 5 s after the first unanswered ping (up
            # to 6 s after the stop): by 9 s every worker has written the gateway off.
            time.sleep(9.0)
        finally:
            os.kill(gateway, signal.SIGCONT)
        resumed = time.monotonic()
        assert stack.log().count("the gateway went away; aborting") > went_away
        results = _streams_until_done(calls)
        # it ends at once (its final, or UNAVAILABLE), not at its deadline
        ((code, _),) = _streams_until_done([short])
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
        assert time.monotonic() - resumed < 10
        # /metrics is the gateway's: it answers again, and the engine has stopped them all
        stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 0, timeout=15)
    assert [code for code, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 3, results
    # ended by the errors the workers queued, or by the gateway itself noticing how long it
    # stalled (whichever it reads first)
    assert all(
        "lost its connection to the gateway" in msg or "the gateway stalled for" in msg
        for _, msg in results
    ), results
    assert _pid(stack, "gateway") == gateway  # the same process
    assert stack.log().count("gateway exited") == restarts
    # The workers reconnected under their identities and count once each, then and later
    # (messages left on a replaced connection must not pose as a third and fourth worker).
    assert stack.metrics()["pagedserve_tokenizer_workers_ready"] == 2
    time.sleep(4.0)  # past the 3 s a silent worker is given
    assert stack.metrics()["pagedserve_tokenizer_workers_ready"] == 2
    assert not re.search(r"tokenizer worker \S+ went silent", stack.log()[log_start:])
    _serves_again(stack)
