"""pagedserve's engine: paged KV cache, continuous batching, Llama-family models, sampler.

``from engine_svc import LLM, SamplingParams`` is the offline API (shaped like vLLM's).
"""

from __future__ import annotations

from protos.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelLoadError,
    PagedServeError,
    QueueFullError,
)
from protos.sampling import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "PagedServeError",
    "InvalidRequestError",
    "ContextLengthError",
    "QueueFullError",
    "ModelLoadError",
]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; keep `import engine_svc` light for the services.
    if name == "LLM":
        from engine_svc.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine_svc.engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from engine_svc.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
