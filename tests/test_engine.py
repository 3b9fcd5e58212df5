"""The engine and the offline API on a tiny random model: sampling, n > 1, errors, aborts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_svc import LLM, ContextLengthError, InvalidRequestError, SamplingParams
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=256, num_kv_heads=2)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", num_kv_blocks=128, progress=False)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def test_generate_token_id_prompts_in_order(llm):
    prompts = [_prompt(n, i) for i, n in enumerate((3, 30, 17))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert len(o.outputs[0].token_ids) == 5
        assert o.outputs[0].finish_reason == "length"
        assert o.usage.prompt_tokens == len(o.prompt_token_ids)
        assert o.usage.completion_tokens == 5


def test_greedy_alone_equals_greedy_in_batch(llm):
    p = _prompt(21, 7)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([p], sp)[0].outputs[0].token_ids
    batch = llm.generate([_prompt(40, 1), p, _prompt(5, 2)], sp)[1].outputs[0].token_ids
    assert alone == batch


def test_seeded_sampling_reproducible_alone_and_in_busy_batch(llm):
    p = _prompt(19, 3)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([p], sp)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True)
    busy = (
        llm.generate([_prompt(33, 4), _prompt(8, 5), p, _prompt(50, 6)], [noise, noise, sp, noise])[
            2
        ]
        .outputs[0]
        .token_ids
    )
    assert alone == busy
    other = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99, ignore_eos=True)
    assert llm.generate([p], other)[0].outputs[0].token_ids != alone


def test_n4_siblings_share_prompt_blocks(model_dir):
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, progress=False)
    eng = llm.engine
    prompt = _prompt(50, 11)  # 3 full blocks + 2 tokens
    eng.add_request(
        "p", prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    )
    eng.step()  # all four admitted in one step
    # 3 shared full blocks + each sibling's own partial last block.
    assert eng.block_manager.num_used_blocks() == 3 + 4
    tables = [eng.block_manager.block_table(f"p#{i}") for i in range(4)]
    assert all(t[:3] == tables[0][:3] for t in tables)
    assert len({t[3] for t in tables}) == 4
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.num_used_blocks() == 0


def test_n4_outputs_and_usage(llm):
    p = _prompt(40, 12)
    out = llm.generate(
        [p], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 24
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # siblings differ
    assert out.usage.cached_tokens >= 3 * 32  # siblings 1..3 reuse the 2 full blocks


def test_logprobs_and_prompt_logprobs(llm):
    p = _prompt(10, 13)
    sp = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([p], sp)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp and len(lp) in (3, 4)
        assert lp[tok] == pytest.approx(max(lp.values()))  # greedy picks the most likely
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    assert all(p[i] in out.prompt_logprobs[i] for i in range(1, len(p)))


def test_min_tokens_and_stop_token_ids(llm):
    p = _prompt(12, 14)
    first = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    stop_tok = first.outputs[0].token_ids[2]
    out = llm.generate(
        [p], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0].outputs[0]
    idx = first.outputs[0].token_ids.index(stop_tok)
    assert out.token_ids == first.outputs[0].token_ids[: idx + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate(
        [p],
        SamplingParams(
            temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[stop_tok], ignore_eos=True
        ),
    )[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


BAD = [
    ([], SamplingParams(), InvalidRequestError, "empty"),
    ([5] * 600, SamplingParams(max_tokens=1), ContextLengthError, "context"),
    ([5] * 500, SamplingParams(max_tokens=100), ContextLengthError, "exceeds"),
    ([5, 999], SamplingParams(), InvalidRequestError, "vocabulary"),
    ([5, -1], SamplingParams(), InvalidRequestError, "vocabulary"),
    ([5], SamplingParams(stop_token_ids=[100000]), InvalidRequestError, "vocabulary"),
    ([5], SamplingParams(logit_bias={4096: 1.0}), InvalidRequestError, "vocabulary"),
    ("text", SamplingParams(), InvalidRequestError, "tokenizer"),
    ([5, 1.5], SamplingParams(), InvalidRequestError, "integers"),
    ([5, "7"], SamplingParams(), InvalidRequestError, "integers"),
    (None, SamplingParams(), InvalidRequestError, "string or a list"),
]


@pytest.mark.parametrize("prompt,sp,err,msg", BAD)
def test_bad_input_raises_typed_error_and_engine_keeps_working(llm, prompt, sp, err, msg):
    with pytest.raises(err, match=msg):
        llm.generate([prompt], sp)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks() == 0
    ok = llm.generate([_prompt(6, 0)], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert len(ok[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(n=0), "n must"),
        (dict(n=10_000), "n must"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(presence_penalty=5), "presence_penalty"),
        (dict(frequency_penalty=float("inf")), "frequency_penalty"),
        (dict(seed=-1), "seed"),
        (dict(logprobs=1000), "logprobs"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["x"] * 100), "stop"),
        (dict(logit_bias={1: 1e9}), "logit_bias"),
    ],
)
def test_absurd_params_rejected(kw, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        SamplingParams(**kw)


def test_random_add_abort_step_ends_with_every_block_free(model_dir):
    """1,000 engine steps of random adds and aborts through the real model."""
    llm = LLM(
        str(model_dir),
        dtype="float32",
        num_kv_blocks=24,
        block_size=8,
        max_num_batched_tokens=32,
        max_num_seqs=6,
        progress=False,
    )
    eng, bm = llm.engine, llm.engine.block_manager
    rng = random.Random(0)
    live: list[str] = []
    for step in range(1000):
        if rng.random() < 0.3:
            rid = f"s{step}"
            n = rng.randint(1, 40)
            prefix = [7] * 16 if rng.random() < 0.4 else []
            sp = SamplingParams(
                temperature=rng.choice([0, 1.0]),
                max_tokens=rng.randint(1, 20),
                n=rng.choice([1, 1, 2]),
            )
            eng.add_request(rid, prefix + _prompt(n, step), sp)
            live.append(rid)
        if live and rng.random() < 0.1:
            eng.abort_request([live.pop(rng.randrange(len(live)))])
        eng.step()
        bm.check_invariants()
        assert eng.last_step.num_tokens <= 32 and eng.last_step.num_seqs <= 6
    eng.abort_request(live)
    assert not eng.has_unfinished_requests()
    assert bm.num_used_blocks() == 0
    assert bm.num_free_blocks() + bm.num_cached_blocks() == 24


def test_numpy_token_ids_accepted(llm):
    np = pytest.importorskip("numpy")
    p = np.array(_prompt(9, 21), dtype=np.int64)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == p.tolist() and len(out.outputs[0].token_ids) == 3


def test_dummy_weights_keep_the_config(model_dir):
    llm = LLM(
        str(model_dir), load_format="dummy", dtype="float32", num_kv_blocks=32, progress=False
    )
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert llm.engine.model_config.vocab_size == 256


def test_hf_directory_loads_without_gguf(model_dir):
    # gguf only converts the default model; a machine without it (a lent GPU box) still serves
    # a Hugging Face directory. Found on the first GPU run, where gguf was not installed.
    code = (
        "import sys; sys.modules['gguf'] = None  # any import of gguf now fails\n"
        "from engine_svc import LLM, SamplingParams\n"
        "llm = LLM(sys.argv[1], dtype='float32', num_kv_blocks=16, progress=False)\n"
        "out = llm.generate([[3, 4]], SamplingParams(max_tokens=2, ignore_eos=True))[0]\n"
        "assert len(out.outputs[0].token_ids) == 2\n"
        "assert 'engine_svc.models.fetch' not in sys.modules\n"
    )
    env = {**os.environ, "PAGEDSERVE_CPU_KERNEL": "0"}
    subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip


def test_a_failed_step_leaves_no_prefix_hits_on_unwritten_blocks(model_dir):
    """Blocks are registered for prefix hits when allocated, before the step writes their KV.
    A step that raises (a CUDA out-of-memory, say) must unregister what it did not write: the
    same prompt afterwards is computed afresh and gives the clean engine's tokens."""
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, progress=False)
    prompt = _prompt(40, 11)  # two full blocks of 16
    sp = SamplingParams(temperature=0, max_tokens=6)
    want = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, progress=False).generate(
        [prompt], sp, use_tqdm=False
    )[0]
    runner = llm.engine.runner
    execute = runner.execute

    def fail_once(sched):
        runner.execute = execute
        raise RuntimeError("simulated failure inside the forward")

    runner.execute = fail_once
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate([prompt], sp, use_tqdm=False)
    assert llm.engine.block_manager.num_cached_blocks() == 0
    got = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert got.usage.cached_tokens == 0
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    again = llm.generate([prompt], sp, use_tqdm=False)[0]  # now written: a real hit
    assert again.usage.cached_tokens == 32
    llm.engine.block_manager.check_invariants()


