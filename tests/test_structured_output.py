"""Structured output (llguidance) against the real default model: every output matches its
schema, regex, choice or grammar; constrained rows leave the rest of the batch as it was;
seeds, n > 1, stop strings, max_tokens and preemption keep working; bad specs fail at
submission with the library's message."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engine_svc import LLM, SamplingParams
from engine_svc.models.fetch import fetch_default_model
from engine_svc.sampler import TokenMask, apply_token_mask
from protos.convert import params_from_proto, params_to_proto
from protos.errors import InvalidRequestError
from protos.sampling import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "address"],
    "additionalProperties": False,
}
DIGITS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1, "maximum": 9},
    "minItems": 2,
    "maxItems": 4,
}
PAINT = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 50},
        "sunny": {"type": "boolean"},
    },
    "required": ["temperature", "sunny"],
    "additionalProperties": False,
}
SCHEMAS = [PERSON, DIGITS, PAINT, WEATHER]
ASK = [
    "Describe a person who lives in Paris as JSON.",
    "List a few small numbers as a JSON array.",
    "Which paint colour and how many cans? Answer in JSON.",
    "What is the weather today? Answer in JSON.",
]
GRAMMAR = """
start: "The answer is " answer "."
answer: NUMBER | WORD
NUMBER: /[0-9]{1,4}/
WORD: /[a-z]{1,10}/
"""


@pytest.fixture(scope="module")
def llm():
    return LLM(str(fetch_default_model(progress=False)), dtype="float32", progress=False)


def _chat_ids(llm: LLM, question: str) -> list[int]:
    tok = llm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}])
    return tok.encode(text, add_special_tokens=False)


def _greedy(so: StructuredOutput | None, max_tokens: int = 120, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=so, **kw)


def test_json_schemas_validate(llm):
    prompts = [_chat_ids(llm, q) for q in ASK]
    params = [_greedy(StructuredOutput(json_schema=s)) for s in SCHEMAS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, schema in zip(outs, SCHEMAS, strict=True):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)


def test_json_object_regex_choice_and_grammar(llm):
    specs = [
        StructuredOutput(json_object=True),
        StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,5}"),
        StructuredOutput(choice=["red", "green", "blue"]),
        StructuredOutput(grammar=GRAMMAR),
    ]
    answer = 'Reply with a JSON object with one key, "answer", whose value is 4: what is 2 + 2?'
    prompts = [_chat_ids(llm, q) for q in (answer, "A code:", "Sky colour?", "2 + 2?")]
    outs = [o.outputs[0] for o in llm.generate(prompts, [_greedy(s) for s in specs], False)]
    assert [o.finish_reason for o in outs] == ["stop"] * 4
    assert json.loads(outs[0].text) == {"answer": 4}
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", outs[1].text)
    assert outs[2].text in ("red", "green", "blue")
    assert re.fullmatch(r"The answer is ([0-9]{1,4}|[a-z]{1,10})\.", outs[3].text)


def test_unconstrained_row_unchanged_by_a_constrained_neighbour(llm):
    plain = _chat_ids(llm, "Tell me about the sea.")
    alone = llm.generate([plain], _greedy(None, 40), use_tqdm=False)[0].outputs[0]
    mixed = llm.generate(
        [plain, _chat_ids(llm, ASK[2])],
        [_greedy(None, 40), _greedy(StructuredOutput(json_schema=PAINT))],
        use_tqdm=False,
    )
    assert mixed[0].outputs[0].token_ids == alone.token_ids
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PAINT)


def test_n2_seeded_reproducible_whatever_the_batch(llm):
    so = StructuredOutput(json_schema=PAINT)
    sp = SamplingParams(n=2, seed=7, temperature=1.0, max_tokens=120, structured_output=so)
    prompt = _chat_ids(llm, ASK[2])
    alone = llm.generate([prompt], sp, use_tqdm=False)[0]
    batched = llm.generate([prompt, _chat_ids(llm, "Hi!")], [sp, _greedy(None, 30)], False)[0]
    assert [o.token_ids for o in batched.outputs] == [o.token_ids for o in alone.outputs]
    for o in alone.outputs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PAINT)


def test_max_tokens_truncates_with_length(llm):
    so = StructuredOutput(json_schema=PERSON)
    o = llm.generate([_chat_ids(llm, ASK[0])], _greedy(so, 6), use_tqdm=False)[0].outputs[0]
    assert (o.finish_reason, len(o.token_ids)) == ("length", 6)
    full = llm.generate([_chat_ids(llm, ASK[0])], _greedy(so), use_tqdm=False)[0].outputs[0]
    assert full.token_ids[:6] == o.token_ids


def test_stop_string_cuts_constrained_output(llm):
    so = StructuredOutput(json_schema=PAINT)
    prompt = _chat_ids(llm, ASK[2])
    full = llm.generate([prompt], _greedy(so), use_tqdm=False)[0].outputs[0]
    cut = llm.generate([prompt], _greedy(so, stop=[":"]), use_tqdm=False)[0].outputs[0]
    assert (cut.finish_reason, cut.stop_reason) == ("stop_sequence", ":")
    assert cut.text == full.text[: full.text.index(":")]


def test_preempted_requests_still_match_their_schema(llm):
    """With 12 blocks of 16 tokens for 4 growing sequences, requests are preempted and
    recompute; each keeps its matcher (its output tokens are kept) and ends as valid JSON,
    token for token what an undisturbed run gives."""
    prompts = [_chat_ids(llm, q) for q in ASK]
    params = [_greedy(StructuredOutput(json_schema=s)) for s in SCHEMAS]
    calm = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    tight = LLM(
        str(fetch_default_model(progress=False)), dtype="float32", num_kv_blocks=12, progress=False
    )
    eng, preemptions = tight.engine, 0
    reqs = [eng.add_request(f"r{i}", p, sp)[0] for i, (p, sp) in enumerate(zip(prompts, params))]
    while eng.has_unfinished_requests():
        eng.step()
        preemptions += eng.last_step.num_preempted
    assert preemptions > 0
    assert [r.output_token_ids for r in reqs] == calm
    for r, schema in zip(reqs, SCHEMAS, strict=True):
        assert r.finish_reason.value == "stop"
        jsonschema.validate(json.loads(tight.tokenizer.decode(r.output_token_ids)), schema)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutput(json_schema={"type": "foo"}), "bad json_schema: Invalid type: foo"),
        (StructuredOutput(regex="(["), "unclosed character class"),
        (StructuredOutput(grammar="start: undefined_rule"), "bad grammar: "),
    ],
)
def test_bad_spec_is_refused_at_submission(llm, spec, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as err:
        llm.generate(["Hello"], _greedy(spec), use_tqdm=False)
    assert err.value.param == "structured_output"
    assert not llm.engine.has_unfinished_requests()


def test_spec_form_is_checked_and_crosses_the_wire():
    with pytest.raises(InvalidRequestError, match="exactly one of .* got \\['regex', 'choice'\\]"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="got none"):
        StructuredOutput()
    with pytest.raises(InvalidRequestError, match="json_schema is not valid JSON"):
        StructuredOutput(json_schema="{nope")
    specs = [
        StructuredOutput(json_schema=PAINT),
        StructuredOutput(json_object=True),
        StructuredOutput(regex="[a-z]+"),
        StructuredOutput(choice=["yes", 'say "no"']),
        StructuredOutput(grammar=GRAMMAR),
    ]
    for so in specs:
        back = params_from_proto(params_to_proto(SamplingParams(structured_output=so)))
        assert back.structured_output == so
    assert params_from_proto(params_to_proto(SamplingParams())).structured_output is None


def test_token_mask_sets_disallowed_tokens_of_its_rows_only():
    """Bit t % 32 of word t // 32 allows token t; rows without a mask are untouched; tokens
    past the mask's width are disallowed."""
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)  # covers 64 of the 70 tokens
    bitmask[0, 0] = 1 << 5
    bitmask[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    bitmask[1, 1] = 1  # token 32
    x = logits.clone()
    apply_token_mask(x, TokenMask([0, 2], bitmask))
    assert torch.equal(x[1], logits[1])
    assert torch.isfinite(x[0]).nonzero().flatten().tolist() == [5, 63]
    assert torch.isfinite(x[2]).nonzero().flatten().tolist() == [32]
    assert torch.equal(x[0, [5, 63]], logits[0, [5, 63]])
