"""Every Triton kernel compiles for NVIDIA GPUs (sm_90 and sm_80) on this CPU-only machine.

The interpreter tests (tests/test_kernels.py) check what the kernels compute; this checks that
the GPU compiler accepts them and that each launch fits in the target's shared memory. It runs
``tests/kernel_compile_check.py`` in a process without ``TRITON_INTERPRET`` (set in this one by
conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
# Most shared memory one block may use (opt-in limit): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
EXPECTED = {
    "attention decode bf16 8B heads, splits 1": {"_paged_attention_kernel"},
    "attention decode bf16, splits 64": {"_paged_attention_kernel", "_combine_splits_kernel"},
    "attention one decode (num_seqs == 1)": {"_paged_attention_kernel", "_combine_splits_kernel"},
    "attention mixed fp16 head 64 block 32": {"_paged_attention_kernel"},
    "attention mixed fp32 head 128 GQA 1": {"_paged_attention_kernel"},
    "attention decode fp32, splits 8": {"_paged_attention_kernel", "_combine_splits_kernel"},
    "attention mixed fp32 head 256": {"_paged_attention_kernel"},
    "reshape_and_cache bf16": {"_reshape_and_cache_kernel"},
    "reshape_and_cache fp32": {"_reshape_and_cache_kernel"},
    "rms_norm bf16": {"_rms_norm_kernel"},
    "fused_add_rms_norm bf16": {"_rms_norm_kernel"},
    "fused_add_rms_norm fp32": {"_rms_norm_kernel"},
    "rotary bf16 head 128": {"_rotary_kernel"},
    "rotary fp16 head 64, partial": {"_rotary_kernel"},
    "rotary_and_cache bf16 head 128": {"_rotary_kernel"},
    "rotary_and_cache fp32 head 64 block 32, partial": {"_rotary_kernel"},
    "silu_and_mul bf16 8B": {"_silu_and_mul_kernel"},
    "silu_and_mul fp16 ragged": {"_silu_and_mul_kernel"},
    "rms_norm_linear bf16 1B qkv, batch 1": {"_rms_norm_linear_kernel"},
    "rms_norm_linear bf16 8B gate_up, batch 16": {"_rms_norm_linear_kernel"},
    "rms_norm_linear bf16 first layer, bias": {"_rms_norm_linear_kernel"},
    "rms_norm_linear fp32 64 rows, gated": {"_rms_norm_linear_kernel"},
}


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # empty: every kernel really compiles
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile_check", "--arch", str(arch)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in rows if "error" in r]
    assert not errors and proc.returncode == 0, (errors, proc.stderr[-3000:])
    got: dict[str, set[str]] = {}
    for r in rows:
        got.setdefault(r["case"], set()).add(r["kernel"])
        assert r["cubin"] > 0, r
        assert r["shared"] <= SHARED_LIMIT[arch], r
    assert got == EXPECTED
