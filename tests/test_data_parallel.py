"""Data-parallel engine replicas behind one gateway: ``pagedserve up --data-parallel-size 2``
(two engine processes of the default model, two tokenizer workers, the gateway; real ZeroMQ
and gRPC), and the tokenizer workers' routing rule on its own.

Routing is deterministic for a given prompt and engine addresses (see
``tokenizer_svc.routing.route``), so the end-to-end tests pick prompts that go to a known
replica instead of hoping a random spread covers both."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from engine_svc import LLM, SamplingParams
from protos.pagedserve.internal.v1 import ipc_pb2
from tests.serving_stack import collect, pb, start_stack, stop_stack, stub
from tokenizer_svc.routing import (
    AFFINITY_BLOCKS,
    BALANCE_SLACK,
    EngineLink,
    prefix_chain,
    route,
)

BLOCK = 16  # the engine's default block size


def _link(index: int, address: str, running: int = 0) -> EngineLink:
    e = EngineLink(index, address)
    e.status = ipc_pb2.EngineStatus(ready=True, stats=ipc_pb2.EngineStats(num_running=running))
    return e


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


# -- the routing rule --------------------------------------------------------------------------
def test_prefix_chain_covers_full_blocks_before_the_last_token():
    rng = random.Random(1)
    p = _prompt(rng, 3 * BLOCK)
    # The last token is always computed, so 3 blocks' worth of tokens give 2 cacheable blocks.
    assert len(prefix_chain(p, BLOCK)) == 2
    assert len(prefix_chain(p + [5], BLOCK)) == 3
    assert prefix_chain(p[:BLOCK], BLOCK) == []
    # Chained: a shared first block gives a shared first hash, and nothing after a difference.
    q = p[:BLOCK] + _prompt(rng, 2 * BLOCK)
    assert prefix_chain(q, BLOCK)[0] == prefix_chain(p, BLOCK)[0]
    assert prefix_chain(q, BLOCK)[1] != prefix_chain(p, BLOCK)[1]
    assert len(prefix_chain(_prompt(rng, 200 * BLOCK), BLOCK)) == AFFINITY_BLOCKS


def test_route_prefers_the_engine_that_has_the_prefix_within_the_load_margin():
    rng = random.Random(2)
    shared = _prompt(rng, 4 * BLOCK)
    a, b = _link(0, "ipc:///x/engine-0.sock"), _link(1, "ipc:///x/engine-1.sock")
    chain = prefix_chain(shared + [1], BLOCK)
    owner, other = (a, b) if route([a, b], chain) is b else (b, a)  # owner: not the first pick
    owner.remember(chain)
    # A request sharing 3 of the 4 blocks goes to the engine that was sent them, even though
    # the rendezvous hash alone picks the other one and the owner is busier (by the margin).
    q = shared[: 3 * BLOCK] + _prompt(rng, 2 * BLOCK)
    owner.status.stats.num_running = BALANCE_SLACK
    assert owner.matched(prefix_chain(q, BLOCK)) == 3
    assert route([a, b], prefix_chain(q, BLOCK)) is owner
    # Past the margin the less loaded engine takes it (the cache is not worth a queue).
    owner.status.stats.num_running = BALANCE_SLACK + 1
    assert route([a, b], prefix_chain(q, BLOCK)) is other
    # The margin grows with the load: a quarter of the least loaded engine's.
    other.status.stats.num_running = 100
    owner.status.stats.num_running = 125
    assert route([a, b], prefix_chain(q, BLOCK)) is owner
    owner.status.stats.num_running = 126
    assert route([a, b], prefix_chain(q, BLOCK)) is other
    # Sequences sent since the last status count as load.
    owner.status.stats.num_running = 100
    owner.sent = 26
    assert route([a, b], prefix_chain(q, BLOCK)) is other


def test_route_without_a_cached_prefix():
    rng = random.Random(3)
    a, b = _link(0, "ipc:///x/engine-0.sock", 3), _link(1, "ipc:///x/engine-1.sock", 1)
    # Shorter than a block: nothing to cache, the least loaded engine.
    assert route([a, b], prefix_chain(_prompt(rng, BLOCK), BLOCK)) is b
    # New prefixes spread over both engines by their first block.
    picks = {route([a, b], prefix_chain(_prompt(rng, 3 * BLOCK), BLOCK)).index for _ in range(64)}
    assert picks == {0, 1}


def test_route_is_the_same_in_every_process():
    """Workers are separate processes (with their own str hash seeds): they must send a new
    prefix to the same engine, or each would warm a different engine's cache with it."""
    code = (
        "import random, sys\n"
        "from tokenizer_svc.routing import EngineLink, prefix_chain, route\n"
        "from protos.pagedserve.internal.v1 import ipc_pb2\n"
        "links = [EngineLink(i, f'tcp://engine-{i}:5560') for i in range(3)]\n"
        "for e in links: e.status = ipc_pb2.EngineStatus(ready=True)\n"
        "rng = random.Random(4)\n"
        "ps = [[rng.randrange(1000, 40000) for _ in range(40)] for _ in range(32)]\n"
        "print(''.join(str(route(links, prefix_chain(p, 16)).index) for p in ps))\n"
    )
    picks = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        picks.add(out.stdout.strip())
    assert len(picks) == 1, picks
    assert set(picks.pop()) == {"0", "1", "2"}


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(
        tmp_path_factory.mktemp("dp"),
        "--data-parallel-size", "2",
        "--kv-cache-memory", "256MiB",
        "--max-model-len", "2048",
    )  # fmt: skip
    s.wait_metric("pagedserve_engine_ready", lambda v: v == 2, timeout=120)
    yield s
    assert stop_stack(s) == 0, s.log()
    assert s.processes() == []


