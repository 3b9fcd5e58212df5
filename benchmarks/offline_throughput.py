"""Offline throughput: pagedserve against Hugging Face ``transformers`` ``generate``.

The same workloads (same model, same dtype, greedy, exactly ``out_len`` tokens per request)
go through pagedserve's engine (all requests at once, continuous batching) and through
``model.generate`` in static batches (left padding; a batch runs until its longest request is
done). Output tokens/s of each and their ratio are printed and written, with the machine, the
command and the date, to a section of ``docs/benchmarks.md``. For pagedserve the KV cache waste
at peak is measured after every engine step: allocated slots not holding a token's KV, as a
share of the allocated slots, at the step where the allocated slots peak.

Run it from the repo root on a quiet machine (nothing else using the CPU):

    python -m benchmarks.offline_throughput

A smoke run (8 short requests per workload, writes nothing unless --output is given):

    python -m benchmarks.offline_throughput --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from engine_svc import LLM, SamplingParams
from engine_svc.config import EngineConfig, cpu_has_native_bf16
from engine_svc.core.request import FinishReason, Request
from engine_svc.engine import LLMEngine

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- offline_throughput:start -->"
SECTION_END = "<!-- offline_throughput:end -->"
# Random prompt tokens are drawn from [FIRST_PROMPT_TOKEN, vocab): clear of the special tokens
# (0..16 in SmolLM2's vocabulary) and of the single bytes at the start of a BPE vocabulary.
FIRST_PROMPT_TOKEN = 100


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt_range: tuple[int, int]  # inclusive bounds; equal bounds = a fixed length
    output_range: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.name} {_span(self.prompt_range)} in / {_span(self.output_range)} out"


def _span(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}–{r[1]}"


WORKLOAD_NAMES = ("fixed", "mixed")  # position = seed offset, so each set is stable alone
FULL_SPECS = {
    "fixed": WorkloadSpec("fixed", (128, 128), (128, 128)),
    "mixed": WorkloadSpec("mixed", (16, 512), (16, 256)),
}
QUICK_SPECS = {
    "fixed": WorkloadSpec("fixed", (32, 32), (16, 16)),
    "mixed": WorkloadSpec("mixed", (8, 64), (4, 32)),
}


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def requested_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(spec: WorkloadSpec, num_requests: int, vocab_size: int, seed: int) -> Workload:
    """Seeded prompt/output lengths and random prompt token ids of exactly those lengths."""
    if vocab_size <= FIRST_PROMPT_TOKEN:
        raise SystemExit(f"vocabulary of {vocab_size} tokens is too small for random prompts")
    rng = np.random.default_rng([seed, WORKLOAD_NAMES.index(spec.name)])
    prompt_lens = rng.integers(spec.prompt_range[0], spec.prompt_range[1] + 1, num_requests)
    output_lens = rng.integers(spec.output_range[0], spec.output_range[1] + 1, num_requests)
    prompts = [rng.integers(FIRST_PROMPT_TOKEN, vocab_size, n).tolist() for n in prompt_lens]
    return Workload(spec, prompts, [int(n) for n in output_lens])


# -- pagedserve ----------------------------------------------------------------------------------


@dataclass
class PagedResult:
    output_tokens: int
    wall_s: float
    steps: int
    max_running: int
    preemptions: int
    probe_s: float  # time spent measuring KV occupancy, left out of wall_s
    peak_slots: int  # allocated KV slots (used blocks x block size) at their peak
    peak_tokens: int  # KV slots holding a token at the first step reaching that peak
    slot_steps: int  # allocated slots summed over all steps
    token_steps: int  # slots holding a token summed over all steps

    @property
    def waste(self) -> float:
        return 1 - self.peak_tokens / self.peak_slots if self.peak_slots else 0.0

    @property
    def mean_waste(self) -> float:
        return 1 - self.token_steps / self.slot_steps if self.slot_steps else 0.0


def kv_occupancy(engine: LLMEngine) -> tuple[int, int]:
    """(allocated slots, slots holding a token's KV) of the block manager right now.

    A block shared by several requests (prefix caching) is counted once, holding as many tokens
    as the request that filled it furthest. ``num_computed_tokens`` is the number of a
    request's tokens whose KV is written.
    """
    bm = engine.block_manager
    bs = bm.block_size
    fill: dict[int, int] = {}
    for req in engine.scheduler.running:
        n = req.num_computed_tokens
        for i, block in enumerate(bm.block_table(req.request_id)):
            held = min(bs, max(n - i * bs, 0))
            if held >= fill.get(block, 0):
                fill[block] = held
    return bm.num_used_blocks() * bs, sum(fill.values())


def run_pagedserve(llm: LLM, wl: Workload, run_tag: str) -> PagedResult:
    """Queue every request at once and drive the engine's step loop, probing KV after each."""
    engine = llm.engine
    reqs: list[Request] = []
    steps = max_running = 0
    probe_s = 0.0
    peak_slots = peak_tokens = slot_steps = token_steps = 0
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(zip(wl.prompts, wl.output_lens)):
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        reqs += engine.add_request(f"{run_tag}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        p0 = time.perf_counter()
        max_running = max(max_running, len(engine.scheduler.running))
        slots, tokens = kv_occupancy(engine)
        slot_steps += slots
        token_steps += tokens
        # The first step of a peak plateau: the most waste while the allocation is at peak.
        if slots > peak_slots:
            peak_slots, peak_tokens = slots, tokens
        probe_s += time.perf_counter() - p0
    wall = time.perf_counter() - t0 - probe_s
    _check_paged_outputs(reqs, wl)
    return PagedResult(
        output_tokens=sum(len(r.output_token_ids) for r in reqs),
        wall_s=wall,
        steps=steps,
        max_running=max_running,
        preemptions=sum(r.num_preemptions for r in reqs),
        probe_s=probe_s,
        peak_slots=peak_slots,
        peak_tokens=peak_tokens,
        slot_steps=slot_steps,
        token_steps=token_steps,
    )


def _check_paged_outputs(reqs: list[Request], wl: Workload) -> None:
    for r, want in zip(reqs, wl.output_lens):
        got = len(r.output_token_ids)
        if got != want or r.finish_reason is not FinishReason.LENGTH:
            raise RuntimeError(
                f"pagedserve request {r.request_id} produced {got} tokens "
                f"(finish {r.finish_reason}), expected {want}"
            )


def warm_up_pagedserve(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([list(range(200, 216)), list(range(300, 309))], params, use_tqdm=False)


# -- transformers --------------------------------------------------------------------------------


@dataclass
class HFResult:
    output_tokens: int  # each request's own out_len tokens: the useful output
    generated_tokens: int  # every token generate produced, including the batch overrun
    wall_s: float
    batches: int
    peak_slots: int  # KV positions of the largest batch at its end (batch x padded length)
    peak_tokens: int  # of those, positions holding one of its request's own tokens

    @property
    def waste(self) -> float:
        return 1 - self.peak_tokens / self.peak_slots if self.peak_slots else 0.0


def load_hf_model(model_path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest prompt], padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def hf_eos_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
    """Greedy ``generate`` of exactly ``new_tokens`` for every row; returns the count made.

    ``min_new_tokens`` equal to ``max_new_tokens`` bans EOS until the end, so no row stops
    early. Checked: a row that stopped would be padded with EOS (the pad id here), and no EOS
    may appear among the generated tokens.
    """
    eos = hf_eos_ids(model)
    pad = eos[0] if eos else 0  # padded prompt positions are masked out: any id works
    ids, mask = left_pad(prompts, pad)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1] :]
    if eos and torch.isin(new, torch.tensor(eos, device=new.device)).any():
        raise RuntimeError("transformers produced EOS: a row stopped before its length")
    return new.shape[1]


def run_hf(model: torch.nn.Module, wl: Workload, batch_size: int) -> HFResult:
    """Static batches in arrival order; a batch generates its longest request's length."""
    useful = generated = batches = 0
    peak_slots = peak_tokens = 0
    t0 = time.perf_counter()
    for start in range(0, wl.num_requests, batch_size):
        prompts = wl.prompts[start : start + batch_size]
        out_lens = wl.output_lens[start : start + batch_size]
        longest = max(out_lens)
        made = hf_generate(model, prompts, longest)
        if made != longest:
            raise RuntimeError(f"transformers generated {made} tokens per row, asked {longest}")
        useful += sum(out_lens)
        generated += made * len(prompts)
        batches += 1
        # The last sampled token's KV is never written, hence the -1s.
        slots = len(prompts) * (max(len(p) for p in prompts) + made - 1)
        if slots > peak_slots:
            peak_slots = slots
            peak_tokens = sum(len(p) + n - 1 for p, n in zip(prompts, out_lens))
    wall = time.perf_counter() - t0
    return HFResult(useful, generated, wall, batches, peak_slots, peak_tokens)


def warm_up_hf(model: torch.nn.Module) -> None:
    hf_generate(model, [list(range(200, 216)), list(range(300, 309))], 4)


# -- report --------------------------------------------------------------------------------------


@dataclass
class WorkloadReport:
    wl: Workload
    paged: PagedResult
    hf: HFResult | None
    hf_batch_size: int

    @property
    def ratio(self) -> float | None:
        if self.hf is None:
            return None
        return _tps(self.paged.output_tokens, self.paged.wall_s) / _tps(
            self.hf.output_tokens, self.hf.wall_s
        )


def _tps(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


TABLE_HEADER = (
    "| workload | system | output tokens | wall (s) | output tok/s | pagedserve / HF "
    "| KV slots at peak | KV waste at peak |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|"
)


def table_rows(rep: WorkloadReport) -> list[str]:
    wl, p, h = rep.wl, rep.paged, rep.hf
    name = f"{wl.spec.label} × {wl.num_requests}"
    ratio = f"**{rep.ratio:.2f}×**" if rep.ratio is not None else "—"
    rows = [
        f"| {name} | pagedserve | {p.output_tokens:,} | {p.wall_s:.2f} "
        f"| {_tps(p.output_tokens, p.wall_s):,.1f} | {ratio} | {p.peak_slots:,} "
        f"| {p.waste:.1%} |"
    ]
    if h is not None:
        rows.append(
            f"| | HF `generate`, batch {rep.hf_batch_size} | {h.output_tokens:,} "
            f"| {h.wall_s:.2f} | {_tps(h.output_tokens, h.wall_s):,.1f} | 1.00× "
            f"| {h.peak_slots:,} | {h.waste:.1%} |"
        )
    return rows


def notes(rep: WorkloadReport, block_size: int) -> list[str]:
    wl, p, h = rep.wl, rep.paged, rep.hf
    out = [
        f"**{wl.spec.label}** ({wl.requested_tokens:,} output tokens requested): pagedserve ran "
        f"{p.steps} engine steps, at most {p.max_running} requests at once, "
        f"{p.preemptions} preemptions; KV occupancy probing took {p.probe_s:.3f} s (left "
        f"out of its wall time); at peak {p.peak_tokens:,} of {p.peak_slots:,} slots held a "
        f"token (block size {block_size}; first step at the peak), and over all steps "
        f"{p.mean_waste:.1%} of the allocated slots were empty."
    ]
    if h is not None:
        overrun = h.generated_tokens - h.output_tokens
        out.append(
            f"HF ran {h.batches} static batches and generated {h.generated_tokens:,} tokens, "
            f"{overrun:,} of them past their request's length (counted as waste, not output; "
            f"with them it would be {_tps(h.generated_tokens, h.wall_s):,.1f} tok/s). "
            f"Its KV figures are computed from the batch shapes (padded prompt + generated "
            f"length per row), not measured."
        )
    return out


def machine_info(engine: LLMEngine, threads: int, load: float) -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.MULTILINE)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    dtype = str(engine.dtype).removeprefix("torch.")
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch threads: {threads}; "
        f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; dtype {dtype}; "
        f"1-minute load average at start {load:.2f}"
    )


