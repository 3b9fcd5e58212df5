"""Paged attention for the CPU path: the batch plan is built once per step, used by every layer.

The flattened batch puts decodes (one query token each) first, then prefill chunks. Decodes
run as one batched SDPA over their gathered, padded block tables; each prefill chunk runs its
own SDPA (causal against its cached prefix). Tested against ``kernels.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    q_start: int  # first row of this chunk in the flattened batch
    q_end: int
    seq_len: int  # context length after this chunk
    blocks: torch.Tensor  # [ceil(seq_len / block_size)] block ids
    mask: (
        torch.Tensor | None
    )  # [q_len, seq_len] bool, None when the chunk starts at 0 (plain causal)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; where reshape_and_cache writes each token
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_blocks: torch.Tensor | None  # [num_decodes, max_blocks] block ids, padded with 0
    decode_mask: (
        torch.Tensor | None
    )  # [num_decodes, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The same batch in the kernels' layout (reference / Triton signature).
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor | None = None  # [num_seqs] int32
    query_start_loc: torch.Tensor | None = None  # [num_seqs + 1] int32


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> AttentionMetadata:
    """Sequences must come decodes first (query_len == 1), then prefill chunks."""
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)

    decode_blocks = decode_mask = None
    if num_decodes:
        width = max((s + block_size - 1) // block_size for s in seq_lens[:num_decodes])
        padded = [
            t[:width] + [0] * (width - min(len(t), width)) for t in block_tables[:num_decodes]
        ]
        decode_blocks = torch.tensor(padded, dtype=torch.int64)
        lens = torch.tensor(seq_lens[:num_decodes], dtype=torch.int64)
        decode_mask = (torch.arange(width * block_size) < lens[:, None])[:, None, None, :]

    prefills = []
    start = num_decodes
    for q_len, s_len, table in zip(
        query_lens[num_decodes:], seq_lens[num_decodes:], block_tables[num_decodes:]
    ):
        n_blocks = (s_len + block_size - 1) // block_size
        mask = None
        if q_len != s_len:
            q_pos = torch.arange(s_len - q_len, s_len)[:, None]
            mask = torch.arange(s_len)[None, :] <= q_pos
        prefills.append(
            PrefillChunk(start, start + q_len, s_len, torch.tensor(table[:n_blocks]), mask)
        )
        start += q_len
    return AttentionMetadata(slot_mapping, num_decodes, decode_blocks, decode_mask, prefills)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], no padding on the CPU path
) -> None:
    kc = key_cache.view(-1, key_cache.shape[2], key_cache.shape[3])
    vc = value_cache.view(-1, value_cache.shape[2], value_cache.shape[3])
    kc.index_copy_(0, slot_mapping, key)
    vc.index_copy_(0, slot_mapping, value)


def attend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    out = torch.empty_like(query)
    kvh, hd = key_cache.shape[2], key_cache.shape[3]
    gqa = query.shape[1] != kvh
    d = meta.num_decodes
    if d:
        blocks = meta.decode_blocks
        k = key_cache[blocks].view(d, -1, kvh, hd).transpose(1, 2)  # [d, kvh, L, hd]
        v = value_cache[blocks].view(d, -1, kvh, hd).transpose(1, 2)
        q = query[:d].unsqueeze(2)  # [d, num_heads, 1, hd]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )
        out[:d] = o.squeeze(2)
    for p in meta.prefills:
        k = key_cache[p.blocks].view(-1, kvh, hd)[: p.seq_len].transpose(0, 1)  # [kvh, S, hd]
        v = value_cache[p.blocks].view(-1, kvh, hd)[: p.seq_len].transpose(0, 1)
        q = query[p.q_start : p.q_end].transpose(0, 1)  # [num_heads, q_len, hd]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=gqa
        )
        out[p.q_start : p.q_end] = o.transpose(0, 1)
    return out
