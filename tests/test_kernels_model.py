"""The model forward on the CUDA path's ops (``engine_svc.runner.cuda_model_ops.KernelOps``) on
the CPU: with the reference kernels it must give the CPU path's hidden states, and with the
Triton kernels (interpreted here) the same within rounding. Plus the pure helpers of the graph
runner."""

from __future__ import annotations

import pytest
import torch

from engine_svc.models.config import ModelConfig, rope_cos_sin_cache
from engine_svc.models.loader import dummy_model
from engine_svc.runner.attention import LayerKV, build_metadata
from engine_svc.runner.cpu_model_ops import TorchCpuOps
from engine_svc.runner.cuda import decode_num_splits
from engine_svc.runner.cuda_graphs import capture_sizes
from engine_svc.runner.cuda_model_ops import BatchTensors, KernelOps
from kernels import reference

BLOCK = 16


def _tiny_cfg() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 32,
            },
        }
    )


def _run_both(ops, dtype: torch.dtype, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps (a mixed prefill, then decodes over the cached KV) through the CPU path and
    through the CUDA path's ops over the kernels ``ops``; returns the second step's hidden states of each. With
    ``fused`` the decode step (3 tokens) takes the fused norm -> projection path."""
    cfg = _tiny_cfg()
    model = dummy_model(cfg, dtype, seed=3)
    for p in model.parameters():  # wider weights: 0.02 would make every hidden state alike
        p.data.mul_(10 if p.dim() > 1 else 1)
    num_blocks = 24
    tables = [[5, 2, 9], [0, 7], [11, 3, 4, 8]]
    gen = torch.Generator().manual_seed(0)
    cs = rope_cos_sin_cache(cfg, 256)
    cpu_ops = TorchCpuOps(cfg, dtype, 256)
    cpu_kv = torch.zeros(2, 2, 2, num_blocks, BLOCK, 16, dtype=dtype)  # heads outer
    gpu_kv = torch.zeros(2, 2, num_blocks, BLOCK, 2, 16, dtype=dtype)  # block-major
    lens_done = [0, 0, 0]
    outs = []
    for q_lens in ([20, 9, 40], [1, 1, 1]):
        seq_lens = [d + q for d, q in zip(lens_done, q_lens)]
        ids = torch.randint(0, 64, (sum(q_lens),), generator=gen)
        pos = torch.cat([torch.arange(d, s) for d, s in zip(lens_done, seq_lens)])
        meta = build_metadata(q_lens, seq_lens, tables, BLOCK)
        layer_kv = [LayerKV(kv[0], kv[1]) for kv in cpu_kv]
        want = model(ids, layer_kv, cpu_ops, cpu_ops.step(pos, meta))
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        batch = BatchTensors(
            input_ids=ids,
            positions=pos,
            slot_mapping=meta.slot_mapping,
            block_tables=torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=starts,
            num_splits=2 if q_lens == [1, 1, 1] else 1,
        )
        got = model(ids, gpu_kv, KernelOps(ops, cs, fused_norm_linear=fused), batch)
        outs.append((got, want))
        lens_done = seq_lens
    return outs[1]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_forward_with_reference_ops_equals_cpu_model(fused):
    got, want = _run_both(reference, torch.float32, fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_with_triton_kernels_equals_cpu_model(dtype, fused):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors need the interpreter; tests/test_gpu.py covers CUDA")
    from kernels import triton_ops

    got, want = _run_both(triton_ops, dtype, fused)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]  # every allowed decode batch has a graph
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-3:] == [240, 248, 256] and len(capture_sizes(256)) == 35


def test_decode_num_splits_fills_the_gpu():
    assert decode_num_splits(1, 8, 132) == 64  # capped
    assert decode_num_splits(2, 8, 132) == 32  # 16 programs * 32 >= 264
    assert decode_num_splits(8, 8, 132) == 8  # 64 programs * 8 >= 264
    assert decode_num_splits(64, 8, 132) == 1
    assert decode_num_splits(256, 1, 132) == 2


def test_gpu_bench_replaces_only_its_own_section(tmp_path):
    from benchmarks.gpu_bench import SECTION_END, SECTION_START, write_section

    doc = tmp_path / "benchmarks.md"
    other = "<!-- offline_throughput:start -->\nCPU table\n<!-- offline_throughput:end -->"
    doc.write_text(f"# Benchmarks\n\n{other}\n")
    write_section(doc, "first run")
    write_section(doc, "second run")
    text = doc.read_text()
    assert other in text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "second run" in text and "first run" not in text


@pytest.mark.parametrize("num_kv_blocks", [32, 4])  # 4: preemption and re-admission
def test_cuda_runner_greedy_equals_cpu_runner_under_the_interpreter(tmp_path, num_kv_blocks):
    """The CUDA runner's batch building (slots, tables, query starts, logits rows) driven by the
    real scheduler, with interpreted kernels on the CPU, against the CPU runner."""
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors need the interpreter; tests/test_gpu.py covers CUDA")
    from engine_svc import LLM, SamplingParams
    from engine_svc.runner.cuda import CudaModelRunner
    from tests.tiny_models import make_tiny_model

    path = str(make_tiny_model(tmp_path / "tiny", num_layers=1, vocab_size=128))
    # long_prefill_chunk 0: the whole budget per prompt, so 4 blocks do run out and preempt
    kw = dict(dtype="float32", num_kv_blocks=num_kv_blocks, progress=False,
              max_num_batched_tokens=24, long_prefill_chunk=0)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 30, 9)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(path, **kw).generate(prompts, sp, use_tqdm=False)

    llm = LLM(path, **kw)
    e = llm.engine
    runner = CudaModelRunner(
        e.runner.model, e.model_config, e.dtype, 16, 8, 24, enforce_eager=True, device="cpu"
    )
    runner.init_kv_cache(num_kv_blocks, e.max_model_len)
    e.runner = runner
    for i, p in enumerate(prompts):
        e.add_request(f"p{i}", p, sp)
    reqs = dict(e.scheduler.requests)
    preemptions = 0
    while e.has_unfinished_requests():
        e.step()
        preemptions += e.last_step.num_preempted
    got = [reqs[f"p{i}"].output_token_ids for i in range(len(prompts))]
    assert got == [o.outputs[0].token_ids for o in want]
    assert (preemptions > 0) == (num_kv_blocks == 4)


def test_host_block_tables_follow_growth_readmission_and_reuse():
    """Random steps against the block manager's contract (a request's table is one list that
    only grows; a new list under the same id after a preemption): every scheduled row must
    equal its list, with so few rows that reclaiming absent requests' rows happens often."""
    from types import SimpleNamespace

    from engine_svc.runner.cuda import HostBlockTables

    rng = __import__("random").Random(7)
    ht = HostBlockTables(num_rows=6, max_blocks=40)
    live: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(400):
        if len(live) < 5 and rng.random() < 0.3:  # admit (possibly with cached prefix blocks)
            live[f"r{next_id}"] = [rng.randrange(1000) for _ in range(rng.randrange(0, 4))]
            next_id += 1
        for rid in list(live):
            r = rng.random()
            if r < 0.05:
                del live[rid]  # finished
            elif r < 0.10:
                live[rid] = [rng.randrange(1000) for _ in range(rng.randrange(0, 3))]  # readmit
            elif len(live[rid]) < 40 and r < 0.5:
                live[rid].extend(rng.randrange(1000) for _ in range(rng.randrange(1, 3)))
        step = [rid for rid in live if rng.random() < 0.8]  # some running ones sit out a step
        rng.shuffle(step)
        seqs = [SimpleNamespace(request=SimpleNamespace(request_id=rid), block_table=live[rid])
                for rid in step]  # fmt: skip
        rows = ht.rows(seqs)
        assert len(set(rows.tolist())) == len(rows)
        for rid, row in zip(step, rows):
            n = len(live[rid])
            assert ht.array[row, :n].tolist() == live[rid]


