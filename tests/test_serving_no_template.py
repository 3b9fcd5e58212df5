"""A model without a chat template, served end to end: GetModelInfo says so, Chat fails with
a clear INVALID_ARGUMENT, and plain prompts still work. The model is the default one with the
template removed from its tokenizer_config.json (weights linked, not copied)."""

from __future__ import annotations

import json

import grpc
import pytest

from engine_svc.models.fetch import fetch_default_model
from tests.serving_stack import collect, pb, start_stack, stop_stack, stub


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    src = fetch_default_model(progress=False)
    model = tmp_path_factory.mktemp("no_template") / "model"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            (model / f.name).symlink_to(f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    assert cfg.pop("chat_template", None), "the default model should have had a template"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = start_stack(tmp_path_factory.mktemp("stack"), "--model", str(model))
    yield s
    assert stop_stack(s) == 0, s.log()


def test_model_without_chat_template(stack):
    with grpc.insecure_channel(stack.target) as ch:
        client = stub(ch)
        info = client.GetModelInfo(pb.GetModelInfoRequest(), metadata=stack.auth, timeout=30)
        assert not info.has_chat_template
        chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=4)
        with pytest.raises(grpc.RpcError) as err:
            list(client.Chat(chat, metadata=stack.auth, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no chat template" in err.value.details()
        gen = pb.GenerateRequest(text="Hello", max_tokens=4, temperature=0)
        out = collect(client.Generate(gen, metadata=stack.auth, timeout=60))
        assert len(out[0]["token_ids"]) == 4 and out[0]["final"] is not None


def test_chat_template_from_its_own_file(tmp_path):
    """Newer HF checkpoints keep the template in chat_template.jinja, not tokenizer_config."""
    from engine_svc.models.tokenizer import Tokenizer

    src = fetch_default_model(progress=False)
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tmp_path).chat_template is None
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok = Tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<user>Hi<assistant>"


def test_template_tojson_takes_hugging_face_keywords(tmp_path):
    """Templates (tool-calling ones especially) call tojson with sort_keys or separators; our
    filter raised TypeError on them, an INTERNAL error for every Chat request."""
    from engine_svc.models.tokenizer import Tokenizer

    src = fetch_default_model(progress=False)
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m | tojson(sort_keys=True, separators=(',', ':')) }}"
        "{{ m.content | tojson(indent=2) }}{% endfor %}"
    )
    out = Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "é"}])
    assert out == '{"content":"é","role":"user"}"é"'
