"""Continuous batching without phases: every request has computed tokens catching up to its
tokens, so chunked prefill and mixed prefill + decode steps fall out of one token budget.

``schedule() -> SchedulerOutput`` then ``update(output, sampled)``: the engine step is these
two calls around the model runner, and tests can drive the scheduler with made-up tokens.
"""

from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass, field

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.request import FinishReason, Request, RequestStatus
from protos.errors import QueueFullError


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 4096  # bound of the waiting queue; past it add_request raises QueueFullError
    max_model_len: int = 2048
    # A prompt is prefilled at most this many tokens per step, so one step never holds the
    # engine for a whole long prefill: requests that arrive meanwhile are admitted after one
    # chunk, and running ones get their next token. None: an eighth of max_num_batched_tokens;
    # 0: off (a prompt takes all the budget it can, and arrivals wait for its step to end).
    long_prefill_chunk: int | None = None
    # What a prompt token's attention adds to its cost per token of context before it, in
    # units of the token's linear layers (ModelConfig.attention_cost_per_context_token): the
    # chunk cap counts cost, not tokens, so a chunk late in a long prompt (each token attends
    # to thousands) is shorter and its step no longer than an early one's. 0: tokens only.
    context_cost: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.long_prefill_chunk is None:
            self.long_prefill_chunk = max(1, self.max_num_batched_tokens // 8)
        if self.long_prefill_chunk < 0:
            raise ValueError("long_prefill_chunk must be >= 0")
        if not self.context_cost >= 0:
            raise ValueError("context_cost must be >= 0")


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # compute all_token_ids[num_computed : num_computed + num_new_tokens]
    block_table: list[int]  # the manager's live list: append-only while the request runs

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class WaitingQueue:
    """Priority queue by (priority, arrival); O(log n) push/pop, O(1) lazy removal."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, int], int, Request]] = []
        self._pushes = 0  # tie-break so the heap never compares Request objects
        # id -> the queued object: an id may be reused after an abort, and the aborted request's
        # stale heap entry must not pass for the new one.
        self._live: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self._live)

    def push(self, req: Request) -> None:
        self._pushes += 1
        heapq.heappush(self._heap, (req.sort_key, self._pushes, req))
        self._live[req.request_id] = req

    def peek(self) -> Request | None:
        while self._heap and self._live.get(self._heap[0][2].request_id) is not self._heap[0][2]:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Request:
        req = self.peek()
        assert req is not None
        heapq.heappop(self._heap)
        del self._live[req.request_id]
        return req

    def remove(self, req: Request) -> None:
        if self._live.get(req.request_id) is req:
            del self._live[req.request_id]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting = WaitingQueue()
        # Sorted by sort_key, so the requests after running[i] are exactly those it outranks.
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # -- requests in and out ---------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"waiting queue is full ({self.config.max_waiting} requests); retry later"
            )
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def abort(self, request_ids: list[str]) -> list[Request]:
        """Finish the named requests at once and free their blocks; unknown ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, FinishReason.ABORT)
            aborted.append(req)
        return aborted

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req.num_tokens, req.num_computed_tokens, budget)
            if not self._reserve(req, num_new, i, out):
                continue  # req itself was preempted; running[i] is now the next request
            out.seqs.append(ScheduledSeq(req, num_new, self.bm.block_table(req.request_id)))
            budget -= num_new
            i += 1
        if not out.preempted:  # admitting while preempting would just thrash
            budget = self._admit(budget, out)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _chunk(self, num_tokens: int, num_computed: int, budget: int) -> int:
        """Tokens of a request to compute this step: all it has left within the budget, but at
        most long_prefill_chunk, so that a long prompt does not hold every other request (new
        ones waiting for admission, running ones for their next token) for the seconds a
        whole budget of prefill takes; its chunks leave room for them in every step. With a
        context cost, the cap is on cost: a token after ``c`` cached ones costs
        ``1 + context_cost * c``, so the chunk shrinks as the prompt's context grows (never
        below 32 tokens, or the cap)."""
        n = min(num_tokens - num_computed, budget)
        cap = self.config.long_prefill_chunk
        if not cap:
            return n
        k = self.config.context_cost
        if k:  # the chunk's tokens at the context of its middle
            cap = max(min(32, cap), int(cap / (1 + k * (num_computed + cap / 2))))
        return min(n, cap)

    def _reserve(self, req: Request, num_new: int, i: int, out: SchedulerOutput) -> bool:
        """Find blocks for req's next tokens, preempting the lowest-priority later request."""
        target = req.num_computed_tokens + num_new
        while not self.bm.allocate(req.request_id, req.all_token_ids, target, salt=req.salt):
            victim = max(self.running[i:], key=lambda r: r.sort_key)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        now = time.monotonic()
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.peek()
            if req is None:
                break
            cached, num_cached = [], 0
            if req.params.prompt_logprobs is None:  # prompt logprobs need every position computed
                cached, num_cached = self.bm.find_cached_prefix(req.all_token_ids, req.salt)
            num_new = self._chunk(req.num_tokens, num_cached, budget)
            if not self.bm.allocate(
                req.request_id, req.all_token_ids, num_cached + num_new, cached, req.salt
            ):
                break  # head of line waits; FCFS order is kept
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = now
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            out.seqs.append(ScheduledSeq(req, num_new, self.bm.block_table(req.request_id)))
            budget -= num_new
        return budget

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.push(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; returns those that finished this step."""
        finished = []
        for s in out.seqs:
            req = s.request
            if req.is_finished:  # aborted between schedule and update
                continue
            samples = s.samples
            req.num_computed_tokens += s.num_new_tokens
            if not samples:
                continue
            req.append_token(sampled[req.request_id])
            reason = req.check_stop(self.config.max_model_len)
            if reason is not None:
                self._finish(req, reason)
                finished.append(req)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.bm.free(req.request_id)
        del self.requests[req.request_id]
