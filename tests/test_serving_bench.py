"""benchmarks/serving.py on a tiny workload: the offline run, a stack it starts, two loads.

Checks the report's consistency only (token counts, ordered percentiles, the ratio, the
section), never timings."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks import serving
from benchmarks.serving import (
    SECTION_END,
    SECTION_START,
    EngineSettings,
    LoadSpec,
    render_section,
    run_benchmark,
    workload_spec,
)


def _ordered(d: serving.Dist) -> bool:
    p = [d.p[q] for q in serving.PERCENTILES]
    return all(not math.isnan(v) for v in p) and p == sorted(p)


def test_serving_benchmark_report(tmp_path: Path) -> None:
    settings = EngineSettings(
        dtype="float32",
        max_num_seqs=8,
        max_num_batched_tokens=256,
        kv_cache_gib=0.05,
        num_threads=None,
        prefix_caching=False,
    )
    loads = [
        LoadSpec(math.inf, "poisson", None),
        LoadSpec(20.0, "fixed", 2),
    ]
    rep = run_benchmark(
        workload_spec((4, 12), (2, 8)),
        4,
        loads,
        settings,
        api_key="bench-key",
        tokenizer_workers=1,
        seed=3,
        work_dir=tmp_path,
    )
    wl = rep.workload
    assert wl.num_requests == 4 and all(2 <= k <= 8 for k in wl.output_lens)
    assert rep.offline is not None and rep.offline.output_tokens == wl.requested_tokens
    assert rep.offline.steps > 0
    assert [r.load for r in rep.runs] == loads
    for run in rep.runs:
        assert not run.errors
        assert len(run.ok) == 4
        for rec, want in zip(run.records, wl.output_lens):
            assert rec.max_tokens == want
            assert rec.streamed_tokens == rec.completion_tokens == want
            assert rec.finish_reason == "LENGTH"
            assert rec.send <= rec.token_times[0] <= rec.token_times[-1] <= rec.end
        assert run.output_tokens == wl.requested_tokens
        assert run.cached_tokens == 0  # prefix caching is off: the second run prefills too
        assert run.duration_s > 0 and run.tok_per_s > 0
        for d in (run.ttft, run.itl, run.e2e):
            assert _ordered(d)
        assert _ordered(run.tpot) or max(wl.output_lens) < 2
        assert run.cpu_s.get("engine", 0) > 0 and "tokenizer" in run.cpu_s
    assert rep.peak is rep.runs[0]
    assert rep.ratio == rep.runs[0].tok_per_s / rep.offline.tps
    assert rep.settings.dtype == "float32"

    section = render_section(rep, "python -m benchmarks.serving (test)")
    assert section.startswith(SECTION_START) and section.rstrip().endswith(SECTION_END)
    assert f"{rep.ratio:.1%}" in section
    assert section.count("| gRPC stack,") == 2

    # Written into a copy of a file with another benchmark's section: only ours changes.
    doc = tmp_path / "benchmarks.md"
    other = "<!-- offline_throughput:start -->\nkeep me\n<!-- offline_throughput:end -->\n"
    doc.write_text("# Benchmarks\n\n" + other)
    serving.write_section(doc, section, SECTION_START, SECTION_END)
    serving.write_section(doc, section, SECTION_START, SECTION_END)  # replaced, not appended
    text = doc.read_text()
    assert other in text and text.count(SECTION_START) == 1
