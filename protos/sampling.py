"""Per-request sampling parameters: the one in-process type for them (defaults and validation
live here and nowhere else).

A public request becomes a ``SamplingParams`` in ``protos.requests``; it crosses to the engine
as ``ipc_pb2.SamplingParams`` (``protos.convert.params_to_proto``), and the engine rebuilds and
so re-validates it with ``protos.convert.params_from_proto``; the sampler reads the dataclass.
This module does not import the generated code, so the engine's core can use it without
loading protobuf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from protos.errors import InvalidRequestError

# Limits that keep one request from eating the engine; shown to clients by GetModelInfo.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
# Stop ids the server adds to a client's (a chat template's end-of-turn token): allowed on top
# of MAX_STOP_TOKEN_IDS, which the gateway checks on the client's list alone.
ADDED_STOP_TOKEN_IDS = 8
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024
MAX_SEED = 2**63 - 1
# Bounds on a structured-output spec: the engine compiles it while the request is added, so an
# unbounded one would stall every other request's step.
MAX_SPEC_CHARS = 100_000
MAX_CHOICES = 256


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidRequestError(msg)


@dataclass(slots=True, frozen=True)
class StructuredOutput:
    """What a request's output must match: exactly one of a JSON schema (JSON text, or a dict
    that is serialized here), any JSON object, a regex (matched in full), one of a list of
    strings, or a Lark grammar in llguidance's dialect. Only the form is checked here; the
    engine compiles the spec against its tokenizer when the request is added and raises
    ``InvalidRequestError`` with the compiler's message for a bad schema, regex or grammar."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):  # frozen: set through object
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.choice is not None and not isinstance(self.choice, str):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k)]
        kinds += ["json_object"] if self.json_object is True else []
        if len(kinds) != 1:
            raise InvalidRequestError(
                "structured_output needs exactly one of json_schema, json_object, regex, "
                f"choice, grammar; got {kinds or 'none'}",
                param="structured_output",
            )
        self._check_kind(kinds[0])

    def _check_kind(self, kind: str) -> None:
        if kind == "json_object":
            return
        if kind == "choice":
            _check_spec(
                all(isinstance(c, str) and c for c in self.choice),
                "choice must be a list of non-empty strings",
            )
            _check_spec(len(self.choice) <= MAX_CHOICES, f"at most {MAX_CHOICES} choices")
            _check_spec(sum(map(len, self.choice)) <= MAX_SPEC_CHARS, _too_long("choice"))
            return
        text = getattr(self, kind)
        _check_spec(isinstance(text, str), f"{kind} must be a string")
        _check_spec(len(text) <= MAX_SPEC_CHARS, _too_long(kind))
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise InvalidRequestError(
                    f"json_schema is not valid JSON: {e}", param="structured_output"
                ) from None
            _check_spec(isinstance(schema, (dict, bool)), "json_schema must be a JSON object")

    @property
    def kind(self) -> str:
        """Which of the five this spec is."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k))


def _check_spec(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidRequestError(msg, param="structured_output")


def _too_long(kind: str) -> str:
    return f"{kind} is longer than {MAX_SPEC_CHARS} characters"


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's output (names and meanings follow vLLM's).

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``max_tokens=None`` means "until the context is full". ``logprobs=k`` returns the sampled
    token's logprob plus the ``k`` most likely tokens' (k may be 0); ``prompt_logprobs`` the same
    for every prompt position after the first.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constrains the output to a schema, regex, choice or grammar (the engine masks the logits).
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            _int(self.n) and 1 <= self.n <= MAX_N,
            f"n must be in [1, {MAX_N}], got {self.n!r}",
        )
        _check(
            self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be >= 1, got {self.max_tokens!r}",
        )
        _check(
            _int(self.min_tokens) and self.min_tokens >= 0,
            f"min_tokens must be >= 0, got {self.min_tokens!r}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(
            _finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
            f"temperature must be in [0, 100], got {self.temperature!r}",
        )
        _check(
            _finite(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _int(self.top_k) and self.top_k >= -1,
            f"top_k must be -1, 0 (off) or >= 1, got {self.top_k!r}",
        )
        _check(
            _finite(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        _check(
            _finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}",
        )
        _check(
            _finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}",
        )
        _check(
            _finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}",
        )
        _check(
            self.seed is None or (_int(self.seed) and 0 <= self.seed <= MAX_SEED),
            f"seed must be in [0, 2^63-1], got {self.seed!r}",
        )
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop strings must be non-empty strings",
        )
        _check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS + ADDED_STOP_TOKEN_IDS,
            f"at most {MAX_STOP_TOKEN_IDS + ADDED_STOP_TOKEN_IDS} stop_token_ids, "
            f"got {len(self.stop_token_ids)}",
        )
        _check(
            all(_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
        )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(
                v is None or (_int(v) and 0 <= v <= MAX_LOGPROBS),
                f"{name} must be in [0, {MAX_LOGPROBS}], got {v!r}",
            )
        if self.logit_bias:
            _check(
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"at most {MAX_LOGIT_BIAS} logit_bias entries",
            )
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            _check(all(k >= 0 for k in self.logit_bias), "logit_bias keys must be token ids >= 0")
            _check(
                all(_finite(v) and -100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            )
        if self.top_k == -1:
            self.top_k = 0
        _check(
            self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
            "structured_output must be a StructuredOutput",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the params must exist in the model's vocabulary."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if self.logit_bias:
            bad += [t for t in self.logit_bias if t >= vocab_size]
        _check(
            not bad, f"token ids out of the vocabulary (size {vocab_size}): {sorted(set(bad))[:8]}"
        )


def _finite(x: object) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return float("-inf") < float(x) < float("inf")
    except OverflowError:  # an int too large for a float
        return False


def _int(x: object) -> bool:
    """An integer, and not a bool (True would pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)