def test_prompt_logprobs_complete_after_preemptions_mid_prefill(model_dir):
    """A prompt whose prefill is preempted and recomputed (its chunks then fall elsewhere)
    still gets one prompt logprob per token, equal to an undisturbed run's."""
    prompt = _prompt(56, 21)
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    calm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, progress=False)
    want = calm.generate([prompt], sp, use_tqdm=False)[0]
    # 8 blocks of 8 tokens, 8 tokens a step: a decoding neighbour keeps preempting the prompt.
    # (long_prefill_chunk 0: the prompt takes the whole budget, as this schedule needs)
    tight = LLM(str(model_dir), dtype="float32", num_kv_blocks=8, block_size=8,
                max_num_batched_tokens=8, long_prefill_chunk=0, progress=False)  # fmt: skip
    busy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sched, preempted = tight.engine.scheduler, []
    preempt = sched._preempt
    sched._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
    outs = tight.generate([_prompt(9, 22), prompt], [busy, sp], use_tqdm=False)
    assert len(preempted) >= 2
    got = outs[1]
    assert len(got.prompt_logprobs) == len(prompt) == len(want.prompt_logprobs)
    assert got.prompt_logprobs[0] is None
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert g.keys() == w.keys()
        for tok in g:
            assert g[tok] == pytest.approx(w[tok], abs=1e-4)


