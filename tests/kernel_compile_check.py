"""Compile every Triton kernel for an NVIDIA GPU on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as NumPy code, so it accepts things the
GPU compiler rejects and never shows what a launch costs in shared memory. This script sends
each launcher's real launches through Triton's own specialization and compiler (down to a
cubin, with the ``ptxas`` that ships in the triton wheel) for a CUDA target, by standing a
stand-in for the CUDA driver in front of ``JITFunction.run`` and compiling with ``warmup``
(compile, do not launch). It prints one JSON line per compiled kernel.

    python -m tests.kernel_compile_check [--arch 90]

Run in a process of its own without ``TRITON_INTERPRET`` (``tests/test_kernels_compile.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _NoGpuDriver:
    """The few driver calls a warmup compile makes, answered for a fixed target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _cases():
    """(name, thunk) pairs; each thunk calls launchers with CPU tensors of a real layout."""
    from kernels import triton_ops as ops

    def attention(dtype, heads, head_size, block_size, query_lens, splits):
        num_heads, kv_heads = heads
        seq_lens = [q + 20 for q in query_lens]
        q = torch.zeros(sum(query_lens), num_heads, head_size, dtype=dtype)
        kc = torch.zeros(64, block_size, kv_heads, head_size, dtype=dtype)
        tables = torch.zeros(len(seq_lens), 8, dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        i32 = dict(dtype=torch.int32)
        args = (torch.tensor(seq_lens, **i32), torch.tensor(starts, **i32))
        return lambda: ops.paged_attention(q, kc, kc.clone(), tables, *args, 0.1, None, splits)

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    yield "attention decode bf16 8B heads, splits 1", attention(bf16, (32, 8), 128, 16, [1] * 4, 1)
    yield "attention decode bf16, splits 64", attention(bf16, (32, 8), 128, 16, [1] * 2, 64)
    yield "attention one decode (num_seqs == 1)", attention(bf16, (32, 8), 128, 16, [1], 8)
    yield "attention mixed fp16 head 64 block 32", attention(fp16, (6, 2), 64, 32, [7, 1, 40], 1)
    yield "attention mixed fp32 head 128 GQA 1", attention(fp32, (4, 4), 128, 16, [3, 1], 1)
    yield "attention decode fp32, splits 8", attention(fp32, (32, 8), 128, 16, [1] * 3, 8)
    yield "attention mixed fp32 head 256", attention(fp32, (8, 4), 256, 16, [5, 1], 1)

    def cache(dtype):
        k = torch.zeros(5, 8, 128, dtype=dtype)
        kc = torch.zeros(16, 16, 8, 128, dtype=dtype)
        slots = torch.tensor([3, -1, 17, 40, 41])
        return lambda: ops.reshape_and_cache(k, k.clone(), kc, kc.clone(), slots)

    yield "reshape_and_cache bf16", cache(bf16)
    yield "reshape_and_cache fp32", cache(fp32)

    def norm(dtype, fused):
        x = torch.zeros(5, 4096, dtype=dtype)
        w = torch.ones(4096, dtype=dtype)
        if fused:
            return lambda: ops.fused_add_rms_norm(x, x.clone(), w, 1e-5)
        return lambda: ops.rms_norm(x, w, 1e-5)

    yield "rms_norm bf16", norm(bf16, fused=False)
    yield "fused_add_rms_norm bf16", norm(bf16, fused=True)
    yield "fused_add_rms_norm fp32", norm(fp32, fused=True)

    def rotary(dtype, head_size, rotary_dim):
        qkv = torch.zeros(5, (32 + 2 * 8) * head_size, dtype=dtype)
        q = qkv[:, : 32 * head_size].view(5, 32, head_size)
        k = qkv[:, 32 * head_size : 40 * head_size].view(5, 8, head_size)
        cache = torch.zeros(64, rotary_dim)
        return lambda: ops.rotary_embedding(torch.arange(5), q, k, cache)

    yield "rotary bf16 head 128", rotary(bf16, 128, 128)
    yield "rotary fp16 head 64, partial", rotary(fp16, 64, 32)

    def rotary_cache(dtype, head_size, rotary_dim, block_size):
        qkv = torch.zeros(5, (32 + 2 * 8) * head_size, dtype=dtype)
        q = qkv[:, : 32 * head_size].view(5, 32, head_size)
        k = qkv[:, 32 * head_size : 40 * head_size].view(5, 8, head_size)
        v = qkv[:, 40 * head_size :].view(5, 8, head_size)
        kc = torch.zeros(16, block_size, 8, head_size, dtype=dtype)
        cache = torch.zeros(64, rotary_dim)
        slots = torch.tensor([3, -1, 17, 40, 41])
        return lambda: ops.rotary_and_cache(torch.arange(5), q, k, v, cache, kc, kc.clone(), slots)

    yield "rotary_and_cache bf16 head 128", rotary_cache(bf16, 128, 128, 16)
    yield "rotary_and_cache fp32 head 64 block 32, partial", rotary_cache(fp32, 64, 32, 32)

    def silu_mul(dtype, inter):
        x = torch.zeros(5, 2 * inter, dtype=dtype)
        return lambda: ops.silu_and_mul(x)

    yield "silu_and_mul bf16 8B", silu_mul(bf16, 14336)
    yield "silu_and_mul fp16 ragged", silu_mul(fp16, 2500)

    def norm_linear(dtype, rows, hidden, out, residual, gated, bias=False):
        x = torch.zeros(rows, hidden, dtype=dtype)
        w = torch.zeros(2 * out if gated else out, hidden, dtype=dtype)
        b = torch.zeros(w.shape[0], dtype=dtype) if bias else None
        r = x.clone() if residual else None
        nw = torch.ones(hidden, dtype=dtype)
        return lambda: ops.rms_norm_linear(x, r, nw, 1e-5, w, b, gated)

    yield "rms_norm_linear bf16 1B qkv, batch 1", norm_linear(bf16, 1, 2048, 3072, True, False)
    yield (
        "rms_norm_linear bf16 8B gate_up, batch 16",
        norm_linear(bf16, 16, 4096, 14336, True, True),
    )
    yield (
        "rms_norm_linear bf16 first layer, bias",
        norm_linear(bf16, 3, 896, 1152, False, False, True),
    )
    yield "rms_norm_linear fp32 64 rows, gated", norm_linear(fp32, 64, 576, 1536, True, True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = p.parse_args(argv)
    driver.set_active(_NoGpuDriver(args.arch))
    compiled: list[dict] = []
    run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):  # noqa: ARG001 (grid: never launched)
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        m = kernel.metadata
        compiled.append(
            dict(kernel=self.fn.__name__, shared=m.shared, num_warps=m.num_warps,
                 num_stages=m.num_stages, cubin=len(kernel.asm.get("cubin", b"")))
        )  # fmt: skip
        return kernel

    JITFunction.run = compile_only
    failed = 0
    try:
        for name, launch in _cases():
            compiled.clear()
            try:
                launch()
            except Exception as e:  # report every case, then fail
                failed += 1
                print(json.dumps(dict(case=name, error=f"{type(e).__name__}: {e}"[:2000])))
                continue
            for k in compiled:
                print(json.dumps(dict(case=name, arch=args.arch, **k)))
    finally:
        JITFunction.run = run
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
