"""Shared cores: the engine's decode speed while other work takes part of the CPU.

Issue 14 found 16 tokens taking 25-34 s with the engine's default two torch threads on a
loaded two-core machine, and 4 s with ``--num-threads 1``: OpenMP threads wait at the end of
every parallel region for a sibling the OS has descheduled. The engine now picks its thread
count from what other work leaves (engine_svc.threads). What this measures: the offline
engine's generation throughput (a fixed batch of greedy requests, EOS ignored, exact output
lengths) on a quiet machine and beside ``stress-ng --cpu N`` (N busy processes), with the
engine's own choice ("auto", the default) and with the thread count fixed; each run is a
fresh process. The fair outcome beside one busy process on two cores is about half the quiet
speed (the CPU share left), not a sixth.

    python -m benchmarks.shared_cores                      # quiet and stress-ng --cpu 1
    python -m benchmarks.shared_cores --stress 1,2 --output docs/benchmarks.md

Needs ``stress-ng`` (Debian: ``apt-get install stress-ng``). Run it on an otherwise quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.offline_throughput import write_section

SECTION_START = "<!-- shared-cores:start -->"
SECTION_END = "<!-- shared-cores:end -->"


def child(args: argparse.Namespace) -> None:
    """One run in this process: warm up, then time the batch; prints a JSON line."""
    from engine_svc import LLM, SamplingParams

    kwargs = {"num_threads": args.threads} if args.threads else {}
    llm = LLM(None, progress=False, enable_prefix_caching=False, **kwargs)
    prompts = [[100 + (i * 37 + j) % 20000 for j in range(args.prompt_len)] for i in range(64)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts[: args.batch], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    gov = llm.engine.thread_governor
    import torch

    print(
        json.dumps(
            {
                "tokens": tokens,
                "seconds": dt,
                "threads_end": gov.threads if gov is not None else torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def run_one(args: argparse.Namespace, threads: int, stress: int) -> dict:
    hog = None
    if stress:
        hog = subprocess.Popen(
            ["stress-ng", "--cpu", str(stress), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    try:
        argv = [sys.executable, "-m", "benchmarks.shared_cores", "--child"]
        argv += ["--threads", str(threads), "--batch", str(args.batch)]
        argv += ["--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=1800)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if hog is not None:
            hog.terminate()
            hog.wait()
    res.update(threads=threads, stress=stress)
    print(
        f"stress-ng --cpu {stress}, threads {threads or 'auto'}: {res['tokens']} tokens in "
        f"{res['seconds']:.1f} s = {res['tokens'] / res['seconds']:.1f} tok/s "
        f"(threads at the end: {res['threads_end']})",
        flush=True,
    )
    return res


def render(args: argparse.Namespace, results: list[dict], flags: str) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quiet = {r["threads"]: r["tokens"] / r["seconds"] for r in results if r["stress"] == 0}
    lines = [
        SECTION_START,
        "## Shared cores: decode speed beside other work",
        "",
        f"- Date: {date}; command: `python -m benchmarks.shared_cores {' '.join(args.argv)}`",
        f"- Machine: {os.cpu_count()} logical cores, CPU flags {flags}; default model, float32",
        f"- Workload: offline engine, {args.batch} requests of {args.prompt_len} prompt tokens, "
        f"{args.max_tokens} output tokens each, greedy, EOS ignored; each run a fresh process;"
        " other work: `stress-ng --cpu N` started 1 s before",
        "",
        "| other work | engine threads | tok/s | vs quiet (same threads) | threads at the end |",
        "|---|---|--:|--:|--:|",
    ]
    for r in results:
        tps = r["tokens"] / r["seconds"]
        base = quiet.get(r["threads"])
        ratio = f"{tps / base:.2f}" if base else "-"
        other = f"stress-ng --cpu {r['stress']}" if r["stress"] else "none"
        lines.append(
            f"| {other} | {r['threads'] or 'auto'} | {tps:.1f} | {ratio} | {r['threads_end']} |"
        )
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            want = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"]
            return " ".join(f for f in want if f in have)
    return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help="requests in the batch (default 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens (default 64)")
    p.add_argument(
        "--stress",
        default="1",
        help="comma-separated stress-ng --cpu counts to run beside (default 1); a quiet run "
        "comes first",
    )
    p.add_argument(
        "--fixed",
        default="1,2",
        help="fixed --num-threads values to compare with auto (default 1,2)",
    )
    p.add_argument("--output", type=Path, help="write the table into this markdown file")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.child:
        return child(args)
    if shutil.which("stress-ng") is None:
        sys.exit("stress-ng is not installed (Debian: apt-get install stress-ng)")
    threads = [0] + [int(x) for x in args.fixed.split(",") if x]
    results = []
    for stress in [0] + [int(x) for x in args.stress.split(",") if x]:
        for t in threads:
            results.append(run_one(args, t, stress))
    section = render(args, results, cpu_flags())
    print(section)
    if args.output:
        write_section(args.output, section, SECTION_START, SECTION_END)


if __name__ == "__main__":
    main()
