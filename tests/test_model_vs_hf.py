"""Our paged model against Hugging Face transformers on tiny random checkpoints.

For prefill (every prompt position) and for each decode step, the logits the engine computes
through the paged KV cache must match transformers' logits for the same token sequence.
"""

from __future__ import annotations

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from protos.sampling import SamplingParams
from tests.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

VARIANTS = {
    "llama-gqa-untied": dict(num_heads=4, num_kv_heads=2),
    "llama-mha-tied": dict(num_heads=4, num_kv_heads=4, tie=True),
    "llama-mqa-bias": dict(num_heads=4, num_kv_heads=1, qkv_bias=True),
    "llama3-rope-scaling": dict(num_heads=4, num_kv_heads=2, rope_scaling=LLAMA3_ROPE),
    "qwen2-qkv-bias-tied": dict(arch="qwen2", num_heads=4, num_kv_heads=2, tie=True),
    "llama-head128": dict(num_heads=2, num_kv_heads=1, head_dim=128, num_layers=1),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), dtype="float32", num_kv_blocks=64, block_size=16, progress=False)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@torch.inference_mode()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def _run_and_compare(eng: LLMEngine, hf, prompts: list[list[int]], steps: int) -> int:
    """Drive the engine step by step; compare every logit row it produces with transformers."""
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    compared = 0
    while eng.has_unfinished_requests():
        sched = eng.scheduler.schedule()
        out = eng.runner.execute(sched)
        for s in sched.seqs:
            req = s.request
            got = out.prompt_logits.get(req.request_id)
            if got is None:
                continue
            start = req.num_computed_tokens
            want = _hf_logits(hf, req.all_token_ids)[start : start + s.num_new_tokens]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            compared += got.shape[0]
        sampled = {}
        # A step of prompt chunks that all stop short of their prompt's end samples nothing.
        rows = zip(out.sample_seqs, out.sample_logits, strict=True) if out.sample_seqs else ()
        for s, logits in rows:
            want = _hf_logits(hf, s.request.all_token_ids)[-1]
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
            sampled[s.request.request_id] = int(want.argmax())
            compared += 1
        eng.scheduler.update(sched, sampled)
    return compared


def test_single_prompt_prefill_and_decode(tiny):
    path, hf = tiny
    eng = _engine(path)
    prompt = [5, 17, 99, 3, 250, 8, 8, 42, 7, 100, 31, 64, 12, 1, 200, 33, 9, 77]  # > one block
    assert _run_and_compare(eng, hf, [prompt], steps=20) == len(prompt) + 20


def test_mixed_batch_with_chunked_prefill(tiny):
    """Three prompts of different lengths, a token budget that forces chunks and mixed steps."""
    path, hf = tiny
    eng = _engine(path, max_num_batched_tokens=24)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 40, 23)]
    compared = _run_and_compare(eng, hf, prompts, steps=12)
    assert compared == sum(len(p) for p in prompts) + 3 * 12
    assert eng.block_manager.num_used_blocks() == 0


def test_prefix_cached_continuation_matches(tiny):
    """A second request reusing cached blocks still produces transformers' logits."""
    path, hf = tiny
    eng = _engine(path)
    prefix = list(range(10, 10 + 48))
    _run_and_compare(eng, hf, [prefix + [3, 4]], steps=2)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    (req,) = eng.add_request("second", prefix + [5, 6, 7], params)
    sched = eng.scheduler.schedule()
    assert req.num_cached_tokens == 48 and sched.seqs[0].num_new_tokens == 3
    out = eng.runner.execute(sched)
    want = _hf_logits(hf, prefix + [5, 6, 7])[-1]
    torch.testing.assert_close(out.sample_logits[0], want, rtol=1e-4, atol=1e-4)


def test_bf16_close_to_reference(tiny):
    """bf16 run stays within bf16 tolerance of the fp32 transformers logits."""
    path, hf = tiny
    eng = _engine(path, dtype="bfloat16")
    prompt = [5, 17, 99, 3, 250, 8, 8, 42, 7, 100, 31, 64, 12, 1, 200, 33, 9, 77]
    eng.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    sched = eng.scheduler.schedule()
    out = eng.runner.execute(sched)
    want = _hf_logits(hf, prompt)
    got = out.prompt_logits["b"]
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 0.05
