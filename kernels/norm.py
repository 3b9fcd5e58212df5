"""RMSNorm and fused residual-add + RMSNorm, one program per token row.

Rounding follows ``kernels.reference`` step by step (the sum rounded to the activation dtype,
statistics in float32, the normalised row rounded before the weight multiplies it), so the
GPU path gives the CPU path's numbers and greedy outputs agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden]
    residual_out_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL)
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    stride_out: tl.int64,
    stride_rout: tl.int64,
    stride_x: tl.int64,
    stride_r: tl.int64,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_rout + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / HIDDEN
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] with contiguous rows, got {x.shape}")
    hidden = x.shape[1]
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError("x and residual must share one dtype")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # as `weight * normed` in torch
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if x.shape[0] == 0:
        return out, res_out
    _rms_norm_kernel[(x.shape[0],)](
        out,
        res_out if res_out is not None else out,
        x,
        residual if residual is not None else x,
        weight,
        out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        float(eps),
        HIDDEN=hidden,
        BLOCK=triton.next_power_of_2(hidden),
        HAS_RESIDUAL=residual is not None,
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton launcher of ``kernels.reference.rms_norm`` for x of shape [num_tokens, hidden]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``kernels.reference.fused_add_rms_norm``: one read of x and the
    residual, one write of the new residual and of the normed row."""
    out, res = _launch(x, residual, weight, eps)
    assert res is not None  # the residual path always returns one
    return out, res
