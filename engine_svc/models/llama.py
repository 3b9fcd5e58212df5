"""Llama-family decoder over a flattened varlen batch with a paged KV cache.

One class per block, as in gpt-fast. q/k/v and gate/up are fused into one matmul each at
load time (fewer ops per step: decode on a CPU is bound by per-op overhead, not FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.runner import cpu_ops
from engine_svc.runner.attention import AttentionMetadata, attend, write_kv
from engine_svc.models.config import ModelConfig
from kernels.reference import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_size,
        )
        self.q_size = cfg.num_heads * cfg.head_size
        self.kv_size = cfg.num_kv_heads * cfg.head_size
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.head_size**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, 1, head_size]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_kv_heads, num_blocks, block_size, head_size]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = _rotate(q.view(n, self.num_heads, self.head_size), cos, sin)
        k = _rotate(k.view(n, self.num_kv_heads, self.head_size), cos, sin)
        v = v.view(n, self.num_kv_heads, self.head_size)
        return self._attend_and_project(q, k, v, kv_cache, meta)

    def forward_fused(self, x, cos2d, sin2d, kv_cache, meta):
        """forward with the fused CPU rotary (float32); cos2d / sin2d: [num_tokens, head]."""
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        cpu_ops.rotary_(qkv, cos2d, sin2d, self.num_heads + self.num_kv_heads, self.head_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_size)
        k = k.view(n, self.num_kv_heads, self.head_size)
        v = v.view(n, self.num_kv_heads, self.head_size)
        return self._attend_and_project(q, k, v, kv_cache, meta)

    def _attend_and_project(self, q, k, v, kv_cache, meta):
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        o = attend(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.view(q.shape[0], self.q_size))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(cpu_ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # float32 on the CPU: the element-wise ops fused in C++ (set by the CPU model runner).
        self.fused_cpu_ops = False

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        cos: torch.Tensor,  # [num_tokens, 1, head_size] in the model dtype
        sin: torch.Tensor,
        kv_caches: torch.Tensor,  # [num_layers, 2, num_kv_heads, num_blocks, block_size, head_size]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden] after the final norm
        if self.fused_cpu_ops:
            return self._forward_fused(input_ids, cos, sin, kv_caches, meta)
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    def _forward_fused(self, input_ids, cos, sin, kv_caches, meta) -> torch.Tensor:
        """The same layers with the fused float32 CPU ops (engine_svc.runner.cpu_ops): the residual
        stream is kept apart and each residual add is fused into the next RMSNorm, rotary is
        applied in place on the qkv projection, silu(gate) * up is one op."""
        n, eps = input_ids.shape[0], self.cfg.rms_norm_eps
        cos2d, sin2d = cos.view(n, -1), sin.view(n, -1)
        residual = self.embed_tokens(input_ids)  # a fresh tensor: updated in place below
        h = cpu_ops.rms_norm(residual, self.layers[0].input_layernorm.weight, eps)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            h = layer.self_attn.forward_fused(h, cos2d, sin2d, kv, meta)
            h = cpu_ops.add_rms_norm_(h, residual, layer.post_attention_layernorm.weight, eps)
            h = layer.mlp.forward_fused(h)
            following = (
                self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            )
            h = cpu_ops.add_rms_norm_(h, residual, following.weight, eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
