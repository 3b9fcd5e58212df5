"""OpenAI's request bodies (Chat Completions, Completions) and vLLM's extra sampling fields, as
pydantic models, and their mapping onto the internal request: the sampling fields go through
``protos.requests.sampling_params`` and ``internal_request``, the same functions the gRPC front
uses, so both fronts validate and default alike.

Types are checked strictly (a string where a number belongs is a 400, as OpenAI answers); ranges
are ``SamplingParams``'s. Fields that no pagedserve part implements are refused with a message
that says so (``UNSUPPORTED``); fields this module does not know are ignored, as vLLM does, so
clients that send newer OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from gateway.openai_structured import structured_output_of
from protos.errors import InvalidRequestError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.requests import (
    Limits,
    conversation_of,
    internal_request,
    sampling_params,
    set_ids_prompt,
    set_text_prompt,
)

Number = StrictInt | StrictFloat
# Integers that travel in 32-bit message fields: bounded here, so a huge value is a 400 that
# names the field (ranges within these are SamplingParams's to check).
UInt32 = Annotated[StrictInt, Field(le=2**32 - 1)]
Int32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool | None = None  # (vLLM's continuous_usage_stats: not implemented)


class _Sampling(_Body):
    """Fields both endpoints share: OpenAI's, then vLLM's extras (top level or ``extra_body``,
    which the official clients merge into the top level)."""

    model: StrictStr | None = None
    stream: StrictBool | None = None  # OpenAI's optional fields may be sent as null
    stream_options: StreamOptions | None = None
    max_tokens: UInt32 | None = None
    n: UInt32 | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None
    response_format: dict[str, Any] | None = None  # (vLLM's structured_outputs: extra)
    # vLLM's extra sampling fields
    top_k: Int32 | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: UInt32 | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    priority: Int32 | None = None
    request_id: StrictStr | None = None

    def sampling_fields(self) -> dict[str, Any]:
        """The fields under SamplingParams's names, unset ones left out."""
        out: dict[str, Any] = {}
        for name in _PLAIN:
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if isinstance(self.stop, str):
            out["stop"] = [self.stop]
        elif self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    bias[int(k)] = v
                except ValueError:
                    raise InvalidRequestError(
                        f"logit_bias keys must be token ids, got {k[:32]!r}"
                    ) from None
            out["logit_bias"] = bias
        so = structured_output_of(self.model_extra or {}, self.response_format)
        if so is not None:
            out["structured_output"] = so
        return out

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, ok in UNSUPPORTED.items():
            if name in extra and not ok(extra[name]):
                raise InvalidRequestError(f"{name} is not supported by this server", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_PLAIN = (
    "max_tokens",
    "n",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def _absent(v: object) -> bool:
    return v is None or v == [] or v == {}


# Fields pagedserve has no part for: a value the predicate accepts means "not used" and passes.
UNSUPPORTED = {
    "tools": _absent,
    "functions": _absent,
    "tool_choice": lambda v: v is None or v == "none",
    "function_call": lambda v: v is None or v == "none",
    "suffix": lambda v: v is None or v == "",
    "prompt_logprobs": lambda v: v is None,
    "audio": _absent,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _absent,
    "lora_request": _absent,
}


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None

    def text(self, i: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{i}].content[{j}]: only text parts are supported "
                    f"(got type {str(part.get('type'))[:32]!r})",
                    "messages",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: UInt32 | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool | None = None
    echo: StrictBool | None = None

    def internal(
        self, request_id: str, info: ipc_pb2.EngineInfo, limits: Limits
    ) -> ipc_pb2.TextRequest:
        self.refuse_unsupported()
        fields = self.sampling_fields()
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        if self.echo:
            raise InvalidRequestError("echo is not supported on chat completions", "echo")
        sp = sampling_params(fields, info.vocab_size)
        out = internal_request(request_id, sp, limits, priority=self.priority or 0)
        turns = [(m.role, m.text(i)) for i, m in enumerate(self.messages)]
        add = self.add_generation_prompt is not False
        out.chat.CopyFrom(conversation_of(turns, add, limits))
        return out


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    add_special_tokens: StrictBool | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def internal(
        self, request_id: str, prompt: str | list[int], info: ipc_pb2.EngineInfo, limits: Limits
    ) -> ipc_pb2.TextRequest:
        self.refuse_unsupported()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequestError("best_of other than n is not supported", "best_of")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs is not supported (it needs prompt logprobs)", "echo"
            )
        fields = self.sampling_fields()
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        sp = sampling_params(fields, info.vocab_size)
        out = internal_request(
            request_id, sp, limits, echo=bool(self.echo), priority=self.priority or 0
        )
        try:
            if isinstance(prompt, str):
                set_text_prompt(out, prompt, limits, self.add_special_tokens is not False)
            else:
                set_ids_prompt(out, prompt, info)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), "prompt") from None
        return out


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]