def test_host_block_tables_reject_overflow():
    from types import SimpleNamespace

    from engine_svc.runner.cuda import HostBlockTables

    ht = HostBlockTables(num_rows=1, max_blocks=2)
    seq = SimpleNamespace(request=SimpleNamespace(request_id="a"), block_table=[1, 2, 3])
    with pytest.raises(ValueError, match="table width"):
        ht.rows([seq])
    two = [SimpleNamespace(request=SimpleNamespace(request_id=r), block_table=[1]) for r in "bc"]
    with pytest.raises(ValueError, match="rows"):
        ht.rows(two)


def test_decode_batch_rejects_a_table_too_short_for_the_new_token():
    """A decode's slot comes from its host-table row, whose columns past the request's own
    blocks hold a previous owner's ids: a table that does not cover the new token must raise
    (the block manager guarantees it does), not write KV into someone else's block."""
    from types import SimpleNamespace

    from engine_svc.runner.cuda import CudaModelRunner

    cfg = _tiny_cfg()
    runner = CudaModelRunner(dummy_model(cfg, torch.float32), cfg, torch.float32, BLOCK, 1, 64,
                             enforce_eager=True, device="cpu")  # fmt: skip
    runner.init_kv_cache(8, 64)  # 2 rows (twice max_num_seqs)

    def seq(rid, computed, table):
        req = SimpleNamespace(request_id=rid, num_computed_tokens=computed,
                              all_token_ids=[1] * (computed + 1))  # fmt: skip
        return SimpleNamespace(request=req, num_new_tokens=1, block_table=table)

    runner.build_batch([seq("x", 0, [0])])
    runner.build_batch([seq("old", 40, [5, 6, 7])])  # fills a row with blocks 5, 6, 7
    runner.build_batch([seq("y", 0, [1])])  # rows ran out: the last one freed, "old"'s
    row = runner.host_tables.rows([seq("y", 0, [1])])[0]
    assert runner.host_tables.array[row, :3].tolist() == [1, 6, 7]  # stale 6, 7 after y's 1
    batch, decode_only = runner.build_batch([seq("y", 3, [1])])
    assert decode_only and batch.slot_mapping.tolist() == [1 * BLOCK + 3]
    with pytest.raises(ValueError, match="no KV block for position 20"):
        runner.build_batch([seq("y", 20, [1])])  # position 20 is in the row's stale column 1


