"""Scheduler: token budget, admission order, preemption, abort, stop conditions, prefix cache.

Pure Python: requests are built directly and a fake runner picks the sampled tokens.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.request import FinishReason, Request, RequestStatus
from engine_svc.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from protos.errors import QueueFullError
from protos.sampling import SamplingParams

EOS = 2


def make_req(
    rid: str,
    prompt: list[int],
    seq: int,
    *,
    max_tokens: int = 16,
    priority: int = 0,
    **params: object,
) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, **params),
        max_tokens=max_tokens,
        eos_token_ids=frozenset({EOS}),
        arrival_time=float(seq),
        arrival_seq=seq,
        priority=priority,
    )


def make_sched(
    num_blocks: int = 64,
    block_size: int = 16,
    *,
    budget: int = 2048,
    max_num_seqs: int = 256,
    max_waiting: int = 4096,
    max_model_len: int = 1024,
    prefix_caching: bool = True,
    long_prefill_chunk: int | None = 0,  # off: most tests pin the budget arithmetic alone
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, budget, max_waiting, max_model_len, long_prefill_chunk)
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching))


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def trace(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.seqs]


def ids(reqs: list[Request]) -> list[str]:
    return [r.request_id for r in reqs]


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """What every step must satisfy, whatever the workload."""
    cfg, bs = sched.config, sched.bm.block_size
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.seqs)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({s.request.request_id for s in out.seqs}) == len(out.seqs)
    for s in out.seqs:
        r = s.request
        assert r.status is RequestStatus.RUNNING
        assert s.num_new_tokens >= 1
        assert r.num_computed_tokens + s.num_new_tokens <= r.num_tokens
        assert s.block_table is sched.bm.block_table(r.request_id)
        assert len(s.block_table) * bs >= r.num_computed_tokens + s.num_new_tokens
    keys = [r.sort_key for r in sched.running]
    assert keys == sorted(keys)  # running is kept in priority order
    if out.preempted:  # every victim ranks below every request that kept running
        assert not keys or keys[-1] < min(r.sort_key for r in out.preempted)
    for r in out.preempted:
        assert r.status is RequestStatus.PREEMPTED
        assert r.num_computed_tokens == 0
        assert sched.bm.block_table(r.request_id) == []
        assert r not in sched.running


@dataclass(slots=True)
class Step:
    seqs: list[tuple[str, int, bool]]  # trace(out), taken before update moves the requests on
    out: SchedulerOutput
    finished: list[Request]

    @property
    def preempted(self) -> list[str]:
        return ids(self.out.preempted)


class FakeRunner:
    """Drives the scheduler; every sampled token is a fresh id (>= 1000) unless overridden."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self._tokens = itertools.count(1000)
        self.sampled: dict[str, list[int]] = defaultdict(list)  # what each request was given

    def step(self, override: dict[str, int] | None = None) -> Step:
        busy = self.sched.has_unfinished()
        out = self.sched.schedule()
        check_output(self.sched, out)
        assert out.is_empty != busy  # no empty step while requests wait (no livelock)
        seqs = trace(out)
        sampled = {}
        for rid, _, samples in seqs:
            if samples:
                sampled[rid] = (override or {}).get(rid, next(self._tokens))
                self.sampled[rid].append(sampled[rid])
        finished = self.sched.update(out, sampled)
        self.sched.bm.check_invariants()
        return Step(seqs, out, finished)

    def run_until_idle(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests still unfinished")


# ---- token budget and chunked prefill ---------------------------------------------------------


def test_long_prompt_is_chunked_at_exactly_the_budget() -> None:
    sched = make_sched(64, 4, budget=16)
    runner = FakeRunner(sched)
    a = make_req("a", toks(10, 40), 0, max_tokens=3)
    sched.add_request(a)
    chunks, tables = [], []
    for _ in range(5):
        step = runner.step()
        chunks += step.seqs
        tables.append(len(sched.bm.block_table("a")))
        assert step.out.num_batched_tokens == chunks[-1][1]
    assert chunks == [
        ("a", 16, False),
        ("a", 16, False),
        ("a", 8, True),
        ("a", 1, True),
        ("a", 1, True),
    ]
    assert tables == [4, 8, 10, 11, 0]  # 40 tokens, then token 41 -> block 11; freed at the end
    assert a.output_token_ids == [1000, 1001, 1002]
    assert a.finish_reason is FinishReason.LENGTH
    assert sched.bm.num_used_blocks() == 0


def test_decodes_go_first_and_share_the_step_with_a_prefill_chunk() -> None:
    sched = make_sched(64, 4, budget=16)
    runner = FakeRunner(sched)
    sched.add_request(make_req("a", toks(10, 6), 0, max_tokens=10))
    sched.add_request(make_req("b", toks(20, 6), 1, max_tokens=10))
    step = runner.step()
    assert step.seqs == [("a", 6, True), ("b", 6, True)]
    assert step.out.num_batched_tokens == 12
    sched.add_request(make_req("c", toks(30, 40), 2, max_tokens=10))
    sched.add_request(make_req("d", toks(80, 20), 3, max_tokens=10))
    steps = [runner.step().seqs for _ in range(4)]
    assert steps == [
        [("a", 1, True), ("b", 1, True), ("c", 14, False)],
        [("a", 1, True), ("b", 1, True), ("c", 14, False)],
        # c's last chunk (12) goes before d's first: running requests before admissions
        [("a", 1, True), ("b", 1, True), ("c", 12, True), ("d", 2, False)],
        [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 13, False)],
    ]
    assert len(sched.bm.block_table("d")) == 4  # 15 slots


