"""Public requests -> the internal ``TextRequest``: the mapping the front ends share.

The gRPC front (``gateway/service.py``) calls ``text_request``. It takes the sampling fields
the client set as a dict under their public names (vLLM's, which ``SamplingParams`` also
uses; ``grpc_sampling_fields``), makes the dataclass from them (``sampling_params``) and the
message from that (``internal_request``), then adds the prompt (``set_text_prompt``,
``set_ids_prompt``, ``conversation_of``). The OpenAI HTTP front (``gateway/openai_protocol.py``)
calls the same functions with the fields of its JSON body. Validation and defaults are the dataclass's (``protos.sampling``);
what is checked here is only what it cannot know (the served model's vocabulary and context,
the server's limits, how the public API encodes "unset").

Raises ``InvalidRequestError`` (-> INVALID_ARGUMENT) with a message that names the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protos.convert import params_to_proto
from protos.errors import InvalidRequestError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    StructuredOutput,
)

MAX_ROLE_CHARS = 64  # a chat message's role ("system", "user", "assistant", "tool", ...)

# gRPC sampling fields that map one to one onto SamplingParams (same names on both).
_SCALARS = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "n",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
_FLOATS = {
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
}


_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(slots=True, frozen=True)
class Limits:
    max_prompt_chars: int = 1_000_000
    max_messages: int = 1024
    max_request_id_len: int = 256
    default_max_tokens: int = 256

    def to_proto(self) -> pb.Limits:
        return pb.Limits(
            max_n=MAX_N,
            max_logprobs=MAX_LOGPROBS,
            max_stop_strings=MAX_STOP_STRINGS,
            max_stop_token_ids=MAX_STOP_TOKEN_IDS,
            max_logit_bias=MAX_LOGIT_BIAS,
            max_prompt_chars=self.max_prompt_chars,
            max_messages=self.max_messages,
        )


def grpc_sampling_fields(req: pb.GenerateRequest | pb.ChatRequest) -> dict[str, Any]:
    """The sampling fields a gRPC client set, by name (unset ones absent)."""
    fields: dict[str, Any] = {}
    for name in _SCALARS:
        if req.HasField(name):
            v = getattr(req, name)
            # float32 on the wire: 0.7 arrives as 0.699999988; 7 significant digits give back
            # what the client wrote.
            fields[name] = float(f"{v:.7g}") if name in _FLOATS else v
    if req.stop:
        fields["stop"] = list(req.stop)
    if req.stop_token_ids:
        fields["stop_token_ids"] = list(req.stop_token_ids)
    if req.logit_bias:
        fields["logit_bias"] = dict(req.logit_bias)
    if req.HasField("response_format"):
        fields["structured_output"] = response_format(req.response_format)
    return fields


def response_format(m: pb.ResponseFormat) -> StructuredOutput:
    """A gRPC ``response_format`` as the engine's spec (its form checked here; the engine
    compiles it, and a bad schema, regex or grammar is refused when the request is added)."""
    kind = m.WhichOneof("format")
    if kind is None:
        raise InvalidRequestError(
            "response_format needs one of json_schema, json_object, regex, choice, grammar",
            "response_format",
        )
    if kind == "json_object" and not m.json_object:
        raise InvalidRequestError(
            "response_format.json_object must be true (leave response_format unset for text)",
            "response_format",
        )
    value = tuple(m.choice.choices) if kind == "choice" else getattr(m, kind)
    return structured_output(kind, value, "response_format")


def structured_output(kind: str, value: Any, param: str) -> StructuredOutput:
    """``StructuredOutput(kind=value)``; a refusal names the front's field (``param``)."""
    try:
        return StructuredOutput(**{kind: value})
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e), param) from None