def _engines(stack) -> list[str]:
    return [f"ipc://{stack.run_dir}/engine-{k}.sock" for k in range(2)]


def _to_engine(stack, rng: random.Random, k: int, n: int = 3 * BLOCK) -> list[int]:
    """A random prompt that the workers route to engine k (when neither is over the margin)."""
    links = [_link(i, a) for i, a in enumerate(_engines(stack))]
    while True:
        p = _prompt(rng, n)
        if route(links, prefix_chain(p, BLOCK)).index == k:
            return p


def _per_engine(stack, name: str) -> list[float]:
    m = stack.metrics()
    return [m[f'{name}{{engine="{k}"}}'] for k in range(2)]


def _generate(client, stack, ids: list[int], **kw):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), temperature=0, **kw)
    return client.Generate(req, metadata=stack.auth, timeout=120)


def test_two_engines_one_thread_each_and_announced(stack):
    engines = [p for p in stack.processes() if "pagedserve.cli engine " in p]
    assert len(engines) == 2, stack.processes()
    # Two cores here: one torch thread each, unless --num-threads says otherwise.
    cores = os.cpu_count() or 1
    assert all(f"--num-threads {max(1, cores // 2)}" in p for p in engines), engines
    # Announced once health is SERVING and both replicas answer ready (a moment after).
    end = time.monotonic() + 10
    while "2 engine replicas" not in stack.log() and time.monotonic() < end:
        time.sleep(0.2)
    assert "pagedserve is serving on" in stack.log() and "2 engine replicas" in stack.log()
    assert "engine-1 INFO engine ready" in stack.log()  # each replica logs under its name