def test_a_long_prefill_goes_in_chunks_that_leave_room_for_arrivals() -> None:
    """Head-of-line blocking: a long prompt is prefilled long_prefill_chunk tokens a step, so
    a request that arrives meanwhile is admitted in the next step, beside the next chunk."""
    sched = make_sched(256, 4, budget=64, max_model_len=512, long_prefill_chunk=16)
    runner = FakeRunner(sched)
    sched.add_request(make_req("long", toks(1000, 300), 0, max_tokens=4))
    assert runner.step().seqs == [("long", 16, False)]
    sched.add_request(make_req("s1", toks(10, 5), 1, max_tokens=3))
    sched.add_request(make_req("s2", toks(20, 30), 2, max_tokens=3))
    # s1 fits whole; s2 (a long prompt too) gets the chunk
    assert runner.step().seqs == [("long", 16, False), ("s1", 5, True), ("s2", 16, False)]
    assert runner.step().seqs == [("long", 16, False), ("s1", 1, True), ("s2", 14, True)]
    # several long prompts fill the budget with one chunk each
    for i in range(4):
        sched.add_request(make_req(f"l{i}", toks(2000 + 100 * i, 40), 3 + i, max_tokens=2))
    seqs = runner.step().seqs
    assert [n for _, n, _ in seqs] == [16, 1, 1, 16, 16, 14]  # budget 64: l2 gets what is left


def test_long_prefill_chunk_caps_an_admission_beside_running_decodes() -> None:
    sched = make_sched(256, 4, budget=64, max_model_len=512, long_prefill_chunk=16)
    runner = FakeRunner(sched)
    sched.add_request(make_req("d", toks(10, 4), 0, max_tokens=50))
    runner.step()
    sched.add_request(make_req("long", toks(1000, 100), 1, max_tokens=2))
    assert runner.step().seqs == [("d", 1, True), ("long", 16, False)]


def test_long_prefill_chunk_off_lets_a_long_prompt_hold_the_budget() -> None:
    sched = make_sched(256, 4, budget=64, max_model_len=512, long_prefill_chunk=0)
    runner = FakeRunner(sched)
    sched.add_request(make_req("long", toks(1000, 300), 0, max_tokens=4))
    runner.step()
    sched.add_request(make_req("s1", toks(10, 5), 1, max_tokens=3))
    assert runner.step().seqs == [("long", 64, False)]  # s1 waits for the whole prefill


