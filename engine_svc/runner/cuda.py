"""The model runner on a CUDA GPU: Triton kernels, KV cache sized by a profile run, decode
steps replayed from CUDA graphs. Same contract as ``engine_svc.runner.cpu.ModelRunner``:
``execute(SchedulerOutput) -> RunnerOutput``.

Construction is in two phases because the KV cache size depends on what the model needs:
``profile_num_blocks()`` runs the worst-case step (``max_num_batched_tokens`` tokens) and
turns ``gpu_memory_utilization`` of the device into a block count; the engine then sizes its
block manager and calls ``init_kv_cache(num_blocks)``, which allocates the cache and captures
the decode graphs (they hold the cache's address).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from engine_svc.core.scheduler import ScheduledSeq, SchedulerOutput
from engine_svc.models.config import ModelConfig, rope_cos_sin_cache
from engine_svc.models.llama import LlamaModel
from engine_svc.runner.cpu import RunnerOutput, select_logits
from engine_svc.runner.cuda_graphs import DecodeGraphs, capture_sizes
from engine_svc.runner.cuda_model_ops import BatchTensors, KernelOps

log = logging.getLogger("pagedserve.cuda_runner")

MAX_SPLITS = 64


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Split-KV partitions so a decode launch has about two programs per SM (a power of two).

    It depends on the batch size only, so one captured graph serves every context length;
    short contexts leave some splits empty, which exit at once.
    """
    programs = max(1, num_seqs * num_kv_heads)
    splits = 1
    while splits < MAX_SPLITS and programs * splits < 2 * num_sms:
        splits *= 2
    return splits


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class HostBlockTables:
    """The block tables of recent requests as rows of one int32 array, kept across steps.

    Rebuilding a [num_seqs, width] table from Python lists every step costs milliseconds at
    256 sequences of long context; here a step writes only the blocks appended since the
    request's last step. That relies on the block manager's contract: a request's table is
    one live list that only grows while the request runs. A different list object under the
    same request id means it was preempted and admitted again, and its row is rewritten. Rows
    of requests absent from a step are reclaimed when rows run out (always correct: a row
    that comes back is written again).
    """

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.array = np.zeros((num_rows, max_blocks), dtype=np.int32)
        # request id -> (row, the list that row mirrors, entries copied)
        self._rows: dict[str, tuple[int, list[int], int]] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def rows(self, seqs: Sequence[ScheduledSeq], lengths: list[int] | None = None) -> np.ndarray:
        """Row index of each sequence's table, after bringing the rows up to date; each
        table's length (its own blocks; the row holds stale ids after them) is appended to
        ``lengths`` when given."""
        out = np.empty(len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            rid, blocks = s.request.request_id, s.block_table
            n = len(blocks)
            if lengths is not None:
                lengths.append(n)
            if n > self.array.shape[1]:
                raise ValueError(f"{rid}: {n} blocks, table width {self.array.shape[1]}")
            row, mirrored, done = self._rows.get(rid) or (-1, None, 0)
            if mirrored is not blocks:  # new here, or re-admitted after a preemption
                row = row if row >= 0 else self._take_row(seqs)
                done = 0
            if n > done:
                self.array[row, done:n] = blocks[done:n]
            self._rows[rid] = (row, blocks, n)
            out[i] = row
        return out

    def _take_row(self, seqs: Sequence[ScheduledSeq]) -> int:
        if not self._free:
            live = {s.request.request_id for s in seqs}
            for rid in [r for r in self._rows if r not in live]:
                self._free.append(self._rows.pop(rid)[0])
        if not self._free:
            raise ValueError(f"more sequences in one step than {self.array.shape[0]} rows")
        return self._free.pop()


class CudaModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cfg: ModelConfig,
        dtype: torch.dtype,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        device: torch.device | str = "cuda",
        fused_norm_linear: bool | None = None,
    ) -> None:
        from kernels import triton_ops  # triton is only needed (and maybe only installed) here

        self.kernels = triton_ops  # the model runs on KernelOps over these
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # set_device needs one
        self.cfg, self.dtype, self.block_size = cfg, dtype, block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        # Small decode batches through kernels/linear.py's fused norm -> projection (see
        # cuda_model_ops). Off unless asked for until a GPU run shows it beats cuBLAS there:
        # gpu_bench times both side by side.
        if fused_norm_linear is None:
            fused_norm_linear = os.environ.get("PAGEDSERVE_FUSED_NORM_LINEAR", "0") == "1"
        self.fused_norm_linear = fused_norm_linear
        self.used_before, self.num_sms = 0, 1
        # device="cpu" runs this runner with interpreted kernels (tests only): no CUDA queries.
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            # Memory in use before we load anything (other processes, our CUDA context) counts
            # against the utilization budget, as in vLLM.
            self.used_before = total - free
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.model = model.to(self.device)
        self.kv_caches: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None
        self.cos_sin_cache = rope_cos_sin_cache(cfg, cfg.max_position_embeddings).to(self.device)

    # -- startup ------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return self.cfg.kv_bytes_per_token(self.dtype) * self.block_size

    @torch.inference_mode()
    def profile_num_blocks(self) -> int:
        """Run the largest step the scheduler can send and size the KV cache to what is left
        of ``gpu_memory_utilization * total`` after weights, peak activations and the memory
        outside torch's allocator (CUDA context, cuBLAS workspaces, Triton modules)."""
        num_tokens = self.max_num_batched_tokens
        num_seqs = max(1, min(self.max_num_seqs, num_tokens))
        blocks_per_seq = _cdiv(_cdiv(num_tokens, num_seqs), self.block_size)
        profile_blocks = num_seqs * blocks_per_seq
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_kv(profile_blocks)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        batch = self._prefill_batch(lens, blocks_per_seq)
        ops = KernelOps(self.kernels, self.cos_sin_cache)
        hidden = self.model(batch.input_ids, self.kv_caches, ops, batch)
        # The sampler's float32 logits for every sequence are part of the peak.
        logits = self.model.compute_logits(hidden[: self.max_num_seqs]).float()
        torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        del hidden, logits
        peak = torch.cuda.max_memory_allocated(self.device)
        profile_kv = self.kv_caches.numel() * self.kv_caches.element_size()
        self.kv_caches = None
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - self.used_before - torch.cuda.memory_reserved(self.device)
        activations = peak - profile_kv
        # Decode graphs keep their own pool: at most one max-batch decode's activations.
        graph_reserve = 0 if self.enforce_eager else activations * self.max_num_seqs // num_tokens
        budget = (
            self.gpu_memory_utilization * total
            - self.used_before
            - max(non_torch, 0)
            - activations
            - graph_reserve
        )
        num_blocks = int(budget // self.kv_bytes_per_block())
        log.info(
            "profile: weights+activations %.2f GiB, non-torch %.2f GiB, KV budget %.2f GiB "
            "= %d blocks",
            activations / 2**30,
            max(non_torch, 0) / 2**30,
            max(budget, 0) / 2**30,
            num_blocks,
        )
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache at gpu_memory_utilization="
                f"{self.gpu_memory_utilization}: raise it or lower max_num_batched_tokens"
            )
        torch.cuda.empty_cache()
        return num_blocks

    def init_kv_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._allocate_kv(num_blocks)
        self.max_blocks_per_seq = _cdiv(max_model_len, self.block_size)
        # Twice the running limit, so finished requests' rows are rarely reclaimed mid-step.
        self.host_tables = HostBlockTables(2 * self.max_num_seqs, self.max_blocks_per_seq)
        if max_model_len > self.cos_sin_cache.shape[0]:
            self.cos_sin_cache = rope_cos_sin_cache(self.cfg, max_model_len).to(self.device)
        if self.enforce_eager:
            return
        self.graphs = DecodeGraphs(
            self._forward,
            capture_sizes(self.max_num_seqs),
            self.max_blocks_per_seq,
            lambda n: decode_num_splits(n, self.cfg.num_kv_heads, self.num_sms),
            self.device,
        )
        self.graphs.capture()

    def _allocate_kv(self, num_blocks: int) -> None:
        c = self.cfg
        # [layers, K|V, blocks, block_size, kv_heads, head_size]: the kernels' block-major layout.
        # Zeros, not empty: padded graph rows read block 0 and must see finite numbers.
        self.kv_caches = torch.zeros(
            c.num_layers,
            2,
            num_blocks,
            self.block_size,
            c.num_kv_heads,
            c.head_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _forward(self, batch: BatchTensors) -> torch.Tensor:
        ops = KernelOps(self.kernels, self.cos_sin_cache, self.fused_norm_linear)
        return self.model(batch.input_ids, self.kv_caches, ops, batch)

    def _prefill_batch(self, lens: list[int], blocks_per_seq: int) -> BatchTensors:
        """Fresh prompts of the given lengths, sequence i in blocks [i * bps, (i + 1) * bps)."""
        slots, positions, tables, starts = [], [], [], [0]
        for i, n in enumerate(lens):
            table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            tables.append(table)
            positions.extend(range(n))
            slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(n))  # fmt: skip
            starts.append(starts[-1] + n)
        return self._to_device(
            [0] * len(positions), positions, slots, np.array(tables), lens, starts, num_splits=1
        )

    def _to_device(self, ids, positions, slots, tables: np.ndarray, seq_lens, starts, num_splits):
        dev = self.device

        def put(values, dtype):
            pinned = dev.type == "cuda"  # pinned host memory makes the copy asynchronous
            if isinstance(values, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
                return (t.pin_memory() if pinned else t).to(dev, non_blocking=True)
            return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(dev, non_blocking=True)

        def put_array(a: np.ndarray) -> torch.Tensor:  # a fresh array, never the host store
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
            return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)

        return BatchTensors(
            input_ids=put(ids, torch.int64),
            positions=put(positions, torch.int64),
            slot_mapping=put(slots, torch.int64),
            block_tables=put_array(tables),
            seq_lens=put(seq_lens, torch.int32),
            query_start_loc=put(starts, torch.int32),
            num_splits=num_splits,
        )

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self.kv_caches is None:
            raise RuntimeError("init_kv_cache() must run before execute()")
        seqs: list[ScheduledSeq] = list(sched.seqs)
        batch, decode_only = self.build_batch(seqs)
        if decode_only and self.graphs is not None and self.graphs.padded_size(len(seqs)):
            hidden = self.graphs.replay(
                batch.input_ids,
                batch.positions,
                batch.slot_mapping,
                batch.seq_lens,
                batch.block_tables,
            )
        else:
            hidden = self._forward(batch)
        return select_logits(self.model, seqs, hidden)

    def build_batch(self, seqs: Sequence[ScheduledSeq]) -> tuple[BatchTensors, bool]:
        """This step's inputs on the device, and whether it is decode-only (graph-eligible)."""
        lengths: list[int] = []
        rows = self.host_tables.rows(seqs, lengths)
        if all(s.num_new_tokens == 1 for s in seqs):
            return self._decode_batch(seqs, rows, np.array(lengths, dtype=np.int64)), True
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens, starts = [], [0]
        bs = self.block_size
        width = 1
        for s in seqs:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            table = s.block_table
            ids.extend(s.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            width = max(width, _cdiv(end, bs))
            starts.append(starts[-1] + s.num_new_tokens)
        # Columns past a sequence's own blocks hold other data; the kernels never read them.
        tables = self.host_tables.array[rows, :width]
        batch = self._to_device(ids, positions, slots, tables, seq_lens, starts, num_splits=1)
        return batch, False

    def _decode_batch(
        self, seqs: Sequence[ScheduledSeq], rows: np.ndarray, have: np.ndarray
    ) -> BatchTensors:
        """build_batch for a decode-only step (one new token per sequence), in NumPy: the
        slots come from the host block tables, not from each request's list."""
        n, bs = len(seqs), self.block_size
        pos = np.fromiter((s.request.num_computed_tokens for s in seqs), np.int64, n)
        # Past a request's own blocks (``have``) a row holds stale ids: a table too short for
        # the new token must fail here (as indexing the request's list would), not write
        # into another request's block.
        if (pos // bs >= have).any():
            i = int(np.argmax(pos // bs >= have))
            raise ValueError(f"{seqs[i].request.request_id}: no KV block for position {pos[i]}")
        ids = [s.request.all_token_ids[p] for s, p in zip(seqs, pos.tolist())]
        seq_lens = pos + 1
        width = _cdiv(int(seq_lens.max()), bs) if n else 1
        slots = self.host_tables.array[rows, pos // bs].astype(np.int64) * bs + pos % bs
        splits = decode_num_splits(n, self.cfg.num_kv_heads, self.num_sms)
        return self._to_device(
            ids, pos, slots, self.host_tables.array[rows, :width], seq_lens,
            np.arange(n + 1), num_splits=splits,
        )  # fmt: skip
