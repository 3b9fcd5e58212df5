"""Paged attention for a mixed varlen batch (prefill chunks and decodes) in one Triton launch.

Layouts are those of ``kernels.reference.paged_attention`` (same signature, same result).

How the grid maps to work (vLLM's unified-attention scheme, which needs no host sync and so is
CUDA-graph safe): a program owns one KV head and a tile of ``BLOCK_M`` rows, each row one
(query token, query head of that KV head's GQA group) pair, so K/V are read once per group.
Sequence ``s`` owns tiles ``query_start_loc[s] // BLOCK_Q + s`` onwards; the grid's first
dimension is the upper bound ``num_tokens // BLOCK_Q + num_seqs`` (from shapes alone), a
program finds its sequence by binary search, and spare programs exit at once. Each program
walks the context in ``TILE_N``-token tiles, looking every token's block up in the block table
(so any block size works), with an online softmax in float32, and stops at the last key its
rows can see (causal).

Split-KV (``num_splits > 1``, for long decodes where ``num_seqs * num_kv_heads`` programs
cannot fill the GPU): a third grid dimension cuts each context into ``num_splits`` contiguous
ranges of tiles; each writes its unnormalised partial output with its running max and sum,
and a second kernel combines them. The split count depends only on the launch, never on the
data, so a captured CUDA graph stays valid whatever the context lengths are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _find_seq(query_start_loc_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with query_start_loc[s] // BLOCK_Q + s <= target (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if val <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size] (NUM_SPLITS == 1)
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD] float32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] float32: running max, running sum
    query_ptr,  # [num_tokens, num_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    scale,
    num_seqs,
    stride_qt: tl.int64,
    stride_qh: tl.int64,
    stride_ot: tl.int64,
    stride_oh: tl.int64,
    stride_kb: tl.int64,
    stride_ks: tl.int64,
    stride_kh: tl.int64,
    stride_vb: tl.int64,
    stride_vs: tl.int64,
    stride_vh: tl.int64,
    stride_bt: tl.int64,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two of HEAD_SIZE
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q * GROUP rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    TILE_N: tl.constexpr,  # keys per inner step
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: tf32 would cost 3 decimal digits
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached tokens before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    q_pos = local_tile * BLOCK_Q + offs_m // GROUP  # position inside the chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_pos < q_len)
    d_ok = offs_d < HEAD_SIZE
    token = (q_start + q_pos).to(tl.int64)
    q = tl.load(
        query_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # Keys visible to any row of this tile: up to the last row's absolute position.
    last_pos = context_len + tl.minimum((local_tile + 1) * BLOCK_Q, q_len)  # exclusive
    num_tiles = tl.cdiv(last_pos, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    row_pos = context_len + q_pos  # absolute position of each row's query token

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t in range(tile_lo, tile_hi):
        k_pos = t * TILE_N + offs_n
        k_ok = k_pos < last_pos
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = k_pos % BLOCK_SIZE
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(
            key_cache_ptr
            + block[:, None] * stride_kb
            + slot[:, None] * stride_ks
            + kv_head * stride_kh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            value_cache_ptr
            + block[:, None] * stride_vb
            + slot[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = (
            tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scale
        )  # [BLOCK_M, TILE_N]
        visible = (k_pos[None, :] <= row_pos[:, None]) & k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 then so exp() gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(
            tl.float32
        )
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials are contiguous [num_tokens, num_heads, NUM_SPLITS, ...] float32.
        part = (token * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
        tl.store(
            part_out_ptr + part[:, None] * HEAD_PAD + offs_d[None, :],
            acc,
            mask=row_ok[:, None],
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD] float32
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] float32
    stride_ot: tl.int64,
    stride_oh: tl.int64,
    num_heads,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * num_heads + head
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_PAD)
    m = tl.load(part_ml_ptr + (row * NUM_SPLITS + offs_s) * 2)
    l_s = tl.load(part_ml_ptr + (row * NUM_SPLITS + offs_s) * 2 + 1)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max)  # empty splits have m = -inf: weight 0
    acc = tl.load(part_out_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_PAD + offs_d[None, :])
    total = tl.sum(l_s * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
    num_splits: int = 1,
    *,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton launcher of ``kernels.reference.paged_attention`` (see there for semantics).

    ``num_splits`` (a power of two) > 1 selects the split-KV variant; the result is the same.
    ``tile_n`` (keys per inner step, a power of two >= 16), ``num_warps`` and ``num_stages``
    override the launch configuration (``benchmarks/gpu_bench.py --sweep`` times them).
    """
    num_tokens, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, kv_head_size = key_cache.shape
    _check_attention_args(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, num_splits
    )
    if kv_head_size != head_size or num_heads % num_kv_heads:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit a cache of {num_kv_heads} KV heads "
            f"of size {kv_head_size}"
        )
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    # tl.dot needs >= 16 rows: pack several query tokens per program when the group is small.
    block_m = max(16, triton.next_power_of_2(group))
    block_q = max(1, block_m // group)
    head_pad = max(16, triton.next_power_of_2(head_size))
    num_seqs = seq_lens.shape[0]
    if tile_n is not None and (tile_n < 16 or tile_n & (tile_n - 1)):
        raise ValueError(f"tile_n must be a power of two >= 16, got {tile_n}")
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    part_out = part_ml = out  # unused placeholders when not splitting
    if num_splits > 1:
        part_out = torch.empty(
            num_tokens, num_heads, num_splits, head_pad, dtype=torch.float32, device=query.device
        )
        part_ml = torch.empty(
            num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=query.device
        )
    _paged_attention_kernel[grid](
        out,
        part_out,
        part_ml,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale),
        num_seqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        block_tables.stride(0),
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n or _default_tile_n(block_size, head_pad * query.element_size(), num_splits),
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **launch,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            out,
            part_out,
            part_ml,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            NUM_SPLITS=num_splits,
        )
    return out


def _default_tile_n(block_size: int, row_bytes: int, num_splits: int) -> int:
    """Keys per inner step, from a decode sweep on an H200 (docs/kernels.md): 64 keys when one
    program walks a whole context (large batches; prefill by extension, not timed), 32 for
    split-KV decodes, whose short ranges waste less of a smaller tile. Rows over 256 bytes (fp32
    with head 128) keep 32 keys: not timed either way, the smaller tile is the cautious guess
    (shared memory would allow 64: 78 KB at fp32 head 128, per the compile check)."""
    tile = 64 if num_splits == 1 and row_bytes <= 256 else 32
    return max(tile, block_size)


def _check_attention_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_splits: int,
) -> None:
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paged_attention supports fp16, bf16 and fp32, not {query.dtype}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError("query, key_cache and value_cache must share one dtype")
    if key_cache.shape != value_cache.shape:
        raise ValueError("key_cache and value_cache must have the same shape")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    for name, t in (
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if block_tables.stride(-1) != 1 or query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("block_tables rows must be contiguous; query_start_loc has num_seqs + 1")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