def test_the_chunk_cap_counts_attention_cost_as_the_context_grows() -> None:
    """With a context cost (1 / 64 here: at 64 tokens of context a token costs twice its
    linears), a chunk holds at most long_prefill_chunk units of cost at its middle token's
    context: 64 / (1 + (ctx + 32) / 64) tokens, never fewer than 32; a cached prefix counts
    as context for the first chunk."""
    config = SchedulerConfig(256, 256, 4096, 4096, long_prefill_chunk=64, context_cost=1 / 64)
    sched = Scheduler(config, BlockManager(1024, 4, True))
    runner = FakeRunner(sched)
    sched.add_request(make_req("long", toks(1000, 1000), 0, max_tokens=1))
    # ctx 0: 64 / 1.5 = 42; ctx 42: 64 / (1 + 74 / 64) = 29 -> 32 (the floor)
    assert [runner.step().seqs for _ in range(3)] == [
        [("long", 42, False)],
        [("long", 32, False)],
        [("long", 32, False)],
    ]
    runner.run_until_idle()
    # the same prompt again: its first 996 tokens are cached (whole blocks), so the one chunk
    # left is the 4-token tail, however high the cost of its context
    sched.add_request(make_req("again", toks(1000, 1000), 1, max_tokens=1))
    assert runner.step().seqs == [("again", 4, True)]
    with pytest.raises(ValueError):
        SchedulerConfig(context_cost=-1.0)
    with pytest.raises(ValueError):
        SchedulerConfig(context_cost=float("nan"))


def test_long_prefill_chunk_defaults_to_an_eighth_of_the_budget() -> None:
    assert SchedulerConfig(max_num_batched_tokens=2048).long_prefill_chunk == 256
    assert SchedulerConfig(max_num_batched_tokens=3).long_prefill_chunk == 1
    with pytest.raises(ValueError):
        SchedulerConfig(long_prefill_chunk=-1)


def test_budget_is_split_over_several_new_prefills() -> None:
    sched = make_sched(64, 4, budget=10)
    runner = FakeRunner(sched)
    for i, n in enumerate([3, 4, 9]):
        sched.add_request(make_req(f"r{i}", toks(100 * i, n), i, max_tokens=2))
    step = runner.step()
    assert step.seqs == [("r0", 3, True), ("r1", 4, True), ("r2", 3, False)]
    assert step.out.num_batched_tokens == 10
    step = runner.step()
    assert step.seqs == [("r0", 1, True), ("r1", 1, True), ("r2", 6, True)]
    assert step.out.num_batched_tokens == 8


# ---- admission order ---------------------------------------------------------------------------


def test_max_num_seqs_caps_running_and_admits_fcfs() -> None:
    sched = make_sched(64, 4, max_num_seqs=2)
    runner = FakeRunner(sched)
    for i, (rid, max_tokens) in enumerate([("a", 1), ("b", 3), ("c", 2), ("d", 1), ("e", 1)]):
        sched.add_request(make_req(rid, toks(10 * i, 4), i, max_tokens=max_tokens))
    steps = []
    while sched.has_unfinished():
        step = runner.step()
        steps.append((step.seqs, ids(step.finished)))
        assert len(sched.running) <= 2
    assert steps == [
        ([("a", 4, True), ("b", 4, True)], ["a"]),
        ([("b", 1, True), ("c", 4, True)], []),
        ([("b", 1, True), ("c", 1, True)], ["b", "c"]),
        ([("d", 4, True), ("e", 4, True)], ["d", "e"]),
    ]


def test_priority_lower_value_first_ties_by_arrival() -> None:
    sched = make_sched(64, 4, max_num_seqs=1)
    runner = FakeRunner(sched)
    for seq, (rid, prio) in enumerate([("p5", 5), ("p0a", 0), ("p1", 1), ("p0b", 0), ("p1b", 1)]):
        sched.add_request(make_req(rid, toks(10 * seq, 3), seq, max_tokens=1, priority=prio))
    order = []
    while sched.has_unfinished():
        order += [rid for rid, _, _ in runner.step().seqs]
    assert order == ["p0a", "p0b", "p1", "p1b", "p5"]


