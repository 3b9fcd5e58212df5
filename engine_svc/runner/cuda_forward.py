"""The Llama forward of the CUDA path, over the weights of an ``engine_svc.models.llama.LlamaModel``.

Same maths as ``LlamaModel.forward`` (the CPU path), fewer launches: the residual add is
fused into each RMSNorm; one ``rotary_and_cache`` launch rotates q and k (cos/sin read from a
cache by position) and writes k and v to their cache slots (padded rows skipped); one
``paged_attention`` launch covers the whole mixed batch; ``silu_and_mul`` is one launch. Per
layer that is two norms, four matmuls and three more kernels (four with split-KV). ``ops`` is
``kernels.triton_ops`` on the GPU; with ``kernels.reference`` the same code runs on the CPU,
which is how the tests pin it to the CPU model. Everything here is a fixed sequence of
launches on static shapes, so a decode step can be captured in a CUDA graph as it is.

With ``fused_norm_linear`` a batch of at most ``FUSED_MAX_TOKENS`` tokens (a small decode
step) runs each norm -> projection pair as one ``rms_norm_linear`` launch, the MLP's with
silu-and-mul fused too: six launches per layer (seven with split-KV) instead of nine (ten).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from engine_svc.models.llama import LlamaModel

# Batches of at most this many tokens may take ``rms_norm_linear`` (kernels/linear.py): each
# norm -> projection pair in one launch, its weight read once for all rows. Larger batches
# keep cuBLAS: there launches weigh less against the step, and its tiles suit more rows.
FUSED_MAX_TOKENS = 16


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
    fused_norm_linear: bool = False,
) -> torch.Tensor:  # [num_tokens, hidden] after the final norm
    cfg = model.cfg
    eps = cfg.rms_norm_eps
    n = batch.input_ids.shape[0]
    x = model.embed_tokens(batch.input_ids)
    residual: torch.Tensor | None = None
    fuse = fused_norm_linear and n <= FUSED_MAX_TOKENS
    for layer, kv in zip(model.layers, kv_caches):
        attn = layer.self_attn
        if fuse:
            qkv, residual = ops.rms_norm_linear(
                x, residual, layer.input_layernorm.weight, eps,
                attn.qkv_proj.weight, attn.qkv_proj.bias,
            )  # fmt: skip
        else:
            if residual is None:
                residual = x
                h = ops.rms_norm(x, layer.input_layernorm.weight, eps)
            else:
                h, residual = ops.fused_add_rms_norm(x, residual, layer.input_layernorm.weight, eps)
            qkv = attn.qkv_proj(h)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = ops.rotary_and_cache(
            batch.positions,
            q.view(n, attn.num_heads, attn.head_size),
            k.view(n, attn.num_kv_heads, attn.head_size),
            v.view(n, attn.num_kv_heads, attn.head_size),
            cos_sin_cache,
            kv[0],
            kv[1],
            batch.slot_mapping,
        )
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
        mlp, norm_w = layer.mlp, layer.post_attention_layernorm.weight
        if fuse:
            act, residual = ops.rms_norm_linear(
                x, residual, norm_w, eps, mlp.gate_up_proj.weight, gated_silu=True
            )
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, norm_w, eps)
            act = ops.silu_and_mul(mlp.gate_up_proj(h))
        x = mlp.down_proj(act)
    if residual is None:  # a model without layers
        return ops.rms_norm(x, model.norm.weight, eps)
    return ops.fused_add_rms_norm(x, residual, model.norm.weight, eps)[0]
