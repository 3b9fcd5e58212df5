"""The default model (SmolLM2-135M-Instruct) end to end: greedy output equals transformers'."""

from __future__ import annotations

import pytest
import torch

from engine_svc import LLM, SamplingParams
from engine_svc.models.fetch import fetch_default_model

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5,",
    "Translate to French: I would like a cup of coffee, please.",
    "The three laws of thermodynamics are",
    "Q: Why is the sky blue?\nA:",
    "Paged attention splits the KV cache into fixed-size blocks so that " * 6,  # ~80 tokens
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def model_dir():
    return fetch_default_model(progress=False)


@pytest.fixture(scope="module")
def hf_greedy(model_dir):
    """transformers' greedy continuation of each prompt, one at a time, float32."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out.append((ids[0].tolist(), _hf_greedy_ignore_eos(model, ids, NEW_TOKENS)))
    return out


def _hf_greedy_ignore_eos(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding with transformers' forward and KV cache, EOS not ending the sequence
    (as ignore_eos does; generate()'s min_new_tokens would forbid EOS instead)."""
    import inspect

    # transformers 5.x renamed the cache argument (past_key_values -> cache).
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    cache, cur, new = None, ids, []
    for _ in range(n):
        out = model(input_ids=cur, use_cache=True, **{cache_kw: cache})
        cache = out[cache_kw]
        new.append(int(out.logits[0, -1].argmax()))
        cur = torch.tensor([[new[-1]]])
    return new


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", progress=False)


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_tokenizer_matches_transformers(llm, hf_greedy):
    assert [llm.tokenizer.encode(p) for p in PROMPTS] == [ids for ids, _ in hf_greedy]


def test_each_prompt_alone_matches(llm, hf_greedy):
    for p, (_, want) in zip(PROMPTS, hf_greedy):
        got = llm.generate([p], GREEDY)[0].outputs[0].token_ids
        assert got == want, p


def test_all_prompts_in_one_batch_match(llm, hf_greedy):
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [w for _, w in hf_greedy]
    assert [o.usage.completion_tokens for o in outs] == [NEW_TOKENS] * len(PROMPTS)


def test_batch_under_preemption_matches(model_dir, hf_greedy):
    # 20 blocks of 16 = 320 token slots for 8 sequences that grow to ~70-150 tokens each.
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=20, progress=False)
    preemptions = 0
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"p{i}", llm.tokenizer.encode(p), GREEDY)
    reqs = dict(eng.scheduler.requests)
    while eng.has_unfinished_requests():
        eng.step()
        preemptions += eng.last_step.num_preempted
        eng.block_manager.check_invariants()
    assert preemptions > 0
    got = [reqs[f"p{i}"].output_token_ids for i in range(len(PROMPTS))]
    assert got == [w for _, w in hf_greedy]
    assert eng.block_manager.num_used_blocks() == 0


def test_chat_stops_at_end_of_turn(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=200),
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == llm.tokenizer.token_id("<|im_end|>")
    assert "Paris" in out.text


def test_prefix_cache_hit_reports_cached_tokens_and_same_output(llm):
    prefix = "You are a helpful assistant. Answer briefly and precisely. " * 4
    first = llm.generate([prefix + "What is 2+2?"], GREEDY)[0]
    assert first.usage.prompt_tokens > 48
    again = llm.generate([prefix + "What is 2+2?"], GREEDY)[0]
    assert again.usage.cached_tokens >= 48
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
