"""CUDA graphs for decode steps: capture once per padded batch size, replay every step.

A decode step launches a few hundred small kernels; at small batches launching them costs
more than running them. A graph replays the whole step with one launch. Graphs read and write
fixed addresses, so every input lives in a static buffer sized for the largest batch and a
step copies its inputs in before the replay; a batch of n runs the graph of the next captured
size >= n, its extra rows padded (slot -1: ``reshape_and_cache`` skips them; a one-token
context at block 0 for attention; their outputs are dropped). Sizes are captured largest first
into one shared memory pool, so the smaller graphs reuse the largest one's memory.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

from engine_svc.runner.cuda_model_ops import BatchTensors

log = logging.getLogger("pagedserve.cuda_graphs")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_num_seqs (vLLM's schedule), ascending."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)  # so every allowed decode batch has a graph
    return sizes


class DecodeGraphs:
    """Static input buffers plus one captured graph per batch size."""

    def __init__(
        self,
        run: Callable[[BatchTensors], torch.Tensor],  # the model forward: batch -> hidden
        sizes: list[int],
        max_blocks_per_seq: int,
        num_splits: Callable[[int], int],  # split-KV partitions for a batch size
        device: torch.device,
    ) -> None:
        self.run = run
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.num_splits = num_splits
        self.device = device
        b = self.max_batch
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(b, **i64)
        self.positions = torch.zeros(b, **i64)
        self.slot_mapping = torch.full((b,), -1, **i64)
        self.block_tables = torch.zeros(b, max_blocks_per_seq, **i32)
        self.seq_lens = torch.ones(b, **i32)
        # Decode: query i is token i; constant, never rewritten.
        self.query_start_loc = torch.arange(b + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def batch_view(self, size: int) -> BatchTensors:
        return BatchTensors(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            num_splits=self.num_splits(size),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first: the first graph sizes the shared pool, the others fit inside it."""
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            batch = self.batch_view(size)
            # Warm up outside the capture: Triton compiles (and cuBLAS picks its kernels) on
            # first use, which must not happen while capturing.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.run(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                out = self.run(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
            self.outputs[size] = out
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def padded_size(self, n: int) -> int | None:
        """The captured size a batch of n runs in, or None (eager) above the largest."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def replay(
        self,
        input_ids: torch.Tensor,  # [n] int64 on the device
        positions: torch.Tensor,  # [n] int64
        slot_mapping: torch.Tensor,  # [n] int64
        seq_lens: torch.Tensor,  # [n] int32
        block_tables: torch.Tensor,  # [n, width] int32, width <= max_blocks_per_seq
    ) -> torch.Tensor:  # [n, hidden], valid until the next replay
        n = input_ids.shape[0]
        size = self.padded_size(n)
        if size is None:
            raise ValueError(f"no graph for a batch of {n} (largest is {self.max_batch})")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.seq_lens[:n].copy_(seq_lens)
        # Columns past a row's last block are never read: stale values there are harmless.
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        if size > n:  # padded rows: no KV write, a one-token context in block 0
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size, 0].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:n]
