"""Plain-torch references of the kernels in this package.

Each function has the signature of its Triton counterpart and is the oracle in the kernel
tests. They are written to be obviously right, not fast: the CPU engine path uses
``engine_svc.runner.attention`` (batched torch) which is itself tested against these.

Layouts (shared by every implementation):
  query / key / value: [num_tokens, num_heads | num_kv_heads, head_size]
  key_cache / value_cache: [num_blocks, block_size, num_kv_heads, head_size]
  block_tables: [num_seqs, max_blocks_per_seq] int32, rows padded with any valid block id
  slot_mapping: [num_tokens] int64, block_id * block_size + offset, -1 = skip (padding)
  seq_lens: [num_seqs] int32, context length of each sequence after this step's tokens
  query_start_loc: [num_seqs + 1] int32, prefix sums of the query lengths
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    """Write each token's K and V into its slot; slots < 0 are padding and skipped."""
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_size] -> (int8 values, float32 scales [...]): symmetric per token and head,
    scale = max |x| / 127 over the head (1 for an all-zero head), q = round(x / scale). The
    KV cache's int8 format (``--kv-cache-dtype int8``); ``x ~= q * scale[..., None]``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [num_seqs]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
    num_splits: int = 1,  # split-KV partitions in the Triton kernel; the result is the same
) -> torch.Tensor:
    """Causal attention of a mixed varlen batch against the paged KV cache.

    Sequence i owns queries ``query_start_loc[i]:query_start_loc[i+1]``; they are the *last*
    tokens of its ``seq_lens[i]`` context, so query j of a chunk of length q sits at position
    ``seq_len - q + j`` and sees keys 0..that position. Decodes are chunks of length 1.
    """
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :num_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len].float()
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_size]
        v = v.repeat_interleave(group, dim=1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it: statistics in float32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then RMSNorm of the sum; returns (normed, new residual)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos half | sin half
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (rotate halves), as Hugging Face Llama applies it."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    cos = cos_sin[:, :half].repeat(1, 2).unsqueeze(1).to(query.dtype)
    sin = cos_sin[:, half:].repeat(1, 2).unsqueeze(1).to(query.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot = x[..., : 2 * half]
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((rot * cos + rotated * sin, x[..., 2 * half :]), dim=-1)

    return rotate(query), rotate(key)


def rotary_and_cache(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = skip
) -> torch.Tensor:  # the rotated query
    """``rotary_embedding`` then ``reshape_and_cache`` of the rotated key and the value: what
    attention needs before it runs, in one launch on the GPU."""
    q, k = rotary_embedding(positions, query, key, cos_sin_cache)
    reshape_and_cache(k, value, key_cache, value_cache, slot_mapping)
    return q


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused [num_tokens, 2 * inter] gate|up projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_linear(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]; None = x is the residual
    norm_weight: torch.Tensor,  # [hidden]
    eps: float,
    weight: torch.Tensor,  # [out, hidden], or [2 * inter, hidden] gate | up (gated_silu)
    bias: torch.Tensor | None = None,  # [out]
    gated_silu: bool = False,
    out: torch.Tensor | None = None,  # [num_tokens, out (inter when gated_silu)]
) -> tuple[torch.Tensor, torch.Tensor]:  # (projection, new residual)
    """(``residual += x`` and) RMSNorm, then the linear projection of the normed rows, then
    ``silu_and_mul`` of it when ``gated_silu``: the two norm -> projection pairs of a layer."""
    if residual is None:
        h, residual = rms_norm(x, norm_weight, eps), x
    else:
        h, residual = fused_add_rms_norm(x, residual, norm_weight, eps)
    y = F.linear(h, weight, bias)
    y = silu_and_mul(y) if gated_silu else y
    if out is None:
        return y, residual
    out.copy_(y)
    return out, residual