def sampling_params(fields: Mapping[str, Any], vocab_size: int) -> SamplingParams:
    """SamplingParams from a client's sampling fields: unset fields keep the dataclass's
    defaults, except ``max_tokens``: unset stays unset (None), so that the worker applies the
    server's ``--default-max-tokens`` capped by the room the prompt leaves (not the offline
    default of 16). Token ids named by the fields must be in the model's vocabulary."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown sampling fields: {', '.join(map(str, unknown))}")
    stop_ids = fields.get("stop_token_ids") or ()
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:  # SamplingParams leaves room for added ids
        raise InvalidRequestError(
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop_ids)}"
        )
    if fields.get("max_tokens") == 0:  # the public API's unset is absent, not 0
        raise InvalidRequestError("max_tokens must be >= 1 (leave it unset for the default)")
    sp = SamplingParams(**{"max_tokens": None, **fields})
    sp.check_vocab(vocab_size)
    return sp


def text_request(
    req: pb.GenerateRequest | pb.ChatRequest,
    request_id: str,
    info: ipc_pb2.EngineInfo,
    limits: Limits,
) -> ipc_pb2.TextRequest:
    """A gRPC Generate or Chat request as the internal message."""
    out = internal_request(
        request_id,
        sampling_params(grpc_sampling_fields(req), info.vocab_size),
        limits,
        echo=req.echo,
        return_prompt_token_ids=req.return_prompt_token_ids,
        priority=req.priority,
    )
    if isinstance(req, pb.ChatRequest):
        out.chat.CopyFrom(conversation(req.messages, req, limits))
    else:
        _prompt(req, out, info, limits)
    return out


def internal_request(
    request_id: str,
    sp: SamplingParams,
    limits: Limits,
    *,
    echo: bool = False,
    return_prompt_token_ids: bool = False,
    priority: int = 0,
) -> ipc_pb2.TextRequest:
    """The internal message for validated params, without its prompt (the caller sets it:
    ``text``/``token_ids``/``chat``)."""
    try:
        params = params_to_proto(sp)
    except ValueError as e:  # a number too large for its message field
        raise InvalidRequestError(f"a sampling field is out of range: {e}") from None
    return ipc_pb2.TextRequest(
        request_id=request_id,
        params=params,
        stop=sp.stop,
        include_stop_str_in_output=sp.include_stop_str_in_output,
        skip_special_tokens=sp.skip_special_tokens,
        echo=echo,
        return_prompt_token_ids=return_prompt_token_ids,
        priority=priority,
        default_max_tokens=limits.default_max_tokens,
    )


def _prompt(
    req: pb.GenerateRequest, out: ipc_pb2.TextRequest, info: ipc_pb2.EngineInfo, limits: Limits
) -> None:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("set the prompt: text or token_ids")
    if kind == "text":
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else True
        set_text_prompt(out, req.text, limits, add_special)
    else:
        set_ids_prompt(out, req.token_ids.ids, info)


def set_text_prompt(
    out: ipc_pb2.TextRequest, text: str, limits: Limits, add_special_tokens: bool = True
) -> None:
    """A text prompt, checked against the server's limits."""
    if not text:
        raise InvalidRequestError("the prompt text is empty")
    _check_chars(text, limits)
    out.text = text
    out.add_special_tokens = add_special_tokens


def set_ids_prompt(out: ipc_pb2.TextRequest, ids, info: ipc_pb2.EngineInfo) -> None:
    """A prompt of token ids: in the vocabulary, shorter than the context."""
    ids = list(ids)
    if not ids:
        raise InvalidRequestError("token_ids is empty")
    if len(ids) >= info.max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; the context length is {info.max_model_len}"
        )
    check_vocab(ids, info)
    out.token_ids.ids.extend(ids)


def check_vocab(ids, info: ipc_pb2.EngineInfo) -> None:
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token_ids outside the vocabulary [0, {info.vocab_size}): {bad[:8]}"
        )


def _check_chars(text: str, limits: Limits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"text has {len(text)} characters; the limit is {limits.max_prompt_chars}"
        )


def tokenize_call(
    text: str, limits: Limits, add_special_tokens: bool = True
) -> ipc_pb2.TokenizeCall:
    _check_chars(text, limits)
    return ipc_pb2.TokenizeCall(text=text, add_special_tokens=add_special_tokens)


def detokenize_call(
    ids, info: ipc_pb2.EngineInfo, skip_special_tokens: bool = True
) -> ipc_pb2.TokenizeCall:
    ids = list(ids)
    check_vocab(ids, info)
    return ipc_pb2.TokenizeCall(
        detokenize=ipc_pb2.PromptIds(ids=ids), skip_special_tokens=skip_special_tokens
    )


def conversation(messages, req, limits: Limits) -> ipc_pb2.Conversation:
    """A gRPC Chat/Tokenize request's messages."""
    add = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
    return conversation_of([(m.role, m.content) for m in messages], add, limits)


def conversation_of(
    turns: list[tuple[str, str]], add_generation_prompt: bool, limits: Limits
) -> ipc_pb2.Conversation:
    """Chat turns ``(role, content)`` checked against the server's limits."""
    if not turns:
        raise InvalidRequestError("messages is empty", "messages")
    if len(turns) > limits.max_messages:
        raise InvalidRequestError(
            f"{len(turns)} messages; the limit is {limits.max_messages}", "messages"
        )
    total = 0
    conv = ipc_pb2.Conversation(add_generation_prompt=add_generation_prompt)
    for i, (role, content) in enumerate(turns):
        if not role:
            raise InvalidRequestError(f"messages[{i}].role is empty", "messages")
        if len(role) > MAX_ROLE_CHARS:
            raise InvalidRequestError(
                f"messages[{i}].role is longer than {MAX_ROLE_CHARS} characters", "messages"
            )
        total += len(role) + len(content)  # the template copies both into the prompt
        conv.messages.add(role=role, content=content)
    if total > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"messages have {total} characters; the limit is {limits.max_prompt_chars}",
            "messages",
        )
    return conv


def check_request_id(request_id: str, limits: Limits) -> None:
    if len(request_id) > limits.max_request_id_len:
        raise InvalidRequestError(
            f"request_id is longer than {limits.max_request_id_len} characters"
        )
    # ASCII: it goes back in the x-request-id response header, which gRPC refuses otherwise.
    if (
        not (request_id.isascii() and request_id.isprintable())
        or "#" in request_id
        or ("/" in request_id)
    ):
        raise InvalidRequestError("request_id must be printable ASCII, without '#' or '/'")
