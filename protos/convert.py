"""Conversions between in-process types and the internal wire messages: ``SamplingParams``
to and from ``ipc_pb2.SamplingParams``. The gateway side calls ``params_to_proto`` (through
``protos.requests``), the engine process ``params_from_proto``, each at its socket."""

from __future__ import annotations

from protos.pagedserve.internal.v1 import ipc_pb2
from protos.sampling import SamplingParams, StructuredOutput


def params_to_proto(p: SamplingParams) -> ipc_pb2.SamplingParams:
    """The engine-side part of SamplingParams (stop strings stay with the worker)."""
    m = ipc_pb2.SamplingParams(
        n=p.n,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
    )
    if p.max_tokens is not None:
        m.max_tokens = p.max_tokens
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    if p.logit_bias:
        m.logit_bias.update(p.logit_bias)
    if p.structured_output is not None:
        m.structured_output.CopyFrom(structured_to_proto(p.structured_output))
    return m


def structured_to_proto(so: StructuredOutput) -> ipc_pb2.StructuredOutput:
    kind = so.kind
    if kind == "choice":
        return ipc_pb2.StructuredOutput(choice=ipc_pb2.ChoiceList(choices=so.choice))
    return ipc_pb2.StructuredOutput(**{kind: getattr(so, kind)})


def structured_from_proto(m: ipc_pb2.StructuredOutput) -> StructuredOutput | None:
    """None when no kind is set (the field was absent); otherwise re-validated."""
    kind = m.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return StructuredOutput(choice=tuple(m.choice.choices))
    return StructuredOutput(**{kind: getattr(m, kind)})


def params_from_proto(m: ipc_pb2.SamplingParams) -> SamplingParams:
    """Rebuild (and so re-validate) the engine's SamplingParams from the wire."""
    return SamplingParams(
        n=m.n or 1,
        max_tokens=m.max_tokens if m.HasField("max_tokens") else None,
        min_tokens=m.min_tokens,
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        min_p=m.min_p,
        repetition_penalty=m.repetition_penalty,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        logit_bias=dict(m.logit_bias) or None,
        seed=m.seed if m.HasField("seed") else None,
        stop_token_ids=list(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        structured_output=structured_from_proto(m.structured_output),
    )
