"""Neox-style rotary embedding of q and k in one launch, one program per token; with
``rotary_and_cache`` the same launch also writes the rotated k and the v to their paged-cache
slots (what ``reshape_and_cache`` does), so the model needs one launch where it had two.

Scaling variants (Llama 3, linear) live in the cos/sin cache (``rope_cos_sin_cache``), so one
kernel serves them all. The arithmetic is float32 from the float32 cos/sin cache with one
rounding to the activation dtype at the end. The reference rounds as Hugging Face Llama does
(cos/sin, each product and the sum in the activation dtype), so in fp16/bf16 the two differ by
an ulp or so; in float32 they agree to rounding. Rounding each product here too did not give
HF's numbers on an H200: with Triton's default FP fusion the compiler narrows the math to bf16
and fuses multiply and subtract into one ``fma.rn.bf16`` (found in the PTX). A launch with
``enable_fp_fusion=False`` should round like HF; it has not been run on a GPU, so the kernel
keeps the simpler float32 form, which is tested there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cache import check_cache_args, copy_heads


@triton.jit
def _rotate_heads(
    src,  # head 0 of this token in the source (a view into the fused qkv output)
    dst,  # head 0 of this token in the destination
    src_stride_h,
    dst_stride_h,
    cos,  # [HALF_PAD] float32
    sin,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,  # head_size - 2 * HALF unrotated dims (partial rotary), padded
):
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    src = src + h * src_stride_h
    dst = dst + h * dst_stride_h
    ty = dst.dtype.element_ty
    x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + d, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst + HALF + d, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)
    if TAIL_PAD > 0:
        e = tl.arange(0, TAIL_PAD)[None, :]
        tail_mask = (h < NUM_HEADS) & (e < HEAD_SIZE - 2 * HALF)
        tail = tl.load(src + 2 * HALF + e, mask=tail_mask)
        tl.store(dst + 2 * HALF + e, tail.to(ty), mask=tail_mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [num_tokens, num_heads, head_size] contiguous
    k_out_ptr,  # [num_tokens, num_kv_heads, head_size] contiguous (not WRITE_CACHE)
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_ptr,  # [num_tokens, num_kv_heads, head_size]
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_position, 2 * HALF] float32: cos half | sin half
    stride_qt: tl.int64,
    stride_qh: tl.int64,
    stride_kt: tl.int64,
    stride_kh: tl.int64,
    stride_cs: tl.int64,
    # WRITE_CACHE only: the rotated key and the value go to their cache slots, not k_out.
    v_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64, -1 = padded row: nothing written
    stride_vt: tl.int64,
    stride_vh: tl.int64,
    stride_kcb: tl.int64,
    stride_kcs: tl.int64,
    stride_kch: tl.int64,
    stride_vcb: tl.int64,
    stride_vcs: tl.int64,
    stride_vch: tl.int64,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * (NUM_HEADS * HEAD_SIZE),
                  stride_qh, HEAD_SIZE, cos, sin,
                  NUM_HEADS, HEAD_SIZE, HALF, HEADS_PAD, HALF_PAD, TAIL_PAD)  # fmt: skip
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            _rotate_heads(k_ptr + token * stride_kt,
                          key_cache_ptr + block * stride_kcb + offset * stride_kcs,
                          stride_kh, stride_kch, cos, sin,
                          NUM_KV_HEADS, HEAD_SIZE, HALF, KV_HEADS_PAD, HALF_PAD, TAIL_PAD)  # fmt: skip
            copy_heads(v_ptr + token * stride_vt,
                       value_cache_ptr + block * stride_vcb + offset * stride_vcs,
                       stride_vh, stride_vch,
                       NUM_KV_HEADS, HEAD_SIZE, KV_HEADS_PAD, HEAD_PAD)  # fmt: skip
    else:
        _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * (NUM_KV_HEADS * HEAD_SIZE),
                      stride_kh, HEAD_SIZE, cos, sin,
                      NUM_KV_HEADS, HEAD_SIZE, HALF, KV_HEADS_PAD, HALF_PAD, TAIL_PAD)  # fmt: skip


def _check(positions, query, key, cos_sin_cache) -> None:
    num_tokens, _, head_size = query.shape
    rot = cos_sin_cache.shape[1]
    if key.shape[0] != num_tokens or key.shape[2] != head_size:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match")
    if rot % 2 or rot > head_size:
        raise ValueError(f"rotary dim {rot} must be even and <= head size {head_size}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("cos_sin_cache must be float32 with contiguous rows")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or positions.shape != (num_tokens,):
        raise ValueError("query/key need contiguous heads; positions must be [num_tokens]")
    if key.dtype != query.dtype:
        raise ValueError("query and key must share one dtype")


def _launch(positions, query, key, cos_sin_cache, q_out, k_out, cache_args) -> None:
    num_tokens, num_heads, head_size = query.shape
    if num_tokens == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    tail = head_size - 2 * half
    if cache_args is None:
        value, key_cache, value_cache, slots = query, query, query, positions  # never read
        cache_strides = (0,) * 8
    else:
        value, key_cache, value_cache, slots = cache_args
        cache_strides = (value.stride(0), value.stride(1), *key_cache.stride()[:3],
                         *value_cache.stride()[:3])  # fmt: skip
    _rotary_kernel[(num_tokens,)](
        q_out,
        k_out,
        query,
        key,
        positions,
        cos_sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        value,
        key_cache,
        value_cache,
        slots,
        *cache_strides,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=key.shape[1],
        HEAD_SIZE=head_size,
        HALF=half,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(key.shape[1]),
        HALF_PAD=triton.next_power_of_2(half),
        TAIL_PAD=triton.next_power_of_2(tail) if tail else 0,
        HEAD_PAD=triton.next_power_of_2(head_size),
        BLOCK_SIZE=key_cache.shape[1] if cache_args is not None else 1,
        WRITE_CACHE=cache_args is not None,
    )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos half | sin half
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``kernels.reference.rotary_embedding``; returns new (q, k).

    Computes in float32 and rounds once (the reference rounds each step as HF does)."""
    _check(positions, query, key, cos_sin_cache)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    _launch(positions, query, key, cos_sin_cache, q_out, k_out, None)
    return q_out, k_out


def rotary_and_cache(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos half | sin half
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> torch.Tensor:
    """Triton launcher of ``kernels.reference.rotary_and_cache``: rotary of q and k, and the
    rotated k and v written to their cache slots, in one launch (the decode step's two
    launches before attention become one). Returns the rotated query.

    The rotated key is rounded once, to the cache dtype (the reference rounds it to the
    activation dtype first; the engine's cache always has the activation dtype)."""
    _check(positions, query, key, cos_sin_cache)
    check_cache_args(key, value, key_cache, value_cache, slot_mapping)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    cache_args = (value, key_cache, value_cache, slot_mapping)
    _launch(positions, query, key, cos_sin_cache, q_out, q_out, cache_args)
    return q_out
