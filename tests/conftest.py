"""Shared pytest hooks: `gpu` tests are skipped without CUDA, and without CUDA every Triton
kernel runs under Triton's interpreter on CPU tensors (the variable must be set before the
kernels are decorated, i.e. before any test module imports them)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_bf16() -> None:
    """Two bfloat16 defects of Triton's interpreter (3.9), fixed so that interpreted kernels
    compute what the GPU computes: float32 -> bfloat16 truncates (GPUs and torch round to
    nearest even), and ``tl.dot`` multiplies bfloat16 operands as their raw uint16 bits."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast, dot = getattr(builder, "cast_impl", None), getattr(builder, "create_dot", None)
    if cast is None or dot is None or getattr(cast, "_fixed_bf16", False):
        return

    def bf16_bits_to_f32(data):
        return (np.ascontiguousarray(data).astype(np.uint32) << 16).view(np.float32)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(src.data.shape), dst_type.scalar)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(bf16_bits_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(bf16_bits_to_f32(b.data), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    cast_impl._fixed_bf16 = True
    builder.cast_impl = cast_impl  # create_fp_trunc and friends call self.cast_impl
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
