"""The Triton launchers under the names and signatures of ``kernels.reference``, so a caller
picks its implementation by picking the module (``ops = kernels.triton_ops``)."""

from __future__ import annotations

from kernels.activation import silu_and_mul
from kernels.cache import reshape_and_cache
from kernels.linear import rms_norm_linear
from kernels.norm import fused_add_rms_norm, rms_norm
from kernels.paged_attention import paged_attention
from kernels.rotary import rotary_and_cache, rotary_embedding

__all__ = [
    "fused_add_rms_norm",
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "rms_norm_linear",
    "rotary_and_cache",
    "rotary_embedding",
    "silu_and_mul",
]