def test_late_high_priority_arrival_overtakes_the_waiting_queue() -> None:
    sched = make_sched(64, 4, max_num_seqs=1)
    runner = FakeRunner(sched)
    sched.add_request(make_req("a", toks(0, 3), 0, max_tokens=2))
    sched.add_request(make_req("b", toks(10, 3), 1, max_tokens=1))
    assert runner.step().seqs == [("a", 3, True)]
    sched.add_request(make_req("urgent", toks(20, 3), 2, max_tokens=1, priority=-1))
    # a keeps its seat (no preemption for priority alone), then urgent goes before b
    assert runner.step().seqs == [("a", 1, True)]
    assert runner.step().seqs == [("urgent", 3, True)]
    assert runner.step().seqs == [("b", 3, True)]


# ---- preemption ----------------------------------------------------------------------------------


def test_preemption_by_recompute_keeps_generated_tokens() -> None:
    # 8 blocks of 4 tokens; a, b, c each take a block per 4 tokens until the pool runs out.
    sched = make_sched(8, 4, budget=8, prefix_caching=False)
    runner = FakeRunner(sched)
    a, b, c = (make_req(r, toks(10 * i, 4), i, max_tokens=8) for i, r in enumerate("abc"))
    d = make_req("d", toks(50, 4), 3, max_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)
    steps = [runner.step().seqs for _ in range(6)]
    assert steps[:2] == [
        [("a", 4, True), ("b", 4, True)],
        [("a", 1, True), ("b", 1, True), ("c", 4, True)],
    ]
    assert [len(sched.bm.block_table(r)) for r in "abc"] == [3, 3, 2]
    assert sched.bm.num_used_blocks() == 8
    sched.add_request(d)
    before = list(c.output_token_ids)
    assert len(before) == 5 and c.num_tokens == 9

    # Step 7: c must grow to a third block; none is left, c is the latest arrival.
    out = sched.schedule()
    check_output(sched, out)
    assert trace(out) == [("a", 1, True), ("b", 1, True)]  # nothing admitted, though c fits
    assert out.preempted == [c]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert sched.bm.block_table("c") == [] and sched.bm.num_free_blocks() == 2
    assert sched.running == [a, b] and sched.waiting.peek() is c  # ahead of d
    sched.update(out, {"a": 1, "b": 1})

    # Step 8: a and b finish; c is readmitted and recomputes prompt + generated tokens from 0.
    step = runner.step()
    assert step.seqs == [("a", 1, True), ("b", 1, True), ("c", 6, False)]
    assert step.finished == [a, b]
    assert runner.step().seqs == [("c", 3, True), ("d", 4, True)]
    runner.run_until_idle()
    assert c.output_token_ids[:5] == before
    assert c.output_token_ids == before + runner.sampled["c"][5:]
    assert len(c.output_token_ids) == 8 and c.finish_reason is FinishReason.LENGTH
    assert c.all_token_ids == c.prompt_token_ids + c.output_token_ids
    assert len(d.output_token_ids) == 2
    assert sched.bm.num_used_blocks() == 0


def test_readmitted_request_reuses_its_cached_blocks() -> None:
    sched = make_sched(8, 4, budget=8)
    runner = FakeRunner(sched)
    a, b, c = (make_req(r, toks(10 * i, 4), i, max_tokens=8) for i, r in enumerate("abc"))
    for r in (a, b, c):
        sched.add_request(r)
    for _ in range(6):
        runner.step()
    step = runner.step()
    assert step.preempted == ["c"] and step.seqs == [("a", 1, True), ("b", 1, True)]
    assert sched.bm.num_cached_blocks() == 2  # c's two full blocks stay in the prefix cache
    # Step 8: c needs its 2 cached blocks + 1 new = 3 > 2 allocatable, so it waits.
    step = runner.step()
    assert step.seqs == [("a", 1, True), ("b", 1, True)] and step.finished == [a, b]
    assert runner.step().seqs == [("c", 1, True)]  # 8 of 9 tokens come from the cache
    assert c.num_cached_tokens == 0  # the hit counted at first scheduling only
    runner.run_until_idle()
    assert len(c.output_token_ids) == 8


