"""``rms_norm_linear``: (residual add +) RMSNorm fused into the projection that reads its output,
for the few-token batches of decode steps, optionally with ``silu_and_mul`` fused after it.

A decode layer is two such pairs: input norm -> qkv projection, and post-attention norm ->
gate|up projection -> silu-and-mul. With cuBLAS each pair is two or three launches; here it is
one, so a layer drops from nine launches (ten with split-KV attention) to six (seven). At batch
1 on a GPU a launch inside a CUDA graph costs a few microseconds however little it does, which
is a large share of a small model's step (docs/benchmarks.md, gpu_bench).

Every program handles ``BLOCK_N`` output columns for all (at most ``MAX_ROWS``) token rows, so
each weight element is read from memory once. It first walks the input rows for their
statistics, then walks them again beside its weight tile (rows x hidden x 2 values a pass: 8 KB
at batch 1 of a 2048-wide model, from L2 after the first program, but 256 KB at 16 rows of a
4096-wide one, which is L2 traffic beside the weight's): residual add, normalise, scale, and one ``tl.dot`` per K tile. Program 0 also writes the
new residual. Rounding follows ``kernels.reference``: the sum rounded to the activation dtype,
the normalised row rounded before the norm weight multiplies it, that product rounded before
the matmul, the matmul's float32 sum rounded once, then silu as in ``kernels.activation``. The
float32 sums (mean square per K tile, the matmul's) run in another order than torch's, so
results match the reference within the dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # token rows one launch takes: all of them sit in every program's registers


@triton.jit
def _rms_norm_linear_kernel(
    out_ptr,  # [M, N]
    res_out_ptr,  # [M, K] (HAS_RESIDUAL)
    x_ptr,  # [M, K]
    res_ptr,  # [M, K] (HAS_RESIDUAL)
    norm_w_ptr,  # [K]
    w_ptr,  # [N, K], or [2 * N, K] gate | up (GATED)
    bias_ptr,  # [N] or [2 * N] (HAS_BIAS)
    M,
    stride_out: tl.int64,
    stride_rout: tl.int64,
    stride_x: tl.int64,
    stride_r: tl.int64,
    stride_w: tl.int64,
    eps,
    K: tl.constexpr,
    N: tl.constexpr,  # output columns (the intermediate size when GATED)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32: tf32 would cost 3 decimal digits
):
    pid = tl.program_id(0)
    ty = x_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)

    # Pass 1: each row's mean square (and, in program 0, the new residual).
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        mask = row_ok[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_r + kk[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(ty)
            if pid == 0:
                tl.store(res_out_ptr + rows[:, None] * stride_rout + kk[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)

    # Pass 2: the normed rows against this program's weight columns.
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        mask = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_r + kk[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(ty)
        normed = (x.to(tl.float32) * rstd[:, None]).to(ty)
        nw = tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0)
        h = (nw.to(tl.float32)[None, :] * normed.to(tl.float32)).to(ty)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_tile = w_ptr + cols[None, :].to(tl.int64) * stride_w + kk[:, None]  # [BLOCK_K, BLOCK_N]
        w = tl.load(w_tile, mask=w_mask, other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            wu = tl.load(w_tile + N * stride_w, mask=w_mask, other=0.0)
            acc_up = tl.dot(h, wu, acc_up, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(ty)
    if GATED:
        gate = y.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(ty)
        y = (act.to(tl.float32) * acc_up.to(ty).to(tl.float32)).to(ty)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=out_mask)


def rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gated_silu: bool = False,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``kernels.reference.rms_norm_linear`` for at most ``MAX_ROWS`` rows.

    ``block_n`` (output columns per program) and ``block_k`` (inner tile), powers of two >= 16,
    ``num_warps`` and ``num_stages`` override the launch defaults (for sweeps; same result).
    """
    _check_args(x, residual, norm_weight, weight, bias, gated_silu)
    m, k = x.shape
    n = weight.shape[0] // 2 if gated_silu else weight.shape[0]
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with contiguous rows")
    if m == 0 or n == 0:
        return out, (x if residual is None else x + residual)
    res_out = torch.empty_like(x) if residual is not None else x
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot takes >= 16 rows
    block_n = block_n or 16
    # K tile: up to 256, less when the rows' tile would pass 8 KB (64 fp32 rows, say): each
    # pipeline stage holds one in shared memory beside the weight tile.
    block_k = block_k or min(256, triton.next_power_of_2(k), 8192 // (block_m * x.element_size()))
    block_k = max(16, block_k)
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
    _rms_norm_linear_kernel[(triton.cdiv(n, block_n),)](
        out,
        res_out,
        x,
        residual if residual is not None else x,
        norm_weight,
        weight,
        bias if bias is not None else weight,
        m,
        out.stride(0),
        res_out.stride(0),
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        float(eps),
        K=k,
        N=n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        GATED=gated_silu,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **launch,
    )
    return out, res_out


def _check_args(x, residual, norm_weight, weight, bias, gated_silu) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] with contiguous rows, got {x.shape}")
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"rms_norm_linear takes at most {MAX_ROWS} rows, got {m}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be contiguous [{k}], got {tuple(norm_weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(-1) != 1:
        raise ValueError(f"weight must be [out, {k}] with contiguous rows, got {weight.shape}")
    if gated_silu and weight.shape[0] % 2:
        raise ValueError(f"a gate | up weight has an even row count, got {weight.shape[0]}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{weight.shape[0]}], got {tuple(bias.shape)}")
    tensors = [x, norm_weight, weight] + [t for t in (residual, bias) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError("x, residual, norm_weight, weight and bias must share one dtype")
