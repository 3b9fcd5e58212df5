"""``silu_and_mul``: the Llama MLP's ``silu(gate) * up`` over the fused gate|up projection, one
launch instead of torch's two (silu, then mul) and no [num_tokens, inter] intermediate.

Rounding follows torch: silu is computed in float32 and rounded to the activation dtype, then
the product of two activation-dtype values is rounded once. A bf16 or fp16 product is exact in
float32, so however the compiler narrows that multiply the result is the same. The float32 silu
itself is not bit for bit torch's: compiled, Triton's exp and division are the fast
approximate ones (``ex2.approx``, ``div.full``), a few float32 ulps off, which moves a bf16 or
fp16 rounding only rarely (tested against torch within one ulp plus the product's rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # output columns per program


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_tokens, inter]
    x_ptr,  # [num_tokens, 2 * inter]: gate | up
    stride_out: tl.int64,
    stride_x: tl.int64,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    ty = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(ty)
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(ty),
             mask=mask)  # fmt: skip


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton launcher of ``kernels.reference.silu_and_mul``: x is [num_tokens, 2 * inter]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(
            f"x must be [num_tokens, 2 * inter] with contiguous rows, got {tuple(x.shape)}"
        )
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        out, x, out.stride(0), x.stride(0), INTER=inter, BLOCK=block
    )
    return out
