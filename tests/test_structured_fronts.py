"""Structured output through both fronts of a real ``pagedserve up`` (default model): gRPC
``response_format`` on Generate and Chat, and on HTTP OpenAI's ``response_format`` (through the
official client) and vLLM's ``structured_outputs`` / ``guided_*``. Outputs match their spec;
a bad spec is INVALID_ARGUMENT / 400 with llguidance's message before anything streams."""

from __future__ import annotations

import json
import re

import grpc
import openai
import pytest

from tests.serving_stack import REPO, collect, pb, start_stack, stop_stack, stub
from tests.test_structured_output import PAINT

jsonschema = pytest.importorskip("jsonschema")

MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
GRAMMAR = """
start: "The answer is " answer "."
answer: NUMBER | WORD
NUMBER: /[0-9]{1,4}/
WORD: /[a-z]{1,10}/
"""
PHONE = r"[0-9]{3}-[0-9]{4}"
BAD_SCHEMA = {"type": "foo"}
BAD_SCHEMA_MESSAGE = "bad json_schema: Invalid type: foo"
ASK_PAINT = [{"role": "user", "content": "Which paint colour and how many cans? Answer in JSON."}]
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # The stack's processes import this checkout's code, whatever is installed.
    s = start_stack(tmp_path_factory.mktemp("stack"), env={"PYTHONPATH": str(REPO)})
    yield s
    assert stop_stack(s) == 0, s.log()


@pytest.fixture()
def client(stack):
    with openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0) as c:
        yield c


def _generate(stack, req: pb.GenerateRequest | pb.ChatRequest):
    """(text, finish reason) of one greedy gRPC call with one output."""
    req.temperature = 0.0
    req.max_tokens = 64
    with stack.channel() as ch:
        s = stub(ch)
        call = s.Chat if isinstance(req, pb.ChatRequest) else s.Generate
        out = collect(call(req, metadata=stack.auth, timeout=120))
    assert list(out) == [0]
    return out[0]["text"], out[0]["final"].finish_reason


# -- gRPC --------------------------------------------------------------------------------------


def test_grpc_generate_and_chat_follow_a_json_schema(stack):
    fmt = pb.ResponseFormat(json_schema=json.dumps(PAINT))
    gen = pb.GenerateRequest(text="Paint order as JSON:", response_format=fmt)
    chat = pb.ChatRequest(
        messages=[pb.ChatMessage(**m) for m in ASK_PERSON],
        response_format=pb.ResponseFormat(json_schema=json.dumps(PERSON)),
    )
    for req, schema in ((gen, PAINT), (chat, PERSON)):
        text, finish = _generate(stack, req)
        assert finish == pb.STOP, text
        jsonschema.validate(json.loads(text), schema)


YES_NO = "Is the sky blue? Give a phone number."
OK = 'Give a JSON object with one key "ok" set to true.'


@pytest.mark.parametrize(
    ("fmt", "ask", "check"),
    [
        (pb.ResponseFormat(regex=PHONE), YES_NO, lambda t: re.fullmatch(PHONE, t)),
        (
            pb.ResponseFormat(choice=pb.Choices(choices=["yes", "no"])),
            YES_NO,
            lambda t: t in ("yes", "no"),
        ),
        (
            pb.ResponseFormat(grammar=GRAMMAR),
            YES_NO,
            lambda t: re.fullmatch(r"The answer is ([0-9]{1,4}|[a-z]{1,10})\.", t),
        ),
        (pb.ResponseFormat(json_object=True), OK, lambda t: isinstance(json.loads(t), dict)),
    ],
    ids=["regex", "choice", "grammar", "json_object"],
)
def test_grpc_chat_follows_regex_choice_grammar_and_json_object(stack, fmt, ask, check):
    messages = [pb.ChatMessage(role="user", content=ask)]
    text, finish = _generate(stack, pb.ChatRequest(messages=messages, response_format=fmt))
    assert finish == pb.STOP, text
    assert check(text), text


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (pb.ResponseFormat(json_schema=json.dumps(BAD_SCHEMA)), BAD_SCHEMA_MESSAGE),
        (pb.ResponseFormat(regex="(["), "unclosed character class"),
        (pb.ResponseFormat(grammar="start: undefined_rule"), "bad grammar: "),
        (pb.ResponseFormat(json_schema="{nope"), "json_schema is not valid JSON"),
        (pb.ResponseFormat(json_object=False), "response_format.json_object must be true"),
        (pb.ResponseFormat(), "response_format needs one of"),
    ],
    ids=["schema", "regex", "grammar", "not-json", "json_object-false", "empty"],
)
def test_grpc_bad_spec_is_invalid_argument_before_the_stream(stack, fmt, message):
    req = pb.GenerateRequest(text="Hello", max_tokens=8, response_format=fmt)
    with stack.channel() as ch, pytest.raises(grpc.RpcError) as err:
        list(stub(ch).Generate(req, metadata=stack.auth, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    # still serving
    text, finish = _generate(stack, pb.GenerateRequest(text="Hello", max_tokens=4))
    assert finish == pb.LENGTH and text


# -- HTTP: the official client -----------------------------------------------------------------


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def test_openai_chat_json_schema_whole_and_streamed(client):
    fmt = _json_schema_format(PAINT)
    kw = dict(model=MODEL, messages=ASK_PAINT, max_tokens=64, temperature=0, response_format=fmt)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    whole = r.choices[0].message.content
    jsonschema.validate(json.loads(whole), PAINT)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_json_object_and_completions_json_schema(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK_PERSON,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(
        model=MODEL,
        prompt="A person as JSON:",
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": _json_schema_format(PERSON)},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_vllm_structured_outputs_and_guided_fields(client):
    ask = [{"role": "user", "content": "Is the sky blue?"}]
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_choice": ["no"]}):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=16, temperature=0, extra_body=extra
        )
        assert r.choices[0].message.content in extra.get("guided_choice", ["yes", "no"])
        assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL,
        prompt="Call me at",
        max_tokens=16,
        temperature=0,
        extra_body={"structured_outputs": {"regex": PHONE}},
    )
    assert re.fullmatch(PHONE, r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_openai_bad_schema_is_a_bad_request_error(client, stream):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_PAINT,
            max_tokens=16,
            response_format=_json_schema_format(BAD_SCHEMA),
            stream=stream,
        )
    assert err.value.status_code == 400
    assert BAD_SCHEMA_MESSAGE in err.value.body["message"]
    assert err.value.body["code"] == "INVALID_ARGUMENT"
    r = client.chat.completions.create(model=MODEL, messages=ASK_PAINT, max_tokens=4)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"choice": ["a"]},
            },
            "structured_outputs",
            "set only one of response_format, structured_outputs",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "response_format.type must"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "response_format.json_schema.schema must be a JSON schema",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "structured_outputs needs exactly one of",
        ),
        (
            {"structured_outputs": {"structural_tag": "{}"}},
            "structured_outputs",
            "structured_outputs.structural_tag is not supported",
        ),
        ({"guided_choice": "yes"}, "guided_choice", "guided_choice must be a list of strings"),
        ({"tools": [{"type": "function"}]}, "tools", "tools is not supported"),
    ],
    ids=["both", "type", "no-schema", "two-kinds", "structural_tag", "choice-str", "tools"],
)
def test_malformed_structured_fields_are_400_with_their_param(client, extra, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=ASK_PAINT, max_tokens=4, extra_body=extra
        )
    assert err.value.body["param"] == param
    assert message in err.value.body["message"]
