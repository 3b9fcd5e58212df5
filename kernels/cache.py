"""``reshape_and_cache``: write this step's K and V into their paged-cache slots in one launch.

One program per token; a slot of -1 marks a padded row (a CUDA-graph batch padded up to its
captured size) and its program returns before touching the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def copy_heads(
    src,  # head 0 of one token's [num_heads, head_size] row
    dst,  # head 0 of its destination (a cache slot)
    src_stride_h,
    dst_stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    """Copy one token's heads, cast to the destination dtype (also used by rotary's fused
    cache write for v)."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_SIZE)
    x = tl.load(src + h * src_stride_h + d, mask=mask)
    tl.store(dst + h * dst_stride_h + d, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt: tl.int64,
    stride_kh: tl.int64,
    stride_vt: tl.int64,
    stride_vh: tl.int64,
    stride_kcb: tl.int64,
    stride_kcs: tl.int64,
    stride_kch: tl.int64,
    stride_vcb: tl.int64,
    stride_vcs: tl.int64,
    stride_vch: tl.int64,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    copy_heads(key_ptr + token * stride_kt,
               key_cache_ptr + block * stride_kcb + offset * stride_kcs, stride_kh, stride_kch,
               NUM_KV_HEADS, HEAD_SIZE, HEADS_PAD, HEAD_PAD)  # fmt: skip
    copy_heads(value_ptr + token * stride_vt,
               value_cache_ptr + block * stride_vcb + offset * stride_vcs, stride_vh, stride_vch,
               NUM_KV_HEADS, HEAD_SIZE, HEADS_PAD, HEAD_PAD)  # fmt: skip


def check_cache_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The layouts a KV write needs (shared with the fused ``rotary_and_cache``)."""
    num_tokens = key.shape[0]
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not fit "
            f"keys of shape {tuple(key.shape)}"
        )
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (num_tokens,):
        raise ValueError("slot_mapping must be int64 of shape [num_tokens]")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    if value_cache.stride(-1) != 1:
        raise ValueError("value_cache must be contiguous in its last (head) dimension")


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Triton launcher of ``kernels.reference.reshape_and_cache``."""
    check_cache_args(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_PAD=triton.next_power_of_2(head_size),
        BLOCK_SIZE=key_cache.shape[1],
    )