def test_victim_is_the_lowest_priority_running_request() -> None:
    sched = make_sched(4, 4)
    runner = FakeRunner(sched)
    low = make_req("low", toks(0, 4), 0, max_tokens=8, priority=5)
    high = make_req("high", toks(10, 7), 1, max_tokens=8, priority=0)
    sched.add_request(low)
    assert runner.step().seqs == [("low", 4, True)]
    sched.add_request(high)  # admitted after low, yet it outranks low
    assert runner.step().seqs == [("low", 1, True), ("high", 7, True)]
    assert runner.step().seqs == [("high", 1, True), ("low", 1, True)]  # in priority order
    # high needs a third block while low's second still has room: low goes, not high.
    step = runner.step()
    assert step.preempted == ["low"]
    assert step.seqs == [("high", 1, True)]
    runner.run_until_idle()
    assert len(low.output_token_ids) == len(high.output_token_ids) == 8
    assert low.num_preemptions == 1 and high.num_preemptions == 0


def test_prompt_filling_the_whole_pool_completes_in_chunks() -> None:
    # 8 blocks of 4 = 32 slots = max_model_len; a needs them all, b arrives alongside.
    sched = make_sched(8, 4, budget=8, max_model_len=32)
    runner = FakeRunner(sched)
    a = make_req("a", toks(100, 28), 0, max_tokens=4)
    b = make_req("b", toks(200, 4), 1, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    steps = []
    while sched.has_unfinished():
        step = runner.step()
        steps.append((step.seqs, step.preempted))
    assert steps == [
        ([("a", 8, False)], []),
        ([("a", 8, False)], []),
        ([("a", 8, False)], []),
        ([("a", 4, True), ("b", 4, True)], []),
        ([("a", 1, True)], ["b"]),  # a's 29th token needs the 8th block, b's
        ([("a", 1, True)], []),
        ([("a", 1, True)], []),
        ([("b", 5, True)], []),  # b recomputes its prompt and first token
        ([("b", 1, True)], []),
    ]
    assert len(a.output_token_ids) == 4 and a.finish_reason is FinishReason.LENGTH
    assert len(b.output_token_ids) == 3
    assert sched.bm.num_used_blocks() == 0


# ---- waiting queue bound and abort ---------------------------------------------------------------


def test_waiting_queue_is_bounded_and_abort_frees_room() -> None:
    sched = make_sched(max_waiting=2)
    sched.add_request(make_req("a", [1, 3], 0))
    sched.add_request(make_req("b", [1, 3], 1))
    with pytest.raises(QueueFullError):
        sched.add_request(make_req("c", [1, 3], 2))
    assert "c" not in sched.requests and len(sched.waiting) == 2
    assert ids(sched.abort(["a"])) == ["a"]
    sched.add_request(make_req("c", [1, 3], 3))
    with pytest.raises(QueueFullError):
        sched.add_request(make_req("d", [1, 3], 4))
    FakeRunner(sched).step()  # both admitted: the queue empties
    sched.add_request(make_req("d", [1, 3], 5))
    sched.add_request(make_req("e", [1, 3], 6))
    assert len(sched.waiting) == 2 and len(sched.running) == 2


def test_abort_running_frees_blocks_at_once() -> None:
    sched = make_sched(16, 4)
    runner = FakeRunner(sched)
    a = make_req("a", toks(10, 10), 0)
    b = make_req("b", toks(30, 5), 1)
    sched.add_request(a)
    sched.add_request(b)
    runner.step()
    assert sched.bm.num_used_blocks() == 5  # 3 + 2
    assert sched.abort(["a"]) == [a]
    assert sched.bm.num_used_blocks() == 2 and sched.bm.block_table("a") == []
    assert sched.bm.num_cached_blocks() == 2  # a's two full blocks stay cached
    assert a.status is RequestStatus.FINISHED and a.finish_reason is FinishReason.ABORT
    assert sched.running == [b] and "a" not in sched.requests
    assert sched.abort(["a", "nope"]) == []  # finished or unknown: no-op
    assert sched.bm.num_used_blocks() == 2 and sched.running == [b]
    assert runner.step().seqs == [("b", 1, True)]


def test_abort_waiting_removes_it() -> None:
    sched = make_sched(16, 4, max_num_seqs=1)
    runner = FakeRunner(sched)
    a, b, c = (make_req(r, toks(10 * i, 3), i, max_tokens=1) for i, r in enumerate("abc"))
    for r in (a, b, c):
        sched.add_request(r)
    assert sched.abort(["b"]) == [b]
    assert b.finish_reason is FinishReason.ABORT and len(sched.waiting) == 2
    order = []
    while sched.has_unfinished():
        order += [rid for rid, _, _ in runner.step().seqs]
    assert order == ["a", "c"] and b.output_token_ids == []


def test_abort_between_schedule_and_update_is_skipped() -> None:
    sched = make_sched(16, 4)
    a = make_req("a", toks(10, 5), 0)
    b = make_req("b", toks(20, 5), 1)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort(["a"])
    assert sched.update(out, {"b": 7}) == []  # no token for a, and none needed
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert b.output_token_ids == [7] and sched.running == [b]
    sched.bm.check_invariants()


def test_aborted_waiting_id_can_be_reused() -> None:
    sched = make_sched(16, 4)
    runner = FakeRunner(sched)
    old = make_req("x", toks(10, 3), 0, max_tokens=1)
    new = make_req("x", toks(50, 5), 1, max_tokens=2)
    sched.add_request(old)
    sched.abort(["x"])
    sched.add_request(new)
    assert len(sched.waiting) == 1
    step = runner.step()
    assert [s.request for s in step.out.seqs] == [new]
    assert old.is_finished and old.output_token_ids == []
    runner.run_until_idle()
    assert len(new.output_token_ids) == 2 and "x" not in sched.requests


# ---- stop conditions -----------------------------------------------------------------------------


def generate(req: Request, tokens: list[int], max_model_len: int = 1024) -> list[int]:
    """Feed ``tokens`` one per step until the request finishes; returns what it kept."""
    sched = make_sched(64, 4, max_model_len=max_model_len)
    runner = FakeRunner(sched)
    sched.add_request(req)
    for t in tokens:
        runner.step({req.request_id: t})
        if req.is_finished:
            break
    return req.output_token_ids


def test_eos_stops() -> None:
    r = make_req("r", [5, 6, 7], 0)
    assert generate(r, [9, 9, EOS, 9]) == [9, 9, EOS]
    assert r.finish_reason is FinishReason.STOP and r.stop_token_id == EOS


def test_ignore_eos_runs_to_max_tokens() -> None:
    r = make_req("r", [5, 6, 7], 0, max_tokens=4, ignore_eos=True)
    assert generate(r, [EOS, EOS, 9, EOS, 9]) == [EOS, EOS, 9, EOS]
    assert r.finish_reason is FinishReason.LENGTH and r.stop_token_id is None


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    r = make_req("r", [5, 6, 7], 0, stop_token_ids=[42], ignore_eos=True)
    assert generate(r, [9, EOS, 42, 9]) == [9, EOS, 42]
    assert r.finish_reason is FinishReason.STOP and r.stop_token_id == 42


def test_min_tokens_suppresses_eos_and_stop_token_ids() -> None:
    r = make_req("r", [5, 6, 7], 0, min_tokens=3, stop_token_ids=[42])
    assert generate(r, [EOS, 42, 42, 9]) == [EOS, 42, 42]
    assert r.finish_reason is FinishReason.STOP and r.stop_token_id == 42
    r = make_req("r", [5, 6, 7], 0, min_tokens=3)
    assert generate(r, [EOS, EOS, 9, EOS]) == [EOS, EOS, 9, EOS]
    assert r.finish_reason is FinishReason.STOP


def test_max_tokens_gives_length() -> None:
    r = make_req("r", [5, 6, 7], 0, max_tokens=3)
    assert generate(r, [9] * 10) == [9, 9, 9]
    assert r.finish_reason is FinishReason.LENGTH and r.stop_token_id is None


def test_max_model_len_gives_length() -> None:
    r = make_req("r", [5, 6, 7, 8, 9, 10], 0, max_tokens=100)
    assert generate(r, [9] * 10, max_model_len=8) == [9, 9]
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 8


def test_stop_token_on_the_last_allowed_token_is_stop() -> None:
    r = make_req("r", [5, 6, 7], 0, max_tokens=2)
    assert generate(r, [9, EOS]) == [9, EOS]
    assert r.finish_reason is FinishReason.STOP


# ---- prefix cache through the scheduler ----------------------------------------------------------


def test_second_request_with_a_shared_prefix_computes_only_the_rest() -> None:
    sched = make_sched(32, 16)
    runner = FakeRunner(sched)
    prefix = toks(1000, 48)
    first = make_req("first", prefix + toks(5000, 10), 0, max_tokens=1)
    sched.add_request(first)
    step = runner.step()
    assert step.seqs == [("first", 58, True)]
    first_blocks = list(step.out.seqs[0].block_table)
    assert first.is_finished and first.num_cached_tokens == 0
    second = make_req("second", prefix + toks(7000, 7), 1, max_tokens=1)
    sched.add_request(second)
    out = sched.schedule()
    assert trace(out) == [("second", 7, True)]
    assert second.num_computed_tokens == 48 and second.num_cached_tokens == 48
    assert out.seqs[0].block_table[:3] == first_blocks[:3]
    assert out.seqs[0].block_table[3] != first_blocks[3]  # the partial block is not shared
    assert sched.bm.hit_stats() == (58 + 55, 48)


def test_prompt_logprobs_bypass_the_prefix_cache() -> None:
    sched = make_sched(32, 16)
    runner = FakeRunner(sched)
    prompt = toks(1000, 40)
    sched.add_request(make_req("a", prompt, 0, max_tokens=1))
    runner.step()
    b = make_req("b", prompt, 1, max_tokens=1, prompt_logprobs=0)
    sched.add_request(b)
    assert runner.step().seqs == [("b", 40, True)]
    assert b.num_cached_tokens == 0


@pytest.mark.parametrize(("prompt_len", "used_at_admission", "used_after_decodes"), [
    (40, 2 + 4, 2 + 4),  # 2 full blocks shared; each sibling's third block holds 8 + 3 tokens
    (48, 3 + 3, 3 + 3 + 4),  # the last full block is recomputed (its logits are needed)
])  # fmt: skip
def test_n_siblings_share_the_full_prompt_blocks(
    prompt_len: int, used_at_admission: int, used_after_decodes: int
) -> None:
    sched = make_sched(32, 16)
    runner = FakeRunner(sched)
    prompt = toks(1000, prompt_len)
    sibs = [make_req(f"p#{i}", prompt, i, max_tokens=8) for i in range(4)]
    for r in sibs:
        sched.add_request(r)
    rest = prompt_len - 32
    assert runner.step().seqs == [("p#0", prompt_len, True)] + [
        (f"p#{i}", rest, True) for i in (1, 2, 3)
    ]
    assert [r.num_cached_tokens for r in sibs] == [0, 32, 32, 32]
    assert sched.bm.num_used_blocks() == used_at_admission
    tables = [sched.bm.block_table(r.request_id) for r in sibs]
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 4
    for _ in range(3):
        assert runner.step().seqs == [(r.request_id, 1, True) for r in sibs]
    assert sched.bm.num_used_blocks() == used_after_decodes
    assert all(t[:2] == tables[0][:2] for t in tables)
    runner.run_until_idle()
    assert sched.bm.num_used_blocks() == 0


# ---- randomized simulation -----------------------------------------------------------------------


def test_random_simulation_keeps_every_invariant() -> None:
    rng = random.Random(1234)
    num_blocks, bs, max_len = 32, 4, 64  # capacity 128 >= max_model_len, as the engine ensures
    sched = make_sched(
        num_blocks, bs, budget=24, max_num_seqs=6, max_waiting=12, max_model_len=max_len
    )
    runner = FakeRunner(sched)
    prefixes = [toks(3000 + 100 * i, rng.randint(4, 20)) for i in range(3)]
    seq = itertools.count()
    reqs: list[Request] = []
    stats = defaultdict(int)

    def add() -> None:
        n = rng.randint(1, 40)
        prompt = [rng.randint(3, 99) for _ in range(n)]
        if rng.random() < 0.4:
            prompt = (rng.choice(prefixes) + prompt)[:48]
        max_tokens = rng.randint(1, min(20, max_len - len(prompt)))
        r = make_req(
            f"r{len(reqs)}",
            prompt,
            next(seq),
            max_tokens=max_tokens,
            priority=rng.randint(0, 2),
            min_tokens=rng.choice([0, 0, 1, max_tokens]),
            ignore_eos=rng.random() < 0.2,
        )
        try:
            sched.add_request(r)
        except QueueFullError:
            stats["full"] += 1
            return
        reqs.append(r)

    def step() -> None:
        busy = sched.has_unfinished()
        out = sched.schedule()
        check_output(sched, out)
        assert out.is_empty != busy
        stats["preempted"] += len(out.preempted)
        sampled = {}
        for s in out.seqs:
            if s.samples:
                t = EOS if rng.random() < 0.1 else rng.randint(3, 99)
                sampled[s.request.request_id] = t
                runner.sampled[s.request.request_id].append(t)
        if rng.random() < 0.05 and sched.requests:  # abort after schedule, before update
            stats["aborted"] += len(sched.abort([rng.choice(sorted(sched.requests))]))
        sched.update(out, sampled)
        sched.bm.check_invariants()

    for _ in range(1000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            add()
        if rng.random() < 0.05 and sched.requests:
            stats["aborted"] += len(sched.abort([rng.choice(sorted(sched.requests))]))
        step()
    leftover = sorted(sched.requests)
    sched.abort(leftover[::2])
    while sched.has_unfinished():
        step()
        stats["drain"] += 1
        assert stats["drain"] < 5000

    for r in reqs:
        assert r.is_finished
        if r.finish_reason is FinishReason.ABORT:
            assert r.output_token_ids == runner.sampled[r.request_id][: len(r.output_token_ids)]
            continue
        assert r.output_token_ids == runner.sampled[r.request_id]  # kept across preemptions
        n = len(r.output_token_ids)
        if r.finish_reason is FinishReason.LENGTH:
            assert n == r.max_tokens or r.num_tokens == max_len
        else:
            assert r.finish_reason is FinishReason.STOP and n >= r.params.min_tokens
            assert r.stop_token_id == r.output_token_ids[-1] == EOS and not r.params.ignore_eos
    assert sched.bm.num_used_blocks() == 0
    assert sched.bm.num_free_blocks() + sched.bm.num_cached_blocks() == num_blocks
    assert sched.bm.num_allocatable_blocks() == num_blocks
    assert not sched.requests and not sched.running and len(sched.waiting) == 0
    # the workload did exercise what it is meant to
    assert stats["preempted"] > 0 and stats["aborted"] > 0 and stats["full"] > 0
    assert sched.bm.hit_stats()[1] > 0
    assert any(r.num_preemptions and r.finish_reason is not FinishReason.ABORT for r in reqs)
