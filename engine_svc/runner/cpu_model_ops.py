"""The CPU runner's ops for the Llama forward (``engine_svc.models.llama.ModelOps``).

One layer's KV cache is an ``engine_svc.runner.attention.LayerKV`` (K and V heads outer,
[num_kv_heads, num_blocks, block_size, head_size], in the cache dtype, with scales when int8);
the KV write and attention are ``engine_svc.runner.attention``'s, over the step's
``AttentionMetadata``.

- ``TorchCpuOps``: plain torch, any dtype (bf16; float32 where the C++ kernels cannot be built).
- ``FusedCpuOps``: float32 with the C++ element-wise kernels (``engine_svc.runner.cpu_ops``):
  each residual add is fused into the RMSNorm after it and updates the residual in place,
  rotary runs in place on the qkv projection, ``silu(gate) * up`` is one op.

Neither fuses a norm with the projection after it (``fuses_norm_linear`` is false).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_svc.models.config import ModelConfig, rope_cos_sin_cache
from engine_svc.runner import cpu_ops
from engine_svc.runner.attention import AttentionMetadata, LayerKV, attend, write_kv
from kernels import reference


@dataclass(slots=True)
class CpuStep:
    """One step's inputs to the ops, made by ``ops.step``."""

    meta: AttentionMetadata
    cos: torch.Tensor  # each token's rotary cos in the model dtype, shaped for its ops' rotary
    sin: torch.Tensor


class TorchCpuOps:
    """Plain torch; rotary in the model dtype, the reference RMSNorm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_model_len: int) -> None:
        cs = rope_cos_sin_cache(cfg, max_model_len)
        half = cs.shape[1] // 2
        # HF Llama casts cos/sin to the activation dtype before rotating: do the same.
        self.cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).to(dtype)  # [positions, head]
        self.sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).to(dtype)

    def step(self, positions: torch.Tensor, meta: AttentionMetadata) -> CpuStep:
        """cos and sin as [num_tokens, 1, head_size]: they broadcast over the heads."""
        return CpuStep(meta, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))

    rms_norm = staticmethod(reference.rms_norm)
    add_rms_norm = staticmethod(reference.fused_add_rms_norm)  # residual + x, not in place
    # Never taken here (fuses_norm_linear is false); the reference keeps the ops complete.
    rms_norm_linear = staticmethod(reference.rms_norm_linear)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up

    def fuses_norm_linear(self, num_tokens: int) -> bool:
        return False

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_size]
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        kv_cache: LayerKV,
        step: CpuStep,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        n, kv_size = qkv.shape[0], num_kv_heads * head_size
        q, k, v = qkv.split([num_heads * head_size, kv_size, kv_size], dim=-1)
        q = _rotate(q.view(n, num_heads, head_size), step.cos, step.sin)
        k = _rotate(k.view(n, num_kv_heads, head_size), step.cos, step.sin)
        v = v.view(n, num_kv_heads, head_size)
        write_kv(k, v, kv_cache, step.meta.slot_mapping)
        return q

    def attention(
        self, q: torch.Tensor, kv_cache: LayerKV, step: CpuStep, scale: float
    ) -> torch.Tensor:
        return attend(q, kv_cache, step.meta, scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FusedCpuOps(TorchCpuOps):
    """float32 with the C++ element-wise kernels; attention as in ``TorchCpuOps``."""

    def step(self, positions: torch.Tensor, meta: AttentionMetadata) -> CpuStep:
        """cos and sin as [num_tokens, head_size], the rows ``cpu_ops.rotary_`` reads."""
        return CpuStep(meta, self.cos[positions], self.sin[positions])

    rms_norm = staticmethod(cpu_ops.rms_norm)
    silu_and_mul = staticmethod(cpu_ops.silu_mul)

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_ops.add_rms_norm_(x, residual, weight, eps), residual  # residual += x

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        kv_cache: LayerKV,
        step: CpuStep,
    ) -> torch.Tensor:
        n, kv_size = qkv.shape[0], num_kv_heads * head_size
        cpu_ops.rotary_(qkv, step.cos, step.sin, num_heads + num_kv_heads, head_size)
        q, k, v = qkv.split([num_heads * head_size, kv_size, kv_size], dim=-1)
        k = k.view(n, num_kv_heads, head_size)
        v = v.view(n, num_kv_heads, head_size)
        write_kv(k, v, kv_cache, step.meta.slot_mapping)
        return q.view(n, num_heads, head_size)


def cpu_model_ops(cfg: ModelConfig, dtype: torch.dtype, max_model_len: int) -> TorchCpuOps:
    """``FusedCpuOps`` where the C++ kernels serve ``dtype`` (float32, and they built)."""
    fused = cpu_ops.fused_ops_available(dtype)
    return (FusedCpuOps if fused else TorchCpuOps)(cfg, dtype, max_model_len)
