"""A request's life inside the engine: its tokens, how many are computed, and why it ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch

from protos.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits again and recomputes from its tokens
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context is full
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched (decided outside the engine)
    ABORT = "abort"


class GrammarMatcher(Protocol):
    """A structured-output request's grammar state (an ``llguidance.LLMatcher``; the engine
    makes it, this layer only advances it and asks whether it is done)."""

    def consume_token(self, token_id: int) -> bool: ...

    def is_stopped(self) -> bool: ...


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. ``n > 1`` becomes n Requests that share the prompt (and its blocks)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never more than the context leaves
    eos_token_ids: frozenset[int]
    arrival_time: float
    arrival_seq: int  # tie-break for FCFS order (and priority among equals)
    priority: int = 0  # lower runs first, as in vLLM
    generator: torch.Generator | None = None
    salt: bytes | None = None
    # Set for structured output: it has consumed exactly output_token_ids. Preemption keeps the
    # output tokens (the recompute is of KV only), so it keeps the matcher as it is too.
    matcher: GrammarMatcher | None = None
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1 = not yet scheduled)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_seq)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.matcher is not None:
            # The sampler's mask allowed only tokens the grammar accepts; a refusal puts the
            # matcher in its error state, which is_stopped() reports, ending the request.
            self.matcher.consume_token(token_id)

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Decide, after a token was appended, whether the request is done."""
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.stop_token_id = last
                return FinishReason.STOP
            if last in self.params.stop_token_ids:
                self.stop_token_id = last
                return FinishReason.STOP
        # A grammar that admits no further token is complete: stop now rather than spend a
        # step on the EOS the mask would force (min_tokens cannot outlast the grammar).
        if self.matcher is not None and self.matcher.is_stopped():
            return FinishReason.STOP
        if n_out >= self.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None