def test_requests_spread_over_both_replicas_and_match_the_offline_engine(stack):
    rng = random.Random(5)
    prompts = [_to_engine(stack, rng, k % 2) for k in range(8)]
    before = _per_engine(stack, "pagedserve_engine_requests_finished_total")
    with grpc.insecure_channel(stack.target) as ch, ThreadPoolExecutor(8) as pool:
        client = stub(ch)
        outs = list(
            pool.map(lambda p: collect(_generate(client, stack, p, max_tokens=12)), prompts)
        )
    # Engine stats reach the gateway with the heartbeats (every 0.5 s, twice).
    stack.wait_metric("pagedserve_engine_requests_finished_total", lambda v: v == sum(before) + 8)
    after = _per_engine(stack, "pagedserve_engine_requests_finished_total")
    assert [b - a for a, b in zip(before, after)] == [4, 4]
    # The replicas run one torch thread each; so does the reference (same reduction order).
    threads = torch.get_num_threads()
    try:
        llm = LLM(max_num_seqs=8, kv_cache_memory=256 * 2**20, max_model_len=2048, num_threads=1)
        want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    finally:
        torch.set_num_threads(threads)
    for out, ref in zip(outs, want):
        assert out[0]["token_ids"] == list(ref.outputs[0].token_ids)


def test_a_shared_prefix_goes_to_the_replica_that_caches_it(stack):
    """The second request of each pair reuses the first's blocks: it went to the same replica
    (random placement would find the cache in half the pairs)."""
    rng = random.Random(6)
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        for k in range(6):
            shared = _prompt(rng, 3 * BLOCK)
            first = collect(_generate(client, stack, shared + [7], max_tokens=2))
            assert first[0]["final"].usage.cached_tokens == 0
            second = collect(_generate(client, stack, shared + [8, 9], max_tokens=2))
            assert second[0]["final"].usage.cached_tokens == 3 * BLOCK, k


def test_a_killed_replica_fails_only_its_streams_and_the_other_serves_on(stack):
    rng = random.Random(7)
    prompts = [_to_engine(stack, rng, k % 2) for k in range(6)]
    victim = next(
        int(p.split()[0]) for p in stack.processes() if "engine-1.sock" in p and " engine " in p
    )
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        calls = [_generate(client, stack, p, max_tokens=300, ignore_eos=True) for p in prompts]
        for c in calls:
            next(c)  # generating
        stack.wait_metric("pagedserve_engine_num_running", lambda v: v == 6)
        assert _per_engine(stack, "pagedserve_engine_num_running") == [3, 3]
        os.kill(victim, signal.SIGKILL)
        # Sent before the workers can know: they go to the dead engine, and when the workers
        # find it gone, on to engine 0, since they have streamed nothing yet.
        early = [_generate(client, stack, _to_engine(stack, rng, 1), max_tokens=4) for _ in "ab"]
        # Once the workers count engine 1 out, new requests (even ones it would have taken)
        # go to engine 0 while it restarts.
        stack.wait_metric("pagedserve_engine_ready", lambda v: v == 1, timeout=30)
        back = collect(_generate(client, stack, _to_engine(stack, rng, 1), max_tokens=4))
        assert back[0]["final"].usage.completion_tokens == 4
        results = []
        for c in calls:
            try:
                results.append(collect(c)[0]["final"].usage.completion_tokens)
            except grpc.RpcError as e:
                results.append((e.code(), e.details()))
        for c in early:
            assert collect(c)[0]["final"].usage.completion_tokens == 4
    assert results[0::2] == [300, 300, 300], results  # engine 0's streams run to the end
    for r in results[1::2]:
        assert r[0] == grpc.StatusCode.UNAVAILABLE, results
        assert "engine-1.sock" in r[1] and "the engine" in r[1], results
    assert "engine 1 exited with code -9; restarting" in stack.log()
    assert "requests sent to other engines" in stack.log()
    # The supervisor restarts it; once it is back, it takes its share again.
    stack.wait_metric("pagedserve_engine_ready", lambda v: v == 2, timeout=120)
    restarted = 'pagedserve_engine_requests_finished_total{engine="1"}'
    assert stack.metrics()[restarted] == 0  # a new process: its counters start again
    with grpc.insecure_channel(stack.target) as ch:
        out = collect(_generate(stub(ch), stack, _to_engine(stack, rng, 1), max_tokens=4))
    assert out[0]["final"].usage.completion_tokens == 4
    stack.wait_metric(restarted, lambda v: v == 1)
