"""Head-of-line benchmark: short requests' time to first token while a long prompt prefills.

The issue it measures: while one 7,000-token prompt prefilled, 40 tiny requests waited a
median 44 s for their first token (0.15 s on an idle server). Targets: the short requests'
TTFT p50 <= 1 s during the long prefill, and the long prompt's own TTFT no more than 1.3x its
TTFT alone.

One ``pagedserve up`` is started here (free ports, no API key) and runs every phase in turn,
all over gRPC ``Inference.Generate``, greedy with EOS ignored, TTFT = send to the first delta
carrying tokens, from the client's clock:

1. warm-up: two short prompts and one of up to 512 tokens;
2. long alone: one prompt of ``--long-len`` random token ids, 8 output tokens;
3. shorts alone: ``--short-count`` prompts of ``--short-len`` tokens, 16 output tokens each,
   released at ``--short-rate`` req/s (Poisson or fixed, seeded);
4. long + shorts: a long prompt, then after ``--short-delay`` s the same arrival times of
   short requests.

Every prompt is fresh seeded random ids (the stack keeps prefix caching on unless told
otherwise, and a repeated prompt would skip its prefill): phase 4's long prompt and shorts
are not those of phases 2 and 3. Flags after ``--`` (or in ``--up-args``) go to
``pagedserve up``, to compare engine settings run against run:

    python -m benchmarks.head_of_line
    python -m benchmarks.head_of_line --long-len 2000 --short-count 10
    python -m benchmarks.head_of_line --output docs/benchmarks.md -- --max-num-batched-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np

from benchmarks.offline_throughput import FIRST_PROMPT_TOKEN, machine_info, write_section
from benchmarks.serving import LoadSpec, _HelpFormatter, arrival_times
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.pagedserve.v1 import inference_pb2_grpc as pb_grpc
from tests.serving_stack import start_stack, stop_stack

SECTION_START = "<!-- head-of-line:start -->"
SECTION_END = "<!-- head-of-line:end -->"
TARGET_SHORT_P50_S = 1.0  # shorts' TTFT p50 while the long prompt prefills
TARGET_LONG_RATIO = 1.3  # long prompt's TTFT with shorts / alone
LONG_MAX_TOKENS = 8
SHORT_MAX_TOKENS = 16
PASS = {True: "**pass**", False: "**FAIL**"}


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    send: float = 0.0
    first: float = 0.0  # perf_counter of the first delta carrying tokens
    tokens: int = 0
    cached: int = 0  # prompt tokens the prefix cache served, as the final usage says

    @property
    def ttft(self) -> float:
        return self.first - self.send


async def generate(stub: pb_grpc.InferenceStub, req: Req, request_id: str) -> Req:
    """One request, its timings into ``req``; anything but exactly max_tokens tokens raises."""
    msg = pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=req.prompt),
        max_tokens=req.max_tokens,
        temperature=0.0,
        ignore_eos=True,
    )
    req.send = time.perf_counter()
    async for r in stub.Generate(msg, timeout=3600):
        if r.HasField("delta") and r.delta.token_ids:
            req.first = req.first or time.perf_counter()
            req.tokens += len(r.delta.token_ids)
        elif r.HasField("final"):
            req.cached = r.final.usage.cached_tokens
    if req.tokens != req.max_tokens:
        raise RuntimeError(f"{request_id}: {req.tokens} tokens streamed, {req.max_tokens} asked")
    return req


async def stream(stub, reqs: list[Req], offsets: list[float], tag: str) -> list[Req]:
    """Release ``reqs[i]`` ``offsets[i]`` s from now; wait for them all."""

    async def one(i: int) -> Req:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        return await generate(stub, reqs[i], f"{tag}-{i}")

    start = time.perf_counter()
    return list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))


@dataclass
class Results:
    long_alone: Req
    shorts_alone: list[Req]
    long_mixed: Req
    shorts_mixed: list[Req]

    @property
    def ratio(self) -> float:
        return self.long_mixed.ttft / self.long_alone.ttft

    @property
    def overlapped(self) -> int:
        """Phase-4 shorts sent before the long prompt's first token, i.e. during its prefill."""
        return sum(r.send < self.long_mixed.first for r in self.shorts_mixed)