ALLOCATION_OPS = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::promote_types",
    "aten::detach", "aten::lift_fresh",
}  # fmt: skip


def _count_launches(fn) -> dict[str, int]:
    """The device work `fn` issues, by name: each Triton kernel launch, and each aten op that
    computes (views and allocations launch nothing on a GPU, so they are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    counts: dict[str, int] = {}
    inside = [False]  # the interpreter's own tensor traffic is not the model's

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # allocations, and views (a result aliasing an input without writing it)
            view = any(r.alias_info is not None and not r.alias_info.is_write
                       for r in func._schema.returns)  # fmt: skip
            free = view or func._schema.name in ALLOCATION_OPS
            if not inside[0] and not free:
                counts[func._schema.name] = counts.get(func._schema.name, 0) + 1
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def launch(self, *a, **kw):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        inside[0] = True
        try:
            return run(self, *a, **kw)
        finally:
            inside[0] = False

    InterpretedFunction.run = launch
    try:
        with Count():
            fn()
    finally:
        InterpretedFunction.run = run
    return counts


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_decode_step_launches_per_layer(fused):
    """A decode step of the CUDA forward issues, per layer: two norms, four matmuls, one
    rotary-and-cache, attention (and its split combine) and one silu-and-mul; plus the
    embedding and the final norm. Fused, each norm -> projection pair (and the silu-and-mul
    after the second) is one launch, leaving two matmuls. At batch 1 on a GPU each launch
    costs a few microseconds of latency inside the graph, a large share of a small model's
    step."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("counts the interpreter's launches")
    from kernels import triton_ops

    cfg = _tiny_cfg()
    model = dummy_model(cfg, torch.float32, seed=3)
    kv = torch.zeros(cfg.num_layers, 2, 8, BLOCK, cfg.num_kv_heads, cfg.head_size)
    i32 = dict(dtype=torch.int32)
    batch = BatchTensors(
        input_ids=torch.tensor([3, 5]),
        positions=torch.tensor([20, 7]),
        slot_mapping=torch.tensor([20, 16 + 7]),
        block_tables=torch.tensor([[0, 1], [1, 2]], **i32),
        seq_lens=torch.tensor([21, 8], **i32),
        query_start_loc=torch.tensor([0, 1, 2], **i32),
        num_splits=2,
    )
    cs = rope_cos_sin_cache(cfg, 256)
    ops = KernelOps(triton_ops, cs, fused)
    counts = _count_launches(lambda: model(batch.input_ids, kv, ops, batch))
    layers = cfg.num_layers
    common = {
        "aten::embedding": 1,
        "_rotary_kernel": layers,
        "_paged_attention_kernel": layers,
        "_combine_splits_kernel": layers,
    }
    if fused:
        assert counts == {
            **common,
            "aten::mm": 2 * layers,
            "_rms_norm_linear_kernel": 2 * layers,
            "_rms_norm_kernel": 1,
        }, counts
    else:
        assert counts == {
            **common,
            "aten::mm": 4 * layers,
            "_rms_norm_kernel": 2 * layers + 1,
            "_silu_and_mul_kernel": layers,
        }, counts


