"""Llama-family decoder over a flattened varlen batch with a paged KV cache: the one forward of
every device.

One class per block, as in gpt-fast, holding the weights; ``LlamaModel.forward`` is the whole
forward, written once. What differs by device (the KV cache layout, attention, the rotary and
cache-write kernels, which element-wise ops are fused) is the ``ModelOps`` object the runner
passes in: ``engine_svc.runner.cpu_model_ops`` on the CPU (plain torch, or C++ kernels in
float32), ``engine_svc.runner.cuda_model_ops`` on CUDA (Triton kernels, or their plain-torch
references in tests). q/k/v and gate/up are fused into one matmul each at load time (fewer ops
per step: decode on a CPU is bound by per-op overhead, not FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from engine_svc.models.config import ModelConfig


class ModelOps(Protocol):
    """The ops ``LlamaModel.forward`` runs on, supplied by the runner for its device. ``step``
    is the runner's own per-step input (positions, slots, block tables or an attention plan):
    the model passes it through untouched; ``kv_cache`` is one layer's cache, in the runner's
    layout. The residual stream is kept apart from the block outputs so that each residual
    add can be fused into the RMSNorm after it."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm as Llama computes it: statistics in float32, scale in the input dtype."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm of ``residual + x``, ``residual + x``); may update ``residual`` in place."""
        ...

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_size]
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        kv_cache: torch.Tensor,
        step: Any,
    ) -> torch.Tensor:  # q, rotated: [num_tokens, num_heads, head_size]
        """Rotate q and k by their tokens' positions and write k and v to their cache slots.
        May rotate inside ``qkv``."""
        ...

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, step: Any, scale: float
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        """Each token's query against its sequence's cached keys and values, causally."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 2 * inter] -> ``silu(gate) * up``, [num_tokens, inter]."""
        ...

    def fuses_norm_linear(self, num_tokens: int) -> bool:
        """Whether a batch of ``num_tokens`` runs each norm -> projection pair as one
        ``rms_norm_linear``. A function of the shape only, so a captured graph stays valid."""
        ...

    def rms_norm_linear(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,  # None: x is the residual (the first layer)
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,  # [out, hidden], or [2 * inter, hidden] gate | up (gated_silu)
        bias: torch.Tensor | None = None,
        gated_silu: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Add and) RMSNorm, the projection, and ``silu_and_mul`` of it when ``gated_silu``:
        (projection, new residual). Called only where ``fuses_norm_linear`` is true."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        kv_caches: Sequence[Any],  # one cache per layer, in the ops' layout
        ops: ModelOps,
        step: Any,  # the runner's per-step input, handed to ``ops``
    ) -> torch.Tensor:  # [num_tokens, hidden] after the final norm
        """Per layer: two norms (each with the residual add before it), four matmuls, rotary
        and the KV write, attention, silu-and-mul. With ``ops.fuses_norm_linear`` each norm ->
        projection pair is one op. A fixed sequence of ops on static shapes (no branch on
        values), so a decode step can be captured in a CUDA graph as it is."""
        eps, n = self.cfg.rms_norm_eps, input_ids.shape[0]
        fuse = ops.fuses_norm_linear(n)
        x = self.embed_tokens(input_ids)  # a fresh tensor: ops may update the residual in place
        residual: torch.Tensor | None = None  # x is added to it by the next norm
        for layer, kv in zip(self.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            norm_w = layer.input_layernorm.weight
            if fuse:
                qkv, residual = ops.rms_norm_linear(
                    x, residual, norm_w, eps, attn.qkv_proj.weight, attn.qkv_proj.bias
                )
            else:
                if residual is None:
                    h, residual = ops.rms_norm(x, norm_w, eps), x
                else:
                    h, residual = ops.add_rms_norm(x, residual, norm_w, eps)
                qkv = attn.qkv_proj(h)
            q = ops.rope_and_cache(qkv, attn.num_heads, attn.num_kv_heads, attn.head_size, kv, step)
            o = ops.attention(q, kv, step, attn.scale)
            x = attn.o_proj(o.view(n, attn.q_size))
            norm_w = layer.post_attention_layernorm.weight
            if fuse:
                act, residual = ops.rms_norm_linear(
                    x, residual, norm_w, eps, mlp.gate_up_proj.weight, gated_silu=True
                )
            else:
                h, residual = ops.add_rms_norm(x, residual, norm_w, eps)
                act = ops.silu_and_mul(mlp.gate_up_proj(h))
            x = mlp.down_proj(act)
        if residual is None:  # a model without layers
            return ops.rms_norm(x, self.norm.weight, eps)
        return ops.add_rms_norm(x, residual, self.norm.weight, eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
