"""The model's tokenizer (``tokenizers``) and chat template (Jinja, rendered as HF does)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from protos.errors import InvalidRequestError, ModelLoadError


class TemplateError(InvalidRequestError):
    """The chat template rejected the messages (e.g. roles out of order)."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """The ``tojson`` filter with the keywords Hugging Face's templates may pass."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, path: Path) -> None:
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(tok_file))
        cfg_file = path / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{name, template}]: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path / "chat_template.jinja"  # where newer HF checkpoints keep it
        if not self.chat_template and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self._byte_level = _uses_byte_level(json.loads(tok_file.read_text()).get("decoder"))
        self._bytes_cache: dict[int, bytes] = {}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for, which may be part of a UTF-8 character
        (what OpenAI's logprobs report as ``bytes``): byte-level BPE spells bytes as printable
        characters (GPT-2's table), SentencePiece has ``<0xNN>`` byte tokens and ``▁`` for a
        space; added tokens stand for their own text."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        tok = self._tok.id_to_token(token_id) or ""
        if token_id in self._added_ids:
            out = tok.encode()
        elif self._byte_level:
            out = bytes(_UNICODE_TO_BYTE.get(c, 0x3F) for c in tok)  # '?' for a stray character
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                out = bytes([int(tok[3:5], 16)])
            except ValueError:
                out = tok.encode()
        else:
            out = tok.replace("\u2581", " ").encode()
        if len(self._bytes_cache) < 1 << 20:
            self._bytes_cache[token_id] = out
        return out

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of B bytes has at least
        B / max_token_bytes tokens, which bounds a prompt's length before tokenizing it."""
        return max(1, max(len(self.token_bytes(i)) for i in range(self.vocab_size)))

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt instead"
            )
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        for m in messages:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise InvalidRequestError("each message needs a string 'role' and 'content'")
        if not messages:
            raise InvalidRequestError("messages is empty")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}") from e

    def chat_stop_token_ids(self) -> list[int]:
        """End-of-turn tokens that templates use besides EOS (e.g. <|im_end|>, <|eot_id|>)."""
        ids = []
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            i = self._tok.token_to_id(t)
            if i is not None:
                ids.append(i)
        return ids


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the others for
    the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _uses_byte_level(decoder: dict | None) -> bool:
    """Whether tokenizer.json's decoder (or one in its Sequence) is ByteLevel."""
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(d) for d in decoder.get("decoders") or ())


def _token_str(tok: object) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None