def render_section(
    reports: list[WorkloadReport], engine: LLMEngine, command: str, machine: str
) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = engine.model_path.name if engine.model_path else "?"
    lines = [
        SECTION_START,
        "## Offline throughput: pagedserve vs transformers `generate`",
        "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Model: {model}",
        f"- Command: `{command}`",
        "",
        "Same prompts (random token ids, seeded), greedy, exactly the requested output length "
        "per request on both sides (EOS ignored). pagedserve gets every request at once "
        "(continuous batching); transformers runs static batches in arrival order with left "
        "padding, and a batch runs until its longest request is done: only each request's own "
        "tokens count as output. KV waste = allocated KV slots not holding a token, as a share "
        "of the allocated slots, at the moment the allocated slots peak.",
        "",
        TABLE_HEADER,
    ]
    for rep in reports:
        lines += table_rows(rep)
    lines += [""]
    for rep in reports:
        lines += [f"- {n}" for n in notes(rep, engine.block_manager.block_size)]
    lines += [SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(
    path: Path, section: str, start_marker: str = SECTION_START, end_marker: str = SECTION_END
) -> None:
    """Replace the section between the markers in ``path`` (or append it), keeping the rest.

    ``section`` includes the markers; other benchmarks pass their own."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n\n" + section)
        return
    text = path.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start >= 0 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# -- main ----------------------------------------------------------------------------------------


def _engine_default(name: str) -> int:
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.offline_throughput",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default=None,
        help="HF-format model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        help="dtype of both systems' weights and KV; auto = what the engine picks on this CPU "
        "(bfloat16 with native bf16 matmul, else float32), given to transformers too",
    )
    ap.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help="comma-separated: fixed (128 in / 128 out), mixed (prompt 16-512, output 16-256)",
    )
    ap.add_argument(
        "--num-requests", type=int, default=None, help="requests per workload (64; 8 with --quick)"
    )
    ap.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="static batch size of the transformers baseline (16; 4 with --quick)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of lengths and prompt tokens")
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=_engine_default("max_num_seqs"),
        help="pagedserve: most requests running at once",
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_engine_default("max_num_batched_tokens"),
        help="pagedserve: token budget of one engine step (prefill chunks + decodes)",
    )
    ap.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="pagedserve: KV cache size in GiB (default: the engine's, 2 GiB)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for both systems (default: torch's choice)",
    )
    ap.add_argument(
        "--output",
        default=None,
        help=f"markdown file whose offline_throughput section is written or replaced "
        f"(default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; nothing with --quick); "
        f"'-' writes nothing",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 requests per workload, short lengths (fixed 32/16, mixed 8-64/4-32)",
    )
    args = ap.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOAD_NAMES]
    if unknown or not args.workloads:
        ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOAD_NAMES)}")
    if args.num_requests is None:
        args.num_requests = 8 if args.quick else 64
    if args.hf_batch_size is None:
        args.hf_batch_size = 4 if args.quick else 16
    for name in ("num_requests", "hf_batch_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output is None:
        args.output = "-" if args.quick else str(DEFAULT_OUTPUT)
    return args


def build_llm(args: argparse.Namespace) -> LLM:
    kwargs: dict = dict(
        dtype=args.dtype,
        progress=False,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    if args.kv_cache_gib is not None:
        kwargs["kv_cache_memory"] = int(args.kv_cache_gib * 1024**3)
    return LLM(model=args.model, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: load average {load:.2f} at start: other work shares the CPU and the "
            "timings will be noisy (with several torch threads, badly so: try --threads 1)",
            file=sys.stderr,
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(
        ["python", "-m", "benchmarks.offline_throughput", *(sys.argv[1:] if argv is None else argv)]
    )
    llm = build_llm(args)
    engine = llm.engine
    if engine.model_path is None:
        raise SystemExit("the benchmark needs real weights (the engine has none)")
    hf_model = None if args.no_hf else load_hf_model(engine.model_path, engine.dtype)
    specs = QUICK_SPECS if args.quick else FULL_SPECS

    warm_up_pagedserve(llm)
    if hf_model is not None:
        warm_up_hf(hf_model)

    reports = []
    for name in args.workloads:
        wl = make_workload(
            specs[name], args.num_requests, engine.model_config.vocab_size, args.seed
        )
        print(f"[{wl.spec.label} × {wl.num_requests}] pagedserve ...", file=sys.stderr, flush=True)
        paged = run_pagedserve(llm, wl, run_tag=f"bench-{name}")
        hf = None
        if hf_model is not None:
            print(f"[{wl.spec.label} × {wl.num_requests}] transformers ...", file=sys.stderr)
            hf = run_hf(hf_model, wl, args.hf_batch_size)
        reports.append(WorkloadReport(wl, paged, hf, args.hf_batch_size))

    section = render_section(
        reports, engine, command, machine_info(engine, torch.get_num_threads(), load)
    )
    print(section.replace(SECTION_START + "\n", "").replace(SECTION_END + "\n", ""))
    if args.output != "-":
        path = Path(args.output)
        write_section(path, section)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