class _TokenText:
    """A stand-in tokenizer for the stop-string checks: token t reads "[t]", padded to 40
    characters for t in ``long``."""

    def __init__(self, long=()) -> None:
        self.long = set(long)

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"[{t}]" + ("." * 36 if t in self.long else "") for t in ids)


def _stop_llm(model_dir, long=()) -> LLM:
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, progress=False)
    llm.tokenizer = _TokenText(long)
    return llm


def _distinct_greedy(llm, n: int) -> tuple[list[int], list[int]]:
    """A prompt whose first n greedy tokens are all different, and those tokens."""
    for seed in range(100, 200):
        prompt = _prompt(7, seed)
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        ids = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        if len(set(ids)) == n:
            return prompt, ids
    raise AssertionError("no prompt with distinct greedy tokens")


def test_offline_stop_string_in_the_last_token_counts(model_dir):
    llm = _stop_llm(model_dir)
    prompt, ids = _distinct_greedy(llm, 4)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, stop=[f"[{ids[3]}]"])
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop_sequence" and out.token_ids == ids
    assert out.text == "".join(f"[{t}]" for t in ids[:3]) and out.stop_reason == f"[{ids[3]}]"
    # the only token (max_tokens=1): checked too
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, stop=[f"[{ids[0]}]"])
    out = llm.generate([prompt], one, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop_sequence" and out.text == ""


def test_offline_stop_string_at_the_start_of_a_long_token_is_found(model_dir):
    llm = _stop_llm(model_dir)
    prompt, ids = _distinct_greedy(llm, 6)
    llm.tokenizer = _TokenText(long=ids)  # every token 40 characters
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[f"[{ids[2]}]"])
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop_sequence" and out.token_ids == ids[:3]


def test_offline_stop_strings_wait_for_min_tokens(model_dir):
    llm = _stop_llm(model_dir)
    prompt, ids = _distinct_greedy(llm, 5)
    sp = SamplingParams(temperature=0, max_tokens=5, min_tokens=3, ignore_eos=True,
                        stop=[f"[{ids[0]}]", f"[{ids[3]}]"])  # fmt: skip
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    # the first stop string came before min_tokens: ignored, and not where the text is cut
    assert out.finish_reason == "stop_sequence" and out.token_ids == ids[:4]
    assert out.text == "".join(f"[{t}]" for t in ids[:3]) and out.stop_reason == f"[{ids[3]}]"


def _cfg(**extra) -> dict:
    return {"architectures": ["MistralForCausalLM"], "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 32768, **extra}  # fmt: skip


def test_sliding_window_models_are_capped_at_the_window(caplog):
    """This engine attends to the whole context: exact only within a sliding window, so a
    model that uses one (Mistral 7B v0.1) gets the window as its context, with a warning."""
    from engine_svc.models.config import ModelConfig

    assert ModelConfig.from_dict(_cfg(sliding_window=4096)).max_position_embeddings == 4096
    assert "sliding-window" in caplog.text
    # none, a window as long as the context, or one the model does not use: no cap
    for extra in ({}, {"sliding_window": None}, {"sliding_window": 32768},
                  {"sliding_window": 4096, "use_sliding_window": False}):  # fmt: skip
        assert ModelConfig.from_dict(_cfg(**extra)).max_position_embeddings == 32768


def test_unsupported_rope_and_too_long_max_model_len_are_refused_before_loading(tmp_path):
    import json

    from engine_svc.models.config import ModelConfig
    from protos.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="'yarn' is not supported"):
        ModelConfig.from_dict(_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    (tmp_path / "config.json").write_text(json.dumps(_cfg(max_position_embeddings=64)))
    # no weights in the directory: refused before any would be read
    with pytest.raises(InvalidRequestError, match="exceeds the model's context of 64"):
        LLM(str(tmp_path), max_model_len=65, progress=False)


def test_offline_stop_string_ending_in_a_character_split_across_tokens(model_dir):
    """A byte-level character split over two tokens decodes as U+FFFD until its last byte:
    the stop string it ends is found when the second token completes it."""
    llm = _stop_llm(model_dir)
    prompt, ids = _distinct_greedy(llm, 4)
    first, second = ids[1], ids[2]

    class Split(_TokenText):
        def decode(self, toks, skip_special_tokens=True) -> str:
            out, i = [], 0
            while i < len(toks):
                if toks[i] == first:
                    done = i + 1 < len(toks) and toks[i + 1] == second
                    out.append("\u597d" if done else "\ufffd")
                    i += 2 if done else 1
                else:
                    out.append(f"[{toks[i]}]")
                    i += 1
            return "".join(out)

    llm.tokenizer = Split()
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, stop=["\u597d"])
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop_sequence" and out.token_ids == ids[:3]
    assert out.text == f"[{ids[0]}]"
