"""Turns a SchedulerOutput into one forward pass over the flattened batch, and returns the
logits of the positions that are sampled (plus every position of prompt-logprob chunks).
The model runs on the CPU ops of ``engine_svc.runner.cpu_model_ops``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine_svc.core.scheduler import ScheduledSeq, SchedulerOutput
from engine_svc.models.config import ModelConfig
from engine_svc.models.llama import LlamaModel
from engine_svc.runner import cpu_ops
from engine_svc.runner.attention import LayerKV, build_metadata
from engine_svc.runner.cpu_model_ops import FusedCpuOps, cpu_model_ops
from protos.errors import InvalidRequestError


@dataclass(slots=True)
class RunnerOutput:
    sample_seqs: list[ScheduledSeq] = field(default_factory=list)
    sample_logits: torch.Tensor | None = None  # [len(sample_seqs), vocab] float32
    # request id -> logits [num_new_tokens, vocab] of every position of its chunk
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cfg: ModelConfig,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        quantization: str | None = None,
        kv_cache_dtype: torch.dtype | None = None,  # None: the model dtype
    ) -> None:
        self.model, self.cfg, self.dtype = model, cfg, dtype
        self.block_size = block_size
        # The fused CPU decode kernel reads KV blocks in place (no gather copy); the
        # plain-torch path stays as the fallback when it cannot be built.
        self.fused_decode = cpu_ops.load() is not None
        # Prompt chunks likewise (cpu_ops.paged_prefill, flash-attention order): float32 only
        # so far; a bfloat16 model keeps torch's matmuls (oneDNN, AMX where present), which
        # this kernel has not been measured against.
        self.fused_prefill = (
            self.fused_decode and dtype == torch.float32 and cfg.head_size % 16 == 0
        )
        # Linear layers over packed weights (engine_svc.runner.cpu_ops.PackedLinear): float32
        # on an AVX-512 or AVX2 CPU, faster than BLAS at every batch size measured; int8 weights
        # when quantization asks for them, whatever the dtype.
        self.packed_linears = 0
        if quantization == "int8":
            if not cpu_ops.packed_linear_supported():
                why = cpu_ops.load_error() or "this CPU has neither AVX-512 nor AVX2 with FMA"
                raise InvalidRequestError(
                    f"--quantization int8 needs the C++ CPU kernels' packed linear layers: {why}"
                )
            self.packed_linears = cpu_ops.pack_linears(model, int8=True)
        elif dtype == torch.float32 and cpu_ops.packed_linear_supported():
            self.packed_linears = cpu_ops.pack_linears(model)
        # float32: the element-wise ops fused in C++ (FusedCpuOps); plain torch otherwise.
        self.ops = cpu_model_ops(cfg, dtype, max_model_len)
        # Those ops with every linear layer packed: decode-only steps run the decoder layers
        # in one C++ call (cpu_ops.DecodeStack, the same ops without the Python in between).
        self.decode_stack = None
        if self.fused_decode and isinstance(self.ops, FusedCpuOps):
            self.decode_stack = cpu_ops.decode_stack(model)
        # One tensor for the whole cache: [layers, K|V, kv_heads, blocks, block_size, head_size]
        # (heads outer: see engine_svc.runner.attention.attend), in the KV cache dtype; an int8
        # cache has its scales beside it, [layers, K|V, kv_heads, blocks, block_size].
        self.kv_dtype = kv_cache_dtype or dtype
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks, block_size)
        self.kv_caches = torch.zeros(*shape, cfg.head_size, dtype=self.kv_dtype)
        self.kv_scales = torch.ones(shape) if self.kv_dtype == torch.int8 else None
        self.layer_kv = [
            LayerKV(
                self.kv_caches[i, 0],
                self.kv_caches[i, 1],
                None if self.kv_scales is None else self.kv_scales[i, 0],
                None if self.kv_scales is None else self.kv_scales[i, 1],
            )
            for i in range(cfg.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        # Decodes first, by context length: the attention plan batches neighbours together.
        seqs = sorted(
            sched.seqs,
            key=lambda s: (s.num_new_tokens != 1, s.request.num_computed_tokens + s.num_new_tokens),
        )
        ids: list[int] = []
        positions: list[int] = []
        q_lens, seq_lens, tables = [], [], []
        for s in seqs:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(s.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            q_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            tables.append(s.block_table)
        meta = build_metadata(
            q_lens, seq_lens, tables, self.block_size, self.fused_decode, self.fused_prefill
        )
        step = self.ops.step(torch.tensor(positions, dtype=torch.int64), meta)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        f = meta.fused_decodes
        if self.decode_stack is not None and f is not None and f.num == len(ids):
            hidden = self.decode_stack.run(
                self.model.embed_tokens(input_ids),
                self.kv_caches,
                self.kv_scales,
                step.cos,
                step.sin,
                meta.slot_mapping,
                f.block_tables,
                f.seq_lens,
            )
        else:
            hidden = self.model(input_ids, self.layer_kv, self.ops, step)

        return select_logits(self.model, seqs, hidden)


def select_logits(
    model: LlamaModel, seqs: list[ScheduledSeq], hidden: torch.Tensor
) -> RunnerOutput:
    """Logits of the rows that sample (each chunk's last row), plus every row of chunks whose
    prompt logprobs were asked for. ``seqs`` in the order their rows sit in ``hidden``."""
    out = RunnerOutput()
    rows: list[int] = []
    prompt_rows: list[tuple[str, int, int]] = []
    offset = 0
    for s in seqs:
        end = offset + s.num_new_tokens
        r = s.request
        if r.params.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens:
            prompt_rows.append((r.request_id, offset, end))
        if s.samples:
            out.sample_seqs.append(s)
            rows.append(end - 1)
        offset = end
    if rows:
        # rows only grow, so as many rows as hidden has means all of them: no gather
        last = hidden
        if len(rows) < hidden.shape[0]:
            last = hidden[torch.tensor(rows, device=hidden.device)]
        out.sample_logits = model.compute_logits(last).float()
    for rid, a, b in prompt_rows:
        out.prompt_logits[rid] = model.compute_logits(hidden[a:b]).float()
    return out
