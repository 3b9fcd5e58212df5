"""CUDA-only checks (skipped without a GPU): compiled kernels on long contexts against the
references, every captured decode graph against eager execution, and greedy output of the
CUDA engine against the CPU engine. ``tests/test_kernels.py`` also runs compiled on a GPU.

Run on a GPU machine:  python -m pytest -q -m gpu tests/
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_svc import LLM, SamplingParams
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _paged_inputs(query_lens, seq_lens, heads, head_size, block_size, dtype, gen):
    num_heads, kv_heads = heads
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 8
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in blocks:
        tables.append(perm[i : i + n] + [0] * (max(blocks) - n))
        i += n
    kc = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    i32 = dict(dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], **i32)
    return q, kc, vc, torch.tensor(tables, **i32), torch.tensor(seq_lens, **i32), starts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_compiled_attention_long_contexts(dtype, num_splits, block_size, gen):
    from kernels import reference, triton_ops

    # Llama-3-8B attention shape; long decodes, and a prefill chunk after a long cached prefix
    query_lens = [1, 1, 1, 700, 1]
    seq_lens = [4000, 1, 2049, 2200, 513]
    args = _paged_inputs(query_lens, seq_lens, (32, 8), 128, block_size, dtype, gen)
    want = reference.paged_attention(*args, 128**-0.5)
    out = torch.full_like(args[0], float("nan")).cuda()
    got = triton_ops.paged_attention(*[a.cuda() for a in args], 128**-0.5, out, num_splits)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gpu"), num_heads=8, num_kv_heads=2)


@pytest.mark.parametrize("fused", ["0", "1"], ids=["unfused", "fused"])
def test_graph_replay_equals_eager_for_every_captured_size(tiny_dir, fused, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_FUSED_NORM_LINEAR", fused)
    llm = LLM(str(tiny_dir), device="cuda", dtype="float32", num_kv_blocks=1024,
              max_num_seqs=32, progress=False)  # fmt: skip
    runner = llm.engine.runner
    assert runner.fused_norm_linear == (fused == "1")
    graphs = runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16, 24, 32]
    g = torch.Generator(device="cuda").manual_seed(0)
    runner.kv_caches.normal_(generator=g)
    bs = runner.block_size
    for size in graphs.sizes:
        for n in sorted({size, max(1, size - 3)}):  # exact and padded batches
            lens = torch.randint(1, 400, (n,), generator=g, device="cuda")
            width = int(lens.max().item()) // bs + 1
            tables = torch.randperm(1024, device="cuda")[: n * width].view(n, width).int()
            ids = torch.randint(0, 256, (n,), generator=g, device="cuda")
            pos = (lens - 1).long()
            slots = tables.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
            got = graphs.replay(ids, pos, slots, lens.int(), tables).clone()
            # eager on the very buffers the graph read (padding included)
            want = runner._forward(graphs.batch_view(graphs.padded_size(n)))[:n]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    "enforce_eager,fused", [(False, "0"), (True, "0"), (False, "1")],
    ids=["graphs", "eager", "graphs-fused"],
)  # fmt: skip
def test_gpu_greedy_equals_cpu_greedy(tiny_dir, enforce_eager, fused, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_FUSED_NORM_LINEAR", fused)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 37, 90, 1, 64, 12)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(dtype="float32", num_kv_blocks=256, progress=False, max_num_batched_tokens=48)
    cpu = LLM(str(tiny_dir), device="cpu", **common).generate(prompts, sp, use_tqdm=False)
    gpu_llm = LLM(str(tiny_dir), device="cuda", enforce_eager=enforce_eager, **common)
    gpu = gpu_llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_gpu_kv_cache_sized_by_profile(tiny_dir):
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(str(tiny_dir), device="cuda", gpu_memory_utilization=0.3, progress=False)
    runner = llm.engine.runner
    kv_bytes = runner.kv_caches.numel() * runner.kv_caches.element_size()
    assert llm.engine.block_manager.num_blocks == runner.kv_caches.shape[2]
    assert 0.1 * total < kv_bytes < 0.3 * total
