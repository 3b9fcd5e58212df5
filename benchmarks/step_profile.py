"""Where a CPU engine step's time goes: linear layers, the lm_head, decode attention, the rest
of the forward (element-wise ops, KV writes and the host work between ops), sampling and the
scheduler, at several decode batch sizes, and for one prefill chunk.

Each part is timed by wrapping the function that runs it (``F.linear`` and the packed linear
kernel, the decode-attention kernel, ``compute_logits``, the sampler, ``schedule``/``update``),
over decode-only steps after every prompt is in the cache. The wrappers add about a
microsecond per call: the "rest" column carries that. Where decode steps run the C++
``DecodeStack`` (float32), its linears, attention and element-wise ops are one call, shown as
"decoder stack"; ``--no-decode-stack`` shows its parts through the Python forward.

    python -m benchmarks.step_profile                       # float32, batch 1/24/64 + prefill
    python -m benchmarks.step_profile --quantization int8 --batches 1,24

Works on older checkouts too (it only needs ``engine_svc.LLM``), which is how the "before"
rows in docs/benchmarks.md were made.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class Timers:
    """Exclusive time per key: a timed call inside another is charged to its own key and
    taken off its parent's, except inside an ``opaque`` part, which keeps everything it calls
    (the lm_head's own linear layer counts as lm_head)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.stack: list[list] = []  # [key, time charged to children, opaque]

    def wrap(self, owner, name: str, key: str, opaque: bool = False) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            if self.stack and self.stack[-1][2]:
                return fn(*args, **kwargs)
            self.stack.append([key, 0.0, opaque])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, children, _ = self.stack.pop()
                self.t[key] = self.t.get(key, 0.0) + elapsed - children
                if self.stack:
                    self.stack[-1][1] += elapsed

        setattr(owner, name, timed)


def profile(args: argparse.Namespace, batch: int, prefill: int | None) -> dict[str, float]:
    from engine_svc import LLM, SamplingParams

    kwargs = {"quantization": args.quantization} if args.quantization else {}
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    llm = LLM(args.model, dtype=args.dtype, progress=False, enable_prefix_caching=False, **kwargs)
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=args.steps + 64, ignore_eos=True)
    if prefill is None:
        for i in range(batch):  # contexts 128 .. 128 + 4 * batch, like a mixed batch
            eng.add_request(f"r{i}", [(1000 + 7 * i + t) % 4096 for t in range(128 + 4 * i)], sp)
        while any(
            r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()
        ):
            eng.step()
        for _ in range(3):
            eng.step()
    timers = Timers()
    from engine_svc.runner import cpu_ops

    timers.wrap(eng.scheduler, "schedule", "scheduler")
    timers.wrap(eng.scheduler, "update", "scheduler")
    timers.wrap(eng, "_sample", "sampler")
    timers.wrap(eng.runner.model, "compute_logits", "lm_head", opaque=True)
    timers.wrap(cpu_ops, "paged_decode", "attention")
    timers.wrap(cpu_ops, "packed_linear", "linears")
    timers.wrap(F, "linear", "linears")
    timers.wrap(eng.runner, "execute", "forward")
    stack = getattr(eng.runner, "decode_stack", None)
    if stack is not None and args.no_decode_stack:
        eng.runner.decode_stack = None
    elif stack is not None:  # a pybind object: time it through a stand-in
        proxy = argparse.Namespace(run=stack.run)
        eng.runner.decode_stack = proxy
        timers.wrap(proxy, "run", "decoder stack", opaque=True)
    total, done = 0.0, 0
    if prefill is None:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        total, done = time.perf_counter() - t0, args.steps
    else:
        for rep in range(args.prefill_repeats):
            eng.add_request(f"p{rep}", [(1000 + t) % 4096 for t in range(prefill)], sp)
            t0 = time.perf_counter()
            eng.step()  # the whole prompt in one chunk (it fits the token budget)
            total, done = total + time.perf_counter() - t0, done + 1
            eng.abort_request([f"p{rep}"])
    n = done
    t = {k: v / n * 1e3 for k, v in timers.t.items()}
    t["rest of forward"] = t.pop("forward", 0.0)  # exclusive: what the parts above leave
    t["step"] = total / n * 1e3
    t["other"] = t["step"] - sum(v for k, v in t.items() if k != "step")
    return t


COLUMNS = (
    "step",
    "linears",
    "lm_head",
    "attention",
    "decoder stack",
    "rest of forward",
    "sampler",
    "scheduler",
    "other",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.step_profile",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default model if unset)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None, choices=["int8"])
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, bfloat16, float16, int8")
    ap.add_argument("--batches", default="1,24,64", help="decode batch sizes, comma-separated")
    ap.add_argument(
        "--prefill", type=int, default=512, help="prompt length of the prefill row (0: none)"
    )
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed per batch size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--no-decode-stack",
        action="store_true",
        help="run decode steps through the Python forward (to see the stack's parts)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        (f"decode, batch {b}", profile(args, int(b), None)) for b in args.batches.split(",") if b
    ]
    if args.prefill:
        rows.append((f"prefill, {args.prefill} tokens", profile(args, 1, args.prefill)))
    mode = args.dtype + (f", {args.quantization} weights" if args.quantization else "")
    mode += f", KV cache {args.kv_cache_dtype}"
    print(f"ms per step ({mode}, {args.threads} threads)")
    print("| step | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, t in rows:
        print(f"| {name} | " + " | ".join(f"{t.get(c, 0.0):.1f}" for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