def p50(reqs: list[Req]) -> float:
    return float(np.percentile([r.ttft for r in reqs], 50))


async def run_phases(args: argparse.Namespace, target: str) -> tuple[pb.ModelInfo, Results]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        if args.long_len + LONG_MAX_TOKENS > info.max_model_len:
            raise SystemExit(
                f"--long-len {args.long_len} + {LONG_MAX_TOKENS} > context {info.max_model_len}"
            )

        def reqs(phase: int, n: int, length: int, max_tokens: int) -> list[Req]:
            rng = np.random.default_rng([args.seed, phase])  # fresh ids in every phase
            ids = rng.integers(FIRST_PROMPT_TOKEN, info.vocab_size, (n, length)).tolist()
            return [Req(p, max_tokens) for p in ids]

        short = (args.short_count, args.short_len, SHORT_MAX_TOKENS)
        load = LoadSpec(args.short_rate, args.arrival, None)
        offsets = arrival_times(load, args.short_count, args.seed)
        _print(f"[1/4] warm-up ({info.id}, {info.dtype}, context {info.max_model_len}) ...")
        warm = reqs(1, 2, args.short_len, 4) + reqs(6, 1, min(args.long_len, 512), 4)
        for i, r in enumerate(warm):
            await generate(stub, r, f"warm-{i}")

        _print(f"[2/4] long alone: {args.long_len} tokens ...")
        long_alone = await generate(
            stub, reqs(2, 1, args.long_len, LONG_MAX_TOKENS)[0], "long-alone"
        )
        _print(f"      TTFT {long_alone.ttft:.2f} s")

        _print(
            f"[3/4] shorts alone: {args.short_count} x {args.short_len} tokens, {load.label} ..."
        )
        shorts_alone = await stream(stub, reqs(3, *short), offsets, "short-alone")
        _print(f"      TTFT p50 {p50(shorts_alone):.2f} s")

        _print(f"[4/4] long + shorts (shorts from {args.short_delay:g} s after the long) ...")
        long_req = reqs(4, 1, args.long_len, LONG_MAX_TOKENS)[0]

        async def delayed_shorts() -> list[Req]:
            await asyncio.sleep(args.short_delay)
            return await stream(stub, reqs(5, *short), offsets, "short-mixed")

        long_mixed, shorts_mixed = await asyncio.gather(
            generate(stub, long_req, "long-mixed"), delayed_shorts()
        )
        res = Results(long_alone, shorts_alone, long_mixed, shorts_mixed)
        _print(
            f"      long TTFT {long_mixed.ttft:.2f} s, shorts TTFT p50 {p50(shorts_mixed):.2f} s"
        )
        return info, res


# -- report --------------------------------------------------------------------------------------


def _ttfts(reqs: list[Req]) -> str:
    t = np.array([r.ttft for r in reqs])
    return f"{np.percentile(t, 50):.2f} / {np.percentile(t, 90):.2f} / {t.max():.2f}"


def report_lines(res: Results) -> list[str]:
    idle, busy = p50(res.shorts_alone), p50(res.shorts_mixed)
    n = len(res.shorts_mixed)
    lines = [
        "| phase | long prompt TTFT (s) | short TTFT p50 / p90 / max (s) |",
        "|---|--:|--:|",
        f"| long alone | {res.long_alone.ttft:.2f} | |",
        f"| shorts alone | | {_ttfts(res.shorts_alone)} |",
        f"| long + shorts | {res.long_mixed.ttft:.2f} | {_ttfts(res.shorts_mixed)} |",
        "",
        f"- Short requests' TTFT p50: {busy:.2f} s during the long prefill vs {idle:.2f} s idle "
        f"(target <= {TARGET_SHORT_P50_S:g} s): {PASS[busy <= TARGET_SHORT_P50_S]}",
        f"- Long prompt's TTFT: {res.long_mixed.ttft:.2f} s with shorts vs "
        f"{res.long_alone.ttft:.2f} s alone, ratio {res.ratio:.2f} "
        f"(target <= {TARGET_LONG_RATIO:g}): {PASS[res.ratio <= TARGET_LONG_RATIO]}",
        f"- {res.overlapped} of {n} shorts were sent before the long prompt's first token",
    ]
    cached = res.long_alone.cached + res.long_mixed.cached
    if cached:
        lines.append(f"- warning: the prefix cache served {cached} long-prompt tokens")
    return lines


