"""The CPU decode-attention kernel (``cpu_ops.paged_decode``) by KV cache precision, portable
path against the vectorized one, on one layer's worth of work.

    python -m benchmarks.decode_attention                     # 64 sequences x 512 tokens
    python -m benchmarks.decode_attention --seqs 24 --context 2048

Blocks are taken in random order (as a long-running cache hands them out). Best of
``--repeats`` rounds of 10 calls; ms per call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=512, help="tokens of each sequence")
    ap.add_argument("--heads", default="9,3", help="query heads,KV heads (default model's)")
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from engine_svc.runner import cpu_ops
    from kernels.reference import quantize_kv_int8

    torch.set_num_threads(args.threads)
    module = cpu_ops.load()
    if module is None:
        raise SystemExit(f"the C++ kernels are not available: {cpu_ops.load_error()}")
    n, bs, d = args.seqs, args.block_size, args.head_size
    h, kvh = (int(x) for x in args.heads.split(","))
    per_seq = -(-args.context // bs)
    nb = n * per_seq + 1
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(kvh, nb, bs, d, generator=gen)
    v = torch.randn(kvh, nb, bs, d, generator=gen)
    q = torch.randn(n, h, d, generator=gen)
    tables = torch.randperm(nb, generator=gen)[: n * per_seq].view(n, per_seq)
    lens = torch.full((n,), args.context, dtype=torch.int64)
    kq, ks = quantize_kv_int8(k)
    vq, vs = quantize_kv_int8(v)
    caches = {
        "float32": (k, v),
        "bfloat16": (k.bfloat16(), v.bfloat16()),
        "float16": (k.half(), v.half()),
        "int8": (kq, vq, ks, vs),
    }

    def best(cache) -> float:
        call = lambda: cpu_ops.paged_decode(q, *cache[:2], tables, lens, d**-0.5, *cache[2:])  # noqa: E731
        for _ in range(3):
            call()
        out = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(10):
                call()
            out = min(out, (time.perf_counter() - t0) / 10)
        return out * 1e3

    print(f"{n} sequences x {args.context} tokens, {h}/{kvh} heads of {d}, {args.threads} threads")
    print("| KV cache | MB read | portable (ms) | vectorized (ms) |")
    print("|---|---:|---:|---:|")
    for name, cache in caches.items():
        mb = sum(t[:, :].numel() * t.element_size() for t in cache) / 1e6
        module.use_generic_decode(True)
        generic = best(cache)
        module.use_generic_decode(False)
        print(f"| {name} | {mb:.0f} | {generic:.2f} | {best(cache):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