def test_gpu_bench_engine_decode_time_runs_on_the_cpu_engine():
    """The benchmark's whole-engine batch-1 measure drives a real engine (here the CPU one
    with a tiny dummy model) and counts exactly the decode steps it asked for."""
    from benchmarks.gpu_bench import engine_decode_time, make_engine

    hf = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256,
    }  # fmt: skip
    engine = make_engine(hf, max_num_seqs=4, enforce_eager=True, util=0.5, device="cpu")
    t = engine_decode_time(engine, context=40, steps=12)
    assert 0 < t < 5
    assert not engine.has_unfinished_requests()


def test_gpu_bench_prefill_step_and_flops():
    """The benchmark's prefill step runs the CUDA runner's forward (interpreted here) on fresh
    prompts and returns one logits row per prompt, equal to the CPU model's; its FLOP count
    is the hand count for the tiny shape."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors need the interpreter")
    from benchmarks.gpu_bench import prefill_flops, prefill_step_fn
    from engine_svc.runner.cuda import CudaModelRunner

    cfg = _tiny_cfg()
    model = dummy_model(cfg, torch.float32, seed=3)
    runner = CudaModelRunner(model, cfg, torch.float32, BLOCK, 4, 64, enforce_eager=True,
                             device="cpu")  # fmt: skip
    runner.init_kv_cache(8, 64)
    with torch.inference_mode():
        logits = prefill_step_fn(runner, 3, 20)()
        # the same three prompts (token 0 throughout) through the CPU path, one at a time
        cpu_ops = TorchCpuOps(cfg, torch.float32, 256)
        kv = [LayerKV(*torch.zeros(2, 2, 2, BLOCK, 16)) for _ in range(2)]
        meta = build_metadata([20], [20], [[0, 1]], BLOCK)
        step = cpu_ops.step(torch.arange(20), meta)
        want = model.compute_logits(model(torch.zeros(20, dtype=torch.long), kv, cpu_ops, step))
    assert logits.shape == (3, cfg.vocab_size)
    for row in logits:
        torch.testing.assert_close(row, want[-1], rtol=1e-4, atol=1e-4)
    h, i, q, kvd = 64, 96, 4 * 16, 2 * 16  # hidden, intermediate, q and kv widths
    per_layer = h * (q + 2 * kvd) + q * h + h * 2 * i + i * h
    attention = 2 * 2 * 4 * 16 * 20 * 21 / 2
    want_flops = 2 * 60 * per_layer * 2 + 3 * 2 * attention + 2 * 3 * 64 * 64
    assert prefill_flops(model, 3, 20) == want_flops


def test_gpu_bench_fused_linear_times_compares_the_two_paths(monkeypatch):
    """The benchmark's side-by-side times a decode step once through the unfused path and once
    through ``rms_norm_linear`` (here each "time" is the step's launch count, from the
    interpreter), and leaves the runner's own setting as it was."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors need the interpreter")
    from benchmarks import gpu_bench
    from engine_svc.runner.cuda import CudaModelRunner

    monkeypatch.delenv("PAGEDSERVE_FUSED_NORM_LINEAR", raising=False)
    cfg = _tiny_cfg()
    runner = CudaModelRunner(dummy_model(cfg, torch.float32, seed=3), cfg, torch.float32, BLOCK,
                             4, 64, enforce_eager=True, device="cpu")  # fmt: skip
    runner.init_kv_cache(8, 64)
    kernels_seen = []

    def launches(fn, iters, reps=10):
        counts = _count_launches(fn)
        kernels_seen.append(counts)
        return float(sum(counts.values()))

    monkeypatch.setattr(gpu_bench, "graph_time", launches)
    times = gpu_bench.fused_linear_times(runner, [1, 2], context=20, iters=1)
    layers = cfg.num_layers
    assert set(times) == {1, 2}
    for unfused, fused in times.values():
        assert unfused - fused == 3 * layers  # two norms and a silu-and-mul per layer
    assert "_rms_norm_linear_kernel" not in kernels_seen[0]
    assert kernels_seen[1]["_rms_norm_linear_kernel"] == 2 * layers
    assert runner.fused_norm_linear is False
