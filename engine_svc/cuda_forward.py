"""The Llama forward of the CUDA path, over the weights of an ``engine_svc.model.LlamaModel``.

Same maths and rounding as ``LlamaModel.forward`` (the CPU path), different kernels: the
residual add is fused into each RMSNorm, rotary reads a cos/sin cache by position, KV is
written by ``reshape_and_cache`` (padded rows skipped) and one ``paged_attention`` launch covers
the whole mixed batch. ``ops`` is ``kernels.triton_ops`` on the GPU; with
``kernels.reference`` the same code runs on the CPU, which is how the tests pin it to the CPU
model. Everything here is a fixed sequence of launches on static shapes, so a decode step can
be captured in a CUDA graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from engine_svc.model import LlamaModel


@dataclass(slots=True)
class BatchTensors:
    """One step's inputs on the device; a CUDA graph holds static copies of these."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padded row (no KV write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    num_splits: int = 1  # split-KV partitions of the attention launch (decode batches)


def forward(
    model: LlamaModel,
    ops: ModuleType,
    batch: BatchTensors,
    kv_caches: torch.Tensor,  # [layers, 2, num_blocks, block_size, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
) -> torch.Tensor:  # [num_tokens, hidden] after the final norm
    cfg = model.cfg
    eps = cfg.rms_norm_eps
    n = batch.input_ids.shape[0]
    x = model.embed_tokens(batch.input_ids)
    residual: torch.Tensor | None = None
    for layer, kv in zip(model.layers, kv_caches):
        if residual is None:
            residual = x
            h = ops.rms_norm(x, layer.input_layernorm.weight, eps)
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, layer.input_layernorm.weight, eps)
        attn = layer.self_attn
        q, k, v = attn.qkv_proj(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = ops.rotary_embedding(
            batch.positions,
            q.view(n, attn.num_heads, attn.head_size),
            k.view(n, attn.num_kv_heads, attn.head_size),
            cos_sin_cache,
        )
        v = v.view(n, attn.num_kv_heads, attn.head_size)
        ops.reshape_and_cache(k, v, kv[0], kv[1], batch.slot_mapping)
        o = ops.paged_attention(
            q,
            kv[0],
            kv[1],
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            attn.scale,
            num_splits=batch.num_splits,
        )
        x = attn.o_proj(o.view(n, attn.q_size))
        h, residual = ops.fused_add_rms_norm(
            x, residual, layer.post_attention_layernorm.weight, eps
        )
        gate, up = layer.mlp.gate_up_proj(h).split(layer.mlp.inter, dim=-1)
        x = layer.mlp.down_proj(F.silu(gate) * up)
    if residual is None:  # a model without layers
        return ops.rms_norm(x, model.norm.weight, eps)
    return ops.fused_add_rms_norm(x, residual, model.norm.weight, eps)[0]
