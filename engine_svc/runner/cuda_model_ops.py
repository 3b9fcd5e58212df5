"""The CUDA runner's ops for the Llama forward (``engine_svc.models.llama.ModelOps``), and the
step they read (``BatchTensors``).

``KernelOps`` wraps a module of kernels: ``kernels.triton_ops`` on the GPU, or
``kernels.reference`` (same signatures, plain torch), with which the same forward runs on the
CPU: that is how the tests pin the CUDA path to the CPU one. Fewer launches than the CPU path:
the residual add is fused into each RMSNorm; one ``rotary_and_cache`` launch rotates q and k
(cos/sin read from a cache by position) and writes k and v to their cache slots (padded rows
skipped); one ``paged_attention`` launch covers the whole mixed batch; ``silu_and_mul`` is one
launch. Per layer that is two norms, four matmuls and three more kernels (four with split-KV).
None of it syncs with the host or branches on values, so a decode step can be captured in a
CUDA graph as it is.

With ``fused_norm_linear`` a batch of at most ``FUSED_MAX_TOKENS`` tokens (a small decode
step) runs each norm -> projection pair as one ``rms_norm_linear`` launch, the MLP's with
silu-and-mul fused too: six launches per layer (seven with split-KV) instead of nine (ten).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

# Batches of at most this many tokens may take ``rms_norm_linear`` (kernels/linear.py): each
# norm -> projection pair in one launch, its weight read once for all rows. Larger batches
# keep cuBLAS: there launches weigh less against the step, and its tiles suit more rows.
FUSED_MAX_TOKENS = 16


@dataclass(slots=True)
class BatchTensors:
    """One step's inputs on the device; a CUDA graph holds static copies of these."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padded row (no KV write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    num_splits: int = 1  # split-KV partitions of the attention launch (decode batches)


class KernelOps:
    """``ModelOps`` over ``kernels`` (``kernels.triton_ops`` or ``kernels.reference``). One
    layer's KV cache is [K|V, num_blocks, block_size, num_kv_heads, head_size]; the step is a
    ``BatchTensors``."""

    def __init__(
        self,
        kernels: ModuleType,
        cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos half | sin half
        fused_norm_linear: bool = False,
    ) -> None:
        self.kernels = kernels
        self.cos_sin_cache = cos_sin_cache
        self.fused_norm_linear = fused_norm_linear

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.fused_add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(gate_up)

    def fuses_norm_linear(self, num_tokens: int) -> bool:
        return self.fused_norm_linear and num_tokens <= FUSED_MAX_TOKENS

    def rms_norm_linear(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        gated_silu: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.rms_norm_linear(x, residual, norm_weight, eps, weight, bias,
                                            gated_silu=gated_silu)  # fmt: skip

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_size]
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        step: BatchTensors,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        n, kv_size = qkv.shape[0], num_kv_heads * head_size
        q, k, v = qkv.split([num_heads * head_size, kv_size, kv_size], dim=-1)
        return self.kernels.rotary_and_cache(
            step.positions,
            q.view(n, num_heads, head_size),
            k.view(n, num_kv_heads, head_size),
            v.view(n, num_kv_heads, head_size),
            self.cos_sin_cache,
            kv_cache[0],
            kv_cache[1],
            step.slot_mapping,
        )

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, step: BatchTensors, scale: float
    ) -> torch.Tensor:
        return self.kernels.paged_attention(
            q,
            kv_cache[0],
            kv_cache[1],
            step.block_tables,
            step.seq_lens,
            step.query_start_loc,
            scale,
            num_splits=step.num_splits,
        )