def render_section(args, info: pb.ModelInfo, res: Results, machine: str, command: str) -> str:
    up = f"`{shlex.join(args.up_args)}`" if args.up_args else "none"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_START,
        "## Head-of-line blocking: short requests during a long prefill",
        "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Model: {info.id} ({info.dtype}, context {info.max_model_len}, KV cache "
        f"{info.kv_cache_blocks} blocks of {info.kv_block_size} tokens)",
        f"- Command: `{command}`",
        f"- Extra `pagedserve up` flags: {up}",
        f"- Workload: long prompt {args.long_len} random token ids, {LONG_MAX_TOKENS} output "
        f"tokens; {args.short_count} shorts of {args.short_len} tokens, {SHORT_MAX_TOKENS} "
        f"output tokens, {args.short_rate:g} req/s {args.arrival}, starting "
        f"{args.short_delay:g} s after the long prompt in phase 4; greedy, EOS ignored, seed "
        f"{args.seed}, fresh prompts per phase",
        "",
        "Phases in turn on one `pagedserve up` over gRPC; TTFT from the client's clock "
        "(send to the first delta carrying tokens).",
        "",
        *report_lines(res),
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.head_of_line",
        usage="%(prog)s [options] [-- PAGEDSERVE_UP_FLAGS...]",
        description=__doc__.split("\n\n")[0],
        epilog="Anything after `--` is passed to `pagedserve up` as is (after --up-args).",
        formatter_class=_HelpFormatter,
    )
    add = ap.add_argument
    add("--long-len", type=int, default=7000, metavar="N", help="long prompt's tokens")
    add("--short-count", type=int, default=40, metavar="N", help="short requests per phase")
    add("--short-len", type=int, default=16, metavar="N", help="short prompts' tokens")
    add("--short-rate", type=float, default=4.0, metavar="R", help="short requests per second")
    add(
        "--arrival",
        choices=["poisson", "fixed"],
        default="poisson",
        help="short requests' inter-arrival times: exponential (Poisson process) or constant",
    )
    add(
        "--short-delay",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds from sending the long prompt to the first short one (phase 4)",
    )
    add("--seed", type=int, default=0, help="seed of the prompts and arrivals")
    add(
        "--up-args",
        default=None,
        metavar="FLAGS",
        help='extra `pagedserve up` flags as one shell-quoted string, e.g. "--max-num-seqs 64"',
    )
    add(
        "--output",
        default=None,
        metavar="FILE",
        help="markdown file whose head-of-line section is written or replaced, e.g. "
        "docs/benchmarks.md (default: print only)",
    )
    args = ap.parse_args(argv[:cut])
    if min(args.long_len, args.short_count, args.short_len) < 1:
        ap.error("--long-len, --short-count and --short-len must be >= 1")
    if not args.short_rate > 0 or args.short_delay < 0:
        ap.error("--short-rate must be > 0 and --short-delay >= 0")
    args.up_args = shlex.split(args.up_args or "") + argv[cut + 1 :]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.head_of_line", *argv])
    load = os.getloadavg()[0]
    if load > 0.5:
        _print(f"warning: load average {load:.2f} at start: the timings will be noisy")
    with tempfile.TemporaryDirectory(prefix="head-of-line-") as tmp:
        _print(f"[stack] {shlex.join(['pagedserve', 'up', *args.up_args])} ...")
        stack = start_stack(Path(tmp), *args.up_args, api_key=None)
        try:
            info, res = asyncio.run(run_phases(args, stack.target))
        finally:
            stop_stack(stack)
    import torch  # imported by offline_throughput already; its default thread count

    # machine_info reads only the engine's dtype: the stack's, as GetModelInfo reports it.
    machine = machine_info(SimpleNamespace(dtype=info.dtype), torch.get_num_threads(), load)
    section = render_section(args, info, res, machine, command)
    print(section.replace(SECTION_START + "\n", "").replace(SECTION_END + "\n", ""))
    if args.output:
        write_section(Path(args.output), section, SECTION_START, SECTION_END)
        _print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
